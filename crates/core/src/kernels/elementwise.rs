//! Row-wise normalisations, softmax and activations, generic over [`Simd`].
//!
//! Each body works on one contiguous row; a ragged end is handled by the same vector code on a
//! padded copy, so every element goes through identical arithmetic.

use super::simd::{self, load_partial, store_partial, Simd};

/// `LANES` elements at `p + i` when `cnt == LANES`, else `cnt` of them padded with `fill`.
#[inline(always)]
unsafe fn ld<S: Simd>(p: *const f32, i: usize, cnt: usize, fill: f32) -> S::V {
    if cnt == S::LANES {
        S::load(p.add(i))
    } else {
        load_partial::<S>(p.add(i), cnt, fill)
    }
}

#[inline(always)]
unsafe fn st<S: Simd>(p: *mut f32, i: usize, cnt: usize, v: S::V) {
    if cnt == S::LANES {
        S::store(p.add(i), v)
    } else {
        store_partial::<S>(p.add(i), cnt, v)
    }
}

/// Calls `f(start, count)` for consecutive chunks of at most `LANES` covering `0..len`.
macro_rules! chunks {
    ($s:ty, $len:expr, |$i:ident, $cnt:ident| $body:block) => {{
        let len = $len;
        let mut $i = 0usize;
        while $i < len {
            let $cnt = (len - $i).min(<$s>::LANES);
            $body
            $i += $cnt;
        }
    }};
}

/// `Σ x²` as ggml's RMSNorm sums it: each square rounded to f32, the sum in f64. The order of
/// the f64 sum moves it by ~1e-16 relative, far below the rounding of the f32 mean taken from
/// it, so every ISA gets the same mean (and llama.cpp's). Summed in f32, the order depended on
/// the vector width, and on a Q8_0 file with 32-wide rows that one-ulp difference moved a
/// quantised activation across a rounding boundary: logits 0.1 from llama.cpp's on AVX-512,
/// equal on AVX2.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f64 {
    // Independent lanes, which the compiler vectorises without reassociating anything.
    let mut acc = [0f64; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v * v) as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| (v * v) as f64).sum();
    acc.iter().sum::<f64>() + tail
}

/// RMSNorm of one row: `x / sqrt(mean(x²) + eps) · weight`.
#[inline(always)]
pub(crate) unsafe fn rms_norm_row<S: Simd>(x: &mut [f32], weight: Option<&[f32]>, eps: f32) {
    let h = x.len();
    if h == 0 {
        return;
    }
    let mean = (sum_sq(x) / h as f64) as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    let s = S::splat(inv);
    let p = x.as_mut_ptr();
    match weight {
        Some(w) => {
            let wp = w.as_ptr();
            chunks!(S, h, |i, cnt| {
                let v = S::mul(S::mul(ld::<S>(p, i, cnt, 0.0), s), ld::<S>(wp, i, cnt, 0.0));
                st::<S>(p, i, cnt, v);
            });
        }
        None => chunks!(S, h, |i, cnt| {
            st::<S>(p, i, cnt, S::mul(ld::<S>(p, i, cnt, 0.0), s));
        }),
    }
}

/// LayerNorm of one row (biased variance, two passes for accuracy).
#[inline(always)]
pub(crate) unsafe fn layer_norm_row<S: Simd>(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let h = x.len();
    if h == 0 {
        return;
    }
    let p = x.as_mut_ptr();
    let mut acc = S::splat(0.0);
    chunks!(S, h, |i, cnt| {
        acc = S::add(acc, ld::<S>(p, i, cnt, 0.0));
    });
    let mean = S::hsum(acc) / h as f32;
    let m = S::splat(mean);
    let mut acc = S::splat(0.0);
    chunks!(S, h, |i, cnt| {
        // Pad with the mean so padded lanes add nothing.
        let d = S::sub(ld::<S>(p, i, cnt, mean), m);
        acc = S::fma(d, d, acc);
    });
    let inv = S::splat(1.0 / (S::hsum(acc) / h as f32 + eps).sqrt());
    let (wp, bp) = (weight.as_ptr(), bias.as_ptr());
    chunks!(S, h, |i, cnt| {
        let d = S::mul(S::sub(ld::<S>(p, i, cnt, 0.0), m), inv);
        let v = S::fma(d, ld::<S>(wp, i, cnt, 0.0), ld::<S>(bp, i, cnt, 0.0));
        st::<S>(p, i, cnt, v);
    });
}

/// Softmax of one row; `-inf` entries become 0.
#[inline(always)]
pub(crate) unsafe fn softmax_row<S: Simd>(x: &mut [f32]) {
    let h = x.len();
    if h == 0 {
        return;
    }
    let p = x.as_mut_ptr();
    let mut mx = S::splat(f32::NEG_INFINITY);
    chunks!(S, h, |i, cnt| {
        mx = S::max(mx, ld::<S>(p, i, cnt, f32::NEG_INFINITY));
    });
    let m = S::splat(S::hmax(mx));
    let mut sum = S::splat(0.0);
    chunks!(S, h, |i, cnt| {
        // Padded lanes are -inf, so their exponential is 0 and the sum is unaffected.
        let e = simd::exp::<S>(S::sub(ld::<S>(p, i, cnt, f32::NEG_INFINITY), m));
        sum = S::add(sum, e);
        st::<S>(p, i, cnt, e);
    });
    let inv = S::splat(1.0 / S::hsum(sum));
    chunks!(S, h, |i, cnt| {
        st::<S>(p, i, cnt, S::mul(ld::<S>(p, i, cnt, 0.0), inv));
    });
}

/// `x ← silu(x)`.
#[inline(always)]
pub(crate) unsafe fn silu<S: Simd>(x: &mut [f32]) {
    let p = x.as_mut_ptr();
    chunks!(S, x.len(), |i, cnt| {
        st::<S>(p, i, cnt, simd::silu::<S>(ld::<S>(p, i, cnt, 0.0)));
    });
}

/// `gate ← silu(gate) · up` (equal lengths checked by the caller).
#[inline(always)]
pub(crate) unsafe fn silu_mul<S: Simd>(gate: &mut [f32], up: &[f32]) {
    let (p, u) = (gate.as_mut_ptr(), up.as_ptr());
    chunks!(S, gate.len(), |i, cnt| {
        let v = S::mul(simd::silu::<S>(ld::<S>(p, i, cnt, 0.0)), ld::<S>(u, i, cnt, 0.0));
        st::<S>(p, i, cnt, v);
    });
}

/// `x ← gelu(x)` (erf form).
#[inline(always)]
pub(crate) unsafe fn gelu<S: Simd>(x: &mut [f32]) {
    let p = x.as_mut_ptr();
    chunks!(S, x.len(), |i, cnt| {
        st::<S>(p, i, cnt, simd::gelu::<S>(ld::<S>(p, i, cnt, 0.0)));
    });
}
