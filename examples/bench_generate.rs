//! End-to-end generation benchmark: prefill and decode tokens/s (median of N runs), peak
//! memory, heap allocations per decode step, and decode time per token at longer contexts.
//!
//! ```text
//! cargo run --release --example make_checkpoint -- --preset bench-mid --out /tmp/bench-mid
//! cargo run --release --example bench_generate -- --model /tmp/bench-mid
//! ```
//! Options: `--prompt-len N` (512) `--new N` (128) `--runs N` (3) `--cache f32|bf16` (f32, as the
//! generate example) `--contexts 1024,8192,32768` (decode time per token after a prompt of each
//! length; empty to skip) `--context-steps N` (16) `--quantize q8|q4|fp8` `--quantize-all`
//! `--quant-group N` (32): load-time quantisation as in the generate example.
//!
//! Each run is `Session::generate` with greedy sampling, the path `generate --json` reports, on
//! a fresh session over the same loaded model; the prompt is pseudo-random ids. Peak memory is
//! the process's peak resident set (`VmHWM`), which includes the mapped weights.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use llama4_core::alloc_count::CountingAllocator;
use llama4_core::{DType, QuantFormat, QuantScope, QuantSpec};
use llama4_model::{GenerateOptions, Logits, Sampler, SamplingConfig, Session, TextModel};

type Error = Box<dyn std::error::Error>;

/// Counts heap allocations (all threads), to show that decoding does not allocate per token.
#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

struct Args {
    model: PathBuf,
    prompt_len: usize,
    new_tokens: usize,
    runs: usize,
    cache: DType,
    contexts: Vec<usize>,
    context_steps: usize,
    quantize: Option<QuantFormat>,
    quantize_all: bool,
    quant_group: usize,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        model: PathBuf::new(),
        prompt_len: 512,
        new_tokens: 128,
        runs: 3,
        cache: DType::F32,
        contexts: vec![1024, 8192, 32768],
        context_steps: 16,
        quantize: None,
        quantize_all: false,
        quant_group: 32,
    };
    let mut model = None;
    let mut it = llama4_examples::utf8_args()?;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--prompt-len" => a.prompt_len = value()?.parse()?,
            "--new" => a.new_tokens = value()?.parse()?,
            "--runs" => a.runs = value()?.parse()?,
            "--context-steps" => a.context_steps = value()?.parse()?,
            "--cache" => {
                a.cache = match value()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    other => return Err(format!("--cache takes f32 or bf16, not {other}").into()),
                }
            }
            "--contexts" => {
                a.contexts = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--quantize" => {
                let v = value()?;
                a.quantize =
                    Some(QuantFormat::parse(&v).ok_or(format!("--quantize takes q8, q4 or fp8, not {v}"))?)
            }
            "--quantize-all" => a.quantize_all = true,
            "--quant-group" => a.quant_group = value()?.parse()?,
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    a.model = model.ok_or("--model DIR is required (see the file's doc for making bench-mid)")?;
    if a.runs == 0 || a.prompt_len == 0 || a.new_tokens < 2 {
        return Err("--runs and --prompt-len must be positive, --new at least 2".into());
    }
    Ok(a)
}

/// Deterministic pseudo-random ids in `[3, vocab)` (skipping the usual special ids).
fn prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (3 + s % (vocab as u64 - 3)) as u32
        })
        .collect()
}

/// Bytes of the checkpoint's `.safetensors` files: what the mapped weights can occupy.
fn safetensors_bytes(dir: &std::path::Path) -> Result<u64, Error> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> std::process::ExitCode {
    llama4_examples::report(try_main())
}

fn try_main() -> Result<(), Error> {
    let args = parse_args()?;
    let t = Instant::now();
    let policy = args.quantize.map(|f| {
        let scope = if args.quantize_all {
            QuantScope::AllLinear
        } else {
            QuantScope::Experts
        };
        let spec = match f {
            QuantFormat::F8E4M3 => QuantSpec::fp8(),
            f => QuantSpec::new(f, args.quant_group),
        };
        llama4_model::quant_policy(spec, scope)
    });
    let model = TextModel::load_with_quantization(&args.model, policy)?;
    let load_s = t.elapsed().as_secs_f64();
    let vocab = model.config().vocab_size;
    // Float weights are mapped: the files are what they can occupy. Quantised ones are held in
    // memory: count what the loader returned.
    let weight_bytes = if policy.is_some() {
        model.checkpoint().weight_bytes() as u64
    } else {
        safetensors_bytes(&args.model)?
    };
    println!(
        "model {}: {:.1} MB of weights, loaded in {:.2} s; {} threads",
        args.model.display(),
        weight_bytes as f64 / 1e6,
        load_s,
        rayon::current_num_threads()
    );

    let options = GenerateOptions {
        max_new_tokens: args.new_tokens,
        sampling: SamplingConfig::greedy(),
        ..Default::default()
    };
    let ids = prompt(args.prompt_len, vocab, 1);
    let (mut prefill, mut decode, mut allocs) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let mut session = Session::new(&model, args.cache)?;
        // Allocations between consecutive tokens = one decode step (forward, sampling).
        let mut last = None;
        let mut per_step = Vec::new();
        let g = session.generate(&ids, &options, |_| {
            let now = ALLOC.allocations();
            if let Some(prev) = last {
                per_step.push(now - prev);
            }
            last = Some(now);
            ControlFlow::Continue(())
        })?;
        per_step.sort_unstable();
        let step_allocs = per_step.get(per_step.len() / 2).copied().unwrap_or(0);
        println!(
            "run {run}: prefill {} tokens {:.1} tokens/s, decode {} steps {:.2} tokens/s, {} allocations per step (median)",
            ids.len(),
            g.prefill_tokens_per_s(),
            g.decode_steps,
            g.decode_tokens_per_s(),
            step_allocs
        );
        prefill.push(g.prefill_tokens_per_s());
        decode.push(g.decode_tokens_per_s());
        allocs.push(step_allocs as f64);
    }
    let peak = peak_rss_bytes().unwrap_or(0);
    println!(
        "median of {}: prefill {:.1} tokens/s, decode {:.2} tokens/s ({:.2} ms/token), {} allocations per decode step",
        args.runs,
        median(prefill),
        median(decode.clone()),
        1e3 / median(decode),
        median(allocs)
    );
    println!(
        "peak RSS {:.1} MB = {:.3} × weight bytes",
        peak as f64 / 1e6,
        peak as f64 / weight_bytes as f64
    );

    // Decode time at longer contexts: chunked layers stay bounded, global ones grow.
    for &ctx in &args.contexts {
        let mut session = Session::new(&model, args.cache)?;
        if ctx + args.context_steps > session.max_len() {
            println!("context {ctx}: over the model's limit of {}", session.max_len());
            continue;
        }
        let t = Instant::now();
        let ids = prompt(ctx, vocab, 2);
        // Prefill in pieces: activations of a whole 32K prompt at once are not the point here.
        for piece in ids.chunks(2048) {
            session.prefill(piece, Logits::Last)?;
        }
        let fill_s = t.elapsed().as_secs_f64();
        let mut times = Vec::new();
        let mut greedy = Sampler::new(SamplingConfig::greedy())?;
        let mut token = ids[ctx - 1];
        for _ in 0..args.context_steps {
            let t = Instant::now();
            let logits = session.step_logits(token)?;
            times.push(t.elapsed().as_secs_f64());
            token = greedy.sample(logits)?;
        }
        let mem = session.cache_memory();
        println!(
            "context {ctx}: decode {:.2} ms/token (median of {}), cache {:.1} MB ({:.1} MB chunked layers, {:.1} MB global), filled in {:.1} s",
            median(times) * 1e3,
            args.context_steps,
            mem.total() as f64 / 1e6,
            mem.chunked as f64 / 1e6,
            mem.global as f64 / 1e6,
            fill_s
        );
    }
    Ok(())
}
