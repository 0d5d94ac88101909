//! Quantised (int8, int4, fp8) `linear_into` throughput against bf16: decode (T = 1, bound by
//! memory bandwidth, reported as weight bytes — values plus scales — per second) and prefill
//! (T = 128, reported as flops per second, `2 · T · in · out`).
//!
//! `quant_tokens` measures prefill at one expert's shape for 4 to 64 tokens.
//!
//! `cargo bench --bench quant` (add a filter such as `decode` to run one group);
//! `LLAMA4_KERNEL=avx2|portable` measures another path.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama4_core::kernels;
use llama4_core::{DType, Layout, QuantFormat, QuantSpec, Weight};
use ndarray::Array2;

mod common;
use common::values;

const N: usize = 4096;
const K: usize = 4096;
/// Bytes of distinct weights a decode ring cycles through: well above the 300 MiB L3 of these
/// machines, so every call streams its weight from memory as a decode step over a model does.
const RING_BYTES: usize = 720 << 20;

/// The weights compared: bf16, the integer formats (f32 scales) and fp8 (one scale per row).
fn kinds() -> Vec<(String, Option<QuantSpec>)> {
    let mut v = vec![("bf16".to_string(), None)];
    for (format, group) in [
        (QuantFormat::Q8, 32),
        (QuantFormat::Q8, 128),
        (QuantFormat::Q4, 32),
        (QuantFormat::Q4, 128),
    ] {
        v.push((
            format!("{}_g{group}", format.name()),
            Some(QuantSpec::new(format, group)),
        ));
    }
    v.push(("fp8".to_string(), Some(QuantSpec::fp8())));
    v
}

fn build(src: &Weight, spec: Option<QuantSpec>) -> Weight {
    match spec {
        // A fresh copy each time: distinct memory for every ring entry.
        None => src.converted(DType::BF16, Layout::OutIn),
        Some(spec) => src.quantized(spec).unwrap(),
    }
}

/// Bytes one `N × K` weight stores (values and scales).
fn nbytes(spec: Option<QuantSpec>) -> usize {
    match spec {
        None => N * K * 2,
        Some(s) => s.format.value_bytes(N * K) + N * K / s.group_for(K) * 4,
    }
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("quant_decode");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let src = Weight::from_out_in(
        Array2::from_shape_vec((N, K), values(N * K, 1)).unwrap().view(),
        DType::F32,
    );
    let x = Array2::from_shape_vec((1, K), values(K, 2)).unwrap();
    let mut y = Array2::zeros((1, N));
    for (name, spec) in kinds() {
        let bytes = nbytes(spec);
        g.throughput(Throughput::Bytes(bytes as u64));
        // Built on the closure's first call, so only when the filter selects this benchmark
        // (criterion calls the closure several times: the ring is kept).
        let mut cache: Option<Vec<Weight>> = None;
        let mut next = 0;
        g.bench_function(format!("{name}_{N}x{K}"), |b| {
            let ring = cache.get_or_insert_with(|| {
                (0..RING_BYTES.div_ceil(bytes))
                    .map(|_| build(&src, spec))
                    .collect()
            });
            assert_eq!(ring[0].nbytes(), bytes);
            b.iter(|| {
                next = (next + 1) % ring.len();
                kernels::linear_into(black_box(x.view()), &ring[next], y.view_mut()).unwrap()
            })
        });
    }
    g.finish();
}

fn prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("quant_prefill_t128");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let t = 128;
    let src = Weight::from_out_in(
        Array2::from_shape_vec((N, K), values(N * K, 1)).unwrap().view(),
        DType::F32,
    );
    let x = Array2::from_shape_vec((t, K), values(t * K, 3)).unwrap();
    let mut y = Array2::zeros((t, N));
    g.throughput(Throughput::Elements((2 * t * K * N) as u64));
    for (name, spec) in kinds() {
        let mut cache: Option<Weight> = None;
        g.bench_function(format!("{name}_{N}x{K}"), |b| {
            let w = cache.get_or_insert_with(|| build(&src, spec));
            b.iter(|| kernels::linear_into(black_box(x.view()), w, y.view_mut()).unwrap())
        });
    }
    g.finish();
}

/// Prefill at the shape of one bench-mid expert (`gate_up`, 2048 × 1024) for the token counts
/// routing gives an expert in a 512-token prompt: where the row and tile kernels cross over.
fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("quant_tokens");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let (n, k) = (2048, 1024);
    let src = Weight::from_out_in(
        Array2::from_shape_vec((n, k), values(n * k, 1)).unwrap().view(),
        DType::F32,
    );
    let mut variants: Vec<(String, Option<QuantSpec>, Layout)> = kinds()
        .into_iter()
        .filter(|(name, _)| !name.ends_with("g128"))
        .map(|(name, spec)| (name, spec, Layout::OutIn))
        .collect();
    // Float experts are stored `[in, out]` in Llama 4 checkpoints.
    variants.push(("bf16_inout".into(), None, Layout::InOut));
    for (name, spec, layout) in variants {
        let build = |src: &Weight, spec| match spec {
            None => src.converted(DType::BF16, layout),
            spec => build(src, spec),
        };
        // A model's prefill reads each expert from memory once: the `cold` runs cycle through
        // a ring of copies larger than the L3, the others reuse one copy that stays in cache.
        let ring: Vec<Weight> = (0..RING_BYTES.div_ceil(build(&src, spec).nbytes()))
            .map(|_| build(&src, spec))
            .collect();
        let mut next = 0;
        for t in [4, 8, 12, 15, 16, 20, 30, 32, 64] {
            let x = Array2::from_shape_vec((t, k), values(t * k, 3)).unwrap();
            let mut y = Array2::zeros((t, n));
            g.throughput(Throughput::Elements((2 * t * k * n) as u64));
            g.bench_function(format!("{name}_t{t}"), |b| {
                b.iter(|| kernels::linear_into(black_box(x.view()), &ring[0], y.view_mut()).unwrap())
            });
            g.bench_function(format!("{name}_t{t}_cold"), |b| {
                b.iter(|| {
                    next = (next + 1) % ring.len();
                    kernels::linear_into(black_box(x.view()), &ring[next], y.view_mut()).unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, decode, prefill, tokens);
criterion_main!(benches);
