//! Long context on the demo model: the context grows to 256K tokens (or `--max-context N`);
//! at each size the example prints the cache memory of the chunked layers (bounded by the chunk
//! size) and of the global NoPE layers (growing with the context), and the time of a decode step.
//!
//! ```text
//! cargo run --release --example long_context [-- --model DIR] [--max-context 262144] [--cache bf16|f16|f32|q8]
//! ```
//! The context is filled with the model's own task tokens, in prefill pieces of 4096 tokens. The
//! "decode" column is the mean of 8 steps taken at that context (the KV figures include them).

use std::path::PathBuf;
use std::time::Instant;

use llama4_core::KvDtype;
use llama4_model::{Logits, Session, TextModel};

type Error = Box<dyn std::error::Error>;

const PIECE: usize = 4096;
const DECODE_STEPS: usize = 8;

fn main() -> std::process::ExitCode {
    llama4_examples::report(try_main())
}

fn try_main() -> Result<(), Error> {
    let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"));
    let mut max_context = 256 * 1024;
    let mut dtype = KvDtype::BF16;
    let mut args = llama4_examples::utf8_args()?;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => dir = args.next().ok_or("--model needs a directory")?.into(),
            "--max-context" => max_context = args.next().ok_or("--max-context needs a value")?.parse()?,
            "--cache" => dtype = llama4_examples::parse_kv_dtype(&a, args.next().as_deref())?,
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    let model = TextModel::load(&dir)?;
    let cfg = model.config();
    let chunked = cfg.layers.iter().filter(|l| l.chunk.is_some()).count();
    println!(
        "{} layers: {chunked} chunked (chunk {:?}), {} global; {} kv heads × {} dims; cache in {dtype}",
        cfg.layers.len(),
        cfg.attention_chunk_size,
        cfg.layers.len() - chunked,
        cfg.num_key_value_heads,
        cfg.head_dim
    );
    // The demo was configured with a short max_position_embeddings; NoPE layers and chunked RoPE
    // layers have no positional limit of their own, so lift it for this experiment.
    let mut session = Session::new(&model, dtype)?.with_max_len(max_context + DECODE_STEPS + 1);

    // Filler: the demo's own kind of text, cycled over the non-special vocabulary.
    let filler: Vec<u32> = (0..PIECE).map(|i| 13 + (i * 7 % 12) as u32).collect();
    println!(
        "{:>9}  {:>14}  {:>14}  {:>16}  {:>12}",
        "context", "chunked KV", "global KV", "decode ms/token", "prefill tok/s"
    );
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
        let t1 = Instant::now();
        for i in 0..DECODE_STEPS {
            session.step(14 + i as u32)?;
        }
        let per_token = t1.elapsed().as_secs_f64() * 1e3 / DECODE_STEPS as f64;
        let mem = session.cache_memory();
        println!(
            "{target:>9}  {:>11.1} KB  {:>11.1} KB  {per_token:>16.3}  {prefill_rate:>12.0}",
            mem.chunked as f64 / 1e3,
            mem.global as f64 / 1e3,
        );
        // Rewind the decode steps so that each row's context is exactly the target (a multiple
        // of the chunk size, so the chunked layers can rewind too).
        session.truncate(target)?;
        target *= 2;
    }
    Ok(())
}
