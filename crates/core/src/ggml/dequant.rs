//! Dequantisation of ggml blocks to f32, operation for operation as `dequantize_row_*` in
//! llama.cpp's `ggml-quants.c` (and `ggml_cpu_fp16_to_fp32` / `_bf16_to_fp32` for the float
//! types), so the values are llama.cpp's bit for bit. The block layouts are in the comments of
//! each function; all multi-byte fields are little-endian.

// Index loops state the block layouts most plainly.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

use super::{GgmlType, QK_K};

/// Little-endian f16 at `b[i..i + 2]`, widened exactly.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K block's 12 scale bytes
/// (`get_scale_min_k4`): sub-blocks 0..4 keep theirs in the low 6 bits of bytes `j` and
/// `j + 4`; 4..8 take 4 low bits from byte `j + 4` and 2 high bits from the top of bytes
/// `j − 4` (scale) and `j` (min).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The sixteen 6-bit scales of a Q3_K block (unbiased: `0..64`, the value is `s − 32`): low 4
/// bits from bytes 0..8 (low nibbles for scales 0..8, high nibbles for 8..16), 2 high bits from
/// bytes 8..12.
#[inline(always)]
pub(crate) fn scales_q3k(q: &[u8]) -> [u8; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { q[j] & 0xf } else { q[j - 8] >> 4 };
        let high = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        low | (high << 4)
    })
}

/// Dequantises whole blocks of `ty` in `bytes` into `out` (`out.len()` elements).
///
/// # Panics
/// When `ty` is not supported or the lengths do not match.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        ty.bytes_for(out.len()),
        Some(bytes.len()),
        "{ty}: {} bytes for {} elements",
        bytes.len(),
        out.len()
    );
    let blocks = bytes
        .chunks_exact(ty.type_size())
        .zip(out.chunks_exact_mut(ty.block_size()));
    match ty {
        GgmlType::F32 => {
            for (b, o) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = f16_at(b, 0)),
        GgmlType::BF16 => blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| q4_0(b, o)),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| q4_1(b, o)),
        GgmlType::Q5_0 => blocks.for_each(|(b, o)| q5_0(b, o)),
        GgmlType::Q5_1 => blocks.for_each(|(b, o)| q5_1(b, o)),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| q8_0(b, o)),
        GgmlType::Q2K => blocks.for_each(|(b, o)| q2_k(b, o)),
        GgmlType::Q3K => blocks.for_each(|(b, o)| q3_k(b, o)),
        GgmlType::Q4K => blocks.for_each(|(b, o)| q4_k(b, o)),
        GgmlType::Q5K => blocks.for_each(|(b, o)| q5_k(b, o)),
        GgmlType::Q6K => blocks.for_each(|(b, o)| q6_k(b, o)),
        _ => panic!("dequantize: {ty} is not supported"),
    }
}

/// Q4_0, 18 bytes: `d` f16, `qs[16]`; element `j < 16` is the low nibble of `qs[j]`, element
/// `j + 16` its high nibble; value `(nibble − 8) · d`.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0xf) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1, 20 bytes: `d`, `m` f16, `qs[16]` as Q4_0; value `nibble · d + m`.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0xf) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The fifth bit of each of a Q5 block's 32 elements: bit `j` of the little-endian `u32`.
#[inline(always)]
fn qh32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Q5_0, 22 bytes: `d` f16, `qh` u32 (bit `j` is element `j`'s fifth bit), `qs[16]` as Q4_0;
/// value `(nibble | bit << 4) − 16`, times `d`.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = qh32(b, 2);
    for j in 0..16 {
        let q = b[6 + j];
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = (((q & 0xf) as i32 | h0) - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as i32 | h1) - 16) as f32 * d;
    }
}

/// Q5_1, 24 bytes: `d`, `m` f16, `qh` u32, `qs[16]`; value `(nibble | bit << 4) · d + m`.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = qh32(b, 4);
    for j in 0..16 {
        let q = b[8 + j];
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        y[j] = ((q & 0xf) as i32 | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) as i32 | h1) as f32 * d + m;
    }
}

/// Q8_0, 34 bytes: `d` f16, `qs[32]` i8; value `q · d`.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q2_K, 84 bytes: `scales[16]` (low nibble: scale, high nibble: min, one per 16 elements),
/// `qs[64]`, `d`, `dmin` f16. Element `128n + 32j + l` (`l < 32`) is bits `2j..2j+2` of
/// `qs[32n + l]`; value `d·sc · q − dmin·m`.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (sc, qs) = (&b[..16], &b[16..80]);
    let (d, min) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    let mut o = 0;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let s = sc[is];
                is += 1;
                let (dl, ml) = (d * (s & 0xf) as f32, min * (s >> 4) as f32);
                for l in 0..16 {
                    y[o] = dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                    o += 1;
                }
            }
        }
    }
}

/// Q3_K, 110 bytes: `hmask[32]`, `qs[64]`, `scales[12]` (sixteen 6-bit scales, see
/// [`scales_q3k`]), `d` f16. Element `128n + 32j + l` has low bits `2j..2j+2` of `qs[32n + l]`
/// and high bit `4n + j` of `hmask[l]`; value `d · (s − 32) · (q − (high ? 0 : 4))`.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hm, qs) = (&b[..32], &b[32..96]);
    let scales = scales_q3k(&b[96..108]);
    let d_all = f16_at(b, 108);
    let mut is = 0;
    let mut o = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 16 * half..16 * half + 16 {
                    let low = ((q[l] >> shift) & 3) as i32;
                    let sub = if hm[l] & m != 0 { 0 } else { 4 };
                    y[o] = dl * (low - sub) as f32;
                    o += 1;
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// Q4_K, 144 bytes: `d`, `dmin` f16, `scales[12]` (eight 6-bit scales and mins, see
/// [`scale_min_k4`]), `qs[128]`. Element `64j + l` is the low nibble of `qs[32j + l]`, element
/// `64j + 32 + l` its high nibble; value `d·sc · q − dmin·m` per 32 elements.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, qs) = (&b[4..16], &b[16..144]);
    for j in 0..QK_K / 64 {
        let (s1, m1) = scale_min_k4(2 * j, sc);
        let (s2, m2) = scale_min_k4(2 * j + 1, sc);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let q = &qs[32 * j..32 * j + 32];
        for l in 0..32 {
            y[64 * j + l] = d1 * (q[l] & 0xf) as f32 - m1;
            y[64 * j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K, 176 bytes: `d`, `dmin` f16, `scales[12]` as Q4_K, `qh[32]`, `qs[128]` as Q4_K; the
/// fifth bit of element `64j + l` is bit `2j` of `qh[l]`, of `64j + 32 + l` bit `2j + 1`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for j in 0..QK_K / 64 {
        let (s1, m1) = scale_min_k4(2 * j, sc);
        let (s2, m2) = scale_min_k4(2 * j + 1, sc);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let (u1, u2) = (1u8 << (2 * j), 1u8 << (2 * j + 1));
        let q = &qs[32 * j..32 * j + 32];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[64 * j + l] = d1 * ((q[l] & 0xf) + h1) as f32 - m1;
            y[64 * j + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K, 210 bytes: `ql[128]` (low 4 bits), `qh[64]` (high 2 bits), `scales[16]` i8 (one per
/// 16 elements), `d` f16. In each half `n` (128 elements; `ql` from `64n`, `qh` from `32n`),
/// for `l < 32`: element `l` is `ql[l]` low | `qh[l]` bits 0..2, `l + 32` is `ql[l + 32]` low |
/// bits 2..4, `l + 64` is `ql[l]` high | bits 4..6, `l + 96` is `ql[l + 32]` high | bits 6..8;
/// value `d · sc · (q − 32)`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let yo = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| (sc[i] as i8) as f32;
            yo[l] = d * s(is) * q1 as f32;
            yo[l + 32] = d * s(is + 2) * q2 as f32;
            yo[l + 64] = d * s(is + 4) * q3 as f32;
            yo[l + 96] = d * s(is + 6) * q4 as f32;
        }
    }
}
