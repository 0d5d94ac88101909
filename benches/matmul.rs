//! `linear_into` throughput: decode (T = 1, bound by memory bandwidth, reported as weight bytes
//! per second), prefill (T = 128, bound by FMA throughput, reported as flops per second), and a
//! memory-read probe (1 GiB summed with 1 and 2 threads) to compare decode against.
//!
//! `batch_shapes`: the shapes of a batched decode step (bench-mid, 1 to 32 rows).
//!
//! `cargo bench --bench matmul` (add a filter such as `decode` to run one group);
//! `LLAMA4_KERNEL=avx2|portable` measures another path.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama4_core::kernels;
use llama4_core::{DType, Layout, Weight};
use ndarray::Array2;
use rayon::prelude::*;

mod common;
use common::values;

/// An `out × in` weight in `dtype` and `layout`.
fn weight(n_out: usize, n_in: usize, dtype: DType, layout: Layout) -> Weight {
    let v = values(n_out * n_in, 1);
    match layout {
        Layout::OutIn => Weight::from_out_in(Array2::from_shape_vec((n_out, n_in), v).unwrap().view(), dtype),
        Layout::InOut => Weight::from_in_out(Array2::from_shape_vec((n_in, n_out), v).unwrap().view(), dtype),
    }
}

fn name(dtype: DType, layout: Layout, n_out: usize, n_in: usize) -> String {
    let l = match layout {
        Layout::OutIn => "out_in",
        Layout::InOut => "in_out",
    };
    format!("{dtype:?}_{l}_{n_out}x{n_in}").to_lowercase()
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // Each weight is 64 MiB. The L3 of these machines can be 300 MiB, so one weight called in
    // a loop would be served from cache: a ring of 12 distinct weights (768 MiB) makes every
    // call stream its weight from memory, as a decode step over a real model does.
    const RING: usize = 12;
    for (dtype, layout, n_out, n_in) in [
        (DType::F32, Layout::OutIn, 4096, 4096),
        (DType::BF16, Layout::OutIn, 8192, 4096),
        (DType::BF16, Layout::InOut, 8192, 4096),
        (DType::F16, Layout::OutIn, 8192, 4096),
    ] {
        let ring: Vec<Weight> = (0..RING).map(|_| weight(n_out, n_in, dtype, layout)).collect();
        let x = Array2::from_shape_vec((1, n_in), values(n_in, 2)).unwrap();
        let mut y = Array2::zeros((1, n_out));
        g.throughput(Throughput::Bytes(ring[0].nbytes() as u64));
        let mut next = 0;
        g.bench_function(name(dtype, layout, n_out, n_in), |b| {
            b.iter(|| {
                next = (next + 1) % RING;
                kernels::linear_into(black_box(x.view()), &ring[next], y.view_mut()).unwrap()
            })
        });
    }
    g.finish();
}

fn prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill_t128");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let t = 128;
    for (dtype, layout) in [
        (DType::F32, Layout::OutIn),
        (DType::F32, Layout::InOut),
        (DType::BF16, Layout::OutIn),
        (DType::BF16, Layout::InOut),
    ] {
        let (n_out, n_in) = (4096, 4096);
        let w = weight(n_out, n_in, dtype, layout);
        let x = Array2::from_shape_vec((t, n_in), values(t * n_in, 3)).unwrap();
        let mut y = Array2::zeros((t, n_out));
        g.throughput(Throughput::Elements((2 * t * n_in * n_out) as u64));
        g.bench_function(name(dtype, layout, n_out, n_in), |b| {
            b.iter(|| kernels::linear_into(black_box(x.view()), &w, y.view_mut()).unwrap())
        });
    }
    g.finish();
}

/// What the decode numbers are measured against: reading 1 GiB once, on 1 and 2 threads.
fn memory_bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("membw_read_1gib");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let data: Vec<u64> = (0..(1usize << 27)).map(|i| i as u64).collect();
    g.throughput(Throughput::Bytes((data.len() * 8) as u64));
    // Integer sums into 8 independent lanes vectorise fully (no floating-point reassociation
    // to forbid it), so the loop is bound by loads, not by a dependency chain of adds.
    let sum = |s: &[u64]| {
        let mut lanes = [0u64; 8];
        for c in s.chunks_exact(8) {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.wrapping_add(v);
            }
        }
        lanes.iter().fold(0u64, |a, &v| a.wrapping_add(v))
    };
    g.bench_function("1_thread", |b| b.iter(|| sum(black_box(&data))));
    g.bench_function("2_threads", |b| {
        b.iter(|| {
            black_box(&data)
                .par_chunks(data.len() / 2)
                .map(sum)
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    g.finish();
}

/// The calls of a batched decode step on bench-mid's shapes (bf16, a ring of 48 weights so each
/// call streams from memory): 1024 × 1024 projections over 1 and 8 rows, and expert matrices
/// (`[in, out]`) over the 1-2 rows a step routes to one expert. Bytes per second of weight: at
/// bandwidth, more rows should cost little more than one.
fn batch_shapes(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_shapes");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    const RING: usize = 48;
    for (layout, n_out, n_in, t) in [
        (Layout::OutIn, 1024, 1024, 1),
        (Layout::OutIn, 1024, 1024, 2),
        (Layout::OutIn, 1024, 1024, 4),
        (Layout::OutIn, 1024, 1024, 8),
        (Layout::OutIn, 1024, 1024, 16),
        (Layout::OutIn, 1024, 1024, 32),
        (Layout::InOut, 2048, 1024, 1),
        (Layout::InOut, 2048, 1024, 2),
        (Layout::InOut, 1024, 1024, 1),
    ] {
        let ring: Vec<Weight> = (0..RING)
            .map(|_| weight(n_out, n_in, DType::BF16, layout))
            .collect();
        let x = Array2::from_shape_vec((t, n_in), values(t * n_in, 2)).unwrap();
        let mut y = Array2::zeros((t, n_out));
        g.throughput(Throughput::Bytes(ring[0].nbytes() as u64));
        let mut next = 0;
        g.bench_function(format!("{}_t{t}", name(DType::BF16, layout, n_out, n_in)), |b| {
            b.iter(|| {
                next = (next + 1) % RING;
                kernels::linear_into(black_box(x.view()), &ring[next], y.view_mut()).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, batch_shapes, memory_bandwidth, decode, prefill);
criterion_main!(benches);
