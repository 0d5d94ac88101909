//! Research use: replace one layer's attention of the demo model with a sliding window built
//! outside the model crate (`llama4_examples::sliding_window`, public parts only), and print how
//! held-out accuracy changes. The layer keeps its projections, RoPE and QK norm; only which keys
//! each query sees changes (the demo's RoPE layers attend within chunks of 8 tokens).
//!
//! ```text
//! cargo run --release --example swap_attention [-- --model DIR] [--layer 0] [--window 4]
//! ```
//! The directory needs `heldout.json` (a list of {"prompt", "answer"}), as the demo model has.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use llama4_examples::heldout;
use llama4_examples::sliding_window::SlidingWindow;
use llama4_model::irope_attn::SelfAttention;
use llama4_model::{AttentionLayer, TextModel, Tokenizer};

type Error = Box<dyn std::error::Error>;

fn main() -> std::process::ExitCode {
    llama4_examples::report(try_main())
}

fn try_main() -> Result<(), Error> {
    let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"));
    let (mut layer, mut window) = (0usize, 4usize);
    let mut args = llama4_examples::utf8_args()?;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => dir = args.next().ok_or("--model needs a directory")?.into(),
            "--layer" => layer = args.next().ok_or("--layer needs a value")?.parse()?,
            "--window" => window = args.next().ok_or("--window needs a value")?.parse()?,
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    let window = NonZeroUsize::new(window).ok_or("--window must be positive")?;
    let cases = heldout::cases(&dir)?;
    let tokenizer = Tokenizer::from_dir(&dir)?.ok_or("the model directory has no tokenizer.json")?;

    let mut model = TextModel::load(&dir)?;
    let before = heldout::evaluate(&model, &tokenizer, &dir, &cases)?;
    let layers = model.layers().len();
    let slot = model
        .layers_mut()
        .get_mut(layer)
        .ok_or_else(|| format!("--layer {layer}: the model has {layers} layers"))?;
    let was = slot.self_attn.cache_kind();
    // The swap: the layer's own attention, wrapped in a sliding window.
    let AttentionLayer::Llama4(original) = &slot.self_attn else {
        return Err(format!("layer {layer} does not hold Llama 4's attention").into());
    };
    let swapped = SlidingWindow::new((**original).clone(), window);
    slot.self_attn = AttentionLayer::Custom(Box::new(swapped));
    let after = heldout::evaluate(&model, &tokenizer, &dir, &cases)?;

    let was = match was.chunk() {
        Some(c) => format!("chunks of {c} keys"),
        None => "every earlier key".into(),
    };
    println!("{:<40}exact match", format!("layer {layer} attention"));
    println!("{:<40}{}", format!("Llama 4: {was}"), before.score());
    println!(
        "{:<40}{}",
        format!("sliding window of {window} keys"),
        after.score()
    );
    let changed = before
        .answers
        .iter()
        .zip(&after.answers)
        .filter(|(a, b)| a != b)
        .count();
    println!("\n{changed} of {} answers changed", cases.len());
    Ok(())
}
