//! Activations in a weight type's dot type, bit for bit as ggml-cpu makes them on x86.
//!
//! - Q8_0 (`quantize_row_q8_0`, AVX path): per 32 values, `amax = max|x|`, `d = f16(amax / 127)`,
//!   `q = round_half_even(x · (127 / amax))` (`id = 0` when `amax = 0`).
//! - Q8_1 (`quantize_row_q8_1`, AVX path): as Q8_0, plus `s = f16((amax / 127) · Σq)`.
//! - Q8_K (`quantize_row_q8_K_ref`): per 256 values, `max` the value of largest magnitude (the
//!   first on ties), `iscale = −127 / max`, `q = min(127, round_half_even(iscale · x))`,
//!   `d = 1 / iscale` (f32), and `bsums` the sum of each 16 `q`.
//! - F16 / BF16: each value rounded to nearest even (`ggml_cpu_fp32_to_fp16` / `_bf16`).

use half::{bf16, f16};

use super::{DotType, QK_K};

/// `x` rounded half to even, for `|x| < 2^22` (ggml's `nearest_int` and `_mm256_round_ps` agree
/// there; larger values cannot occur: quantised values are at most 127 in magnitude).
#[inline(always)]
pub(crate) fn nearest(x: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it leaves no fraction bits
    let v = x + MAGIC;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// One row quantised to Q8_0: `qs[k]`, `d[k / 32]` (f16, returned widened to f32, exactly).
///
/// # Shapes
/// `x: [k]`, `qs: [k]`, `d: [k / 32]`.
pub fn quantize_q8_0(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), db) in x.chunks_exact(32).zip(qs.chunks_exact_mut(32)).zip(d.iter_mut()) {
        *db = q8_block(xb, qb).0;
    }
}

/// One row quantised to Q8_1: as [`quantize_q8_0`], plus `s[k / 32]` (f16 widened).
///
/// # Shapes
/// `x: [k]`, `qs: [k]`, `d, s: [k / 32]`.
pub fn quantize_q8_1(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (((xb, qb), db), sb) in x
        .chunks_exact(32)
        .zip(qs.chunks_exact_mut(32))
        .zip(d.iter_mut())
        .zip(s.iter_mut())
    {
        let (dh, dfull) = q8_block(xb, qb);
        *db = dh;
        let sum: i32 = qb.iter().map(|&q| q as i32).sum();
        *sb = f16::from_f32(dfull * sum as f32).to_f32();
    }
}

/// One Q8_0 block: writes `q`, returns `(f16(d) widened, d)`.
#[inline(always)]
fn q8_block(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    // `max` as the AVX code's `_mm256_max_ps(|x|, m)`: a NaN lane leaves `m`.
    let amax = x.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (qi, &v) in q.iter_mut().zip(x) {
        // `_mm256_cvtps_epi32` of a rounded value in [-127, 127]; NaN or overflow gives
        // i32::MIN there, whose low byte after the saturating packs is -128.
        let r = v * id;
        *qi = if r.is_finite() { nearest(r) as i8 } else { -128 };
    }
    (f16::from_f32(d).to_f32(), d)
}

/// One row quantised to Q8_K: `qs[k]`, `d[k / 256]` (f32), `bsums[k / 16]`.
///
/// # Shapes
/// `x: [k]`, `qs: [k]`, `d: [k / 256]`, `bsums: [k / 16]`.
pub fn quantize_q8_k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for (((xb, qb), db), bb) in x
        .chunks_exact(QK_K)
        .zip(qs.chunks_exact_mut(QK_K))
        .zip(d.iter_mut())
        .zip(bsums.chunks_exact_mut(QK_K / 16))
    {
        // The largest |v| (NaN never compares greater), kept per lane of eight so the loop
        // vectorises; then the first value of that magnitude gives the sign, as ggml's scan.
        let mut lanes = [0f32; 8];
        for c in xb.chunks_exact(8) {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = if v.abs() > *m { v.abs() } else { *m };
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
        let max = xb.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
        if amax == 0.0 {
            *db = 0.0;
            qb.fill(0);
            bb.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (qi, &v) in qb.iter_mut().zip(xb) {
            let r = iscale * v;
            // `nearest_int` asserts |r| ≤ 2^22 − 1; only non-finite input exceeds it.
            let q = nearest(r).min(127);
            *qi = if r.abs() <= 4_194_303.0 { q as i8 } else { 0 };
        }
        for (s, qs16) in bb.iter_mut().zip(qb.chunks_exact(16)) {
            *s = qs16.iter().map(|&q| q as i16).sum();
        }
        *db = 1.0 / iscale;
    }
}

/// `x` rounded to f16 precision in place (kept as f32, exactly).
pub fn round_f16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
}

/// `x` rounded to bf16 precision in place (kept as f32, exactly).
pub fn round_bf16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
}

/// One row of activations in a dot type, in the form the scalar dot products read.
#[derive(Clone, Debug, PartialEq)]
pub struct ActRow {
    /// The dot type.
    pub dot: DotType,
    /// Quantised values (empty for the float dot types).
    pub qs: Vec<i8>,
    /// Block scales: f16-rounded for Q8_0 / Q8_1, f32 for Q8_K.
    pub d: Vec<f32>,
    /// Q8_1's `s` per block (f16-rounded); empty otherwise.
    pub s: Vec<f32>,
    /// Q8_K's sums of each 16 values; empty otherwise.
    pub bsums: Vec<i16>,
    /// The rounded values for the float dot types; empty otherwise.
    pub f: Vec<f32>,
}

impl ActRow {
    /// `x` converted to `dot`.
    ///
    /// # Panics
    /// When `x.len()` is not whole blocks of `dot`.
    pub fn new(dot: DotType, x: &[f32]) -> Self {
        let k = x.len();
        let mut a = ActRow {
            dot,
            qs: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            bsums: Vec::new(),
            f: Vec::new(),
        };
        match dot {
            DotType::F32 | DotType::F16 | DotType::BF16 => {
                a.f = x.to_vec();
                match dot {
                    DotType::F16 => round_f16(&mut a.f),
                    DotType::BF16 => round_bf16(&mut a.f),
                    _ => {}
                }
            }
            DotType::Q8_0 | DotType::Q8_1 => {
                assert!(k.is_multiple_of(32), "{k} values are not whole Q8 blocks");
                a.qs = vec![0; k];
                a.d = vec![0.0; k / 32];
                if dot == DotType::Q8_0 {
                    quantize_q8_0(x, &mut a.qs, &mut a.d);
                } else {
                    a.s = vec![0.0; k / 32];
                    quantize_q8_1(x, &mut a.qs, &mut a.d, &mut a.s);
                }
            }
            DotType::Q8K => {
                assert!(k.is_multiple_of(QK_K), "{k} values are not whole Q8_K blocks");
                a.qs = vec![0; k];
                a.d = vec![0.0; k / QK_K];
                a.bsums = vec![0; k / 16];
                quantize_q8_k(x, &mut a.qs, &mut a.d, &mut a.bsums);
            }
        }
        a
    }

    /// The row as ggml lays it out in memory (`block_q8_0`, `block_q8_1`, `block_q8_K`, or
    /// f32 / f16 / bf16 elements): for comparison with ggml's own `from_float`.
    pub fn to_ggml_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.dot {
            DotType::F32 => self.f.iter().for_each(|v| out.extend(v.to_le_bytes())),
            DotType::F16 => self
                .f
                .iter()
                .for_each(|&v| out.extend(f16::from_f32(v).to_le_bytes())),
            DotType::BF16 => self
                .f
                .iter()
                .for_each(|&v| out.extend(bf16::from_f32(v).to_le_bytes())),
            DotType::Q8_0 | DotType::Q8_1 => {
                for (b, q) in self.qs.chunks_exact(32).enumerate() {
                    out.extend(f16::from_f32(self.d[b]).to_le_bytes());
                    if self.dot == DotType::Q8_1 {
                        out.extend(f16::from_f32(self.s[b]).to_le_bytes());
                    }
                    out.extend(q.iter().map(|&v| v as u8));
                }
            }
            DotType::Q8K => {
                for (b, q) in self.qs.chunks_exact(QK_K).enumerate() {
                    out.extend(self.d[b].to_le_bytes());
                    out.extend(q.iter().map(|&v| v as u8));
                    for s in &self.bsums[b * 16..b * 16 + 16] {
                        out.extend(s.to_le_bytes());
                    }
                }
            }
        }
        out
    }
}
