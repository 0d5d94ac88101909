//! The scalar definitions of the ggml dot products: what every kernel path computes, and the
//! twin the tests compare them with.
//!
//! Each block contributes an exact integer sum times f32 scales, as in ggml-cpu's
//! `ggml_vec_dot_*` (the `_generic` versions in `ggml-cpu/quants.c` state the formulas):
//!
//! ```text
//! Q4_0, Q5_0, Q8_0 · Q8_0:  Σ_b  (d_w·d_x) · Σ_j q_w·q_x                       (q_w signed)
//! Q4_1, Q5_1 · Q8_1:        Σ_b  (d_w·d_x) · Σ_j q_w·q_x  +  m_w·s_x           (q_w unsigned)
//! Q2_K … Q6_K · Q8_K:       Σ_B  (d_w·d_x) · Σ_sub sc·Σ_j q_w·q_x  −  (dmin_w·d_x) · Σ_sub m·bsum
//! ```
//!
//! with, per super-block, `q_w` and the sub-block scales `sc` / mins `m` as
//! [`dequantize`](super::dequantize) decodes them (Q3_K: `q ∈ [−4, 3]`, `sc ∈ [−32, 31]`; Q6_K:
//! `q ∈ [−32, 31]`, `sc` int8; the others unsigned). This file sums blocks in order; kernels
//! sum in other orders, hence [`rounding_bound`].

// Index loops state the block layouts most plainly.
#![allow(clippy::needless_range_loop)]

use super::act::ActRow;
use super::dequant::{f16_at, scale_min_k4, scales_q3k};
use super::{DotType, GgmlType, QK_K};

/// A k-quant super-block decoded for the dot product: values `q` (offset applied), one scale per
/// 16 values, one min per 16 values (zero for types without mins), and the f16 scales widened.
pub(crate) struct KBlock {
    pub q: [i8; QK_K],
    pub sc: [i16; 16],
    pub m: [i16; 16],
    pub d: f32,
    pub dmin: f32,
}

/// Decodes super-block `b` (`ty.type_size()` bytes) of a k-quant type.
pub(crate) fn decode_k(ty: GgmlType, b: &[u8]) -> KBlock {
    let mut k = KBlock {
        q: [0; QK_K],
        sc: [0; 16],
        m: [0; 16],
        d: 0.0,
        dmin: 0.0,
    };
    match ty {
        GgmlType::Q2K => {
            let qs = &b[16..80];
            for e in 0..QK_K {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                k.q[e] = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
            }
            for s in 0..16 {
                k.sc[s] = (b[s] & 0xf) as i16;
                k.m[s] = (b[s] >> 4) as i16;
            }
            k.d = f16_at(b, 80);
            k.dmin = f16_at(b, 82);
        }
        GgmlType::Q3K => {
            let (hm, qs) = (&b[..32], &b[32..96]);
            for e in 0..QK_K {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
                let high = (hm[l] >> (4 * n + j)) & 1;
                k.q[e] = low - if high != 0 { 0 } else { 4 };
            }
            let s = scales_q3k(&b[96..108]);
            for i in 0..16 {
                k.sc[i] = s[i] as i16 - 32;
            }
            k.d = f16_at(b, 108);
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let sc = &b[4..16];
            let five = ty == GgmlType::Q5K;
            let qs = if five { &b[48..176] } else { &b[16..144] };
            for e in 0..QK_K {
                let (j, hi, l) = (e / 64, (e % 64) / 32, e % 32);
                let byte = qs[32 * j + l];
                let mut v = if hi == 1 { byte >> 4 } else { byte & 0xf };
                if five && (b[16 + l] >> (2 * j + hi)) & 1 != 0 {
                    v += 16;
                }
                k.q[e] = v as i8;
            }
            for sub in 0..8 {
                let (s, m) = scale_min_k4(sub, sc);
                k.sc[2 * sub] = s as i16;
                k.sc[2 * sub + 1] = s as i16;
                k.m[2 * sub] = m as i16;
                k.m[2 * sub + 1] = m as i16;
            }
            k.d = f16_at(b, 0);
            k.dmin = f16_at(b, 2);
        }
        GgmlType::Q6K => {
            for e in 0..QK_K {
                let (n, part, l) = (e / 128, (e % 128) / 32, e % 32);
                let ql = b[64 * n + l + 32 * (part % 2)];
                let low = if part >= 2 { ql >> 4 } else { ql & 0xf };
                let high = (b[128 + 32 * n + l] >> (2 * part)) & 3;
                k.q[e] = (low | (high << 4)) as i8 - 32;
            }
            for i in 0..16 {
                k.sc[i] = (b[192 + i] as i8) as i16;
            }
            k.d = f16_at(b, 208);
        }
        _ => unreachable!("decode_k of {ty}"),
    }
    k
}

/// A legacy (32-value) block decoded: values `q` (signed for Q4_0 / Q5_0 / Q8_0, unsigned for
/// Q4_1 / Q5_1), `d`, and `m` (zero without a min).
pub(crate) fn decode_32(ty: GgmlType, b: &[u8]) -> ([i8; 32], f32, f32) {
    let mut q = [0i8; 32];
    let (d, m) = match ty {
        GgmlType::Q8_0 => {
            for j in 0..32 {
                q[j] = b[2 + j] as i8;
            }
            (f16_at(b, 0), 0.0)
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (at, off) = if ty == GgmlType::Q4_0 { (2, 8) } else { (4, 0) };
            for j in 0..16 {
                q[j] = (b[at + j] & 0xf) as i8 - off;
                q[j + 16] = (b[at + j] >> 4) as i8 - off;
            }
            let m = if ty == GgmlType::Q4_1 { f16_at(b, 2) } else { 0.0 };
            (f16_at(b, 0), m)
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (hat, at, off) = if ty == GgmlType::Q5_0 {
                (2, 6, 16)
            } else {
                (4, 8, 0)
            };
            let qh = u32::from_le_bytes([b[hat], b[hat + 1], b[hat + 2], b[hat + 3]]);
            for j in 0..16 {
                let h0 = (((qh >> j) & 1) << 4) as u8;
                let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
                q[j] = ((b[at + j] & 0xf) | h0) as i8 - off;
                q[j + 16] = ((b[at + j] >> 4) | h1) as i8 - off;
            }
            let m = if ty == GgmlType::Q5_1 { f16_at(b, 2) } else { 0.0 };
            (f16_at(b, 0), m)
        }
        _ => unreachable!("decode_32 of {ty}"),
    };
    (q, d, m)
}

/// The dot product of one weight row (`row`: its blocks) with one row of activations in the
/// weight type's dot type, blocks summed in order. Also returns `Σ|term|` (see
/// [`rounding_bound`]).
///
/// # Panics
/// When `ty` is not supported, or `a` is not `ty`'s dot type of a row of the same length.
pub fn dot_row(ty: GgmlType, row: &[u8], a: &ActRow) -> (f32, f32) {
    assert_eq!(
        ty.dot_type(),
        Some(a.dot),
        "{ty} rows take {:?} activations",
        ty.dot_type()
    );
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let nb = row.len() / ts;
    let (mut sum, mut abs) = (0f32, 0f32);
    match a.dot {
        DotType::F32 | DotType::F16 | DotType::BF16 => {
            let mut w = vec![0f32; nb];
            super::dequantize(ty, row, &mut w);
            for (wi, xi) in w.iter().zip(&a.f) {
                sum += wi * xi;
                abs += (wi * xi).abs();
            }
        }
        DotType::Q8_0 | DotType::Q8_1 => {
            for b in 0..nb {
                let (q, d, m) = decode_32(ty, &row[b * ts..(b + 1) * ts]);
                let xs = &a.qs[b * bs..(b + 1) * bs];
                let isum: i32 = q.iter().zip(xs).map(|(&w, &x)| w as i32 * x as i32).sum();
                let iabs: i32 = q.iter().zip(xs).map(|(&w, &x)| (w as i32 * x as i32).abs()).sum();
                let dd = d * a.d[b];
                let mut term = dd * isum as f32;
                abs += (dd * iabs as f32).abs();
                if a.dot == DotType::Q8_1 {
                    term += m * a.s[b];
                    abs += (m * a.s[b]).abs();
                }
                sum += term;
            }
        }
        DotType::Q8K => {
            for b in 0..nb {
                let k = decode_k(ty, &row[b * ts..(b + 1) * ts]);
                let xs = &a.qs[b * QK_K..(b + 1) * QK_K];
                let (mut isum, mut iabs, mut msum, mut mabs) = (0i64, 0i64, 0i64, 0i64);
                for s in 0..16 {
                    let dot: i64 = (0..16)
                        .map(|j| k.q[16 * s + j] as i64 * xs[16 * s + j] as i64)
                        .sum();
                    let dabs: i64 = (0..16)
                        .map(|j| (k.q[16 * s + j] as i64 * xs[16 * s + j] as i64).abs())
                        .sum();
                    isum += k.sc[s] as i64 * dot;
                    iabs += (k.sc[s] as i64).abs() * dabs;
                    let bsum = a.bsums[b * 16 + s] as i64;
                    msum += k.m[s] as i64 * bsum;
                    mabs += (k.m[s] as i64 * bsum).abs();
                }
                let (dd, dm) = (k.d * a.d[b], k.dmin * a.d[b]);
                sum += dd * isum as f32 - dm * msum as f32;
                abs += (dd * iabs as f32).abs() + (dm * mabs as f32).abs();
            }
        }
    }
    (sum, abs)
}

/// How far two correct implementations of a row's dot product may differ: both add the same
/// exact terms (integer sums times the same f32 scale products), in different orders and split
/// into at most 8 lanes per block before converting to f32. Each sum of `n` terms is within
/// `γ_n · Σ|term|` of the exact value (`γ_n = n·u / (1 − n·u)`, `u = 2^-24`), so two are within
/// twice that; `n` is bounded by `8 · blocks + 16` (lanes, the final reduction, the conversion of
/// an integer above 2^24 and the scale multiply).
pub fn rounding_bound(blocks: usize, abs: f32) -> f32 {
    let n = (8 * blocks + 16) as f32;
    let u = f32::EPSILON / 2.0;
    2.0 * n * u / (1.0 - n * u) * abs
}

/// `y = x · Wᵀ` for a ggml matrix `w` (`[n, k]` row-major blocks), by [`dot_row`]: the scalar
/// twin of the kernels.
///
/// # Shapes
/// `x: [t, k]`, `w: n · k` elements, `y: [t, n]`.
pub fn linear_reference(x: &[f32], t: usize, k: usize, n: usize, w: &super::GgmlData, y: &mut [f32]) {
    let ty = w.ty();
    let dot = ty.dot_type().expect("GgmlData holds supported types");
    let row_bytes = ty.bytes_for(k).expect("whole blocks");
    for r in 0..t {
        let a = ActRow::new(dot, &x[r * k..(r + 1) * k]);
        for o in 0..n {
            y[r * n + o] = dot_row(ty, &w.bytes()[o * row_bytes..(o + 1) * row_bytes], &a).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoded values and scales give the dequantised values bit for bit, by the same
    /// operations: so the dot products read the blocks as dequantisation does.
    #[test]
    fn decoding_agrees_with_dequantisation() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for ty in GgmlType::SUPPORTED {
            let Some(dot) = ty.dot_type() else { continue };
            if matches!(dot, DotType::F32 | DotType::F16 | DotType::BF16) {
                continue;
            }
            for _ in 0..50 {
                let mut b: Vec<u8> = (0..ty.type_size()).map(|_| next() as u8).collect();
                // Finite f16 scales: exponent bits below all-ones.
                let fields: &[usize] = match ty {
                    GgmlType::Q2K => &[80, 82],
                    GgmlType::Q3K => &[108],
                    GgmlType::Q6K => &[208],
                    _ => &[0, 2],
                };
                for &f in fields {
                    b[f + 1] &= 0xbb;
                }
                let mut want = vec![0f32; ty.block_size()];
                super::super::dequantize(ty, &b, &mut want);
                let got: Vec<f32> = if dot == DotType::Q8K {
                    let k = decode_k(ty, &b);
                    (0..QK_K)
                        .map(|e| {
                            let (sc, m) = (k.sc[e / 16] as f32, k.m[e / 16] as f32);
                            (k.d * sc) * k.q[e] as f32 - k.dmin * m
                        })
                        .collect()
                } else {
                    let (q, d, m) = decode_32(ty, &b);
                    let with_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
                    q.iter()
                        .map(|&q| {
                            if with_min {
                                q as u8 as f32 * d + m
                            } else {
                                q as f32 * d
                            }
                        })
                        .collect()
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{ty}");
            }
        }
    }
}
