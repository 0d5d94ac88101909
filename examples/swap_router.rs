//! Research use: replace the demo model's Llama 4 router (sigmoid weight of the top-1 raw
//! logit) with a softmax top-2 router over the same router weights, through the public API,
//! and print how answers and held-out accuracy change.
//!
//! ```text
//! cargo run --release --example swap_router [-- --model DIR] [--top-k 2] [--no-renormalize]
//! ```
//! The directory needs `heldout.json` (a list of {"prompt", "answer"}), as the demo model has.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use llama4_core::{Checkpoint, DType};
use llama4_model::{stop_ids, GenerateOptions, SamplingConfig, Session, TextModel, Tokenizer};
use moe_router::SoftmaxTopKRouter;

type Error = Box<dyn std::error::Error>;

fn main() -> std::process::ExitCode {
    llama4_examples::report(try_main())
}

fn try_main() -> Result<(), Error> {
    let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"));
    let (mut top_k, mut renormalize) = (2usize, true);
    let mut args = llama4_examples::utf8_args()?;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => dir = args.next().ok_or("--model needs a directory")?.into(),
            "--top-k" => top_k = args.next().ok_or("--top-k needs a value")?.parse()?,
            "--no-renormalize" => renormalize = false,
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    let cases = heldout(&dir)?;
    let tokenizer = Tokenizer::from_dir(&dir)?.ok_or("the model directory has no tokenizer.json")?;

    let mut model = TextModel::load(&dir)?;
    let before = evaluate(&model, &tokenizer, &dir, &cases)?;

    // The swap: every MoE layer gets a softmax top-k router built from its own router weights.
    let ckpt = Checkpoint::open(&dir)?;
    let cfg = model.config().clone();
    model.replace_routers(|layer, _moe| {
        let scope = ckpt.scope(&format!("model.layers.{layer}.feed_forward.router"));
        let router =
            SoftmaxTopKRouter::load(&scope, cfg.hidden_size, cfg.num_local_experts, top_k, renormalize)?;
        Ok(Box::new(router))
    })?;
    let after = evaluate(&model, &tokenizer, &dir, &cases)?;

    println!("router                               exact match");
    println!(
        "Llama 4: sigmoid, top-{} (as trained)  {:>3}/{} = {:5.1}%",
        cfg.num_experts_per_tok,
        before.correct,
        cases.len(),
        100.0 * before.correct as f64 / cases.len() as f64
    );
    println!(
        "softmax top-{top_k}{}            {:>3}/{} = {:5.1}%",
        if renormalize {
            ", renormalised"
        } else {
            ", raw probs   "
        },
        after.correct,
        cases.len(),
        100.0 * after.correct as f64 / cases.len() as f64
    );
    println!("\nfirst answers (expected | Llama 4 router | softmax top-{top_k}):");
    for ((case, b), a) in cases.iter().zip(&before.answers).zip(&after.answers).take(5) {
        println!("{:<22}|{:<22}|{}", case.1, b, a);
    }
    let changed = before
        .answers
        .iter()
        .zip(&after.answers)
        .filter(|(a, b)| a != b)
        .count();
    println!("\n{changed} of {} answers changed", cases.len());
    Ok(())
}

struct Outcome {
    correct: usize,
    answers: Vec<String>,
}

fn heldout(dir: &Path) -> Result<Vec<(String, String)>, Error> {
    let bytes = llama4_core::input::read_capped(&dir.join("heldout.json"), llama4_core::input::Cap::JSON)?;
    let text = String::from_utf8(bytes)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let list = v.as_array().ok_or("heldout.json is not a list")?;
    list.iter()
        .map(|e| match (e["prompt"].as_str(), e["answer"].as_str()) {
            (Some(p), Some(a)) => Ok((p.to_string(), a.to_string())),
            _ => Err("heldout.json entries need prompt and answer strings".into()),
        })
        .collect()
}

fn evaluate(
    model: &TextModel,
    tok: &Tokenizer,
    dir: &Path,
    cases: &[(String, String)],
) -> Result<Outcome, Error> {
    let stops = stop_ids(dir, model.config())?;
    let options = GenerateOptions {
        max_new_tokens: 16,
        sampling: SamplingConfig::greedy(),
        stop_ids: stops.clone(),
        keep_logits: false,
    };
    let mut outcome = Outcome {
        correct: 0,
        answers: Vec::new(),
    };
    for (prompt, answer) in cases {
        let mut session = Session::new(model, DType::F32)?;
        let g = session.generate(&tok.encode(prompt)?, &options, |_| ControlFlow::Continue(()))?;
        let body = g.answer_ids();
        let text = tok.decode(body)?;
        outcome.correct += usize::from(&text == answer);
        outcome.answers.push(text);
    }
    Ok(outcome)
}
