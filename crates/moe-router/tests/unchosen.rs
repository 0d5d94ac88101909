//! An expert that no token chose costs nothing: its weights are never read.
//!
//! Proof by poisoning: the unchosen experts' weights are NaN. Any read that reached the output
//! (even multiplied by a zero routing weight: 0 · NaN = NaN) would make it NaN, as the dense
//! reference formula shows. The sparse layer's output must instead be finite and bit-identical
//! to the same layer with sane weights there, and its byte counter must count only the router,
//! the shared expert and the chosen experts.

mod common;

use common::{Dims, RawMoe, Rng};
use llama4_core::DType;
use moe_router::{FeedForward, WeightPlacement};

/// A layer whose router sends every token to experts `0..k` (in that order of preference):
/// inputs are positive and router rows are `+1`, `+1/2`, …  for the first `k` experts and `−1`
/// for the rest.
fn layer_routing_to_first_k(dims: Dims, seed: u64) -> (RawMoe, ndarray::Array2<f32>) {
    let mut rng = Rng::new(seed);
    let mut raw = RawMoe::random(&mut rng, dims);
    for e in 0..dims.e {
        let v = if e < dims.k { 1.0 / (e + 1) as f32 } else { -1.0 };
        raw.router[e * dims.h..(e + 1) * dims.h].fill(v);
    }
    let x = rng.array(9, dims.h, 1.0).mapv(|v| v.abs() + 0.1);
    (raw, x)
}

fn unchosen_experts_are_not_read(dtype: DType, k: usize, placement: WeightPlacement) {
    let dims = Dims {
        h: 32,
        i: 16,
        e: 8,
        k,
    };
    let (sane, x) = layer_routing_to_first_k(dims, 11 + k as u64);
    let mut poisoned = sane.clone();
    for e in k..dims.e {
        poisoned.fill_expert(e, f32::NAN);
    }
    let sane = sane.build(dtype, placement);
    let poisoned = poisoned.build(dtype, placement);

    let routed = poisoned.forward_with_routing(x.view()).unwrap();
    for t in 0..x.nrows() {
        let want: Vec<u32> = (0..k as u32).collect();
        assert_eq!(
            routed.routing.experts_of(t),
            &want[..],
            "token {t} routed as designed"
        );
    }
    assert!(
        routed.output.iter().all(|v| v.is_finite()),
        "a NaN expert was read"
    );
    assert_eq!(
        routed.output,
        sane.forward(x.view()).unwrap(),
        "poison changed nothing"
    );

    // The test can fail: the dense formula reads every expert and is poisoned.
    let dense = poisoned.forward_dense_reference(x.view()).unwrap();
    assert!(dense.iter().any(|v| v.is_nan()));

    // The byte counter: router + shared expert + k experts, nothing for the other 8 − k.
    let size = dtype.size();
    let (h, i, e) = (dims.h, dims.i, dims.e);
    let expected = size * (e * h + 3 * h * i + k * 3 * h * i);
    assert_eq!(poisoned.stats().weight_bytes_read(), expected as u64);
    assert_eq!(poisoned.min_decode_weight_bytes(), expected);
    let mut want_counts = vec![0u64; e];
    want_counts[..k].fill(x.nrows() as u64);
    assert_eq!(poisoned.stats().tokens_per_expert(), want_counts);
    poisoned.stats().reset();
    assert_eq!(poisoned.stats().tokens_per_expert(), vec![0; e]);
    assert_eq!(poisoned.stats().weight_bytes_read(), 0);
}

#[test]
fn unchosen_experts_not_read_f32_top1() {
    unchosen_experts_are_not_read(DType::F32, 1, WeightPlacement::ExpertInput);
}

#[test]
fn unchosen_experts_not_read_bf16_top2() {
    unchosen_experts_are_not_read(DType::BF16, 2, WeightPlacement::ExpertInput);
}

#[test]
fn unchosen_experts_not_read_weight_on_output() {
    unchosen_experts_are_not_read(DType::F32, 2, WeightPlacement::ExpertOutput);
}
