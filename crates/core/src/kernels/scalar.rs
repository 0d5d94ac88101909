//! Plain, obviously-correct twins of every kernel, used by tests as the reference.
//! Accumulation is in f64 where it makes the twin more exact than the fast path it checks.

use crate::{Layout, Weight};

/// `y[t, o] = Σ_i x[t, i] · W(o, i)` for `x` of `t × in` (row-major) and `y` of `t × out`.
pub fn linear(x: &[f32], t: usize, w: &Weight, y: &mut [f32]) {
    let (n_in, n_out) = (w.in_features(), w.out_features());
    let v = w.data().to_f32_vec();
    for r in 0..t {
        for o in 0..n_out {
            let mut acc = 0f64;
            for i in 0..n_in {
                let wi = match w.layout() {
                    Layout::OutIn => v[o * n_in + i],
                    Layout::InOut => v[i * n_out + o],
                };
                acc += x[r * n_in + i] as f64 * wi as f64;
            }
            y[r * n_out + o] = acc as f32;
        }
    }
}

/// `x / sqrt(mean(x²) + eps) · weight` over one row.
pub fn rms_norm(x: &mut [f32], weight: Option<&[f32]>, eps: f32) {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps as f64).sqrt();
    for (i, v) in x.iter_mut().enumerate() {
        let w = weight.map_or(1.0, |w| w[i] as f64);
        *v = (*v as f64 * inv * w) as f32;
    }
}

/// `(x − mean) / sqrt(var + eps) · weight + bias` over one row (biased variance).
pub fn layer_norm(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((*v as f64 - mean) * inv * weight[i] as f64 + bias[i] as f64) as f32;
    }
}

/// Softmax over one row; `-inf` entries get probability 0.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
    for v in x.iter_mut() {
        *v = (((*v - m) as f64).exp() / sum) as f32;
    }
}

/// `x · sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    let x = x as f64;
    (x / (1.0 + (-x).exp())) as f32
}

/// Exact GELU, `x/2 · (1 + erf(x/√2))`.
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
}
