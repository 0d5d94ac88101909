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
//!   32K context, as `examples/long_context.rs` prefills; `demo_q8` the same over a q8 cache
//!   (on CPUs with AVX-512 BF16, the bf16-dot kernel).
//! - `scout`: Scout's layout, 64 tokens at 8K context.
//! - `mid`: `bench-mid`'s layout (16 query heads, 4 kv heads, head dim 64), a 512-token prompt
//!   prefilled from position 0, as `examples/bench_generate.rs --prompt-len 512` does.
//!
//! `attention_decode_demo`: one decode step over the demo model's two global layers (4 query
//! heads, 2 kv heads, head dim 16) at 256K and 1M keys, in each cache format, as
//! `examples/long_context.rs` decodes; throughput is the K/V bytes of both layers (in the
//! format, q8's scales included), each layer its own buffer so that a step reads beyond the
//! last-level cache. At 256K and beyond, the same again from a `LayerCache`'s pages
//! (`{format}_pages_of_{N}`: the automatic page length, and one page of the whole context).
//!
//! Run: `cargo bench --bench attention` (`-- decode` or `-- prefill` for one part).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use irope_attn::{attention, AttnContext, LayerKind};
use llama4_core::{pool, quantize_q8, KvData, KvDtype, KvView};
use llama4_model::kv_cache::{CacheSpec, LayerCache};
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
            let kv = KvView::contiguous(KvData::BF16(&k), HKV, len, D, MAX_CTX * D, first_pos);
            let vv = KvView::contiguous(KvData::BF16(&v), HKV, len, D, MAX_CTX * D, first_pos);
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
    let kv = KvView::contiguous(KvData::BF16(&k), HKV, len, D, len * D, 0);
    let vv = KvView::contiguous(KvData::BF16(&v), HKV, len, D, len * D, 0);
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

/// Elements of one layer's K (or V) in a cache format.
enum Buf {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    Q8(Vec<i8>, Vec<f32>),
}

impl Buf {
    fn new(dtype: KvDtype, n: usize, d: usize, seed: u64) -> Self {
        let x = fill(n, seed);
        match dtype {
            KvDtype::F32 => Buf::F32(x.iter().map(|v| v.to_f32()).collect()),
            KvDtype::Q8 => Buf::Q8(
                x.iter().map(|v| (v.to_f32() * 127.0) as i8).collect(),
                (0..n / d).map(|i| 0.01 + (i % 7) as f32 * 1e-3).collect(),
            ),
            _ => Buf::BF16(x),
        }
    }

    fn data(&self) -> KvData<'_> {
        match self {
            Buf::F32(v) => KvData::F32(v),
            Buf::BF16(v) => KvData::BF16(v),
            Buf::Q8(q, scales) => KvData::Q8 { q, scales },
        }
    }
}

fn decode_demo(c: &mut Criterion) {
    const LAYERS: usize = 2;
    let (hq, hkv, d) = (4, 2, 16);
    let mut group = c.benchmark_group("attention_decode_demo");
    group.sample_size(20);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(3));
    // The reference: a 256 MiB array summed on all the pool's threads (as `long_context`
    // measures its bandwidth), taken in the same run as the kernels it is compared with.
    let words: Vec<u64> = (0..(32u64 << 20)).collect();
    let threads = pool::threads();
    let part = words.len().div_ceil(threads);
    group.throughput(Throughput::Bytes((words.len() * 8) as u64));
    group.bench_function(BenchmarkId::new("read_bandwidth", threads), |b| {
        b.iter(|| {
            pool::run(threads, &|i| {
                let s = &words[(i * part).min(words.len())..((i + 1) * part).min(words.len())];
                std::hint::black_box(s.iter().fold(0u64, |a, &x| a.wrapping_add(x)));
            })
        })
    });
    drop(words);
    let q = Array3::from_shape_vec((1, hq, d), fill(hq * d, 3).iter().map(|x| x.to_f32()).collect())
        .expect("sized");
    for (dtype, len) in [
        // 1 MiB of K/V in all, in the cores' caches: the kernel's arithmetic ceiling.
        (KvDtype::BF16, 4 << 10),
        // 5 MiB, in the last-level cache: the same ceiling for q8, whose bytes per key are
        // fewer and whose work per key is not.
        (KvDtype::Q8, 32 << 10),
        (KvDtype::BF16, 256 << 10),
        (KvDtype::Q8, 256 << 10),
        (KvDtype::F32, 256 << 10),
        (KvDtype::Q8, 1 << 20),
    ] {
        let bufs: Vec<(Buf, Buf)> = (0..LAYERS as u64)
            .map(|l| {
                (
                    Buf::new(dtype, hkv * len * d, d, 10 + 2 * l),
                    Buf::new(dtype, hkv * len * d, d, 11 + 2 * l),
                )
            })
            .collect();
        let positions = [len - 1];
        let actx = AttnContext {
            positions: &positions,
            mask: &LayerKind::Global,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let views: Vec<(KvView, KvView)> = bufs
            .iter()
            .map(|(k, v)| {
                let kv = KvView::contiguous(k.data(), hkv, len, d, len * d, 0);
                (kv, KvView::contiguous(v.data(), hkv, len, d, len * d, 0))
            })
            .collect();
        let bytes = LAYERS * 2 * hkv * len * dtype.vector_bytes(d);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new(dtype.to_string(), len), |b| {
            b.iter(|| {
                for (kv, vv) in &views {
                    attention(q.view(), kv, vv, &actx).expect("valid shapes");
                }
            })
        });
        drop(views);
        drop(bufs);
        if len < 256 << 10 {
            continue;
        }
        // The same read from a cache's pages: the automatic page length, and one page of
        // the whole context (the same values in one buffer per head), to separate what the
        // pages cost from what the data does.
        for page in [0, len] {
            let layers: Vec<LayerCache> = (0..LAYERS as u64)
                .map(|l| {
                    filled_cache(
                        CacheSpec::new(hkv, d, dtype).with_page_len(page),
                        len,
                        100 + 64 * l,
                    )
                })
                .collect();
            let page_len = layers[0].page_len();
            group.bench_function(
                BenchmarkId::new(format!("{dtype}_pages_of_{page_len}"), len),
                |b| {
                    b.iter(|| {
                        for layer in &layers {
                            let view = layer.view();
                            attention(q.view(), &view.k, &view.v, &actx).expect("valid shapes");
                        }
                    })
                },
            );
        }
    }
    group.finish();
}

/// A global layer's cache of `len` positions of pseudo-random keys (values the same).
fn filled_cache(spec: CacheSpec, len: usize, seed: u64) -> LayerCache {
    const PIECE: usize = 4096;
    let (hkv, d) = (spec.kv_heads, spec.head_dim);
    let mut cache = LayerCache::new(LayerKind::Global, spec).expect("spec");
    cache.reserve(len).expect("memory");
    for (i, start) in (0..len).step_by(PIECE).enumerate() {
        let n = PIECE.min(len - start);
        let x = fill(n * hkv * d, seed + i as u64);
        let x = Array3::from_shape_vec((n, hkv, d), x.iter().map(|v| v.to_f32()).collect()).expect("sized");
        cache.append(x.view(), x.view()).expect("append");
    }
    cache
}

fn prefill(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_prefill_bf16");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(4));
    for (name, hq, hkv, d, ctx_len, t, q8) in [
        ("demo", 4, 2, 16, 32 * 1024, 512, false),
        ("demo_q8", 4, 2, 16, 32 * 1024, 512, true),
        ("scout", HQ, HKV, D, 8 * 1024, 64, false),
        ("mid", 16, 4, 64, 512, 512, false),
    ] {
        let k = fill(hkv * ctx_len * d, 4);
        let v = fill(hkv * ctx_len * d, 5);
        let q = Array3::from_shape_vec(
            (t, hq, d),
            fill(t * hq * d, 6).iter().map(|x| x.to_f32()).collect(),
        )
        .expect("sized");
        // q8: the same values quantised per head vector, as the cache stores them.
        let quant = |x: &[bf16]| {
            let mut q = vec![0i8; x.len()];
            let s: Vec<f32> = x
                .chunks_exact(d)
                .zip(q.chunks_exact_mut(d))
                .map(|(x, q)| quantize_q8(&x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), q))
                .collect();
            (q, s)
        };
        let ((kq, ks), (vq, vs)) = if q8 {
            (quant(&k), quant(&v))
        } else {
            Default::default()
        };
        let (kd, vd) = if q8 {
            (
                KvData::Q8 { q: &kq, scales: &ks },
                KvData::Q8 { q: &vq, scales: &vs },
            )
        } else {
            (KvData::BF16(&k), KvData::BF16(&v))
        };
        let kv = KvView::contiguous(kd, hkv, ctx_len, d, ctx_len * d, 0);
        let vv = KvView::contiguous(vd, hkv, ctx_len, d, ctx_len * d, 0);
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

criterion_group!(benches, decode, decode_demo, prefill);
criterion_main!(benches);
