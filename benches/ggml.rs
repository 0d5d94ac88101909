//! ggml weights (Q4_K, Q8_0) through `linear_into`: decode (T = 1, reported as weight bytes
//! per second) and prefill (T = 128 and 512, reported as `2 · T · in · out` flops per second),
//! at llama.cpp's `test-backend-ops perf -o MUL_MAT` shapes (4096 outputs of 14,336 and of
//! 4,096 inputs) so the two can be set side by side.
//!
//! `ggml_decode` reuses one weight (as test-backend-ops does: 4096 × 4096 stays in a 32 MiB L3,
//! 4096 × 14336 does not); `ggml_decode_ring` cycles through copies larger than the L3, as a
//! decode step over a model reads from memory.
//!
//! `cargo bench --bench ggml` (a filter such as `decode` runs one group);
//! `LLAMA4_KERNEL=portable` measures another path.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama4_core::ggml::{GgmlData, GgmlType};
use llama4_core::{kernels, Buffer, Layout, Weight, WeightData};
use ndarray::Array2;

mod common;
use common::values;

#[path = "../crates/core/tests/common/ggml_blocks.rs"]
mod blocks;

const TYPES: [GgmlType; 2] = [GgmlType::Q4K, GgmlType::Q8_0];
/// `(out, in)` shapes of llama.cpp's perf cases.
const SHAPES: [(usize, usize); 2] = [(4096, 14336), (4096, 4096)];
const RING_BYTES: usize = 256 << 20;

fn weight(ty: GgmlType, n: usize, k: usize, seed: u64) -> Weight {
    let data = GgmlData::new(
        ty,
        Buffer::from_vec(blocks::random_blocks(ty, n * k, seed)),
        n * k,
    )
    .unwrap();
    Weight::new(WeightData::Ggml(Box::new(data)), Layout::OutIn, n, k).unwrap()
}

fn decode(c: &mut Criterion) {
    for ring in [false, true] {
        let mut g = c.benchmark_group(if ring { "ggml_decode_ring" } else { "ggml_decode" });
        g.sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for ty in TYPES {
            for (n, k) in SHAPES {
                let bytes = ty.bytes_for(n * k).unwrap();
                g.throughput(Throughput::Bytes(bytes as u64));
                let x = Array2::from_shape_vec((1, k), values(k, 2)).unwrap();
                let mut y = Array2::zeros((1, n));
                let mut cache: Option<Vec<Weight>> = None;
                let mut next = 0;
                g.bench_function(format!("{ty}_{n}x{k}"), |b| {
                    let copies = if ring { RING_BYTES.div_ceil(bytes) } else { 1 };
                    let ws = cache
                        .get_or_insert_with(|| (0..copies).map(|i| weight(ty, n, k, i as u64 + 1)).collect());
                    b.iter(|| {
                        next = (next + 1) % ws.len();
                        kernels::linear_into(black_box(x.view()), &ws[next], y.view_mut()).unwrap()
                    })
                });
            }
        }
        g.finish();
    }
}

fn prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("ggml_prefill");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let (n, k) = SHAPES[0];
    for t in [128, 512] {
        let x = Array2::from_shape_vec((t, k), values(t * k, 3)).unwrap();
        let mut y = Array2::zeros((t, n));
        g.throughput(Throughput::Elements((2 * t * k * n) as u64));
        for ty in TYPES {
            let mut cache: Option<Weight> = None;
            g.bench_function(format!("{ty}_t{t}_{n}x{k}"), |b| {
                let w = cache.get_or_insert_with(|| weight(ty, n, k, 1));
                b.iter(|| kernels::linear_into(black_box(x.view()), w, y.view_mut()).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, decode, prefill);
criterion_main!(benches);
