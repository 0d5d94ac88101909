//! How far quantised weights move a model's logits, measured through our own inference path.
//!
//! ```text
//! cargo run --release --example quant_accuracy [-- --model DIR] [--prompt-len 512] [--steps 256]
//!                                               [--group 32] [--scales f32|f16] [--seed 0]
//! ```
//! The default model is a bench-mid checkpoint at /tmp/bench-mid (make it with
//! `cargo run --release --example make_checkpoint -- --preset bench-mid --out /tmp/bench-mid`).
//!
//! The stored-dtype model (bf16 for bench-mid) is the reference: it prefills a prompt of
//! `--prompt-len` pseudo-random token ids and greedily continues for `--steps` decode steps.
//! Each quantised variant (q8, q4 and fp8, experts only and all linear weights) then prefills the same
//! prompt and is fed the reference's own continuation (teacher forcing, so every position sees
//! the same context). Per phase (prefill: every prompt position; decode: every step) it reports
//! the relative logit error, `max |Δ| / max |ref|` and `rms(Δ) / rms(ref)` over all positions
//! and vocabulary entries, and the greedy agreement: the fraction of positions whose argmax
//! equals the reference's.
//!
//! It also records every routing decision (a wrapper around each layer's Llama 4 router) and
//! reports the routing agreement: the fraction of (layer, position) pairs whose chosen expert
//! equals the reference's, overall and in the first and last MoE layers. Perturbations that
//! flip a top-1 choice send a token through a different expert, which changes its hidden state
//! far more than the quantisation error itself. To measure how much, each variant runs a second
//! time with every token sent to the expert the reference chose (see `Recording`): the error
//! left is the quantisation's own.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llama4_core::{DType, QuantFormat, QuantPolicy, QuantScope, QuantSpec, ScaleType};
use llama4_model::{Logits, Session, TextModel};
use moe_router::{Llama4Router, Router, Routing};
use ndarray::{Array2, ArrayView1, ArrayView2};

type Error = Box<dyn std::error::Error>;

struct Args {
    model: PathBuf,
    prompt_len: usize,
    steps: usize,
    group: usize,
    scales: ScaleType,
    seed: u64,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        model: PathBuf::from("/tmp/bench-mid"),
        prompt_len: 512,
        steps: 256,
        group: 32,
        scales: ScaleType::F32,
        seed: 0,
    };
    let mut it = llama4_examples::utf8_args()?;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value()?),
            "--prompt-len" => a.prompt_len = value()?.parse()?,
            "--steps" => a.steps = value()?.parse()?,
            "--group" => a.group = value()?.parse()?,
            "--scales" => {
                let v = value()?;
                a.scales =
                    ScaleType::parse(&v).ok_or_else(|| format!("--scales takes f32 or f16, not `{v}`"))?;
            }
            "--seed" => a.seed = value()?.parse()?,
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    if a.prompt_len == 0 || a.steps == 0 {
        return Err("--prompt-len and --steps must be positive".into());
    }
    Ok(a)
}

/// The logits of one run: every prompt position, then one row per decode step.
struct Run {
    prefill: Array2<f32>,
    decode: Array2<f32>,
    /// Per MoE layer, the expert chosen for every position in order (top-1).
    routes: Vec<Vec<u32>>,
    load_s: f64,
    run_s: f64,
    weight_bytes: usize,
}

/// A router that delegates to the Llama 4 router and appends each token's own choice to a log.
/// With `replay`, it routes every token to the expert the reference chose at that position
/// instead (weighted by the sigmoid of its own logit for that expert, as Llama 4 weights its
/// choice), which separates the error quantisation causes directly from the error of tokens
/// sent through a different expert.
#[derive(Debug)]
struct Recording {
    inner: Llama4Router,
    log: Arc<Mutex<Vec<u32>>>,
    replay: Option<Vec<u32>>,
}

impl Router for Recording {
    fn num_experts(&self) -> usize {
        self.inner.num_experts()
    }
    fn top_k(&self) -> usize {
        self.inner.top_k()
    }
    fn hidden_size(&self) -> usize {
        self.inner.hidden_size()
    }
    fn route(&self, x: ArrayView2<f32>) -> moe_router::Result<Routing> {
        let logits = self.inner.logits(x)?;
        let own = moe_router::sigmoid_top_k(logits.view(), 1)?;
        // A poisoned log only loses the record; `routing_agreement` then sees a short log.
        let Ok(mut log) = self.log.lock() else {
            return Ok(own);
        };
        let start = log.len();
        log.extend_from_slice(own.experts());
        match &self.replay {
            Some(replay) if replay.len() >= log.len() => {
                let experts = replay[start..log.len()].to_vec();
                let weights = experts
                    .iter()
                    .enumerate()
                    .map(|(t, &e)| moe_router::sigmoid(logits[[t, e as usize]]))
                    .collect();
                Routing::new(own.num_experts(), 1, experts, weights)
            }
            _ => Ok(own),
        }
    }
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }
}

/// Prefills `prompt`, then feeds `forced` one token per step (or, when `forced` is empty, the
/// model's own greedy choice for `steps` steps).
fn run(
    model: &TextModel,
    prompt: &[u32],
    forced: &[u32],
    steps: usize,
) -> Result<(Array2<f32>, Array2<f32>), Error> {
    let mut session = Session::new(model, DType::F32)?;
    let prefill = session.prefill(prompt, Logits::All)?;
    let vocab = prefill.ncols();
    let mut decode = Array2::zeros((steps, vocab));
    let mut next = argmax(prefill.row(prefill.nrows() - 1));
    for k in 0..steps {
        let token = forced.get(k).copied().unwrap_or(next);
        let logits = session.step(token)?;
        next = argmax(logits.view());
        decode.row_mut(k).assign(&logits);
    }
    Ok((prefill, decode))
}

fn argmax(row: ArrayView1<f32>) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `(max |Δ| / max |ref|, rms(Δ) / rms(ref), argmax agreement)` over the rows.
fn compare(got: ArrayView2<f32>, reference: ArrayView2<f32>) -> (f64, f64, f64) {
    let (mut max_d, mut max_r, mut sq_d, mut sq_r) = (0f64, 0f64, 0f64, 0f64);
    for (&g, &r) in got.iter().zip(reference.iter()) {
        let d = (g - r) as f64;
        max_d = max_d.max(d.abs());
        max_r = max_r.max((r as f64).abs());
        sq_d += d * d;
        sq_r += (r as f64) * (r as f64);
    }
    let agree = got
        .rows()
        .into_iter()
        .zip(reference.rows())
        .filter(|(g, r)| argmax(g.view()) == argmax(r.view()))
        .count();
    (
        max_d / max_r,
        (sq_d / sq_r).sqrt(),
        agree as f64 / got.nrows() as f64,
    )
}

/// Fractions of routing decisions equal to the reference's: over all layers, in the first MoE
/// layer, in the last.
fn routing_agreement(got: &[Vec<u32>], reference: &[Vec<u32>]) -> (f64, f64, f64) {
    let agree = |g: &[u32], r: &[u32]| (g.iter().zip(r).filter(|(a, b)| a == b).count(), r.len().max(1));
    let (mut same, mut total) = (0, 0);
    for (g, r) in got.iter().zip(reference) {
        let (s, t) = agree(g, r);
        same += s;
        total += t;
    }
    let frac = |(s, t): (usize, usize)| s as f64 / t as f64;
    let layer = |i: Option<usize>| i.map_or(0.0, |i| frac(agree(&got[i], &reference[i])));
    (
        same as f64 / total.max(1) as f64,
        layer((!got.is_empty()).then_some(0)),
        layer(got.len().checked_sub(1)),
    )
}

fn load_and_run(
    args: &Args,
    policy: Option<QuantPolicy>,
    prompt: &[u32],
    forced: &[u32],
    replay: Option<&[Vec<u32>]>,
) -> Result<Run, Error> {
    let started = Instant::now();
    let mut model = TextModel::load_with_quantization(&args.model, policy)?;
    let load_s = started.elapsed().as_secs_f64();
    let cfg = llama4_model::ModelConfig::from_dir(&args.model)?;
    // The router weights are never quantised; a second map of the files reads them as stored.
    let ckpt = llama4_core::Checkpoint::open(&args.model)?;
    let mut logs = Vec::new();
    model.replace_routers(|layer, moe| {
        let scope = ckpt.scope(&format!(
            "{}model.layers.{layer}.feed_forward.router",
            cfg.text_prefix
        ));
        let inner = Llama4Router::load(&scope, cfg.text.hidden_size(), moe.router().num_experts(), 1)?;
        let log = Arc::new(Mutex::new(Vec::new()));
        logs.push(log.clone());
        let replay = replay.and_then(|r| r.get(logs.len() - 1)).cloned();
        Ok(Box::new(Recording { inner, log, replay }))
    })?;
    let started = Instant::now();
    let (prefill, decode) = run(&model, prompt, forced, args.steps)?;
    let routes = logs
        .iter()
        .map(|l| l.lock().map(|v| v.clone()).map_err(|_| "routing log poisoned"))
        .collect::<Result<_, _>>()?;
    Ok(Run {
        prefill,
        decode,
        routes,
        load_s,
        run_s: started.elapsed().as_secs_f64(),
        weight_bytes: model
            .checkpoint()
            .expect("loaded from safetensors")
            .weight_bytes(),
    })
}

fn main() -> std::process::ExitCode {
    llama4_examples::report(try_main())
}

fn try_main() -> Result<(), Error> {
    let args = parse_args()?;
    if !args.model.join("config.json").is_file() {
        return Err(format!(
            "{} is not a checkpoint; make one with `cargo run --release --example make_checkpoint -- \
             --preset bench-mid --out {}`",
            args.model.display(),
            args.model.display()
        )
        .into());
    }
    let vocab = llama4_model::ModelConfig::from_dir(&args.model)?.text.vocab_size as u64;
    // A fixed pseudo-random prompt (SplitMix64), clear of the lowest ids that configs use as
    // special tokens.
    let mut state = args.seed;
    let prompt: Vec<u32> = (0..args.prompt_len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (16 + z % (vocab - 16)) as u32
        })
        .collect();

    let reference = load_and_run(&args, None, &prompt, &[], None)?;
    // The reference's own continuation: its greedy choices at the last prompt position and
    // after each decode step.
    let mut forced = vec![argmax(reference.prefill.row(args.prompt_len - 1))];
    forced.extend(reference.decode.rows().into_iter().map(argmax));
    forced.truncate(args.steps);
    println!(
        "model {}: prompt {} tokens, {} decode steps (teacher-forced with the reference's greedy tokens)",
        args.model.display(),
        args.prompt_len,
        args.steps
    );
    println!(
        "reference (stored dtype): weights {:.1} MB, load {:.2} s, run {:.1} s; logits max |ref| {:.3}, \
         decode rms {:.3}",
        reference.weight_bytes as f64 / 1e6,
        reference.load_s,
        reference.run_s,
        reference.decode.iter().fold(0f32, |m, v| m.max(v.abs())),
        (reference.decode.iter().map(|v| (v * v) as f64).sum::<f64>() / reference.decode.len() as f64).sqrt()
    );
    println!();
    println!(
        "| variant | weights MB | load s | prefill max rel | prefill rms rel | prefill argmax agree | decode \
         max rel | decode rms rel | greedy agreement ({} steps) | routing agreement: all / first MoE layer / \
         last | with the reference's routing: decode rms rel, greedy agreement |",
        args.steps
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for scope in [QuantScope::Experts, QuantScope::AllLinear] {
        for format in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::F8E4M3] {
            let (spec, group) = match format {
                QuantFormat::F8E4M3 => (QuantSpec::fp8(), "row".to_string()),
                _ => (QuantSpec::new(format, args.group), format!("g{}", args.group)),
            };
            let spec = spec.with_scales(args.scales);
            let policy = Some(llama4_model::quant_policy(spec, scope));
            let r = load_and_run(&args, policy, &prompt, &forced, None)?;
            let replayed = load_and_run(&args, policy, &prompt, &forced, Some(&reference.routes))?;
            let (_, rr, ra) = compare(replayed.decode.view(), reference.decode.view());
            let (pm, pr, pa) = compare(r.prefill.view(), reference.prefill.view());
            let (dm, dr, da) = compare(r.decode.view(), reference.decode.view());
            let (all, first, last) = routing_agreement(&r.routes, &reference.routes);
            println!(
                "| {} {} {group} {} | {:.1} | {:.1} | {pm:.4} | {pr:.4} | {:.1}% | {dm:.4} | {dr:.4} | {:.1}% | \
                 {:.1}% / {:.1}% / {:.1}% | {rr:.4}, {:.1}% |",
                format.name(),
                scope.name(),
                args.scales.name(),
                r.weight_bytes as f64 / 1e6,
                r.load_s,
                pa * 100.0,
                da * 100.0,
                all * 100.0,
                first * 100.0,
                last * 100.0,
                ra * 100.0
            );
        }
    }
    Ok(())
}
