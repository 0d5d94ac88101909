//! Research use: replace the demo model's Llama 4 router (sigmoid weight of the top-1 raw
//! logit) with a softmax top-2 router over the same router weights, through the public API,
//! and print how answers and held-out accuracy change.
//!
//! ```text
//! cargo run --release --example swap_router [-- --model DIR] [--top-k 2] [--no-renormalize]
//! ```
//! The directory needs `heldout.json` (a list of {"prompt", "answer"}), as the demo model has.

use std::path::PathBuf;

use llama4_core::Checkpoint;
use llama4_model::{heldout, DType, TextModel, Tokenizer};
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
    let cases = heldout::cases(&dir)?;
    let tokenizer = Tokenizer::from_dir(&dir)?.ok_or("the model directory has no tokenizer.json")?;

    let mut model = TextModel::load(&dir)?;
    let before = heldout::evaluate(&model, &tokenizer, &dir, &cases, DType::F32)?;

    // The swap: every MoE layer gets a softmax top-k router built from its own router weights.
    let ckpt = Checkpoint::open(&dir)?;
    let cfg = model.config().clone();
    model.replace_routers(|layer, _moe| {
        let scope = ckpt.scope(&format!("model.layers.{layer}.feed_forward.router"));
        let router = SoftmaxTopKRouter::load(
            &scope,
            cfg.hidden_size(),
            cfg.num_local_experts,
            top_k,
            renormalize,
        )?;
        Ok(Box::new(router))
    })?;
    let after = heldout::evaluate(&model, &tokenizer, &dir, &cases, DType::F32)?;

    println!("router                               exact match");
    println!(
        "Llama 4: sigmoid, top-{} (as trained)  {}",
        cfg.num_experts_per_tok,
        before.score()
    );
    println!(
        "softmax top-{top_k}{}            {}",
        if renormalize {
            ", renormalised"
        } else {
            ", raw probs   "
        },
        after.score()
    );
    println!("\nfirst answers (expected | Llama 4 router | softmax top-{top_k}):");
    for ((case, b), a) in cases.iter().zip(&before.answers).zip(&after.answers).take(5) {
        println!("{:<22}|{:<22}|{}", case.answer, b, a);
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
