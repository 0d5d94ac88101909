//! One decode step (T = 1) of the attention kernel at long context, Scout's head layout
//! (40 query heads, 8 kv heads, head dim 128), bf16 K/V views as the cache hands them out.
//!
//! - `chunked`: a RoPE layer with chunk 8192; its cache holds only the current chunk, so it
//!   reads at most 8192 keys whatever the context.
//! - `global`: a NoPE layer; it reads every key of the context.
//!
//! - `in_cache`: 512 keys (2 MiB of K/V, heads packed), which stay in L2: the kernel's
//!   arithmetic ceiling, with memory out of the way.
//!
//! Throughput is the K/V bytes read per step, so criterion reports GB/s to compare with the
//! machine's memory bandwidth.
//!
//! `prefill`: a piece of query tokens at the end of a causal (global) context, where the
//! kernel is bound by arithmetic; throughput is the visible query-key pairs per call
//! (query heads × keys each query sees), so criterion reports pairs per second.
//! - `demo`: the demo model's layout (4 query heads, 2 kv heads, head dim 16), 512 tokens at
//!   32K context, as `examples/long_context.rs` prefills.
//! - `scout`: Scout's layout, 64 tokens at 8K context.
//! - `mid`: `bench-mid`'s layout (16 query heads, 4 kv heads, head dim 64), a 512-token prompt
//!   prefilled from position 0, as `examples/bench_generate.rs --prompt-len 512` does.
//!
//! Run: `cargo bench --bench attention` (`-- decode` or `-- prefill` for one part).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use irope_attn::{attention, AttnContext, LayerKind};
use llama4_core::{KvData, KvView};
use ndarray::Array3;

const HQ: usize = 40;
const HKV: usize = 8;
const D: usize = 128;
const CHUNK: usize = 8192;
const MAX_CTX: usize = 128 * 1024;

/// Deterministic values in [-1, 1) (a 64-bit LCG), cheap enough to fill 512 MiB.
fn fill(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    // One allocation of the longest context; shorter contexts are prefix views of it (the
    // head stride stays that of the full buffer, as a growing cache's would).
    let k = fill(HKV * MAX_CTX * D, 1);
    let v = fill(HKV * MAX_CTX * D, 2);
    let q = Array3::from_shape_vec((1, HQ, D), fill(HQ * D, 3).iter().map(|x| x.to_f32()).collect())
        .expect("sized");
    let scale = 1.0 / (D as f32).sqrt();

    let mut group = c.benchmark_group("attention_decode_bf16");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(4));
    for ctx_len in [4 * 1024, 32 * 1024, 128 * 1024] {
        let pos = ctx_len - 1;
        for (name, mask) in [
            ("chunked", LayerKind::chunked(CHUNK).expect("non-zero chunk")),
            ("global", LayerKind::Global),
        ] {
            // A chunked cache holds keys C·floor(p/C) ..= p, stored from slot 0.
            let vis = mask.visible(pos);
            let (first_pos, len) = (vis.start, vis.len());
            let kv = KvView {
                data: KvData::BF16(&k),
                heads: HKV,
                len,
                head_dim: D,
                head_stride: MAX_CTX * D,
                first_pos,
            };
            let vv = KvView {
                data: KvData::BF16(&v),
                ..kv
            };
            let positions = [pos];
            let actx = AttnContext {
                positions: &positions,
                mask: &mask,
                scale,
            };
            let bytes = 2 * HKV * len * D * std::mem::size_of::<bf16>();
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_with_input(BenchmarkId::new(name, ctx_len), &ctx_len, |b, _| {
                b.iter(|| attention(q.view(), &kv, &vv, &actx).expect("valid shapes"))
            });
        }
    }
    group.finish();

    // The kernel's arithmetic ceiling: a context small enough (2 MiB of K/V) to stay in the
    // cores' L2, so memory does not limit it. Decoding at long context reaches memory
    // bandwidth only if this is well above it.
    let mut group = c.benchmark_group("attention_decode_bf16_in_cache");
    group.sample_size(20);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(2));
    let len = 512;
    let kv = KvView {
        data: KvData::BF16(&k),
        heads: HKV,
        len,
        head_dim: D,
        head_stride: len * D,
        first_pos: 0,
    };
    let vv = KvView {
        data: KvData::BF16(&v),
        ..kv
    };
    let positions = [len - 1];
    let actx = AttnContext {
        positions: &positions,
        mask: &LayerKind::Global,
        scale,
    };
    group.throughput(Throughput::Bytes(
        (2 * HKV * len * D * std::mem::size_of::<bf16>()) as u64,
    ));
    group.bench_function(BenchmarkId::new("global", len), |b| {
        b.iter(|| attention(q.view(), &kv, &vv, &actx).expect("valid shapes"))
    });
    group.finish();
}

fn prefill(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_prefill_bf16");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(4));
    for (name, hq, hkv, d, ctx_len, t) in [
        ("demo", 4, 2, 16, 32 * 1024, 512),
        ("scout", HQ, HKV, D, 8 * 1024, 64),
        ("mid", 16, 4, 64, 512, 512),
    ] {
        let k = fill(hkv * ctx_len * d, 4);
        let v = fill(hkv * ctx_len * d, 5);
        let q = Array3::from_shape_vec(
            (t, hq, d),
            fill(t * hq * d, 6).iter().map(|x| x.to_f32()).collect(),
        )
        .expect("sized");
        let kv = KvView {
            data: KvData::BF16(&k),
            heads: hkv,
            len: ctx_len,
            head_dim: d,
            head_stride: ctx_len * d,
            first_pos: 0,
        };
        let vv = KvView {
            data: KvData::BF16(&v),
            ..kv
        };
        let positions: Vec<usize> = (ctx_len - t..ctx_len).collect();
        let actx = AttnContext {
            positions: &positions,
            mask: &LayerKind::Global,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let pairs: usize = positions.iter().map(|&p| hq * (p + 1)).sum();
        group.throughput(Throughput::Elements(pairs as u64));
        group.bench_function(BenchmarkId::new(name, ctx_len), |b| {
            b.iter(|| attention(q.view(), &kv, &vv, &actx).expect("valid shapes"))
        });
    }
    group.finish();
}

criterion_group!(benches, decode, prefill);
criterion_main!(benches);
