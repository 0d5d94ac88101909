//! The plain formula, for tests.

use ndarray::{Array3, ArrayView3};

use super::{check, AttnContext, Dims};
use crate::{KvView, Result};

/// Element `(h, j, i)` of a view as f32 (inside the view: checked by the caller).
fn kv_at(view: &KvView, h: usize, j: usize, i: usize) -> f32 {
    view.get(h, j, i).unwrap_or(f32::NAN)
}

/// The plain formula, for tests: for each query row and head, scores over every slot the mask
/// allows, softmax and weighted sum, all in f64; no tiling, no skipping. Same contract as
/// [`super::attention`].
///
/// # Shapes
/// `q: [T, Hq, D]`, `k, v: [Hkv, len, D]` views → `[T, Hq, D]`.
pub fn attention_naive(q: ArrayView3<f32>, k: &KvView, v: &KvView, ctx: &AttnContext) -> Result<Array3<f32>> {
    let dims = check(&q, k, v, ctx)?;
    let Dims {
        t,
        hq,
        d,
        len,
        first_pos,
        ..
    } = dims;
    let rep = dims.group();
    let mut out = Array3::<f32>::zeros((t, hq, d));
    for ti in 0..t {
        let p = ctx.positions[ti];
        for h in 0..hq {
            let g = h / rep;
            let slots: Vec<usize> = (0..len)
                .filter(|&j| {
                    let k = first_pos + j;
                    ctx.mask.first_visible(p) <= k && k <= p
                })
                .collect();
            if slots.is_empty() {
                continue;
            }
            let scores: Vec<f64> = slots
                .iter()
                .map(|&j| {
                    let dot: f64 = (0..d)
                        .map(|i| q[[ti, h, i]] as f64 * kv_at(k, g, j, i) as f64)
                        .sum();
                    dot * ctx.scale as f64
                })
                .collect();
            let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let total: f64 = w.iter().sum();
            for i in 0..d {
                let y: f64 = slots
                    .iter()
                    .zip(&w)
                    .map(|(&j, &wj)| wj * kv_at(v, g, j, i) as f64)
                    .sum();
                out[[ti, h, i]] = (y / total) as f32;
            }
        }
    }
    Ok(out)
}
