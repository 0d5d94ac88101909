//! One Llama 4 MoE layer (16 experts, top-1, shared expert, bf16 weights) at decode (T = 1)
//! and prefill (T = 128). H = 2048, I = 1024: a quarter of Scout's widths in each direction, so
//! the layer holds 204 MB of weights and builds in a few seconds.
//!
//! Throughput is tokens, so criterion reports tokens/s. Before measuring, the bench prints the
//! bytes of weights one decode token reads (from the layer's own counter) against the minimum
//! (router + shared expert + one expert). Run: `cargo bench --bench moe`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llama4_core::{bf16, BatchedWeight, Buffer, Layout, Weight, WeightData};
use moe_router::{Experts, FeedForward, Llama4Router, Mlp, Moe, WeightPlacement};
use ndarray::Array2;

const H: usize = 2048;
const I: usize = 1024;
const E: usize = 16;
const TOP_K: usize = 1;

/// Deterministic values in `[-scale, scale)` (a 64-bit LCG).
fn values(n: usize, seed: u64, scale: f32) -> impl Iterator<Item = f32> {
    let mut s = seed;
    (0..n).map(move |_| {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    })
}

fn bf16_data(n: usize, seed: u64, scale: f32) -> WeightData {
    WeightData::BF16(Buffer::from_vec(
        values(n, seed, scale).map(bf16::from_f32).collect(),
    ))
}

fn layer() -> Moe {
    let (sh, si) = (1.0 / (H as f32).sqrt(), 1.0 / (I as f32).sqrt());
    let linear = |out: usize, inp: usize, seed: u64, scale: f32| {
        Weight::new(bf16_data(out * inp, seed, scale), Layout::OutIn, out, inp).expect("sized")
    };
    let router = Llama4Router::new(linear(E, H, 1, sh), TOP_K).expect("valid k");
    let experts = Experts::new(
        BatchedWeight::new(bf16_data(E * H * 2 * I, 2, sh), Layout::InOut, E, 2 * I, H).expect("sized"),
        BatchedWeight::new(bf16_data(E * I * H, 3, si), Layout::InOut, E, H, I).expect("sized"),
    )
    .expect("consistent");
    let shared = Mlp::new(linear(I, H, 4, sh), linear(I, H, 5, sh), linear(H, I, 6, si)).expect("consistent");
    Moe::new(
        Box::new(router),
        experts,
        Some(shared),
        WeightPlacement::ExpertInput,
    )
    .expect("consistent")
}

fn moe(c: &mut Criterion) {
    let moe = layer();
    let input = |t: usize, seed: u64| {
        Array2::from_shape_vec((t, H), values(t * H, seed, 1.0).collect()).expect("sized")
    };

    // Bytes per decode token, counted by the layer over a few tokens.
    moe.stats().reset();
    for seed in 0..8 {
        moe.forward(input(1, 100 + seed).view()).expect("forward");
    }
    let per_token = moe.stats().weight_bytes_read() as f64 / moe.stats().tokens() as f64;
    let minimum = moe.min_decode_weight_bytes();
    let all = moe.router().weight_bytes()
        + moe.shared_expert().map_or(0, Mlp::weight_bytes)
        + E * moe.experts().expert_bytes();
    eprintln!(
        "moe H={H} I={I} E={E} top-{TOP_K} bf16: weights read per decode token {:.2} MB \
         (minimum router + shared + one expert {:.2} MB; whole layer {:.2} MB)",
        per_token / 1e6,
        minimum as f64 / 1e6,
        all as f64 / 1e6
    );

    let mut group = c.benchmark_group("moe_bf16_h2048_i1024_e16");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(3));
    for (name, t) in [("decode", 1usize), ("prefill", 128)] {
        let x = input(t, 7);
        group.throughput(Throughput::Elements(t as u64));
        group.bench_with_input(BenchmarkId::new(name, t), &x, |b, x| {
            b.iter(|| moe.forward(x.view()).expect("forward"))
        });
    }
    group.finish();

    moe.stats().reset();
    moe.forward(input(128, 7).view()).expect("forward");
    let counts = moe.stats().tokens_per_expert();
    eprintln!("prefill T=128 tokens per expert: {counts:?}");
}

criterion_group!(benches, moe);
criterion_main!(benches);
