//! Helpers shared by the integration tests: a seeded generator and random layers.
#![allow(dead_code)]

use llama4_core::{BatchedWeight, DType, Layout, Weight, WeightData};
use moe_router::{Experts, Llama4Router, Mlp, Moe, WeightPlacement};
use ndarray::ArrayView2;

pub use llama4_testkit::Rng;

/// Sizes of a random layer.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub h: usize,
    pub i: usize,
    pub e: usize,
    pub k: usize,
}

/// Raw f32 values of every weight of a layer, so that variants (poisoned experts) can be built
/// from the same numbers.
#[derive(Clone)]
pub struct RawMoe {
    pub dims: Dims,
    pub router: Vec<f32>,
    pub gate_up: Vec<f32>,
    pub down: Vec<f32>,
    pub shared: [Vec<f32>; 3],
}

impl RawMoe {
    pub fn random(rng: &mut Rng, dims: Dims) -> Self {
        let Dims { h, i, e, .. } = dims;
        let sh = 1.0 / (h as f32).sqrt();
        let si = 1.0 / (i as f32).sqrt();
        RawMoe {
            dims,
            router: rng.vec(e * h, sh),
            gate_up: rng.vec(e * h * 2 * i, sh),
            down: rng.vec(e * i * h, si),
            shared: [rng.vec(i * h, sh), rng.vec(i * h, sh), rng.vec(h * i, si)],
        }
    }

    /// Sets every weight of expert `expert` to `value` (NaN to prove it is never read).
    pub fn fill_expert(&mut self, expert: usize, value: f32) {
        let Dims { h, i, .. } = self.dims;
        let gu = h * 2 * i;
        self.gate_up[expert * gu..(expert + 1) * gu].fill(value);
        let d = i * h;
        self.down[expert * d..(expert + 1) * d].fill(value);
    }

    pub fn build(&self, dtype: DType, placement: WeightPlacement) -> Moe {
        let Dims { h, i, e, k } = self.dims;
        let w = |v: &[f32], out: usize, inp: usize| {
            Weight::new(WeightData::from_f32(v, dtype), Layout::OutIn, out, inp).unwrap()
        };
        let router = Llama4Router::new(w(&self.router, e, h), k).unwrap();
        let experts = Experts::new(
            BatchedWeight::new(
                WeightData::from_f32(&self.gate_up, dtype),
                Layout::InOut,
                e,
                2 * i,
                h,
            )
            .unwrap(),
            BatchedWeight::new(WeightData::from_f32(&self.down, dtype), Layout::InOut, e, h, i).unwrap(),
        )
        .unwrap();
        let shared = Mlp::new(
            w(&self.shared[0], i, h),
            w(&self.shared[1], i, h),
            w(&self.shared[2], h, i),
        )
        .unwrap();
        Moe::new(Box::new(router), experts, Some(shared), placement).unwrap()
    }
}

/// `(max |got − want|, max |want|)`.
pub fn max_abs_diff(got: ArrayView2<f32>, want: ArrayView2<f32>) -> (f32, f32) {
    assert_eq!(got.dim(), want.dim());
    let diff = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, |m, d| {
            if d.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        });
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    (diff, scale)
}
