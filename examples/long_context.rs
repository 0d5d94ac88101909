//! Long context on the demo model: the context grows to 256K tokens (or `--max-context N`, up to
//! 10M); at each size the example prints the cache memory of the chunked layers (bounded by the
//! chunk size) and of the global NoPE layers (growing with the context), the time of a decode
//! step, and the rate at which that step reads the cache against the machine's measured read
//! bandwidth. It ends with one JSON line for the largest context:
//! `{"context", "kv_bytes", "decode_ms", "kv_read_gb_s", "bandwidth_gb_s", "total_s"}`.
//!
//! ```text
//! cargo run --release --example long_context [-- --model DIR] [--max-context 262144] [--cache bf16|f16|f32|q8]
//! ```
//! The context is filled with the model's own task tokens, in prefill pieces of 4096 tokens. The
//! "decode" column is the mean of 8 steps taken at that context (the KV figures include them),
//! after one untimed step that grows the cache past the full capacity a power of two leaves.
//! "KV read" is the bytes of keys and values a decode step's attention reads (every position
//! each layer holds, K and V, in the cache's format) over the step's time; the bandwidth is the
//! best of 5 sums of a 256 MiB array on all the kernel pool's threads. First, Scout's and
//! Maverick's cache sizes at 128K, 1M and 10M tokens for every cache format, from the estimate
//! the caches' own sizes are checked against.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llama4_core::{pool, KvDtype};
use llama4_model::kv_cache::{CacheSpec, KvCache, MemoryBytes};
use llama4_model::{LayerKind, Logits, Session, TextConfig, TextModel};

type Error = Box<dyn std::error::Error>;

const PIECE: usize = 4096;
const DECODE_STEPS: usize = 8;
/// The largest `--max-context` (Scout's 10M, `max_position_embeddings` 10485760).
const MAX_CONTEXT: usize = 10 << 20;
const GIB: f64 = (1u64 << 30) as f64;

fn main() -> std::process::ExitCode {
    llama4_examples::report(try_main())
}

fn try_main() -> Result<(), Error> {
    let started = Instant::now();
    let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"));
    let mut max_context = 256 * 1024;
    let mut dtype = KvDtype::BF16;
    let mut args = llama4_examples::utf8_args()?;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => dir = args.next().ok_or("--model needs a directory")?.into(),
            "--max-context" => {
                let v = args.next().ok_or("--max-context needs a value")?;
                max_context = v
                    .parse()
                    .ok()
                    .filter(|n| (1024..=MAX_CONTEXT).contains(n))
                    .ok_or_else(|| format!("--max-context takes 1024 to {MAX_CONTEXT}, not `{v}`"))?;
            }
            "--cache" => dtype = llama4_examples::parse_kv_dtype(&a, args.next().as_deref())?,
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    published_estimates()?;

    let model = TextModel::load(&dir)?;
    let cfg = model.config();
    // The layout the estimates above derive from a config must be the one the model caches.
    if config_kinds(cfg)? != model.cache_kinds() {
        return Err("the config's layer kinds differ from the model's cache layout".into());
    }
    let chunked = cfg.layers.iter().filter(|l| l.chunk.is_some()).count();
    println!(
        "\n{}: {} layers: {chunked} chunked (chunk {:?}), {} global; {} kv heads × {} dims; cache in {dtype}",
        dir.display(),
        cfg.layers.len(),
        cfg.attention.attention_chunk_size,
        cfg.layers.len() - chunked,
        cfg.attention.num_key_value_heads,
        cfg.attention.head_dim
    );
    let threads = pool::threads();
    let bandwidth = read_bandwidth();
    println!("read bandwidth, {threads} threads (sum of a 256 MiB array, best of 5): {bandwidth:.1} GB/s");
    // The demo was configured with a short max_position_embeddings; NoPE layers and chunked RoPE
    // layers have no positional limit of their own, so lift it for this experiment.
    let mut session = Session::new(&model, dtype)?.with_max_len(max_context + DECODE_STEPS + 2);
    let spec = session.cache().spec();
    let kinds: Vec<LayerKind> = session.cache().kinds().collect();

    // Filler: the demo's own kind of text, cycled over the non-special vocabulary.
    let filler: Vec<u32> = (0..PIECE).map(|i| 13 + (i * 7 % 12) as u32).collect();
    println!(
        "{:>9}  {:>12}  {:>12}  {:>10}  {:>12}  {:>12}  {:>12}",
        "context", "chunked KV", "global KV", "decode ms", "KV read GB/s", "of bandwidth", "prefill tok/s"
    );
    let mut last = None;
    let mut target = 1024;
    while target <= max_context {
        let t0 = Instant::now();
        let mut filled = 0;
        while session.len() < target {
            let n = (target - session.len()).min(PIECE);
            session.prefill(&filler[..n], Logits::Last)?;
            filled += n;
        }
        let prefill_rate = filled as f64 / t0.elapsed().as_secs_f64();
        // One step untimed: the first step past a page boundary allocates a page, which is
        // not the steady decode being measured.
        session.step(13)?;
        let (mut decode, mut read) = (Duration::ZERO, 0u64);
        for i in 0..DECODE_STEPS {
            let t1 = Instant::now();
            session.step(14 + i as u32)?;
            decode += t1.elapsed();
            read += kv_read_bytes(session.cache())?;
        }
        let per_token = decode.as_secs_f64() * 1e3 / DECODE_STEPS as f64;
        let read_rate = read as f64 / decode.as_secs_f64() / 1e9;
        let mem = session.cache_memory();
        // What the cache allocated is what its estimate says for this many tokens.
        let estimate = spec.estimate(&kinds, session.len())?;
        if mem != estimate {
            return Err(format!("cache holds {mem:?}, its estimate says {estimate:?}").into());
        }
        println!(
            "{target:>9}  {:>9.1} KB  {:>9.1} MB  {per_token:>10.3}  {read_rate:>12.2}  {:>11.0}%  {prefill_rate:>12.0}",
            mem.chunked as f64 / 1e3,
            mem.global as f64 / 1e6,
            100.0 * read_rate / bandwidth,
        );
        last = Some((target, mem, per_token, read_rate));
        // Rewind the decode steps so that each row's context is exactly the target (a multiple
        // of the chunk size, so the chunked layers can rewind too).
        session.truncate(target)?;
        target *= 2;
    }
    if let Some((context, mem, decode_ms, read_rate)) = last {
        println!(
            "{}",
            serde_json::json!({
                "context": context,
                "kv_bytes": mem.total(),
                "decode_ms": decode_ms,
                "kv_read_gb_s": read_rate,
                "bandwidth_gb_s": bandwidth,
                "total_s": started.elapsed().as_secs_f64(),
            })
        );
    }
    Ok(())
}

/// Each layer's kind as a config gives it (a chunk size, or global).
fn config_kinds(cfg: &TextConfig) -> Result<Vec<LayerKind>, Error> {
    cfg.layers
        .iter()
        .map(|l| LayerKind::from_chunk_size(l.chunk).ok_or_else(|| "a layer has chunk size 0".into()))
        .collect()
}

/// Bytes a decode step's attention reads now: keys and values of every position each layer
/// holds (the step's own token included), in the cache's format.
fn kv_read_bytes(cache: &KvCache) -> Result<u64, Error> {
    let spec = cache.spec();
    (0..cache.num_layers()).try_fold(0u64, |acc, i| Ok(acc + spec.layer_bytes(cache.layer(i)?.held())?))
}

/// Scout's and Maverick's caches at 128K, 1M and 10M tokens, each format: the caches' own
/// estimate (whole pages; these sizes are whole pages).
fn published_estimates() -> Result<(), Error> {
    println!("Llama 4 caches by format, chunked + global layers (GiB = 2³⁰ B; the caches' estimate)");
    println!(
        "{:<9} {:<5} {:>28} {:>28} {:>28}",
        "model", "cache", "128K", "1M", "10M"
    );
    for (name, cfg) in [
        ("Scout", TextConfig::scout()),
        ("Maverick", TextConfig::maverick()),
    ] {
        let kinds = config_kinds(&cfg)?;
        for dtype in [KvDtype::F32, KvDtype::BF16, KvDtype::F16, KvDtype::Q8] {
            let spec = CacheSpec::new(cfg.attention.num_key_value_heads, cfg.attention.head_dim, dtype);
            let cells = [128 << 10, 1 << 20, 10 << 20]
                .into_iter()
                .map(|n| {
                    let MemoryBytes { chunked, global } = spec.estimate(&kinds, n)?;
                    Ok(format!(
                        "{:.3} + {:.2} = {:.2}",
                        chunked as f64 / GIB,
                        global as f64 / GIB,
                        (chunked + global) as f64 / GIB
                    ))
                })
                .collect::<Result<Vec<_>, Error>>()?;
            println!(
                "{name:<9} {:<5} {:>28} {:>28} {:>28}",
                dtype.to_string(),
                cells[0],
                cells[1],
                cells[2]
            );
        }
    }
    Ok(())
}

/// Read bandwidth in GB/s (10⁹ B/s): the best of 5 wrapping sums of a 256 MiB array (far beyond
/// the caches), split over the kernel pool's threads as attention splits its keys.
fn read_bandwidth() -> f64 {
    const WORDS: usize = (256 << 20) / 8;
    let data: Vec<u64> = (0..WORDS as u64).collect();
    let threads = pool::threads();
    let part = WORDS.div_ceil(threads);
    let sums: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        pool::run(threads, &|i| {
            let slice = std::hint::black_box(&data[(i * part).min(WORDS)..((i + 1) * part).min(WORDS)]);
            let s = slice.iter().fold(0u64, |a, &x| a.wrapping_add(x));
            sums[i].store(s, Ordering::Relaxed);
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    let total = sums
        .iter()
        .fold(0u64, |a, s| a.wrapping_add(s.load(Ordering::Relaxed)));
    std::hint::black_box(total);
    (WORDS * 8) as f64 / best / 1e9
}
