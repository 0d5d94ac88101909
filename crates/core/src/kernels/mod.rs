//! CPU kernels over f32 activations. Each public function checks shapes and then runs the
//! fastest path the CPU supports; [`scalar`] holds the plain twins the tests compare against.

pub mod scalar;

use half::{bf16, f16};
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::{Error, Layout, Result, Weight, WeightData};

/// A stored element that widens to f32.
trait Elem: Copy + Send + Sync {
    fn f32(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}
impl Elem for f16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// `x · Wᵀ` (or `x · W` for [`Layout::InOut`]): applies the linear map `w` to each row of `x`.
///
/// # Shapes
/// `x: [T, in]` → `[T, out]`.
pub fn linear(x: ArrayView2<f32>, w: &Weight) -> Result<Array2<f32>> {
    let mut y = Array2::zeros((x.nrows(), w.out_features()));
    linear_into(x, w, y.view_mut())?;
    Ok(y)
}

/// [`linear`] writing into `y`, which is overwritten.
///
/// # Shapes
/// `x: [T, in]`, `y: [T, out]`.
pub fn linear_into(x: ArrayView2<f32>, w: &Weight, mut y: ArrayViewMut2<f32>) -> Result<()> {
    let (t, n_in) = x.dim();
    if n_in != w.in_features() || y.dim() != (t, w.out_features()) {
        return Err(Error::shape(
            "linear",
            format!(
                "x {:?}, weight {}→{}, y {:?}",
                x.dim(),
                w.in_features(),
                w.out_features(),
                y.dim()
            ),
        ));
    }
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    let run = |y: &mut [f32]| match w.data() {
        WeightData::F32(d) => linear_generic(x, t, w, d, y),
        WeightData::BF16(d) => linear_generic(x, t, w, d, y),
        WeightData::F16(d) => linear_generic(x, t, w, d, y),
    };
    if let Some(y) = y.as_slice_mut() {
        run(y);
    } else {
        // A strided output: compute contiguously, then copy.
        let mut buf = vec![0f32; t * w.out_features()];
        run(&mut buf);
        y.assign(&ArrayView2::from_shape((t, w.out_features()), &buf).expect("sized above"));
    }
    Ok(())
}

/// Output columns handed to one task.
const COLS_PER_TASK: usize = 64;

fn linear_generic<E: Elem>(x: &[f32], t: usize, w: &Weight, data: &[E], y: &mut [f32]) {
    let (n_in, n_out) = (w.in_features(), w.out_features());
    let blocks: Vec<usize> = (0..n_out).step_by(COLS_PER_TASK).collect();
    let results: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|&o0| {
            let o1 = (o0 + COLS_PER_TASK).min(n_out);
            let mut out = vec![0f32; t * (o1 - o0)];
            match w.layout() {
                Layout::OutIn => {
                    for o in o0..o1 {
                        let row = &data[o * n_in..(o + 1) * n_in];
                        for r in 0..t {
                            let xr = &x[r * n_in..(r + 1) * n_in];
                            out[r * (o1 - o0) + o - o0] =
                                xr.iter().zip(row).map(|(&a, &b)| a * b.f32()).sum();
                        }
                    }
                }
                Layout::InOut => {
                    for r in 0..t {
                        let acc = &mut out[r * (o1 - o0)..(r + 1) * (o1 - o0)];
                        for i in 0..n_in {
                            let xi = x[r * n_in + i];
                            let row = &data[i * n_out + o0..i * n_out + o1];
                            for (a, &b) in acc.iter_mut().zip(row) {
                                *a += xi * b.f32();
                            }
                        }
                    }
                }
            }
            out
        })
        .collect();
    for (&o0, out) in blocks.iter().zip(results) {
        let width = out.len() / t.max(1);
        for r in 0..t {
            y[r * n_out + o0..r * n_out + o0 + width].copy_from_slice(&out[r * width..(r + 1) * width]);
        }
    }
}

/// Row-wise RMSNorm in place: `x / sqrt(mean(x²) + eps) · weight` (no weight: `· 1`).
///
/// # Shapes
/// `x: [T, H]`, `weight: [H]`.
pub fn rms_norm_inplace(mut x: ArrayViewMut2<f32>, weight: Option<ArrayView1<f32>>, eps: f32) -> Result<()> {
    let h = x.ncols();
    if let Some(w) = &weight {
        if w.len() != h {
            return Err(Error::shape(
                "rms_norm",
                format!("x {:?}, weight [{}]", x.dim(), w.len()),
            ));
        }
    }
    let w = weight.map(|w| w.to_vec());
    for mut row in x.axis_iter_mut(Axis(0)) {
        let ms = row.iter().map(|&v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        match &w {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, &g)| *v = *v * inv * g),
            None => row.iter_mut().for_each(|v| *v *= inv),
        }
    }
    Ok(())
}

/// Row-wise RMSNorm returning a new array.
///
/// # Shapes
/// `x: [T, H]`, `weight: [H]` → `[T, H]`.
pub fn rms_norm(x: ArrayView2<f32>, weight: Option<ArrayView1<f32>>, eps: f32) -> Result<Array2<f32>> {
    let mut y = x.to_owned();
    rms_norm_inplace(y.view_mut(), weight, eps)?;
    Ok(y)
}

/// Row-wise LayerNorm in place: `(x − mean) / sqrt(var + eps) · weight + bias`.
///
/// # Shapes
/// `x: [T, H]`, `weight, bias: [H]`.
pub fn layer_norm_inplace(
    mut x: ArrayViewMut2<f32>,
    weight: ArrayView1<f32>,
    bias: ArrayView1<f32>,
    eps: f32,
) -> Result<()> {
    let h = x.ncols();
    if weight.len() != h || bias.len() != h {
        return Err(Error::shape(
            "layer_norm",
            format!(
                "x {:?}, weight [{}], bias [{}]",
                x.dim(),
                weight.len(),
                bias.len()
            ),
        ));
    }
    for mut row in x.axis_iter_mut(Axis(0)) {
        let mean = row.sum() / h as f32;
        let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(weight.iter()).zip(bias.iter()) {
            *v = (*v - mean) * inv * g + b;
        }
    }
    Ok(())
}

/// Row-wise softmax in place; `-inf` entries get probability 0.
///
/// # Shapes
/// `x: [T, N]`.
pub fn softmax_inplace(mut x: ArrayViewMut2<f32>) {
    for mut row in x.axis_iter_mut(Axis(0)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        row.iter_mut().for_each(|v| {
            *v = (*v - m).exp();
            sum += *v;
        });
        row.iter_mut().for_each(|v| *v /= sum);
    }
}

/// SiLU in place: `x · sigmoid(x)`.
pub fn silu_inplace(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp());
}

/// SwiGLU's gate in place: `gate = silu(gate) · up`.
///
/// # Shapes
/// `gate` and `up` of equal length.
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) -> Result<()> {
    if gate.len() != up.len() {
        return Err(Error::shape(
            "silu_mul",
            format!("gate {}, up {}", gate.len(), up.len()),
        ));
    }
    gate.iter_mut()
        .zip(up)
        .for_each(|(g, &u)| *g = *g / (1.0 + (-*g).exp()) * u);
    Ok(())
}

/// Exact (erf) GELU in place.
pub fn gelu_inplace(x: &mut [f32]) {
    x.iter_mut()
        .for_each(|v| *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2)));
}
