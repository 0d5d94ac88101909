//! Key-value retrieval at long context on the length-generalisation demo (models/longctx-demo):
//! accuracy at `--context N` tokens of a model trained on at most 1024.
//!
//! ```text
//! cargo run --release --example needle -- --context 65536 --samples 64
//! cargo run --release --example needle -- --context 65536 --samples 64 --no-temperature
//! cargo run --release --example needle -- --context 4096 --model models/longctx-demo-allrope
//! ```
//!
//! Options:
//! ```text
//! --context N          prompt length in tokens (even), the query included
//! --samples K          held-out samples (default: one context's pairs); sample j is context
//!                      j / pairs asked for its pair j % pairs (models/longctx-demo/task.rs)
//! --model DIR          checkpoint directory with task.json (default: models/longctx-demo)
//! --no-temperature     turn attention temperature tuning off (it is on in the checkpoint's config)
//! --dump-logits FILE   safetensors with "logits" F32 [K, vocab] (the answer position of each
//!                      sample) and "answers" I64 [K], to compare with the reference
//! ```
//! Each context is prefilled once (in pieces of 4096 tokens); each of its queries is then run
//! as two more tokens and rewound. The last line of stdout is one JSON object with `context`,
//! `samples`, `accuracy` and `train_context`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use llama4_core::{Checkpoint, DType};
use llama4_model::{Logits, ModelConfig, Session, TextModel};

#[path = "../models/longctx-demo/task.rs"]
mod task;
use task::Task;

type Error = Box<dyn std::error::Error>;

const DEMO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/longctx-demo");
/// Prefill piece: bounds the `[T, H]` activations of one call whatever the context.
const PIECE: usize = 4096;

struct Args {
    context: usize,
    samples: Option<usize>,
    model: PathBuf,
    no_temperature: bool,
    dump_logits: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut context = None;
    let mut a = Args {
        context: 0,
        samples: None,
        model: PathBuf::from(DEMO_DIR),
        no_temperature: false,
        dump_logits: None,
    };
    let mut it = llama4_examples::utf8_args().map_err(|e| e.to_string())?;
    fn value<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse().map_err(|_| format!("{flag}: cannot parse `{v}`"))
    }
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--context" => context = Some(value(&flag, it.next())?),
            "--samples" => a.samples = Some(value(&flag, it.next())?),
            "--model" => a.model = value(&flag, it.next())?,
            "--no-temperature" => a.no_temperature = true,
            "--dump-logits" => a.dump_logits = Some(value(&flag, it.next())?),
            "-h" | "--help" => {
                // The options as this file's doc comment lists them.
                println!("usage: needle --context N [options]\n");
                include_str!("needle.rs")
                    .lines()
                    .skip_while(|l| *l != "//! Options:")
                    .skip(2)
                    .take_while(|l| *l != "//! ```")
                    .for_each(|l| println!("{}", l.strip_prefix("//! ").unwrap_or("")));
                std::process::exit(0);
            }
            other => return Err(format!("unknown option `{other}` (see --help)")),
        }
    }
    a.context = context.ok_or("--context N is required")?;
    if a.samples == Some(0) {
        return Err("--samples must be positive".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    llama4_examples::report(run())
}

fn run() -> Result<(), Error> {
    let args = parse_args()?;
    let task = Task::load(&args.model)?;
    task.check_length(args.context)?;
    let samples = args.samples.unwrap_or(task.pairs);

    let mut config = ModelConfig::from_dir(&args.model)?;
    if args.no_temperature {
        config.text.attention.attn_temperature_tuning = false;
    }
    let model = TextModel::from_checkpoint(Checkpoint::open(&args.model)?, &config)?;
    describe(&args.model, &config, &task);

    let n = args.context;
    let contexts = samples.div_ceil(task.pairs);
    println!(
        "context {n} tokens ({:.3}x the training length), {samples} samples from {contexts} context{} of {} pairs",
        n as f64 / task.train_context as f64,
        if contexts == 1 { "" } else { "s" },
        task.pairs
    );
    // The checkpoint's max_position_embeddings is the training length: lift it, which is the
    // experiment (chunked RoPE layers and NoPE layers have no positional limit of their own).
    let mut session = Session::new(&model, DType::F32)?.with_max_len(n);
    session.reserve(n)?;
    let started = Instant::now();
    let (mut correct, mut done) = (0, 0);
    let mut logits_rows: Vec<f32> = Vec::new();
    let mut answers: Vec<i64> = Vec::new();
    let mut prefill_s = 0.0;
    for c in 0..contexts {
        let ctx = task.context(n, c as u64)?;
        session.reset();
        let t0 = Instant::now();
        for piece in ctx.tokens.chunks(PIECE) {
            session.prefill(piece, Logits::Last)?;
        }
        let t_prefill = t0.elapsed().as_secs_f64();
        prefill_s += t_prefill;
        let asked = task.pairs.min(samples - done);
        let mut right = 0;
        for q in 0..asked {
            let (prompt, answer) = ctx.query(&task, q);
            let logits = session.prefill(&prompt, Logits::Last)?;
            let row = logits.row(0);
            let best = argmax(row.as_slice().ok_or("logits are not contiguous")?);
            right += usize::from(best == answer as usize);
            if args.dump_logits.is_some() {
                logits_rows.extend(row.iter());
                answers.push(i64::from(answer));
            }
            session.truncate(n - 2)?;
        }
        correct += right;
        done += asked;
        println!(
            "  context {c}: {right}/{asked} right (prefill {} tokens in {t_prefill:.2} s, queries {:.2} s)",
            n - 2,
            t0.elapsed().as_secs_f64() - t_prefill
        );
    }
    let accuracy = correct as f64 / samples as f64;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "accuracy: {correct}/{samples} = {:.1}% ({seconds:.1} s, of which prefill {prefill_s:.1} s)",
        accuracy * 100.0
    );
    if let Some(path) = &args.dump_logits {
        dump(path, &logits_rows, &answers, config.text.vocab_size)?;
    }
    let json = serde_json::json!({
        "context": n,
        "samples": samples,
        "accuracy": accuracy,
        "train_context": task.train_context,
        "correct": correct,
        "temperature_tuning": config.text.attention.attn_temperature_tuning,
        "model": args.model.file_name().and_then(|s| s.to_str()).unwrap_or(""),
        "seconds": seconds,
    });
    println!("{json}");
    Ok(())
}

/// One line on the architecture, so a table row says what it measured.
fn describe(dir: &Path, config: &ModelConfig, task: &Task) {
    let t = &config.text;
    let chunked = t.layers.iter().filter(|l| l.chunk.is_some()).count();
    let nope = t.layers.iter().filter(|l| !l.rope).count();
    println!(
        "model {}: {} layers ({chunked} chunked{}, {} global of which {nope} NoPE), {} query / {} kv heads of {}; \
         temperature tuning {} (floor_scale {}, attn_scale {:.4}); trained on contexts up to {}",
        dir.display(),
        t.layers.len(),
        match t.attention.attention_chunk_size {
            Some(c) if chunked > 0 => format!(" with chunk {c}"),
            _ => String::new(),
        },
        t.layers.len() - chunked,
        t.attention.num_attention_heads,
        t.attention.num_key_value_heads,
        t.attention.head_dim,
        if t.attention.attn_temperature_tuning { "on" } else { "off" },
        t.attention.floor_scale,
        t.attention.attn_scale,
        task.train_context
    );
}

/// Index of the largest value (the first on ties, as torch's argmax).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Writes the answer-position logits `[K, V]` and the answers `[K]`.
fn dump(path: &Path, logits: &[f32], answers: &[i64], vocab: usize) -> Result<(), Error> {
    let l: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let a: Vec<u8> = answers.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = [
        (
            "logits",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![answers.len(), vocab], &l)?,
        ),
        (
            "answers",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![answers.len()], &a)?,
        ),
    ];
    safetensors::serialize_to_file(views, None, path)?;
    Ok(())
}
