//! Batched decode without the server: N sessions, each prefilled with its own prompt, then
//! decode steps of all N in one pass ([`forward_batch`]), the step the serving engine runs. Prints
//! the median step time and the aggregate decode tokens/s for each N.
//!
//! ```text
//! cargo run --release --example bench_batch -- --model /tmp/bench-mid [--streams 1,4,8,16]
//!     [--prompt-len 128] [--steps 64] [--runs 3] [--cache f32|bf16|f16|q8]
//! ```
//! The prompts are pseudo-random ids (distinct per stream, so the streams route to different
//! experts as real conversations do); each decode step feeds every stream the greedy choice of
//! its last logits. The cache is f32 by default, as the server's.

use std::path::PathBuf;
use std::time::Instant;

use llama4_core::KvDtype;
use llama4_model::{forward_batch, BatchEntry, FeedForwardLayer, Logits, Session, TextModel, Workspace};

type Error = Box<dyn std::error::Error>;

fn main() -> std::process::ExitCode {
    llama4_examples::report(try_main())
}

fn try_main() -> Result<(), Error> {
    let mut model_dir = None;
    let (mut streams, mut prompt_len, mut steps, mut runs) = (vec![1, 4, 8, 16], 128, 64, 3);
    let mut dtype = KvDtype::F32;
    let mut args = llama4_examples::utf8_args()?;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model_dir = Some(PathBuf::from(value()?)),
            "--streams" => {
                streams = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("--streams: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--prompt-len" => prompt_len = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            "--runs" => runs = value()?.parse()?,
            "--cache" => dtype = llama4_examples::parse_kv_dtype(&flag, Some(value()?.as_str()))?,
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    let dir = model_dir.ok_or("--model DIR is required")?;
    if streams.contains(&0) || prompt_len == 0 || steps == 0 || runs == 0 {
        return Err("--streams, --prompt-len, --steps and --runs must be positive".into());
    }
    let model = TextModel::load(&dir)?;
    let vocab = model.config().vocab_size as u64;
    let pages = if model.checkpoint().is_some_and(|c| c.in_huge_pages()) {
        "weights copied for 2 MiB pages"
    } else {
        "weights mapped from the file"
    };
    println!(
        "{}: {prompt_len}-id prompts, {steps} decode steps, median of {runs} runs, cache {dtype}, {} threads, {pages}",
        dir.display(),
        llama4_core::pool::threads()
    );
    println!("streams  ms/step  decode tok/s (all streams)  experts/layer");
    for &n in &streams {
        let mut experts = 0.0;
        let mut times = Vec::with_capacity(runs);
        for run in 0..runs {
            let mut sessions = Vec::with_capacity(n);
            let mut next = Vec::with_capacity(n);
            for s in 0..n {
                let mut session = Session::new(&model, dtype)?;
                // A small LCG per stream: distinct, reproducible prompts.
                let mut state = (s as u64 + 1) * 0x9e37_79b9_7f4a_7c15 + run as u64;
                let prompt: Vec<u32> = (0..prompt_len)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((state >> 33) % vocab) as u32
                    })
                    .collect();
                let logits = session.prefill(&prompt, Logits::Last)?;
                next.push(argmax(logits.row(0).as_slice().ok_or("logits not contiguous")?));
                sessions.push(session);
            }
            let mut ws = Workspace::new();
            reset_routing_stats(&model);
            let t0 = Instant::now();
            for _ in 0..steps {
                let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                let mut entries: Vec<BatchEntry<'_, &TextModel>> = sessions
                    .iter_mut()
                    .zip(&tokens)
                    .map(|(session, t)| BatchEntry {
                        session,
                        tokens: t,
                        embeddings: None,
                    })
                    .collect();
                let logits = forward_batch(&model, &mut entries, &mut ws)?;
                for (i, row) in logits.rows().into_iter().enumerate() {
                    next[i] = argmax(row.as_slice().ok_or("logits not contiguous")?);
                }
            }
            times.push(t0.elapsed().as_secs_f64() / steps as f64);
            experts = routed_experts(&model, steps);
        }
        times.sort_by(f64::total_cmp);
        let step = times[times.len() / 2];
        println!(
            "{n:>7}  {:>7.2}  {:>10.1}  {:>12.1}",
            step * 1e3,
            n as f64 / step,
            experts
        );
    }
    Ok(())
}

fn moe_layers(model: &TextModel) -> impl Iterator<Item = &moe_router::Moe> {
    model.layers().iter().filter_map(|l| match &l.feed_forward {
        FeedForwardLayer::Moe(m) => Some(m.as_ref()),
        _ => None,
    })
}

fn reset_routing_stats(model: &TextModel) {
    moe_layers(model).for_each(|m| m.stats().reset());
}

/// Distinct routed experts per MoE layer per step, averaged over the last run: what a step
/// reads beyond the dense weights.
fn routed_experts(model: &TextModel, steps: usize) -> f64 {
    let (mut experts, mut layers) = (0u64, 0u64);
    for m in moe_layers(model) {
        let s = m.stats();
        let dense = m.min_decode_weight_bytes() - m.router().top_k() * m.experts().expert_bytes();
        let fixed = dense as u64 * s.forward_calls();
        experts += (s.weight_bytes_read() - fixed) / m.experts().expert_bytes() as u64;
        layers += 1;
    }
    experts as f64 / (layers.max(1) * steps as u64) as f64
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}
