//! The length-generalisation demo (models/longctx-demo) through our inference path: the held-out
//! generator agrees with the Python one, the logits equal transformers' (with and without
//! temperature tuning, and for the two controls), and the model retrieves at its training
//! length. The long-context figures come from `examples/needle.rs` (see the README).

use std::path::{Path, PathBuf};

use llama4_core::{Checkpoint, DType};
use llama4_model::{Logits, ModelConfig, Session, TextModel};
use ndarray::Array2;
use safetensors::SafeTensors;

mod common;
use common::{ids, matrix, rel_err};

#[path = "../../../models/longctx-demo/task.rs"]
mod task;
use task::Task;

const TOL: f32 = 1e-4;

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

fn load(dir: &Path, temperature: bool) -> TextModel {
    let mut config = ModelConfig::from_dir(dir).unwrap();
    config.text.attention.attn_temperature_tuning = temperature;
    TextModel::from_checkpoint(Checkpoint::open(dir).unwrap(), &config).unwrap()
}

/// Logits at the answer position of each query `[Q, V]`: the context prefilled once, each
/// query run as two tokens and rewound (as the example does).
fn answer_logits(model: &TextModel, context: &[u32], queries: &[[u32; 2]]) -> Array2<f32> {
    let n = context.len() + 2;
    let mut session = Session::new(model, DType::F32).unwrap().with_max_len(n);
    session.prefill(context, Logits::Last).unwrap();
    let mut out = Array2::zeros((queries.len(), model.config().vocab_size));
    for (q, prompt) in queries.iter().enumerate() {
        let logits = session.prefill(prompt, Logits::Last).unwrap();
        out.row_mut(q).assign(&logits.row(0));
        session.truncate(context.len()).unwrap();
    }
    out
}

fn argmax(row: ndarray::ArrayView1<f32>) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Checks one model directory against its `reference.safetensors`; `variants` names the
/// reference tensors with the temperature setting each was computed with.
fn check_reference(name: &str, variants: &[(&str, bool)]) {
    let dir = model_dir(name);
    let task = Task::load(&dir).unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let context = ids(&st, "context");
    let queries: Vec<[u32; 2]> = ids(&st, "queries")
        .chunks_exact(2)
        .map(|q| [q[0], q[1]])
        .collect();
    let answers = ids(&st, "answers");

    // The Rust generator draws exactly the context the Python one drew.
    let ctx = task.context(task.train_context, 0).unwrap();
    assert_eq!(
        ctx.tokens, context,
        "{name}: held-out context 0 differs from Python's"
    );
    let ours: Vec<[u32; 2]> = (0..task.pairs).map(|q| ctx.query(&task, q).0).collect();
    assert_eq!(ours, queries);
    assert_eq!(ctx.pairs.iter().map(|p| p.1).collect::<Vec<_>>(), answers);

    for &(tensor, temperature) in variants {
        let model = load(&dir, temperature);
        let got = answer_logits(&model, &context, &queries);
        let want = matrix(&st, tensor);
        let e = rel_err(got.view(), want.view());
        println!("{name} {tensor}: logits within {e:.2e} of transformers");
        assert!(e < TOL, "{name} {tensor}: logits off by {e:e}");
        for (q, (g, w)) in got.rows().into_iter().zip(want.rows()).enumerate() {
            assert_eq!(
                argmax(g),
                argmax(w),
                "{name} {tensor}: query {q} answers differently"
            );
        }
    }
}

#[test]
fn longctx_demo_logits_equal_transformers() {
    check_reference(
        "longctx-demo",
        &[("logits", true), ("logits_no_temperature", false)],
    );
}

#[test]
fn longctx_notemp_control_logits_equal_transformers() {
    check_reference("longctx-demo-notemp", &[("logits", false)]);
}

#[test]
fn longctx_allrope_control_logits_equal_transformers() {
    check_reference("longctx-demo-allrope", &[("logits", false)]);
}

#[test]
fn longctx_demo_retrieves_at_its_training_length() {
    let dir = model_dir("longctx-demo");
    let task = Task::load(&dir).unwrap();
    let model = TextModel::load(&dir).unwrap();
    assert!(model.config().attention.attn_temperature_tuning);
    // Contexts 1 and 2 (context 0 is the reference's): every pair asked.
    let (mut right, mut asked) = (0, 0);
    for c in 1..3 {
        let ctx = task.context(task.train_context, c).unwrap();
        let queries: Vec<[u32; 2]> = (0..task.pairs).map(|q| ctx.query(&task, q).0).collect();
        let logits = answer_logits(&model, &ctx.tokens, &queries);
        for (q, row) in logits.rows().into_iter().enumerate() {
            right += usize::from(argmax(row) == ctx.pairs[q].1 as usize);
            asked += 1;
        }
    }
    println!("longctx-demo at its training length: {right}/{asked}");
    assert!(
        right * 10 >= asked * 9,
        "{right}/{asked} right at the training length"
    );
}

#[test]
fn longctx_task_rejects_bad_lengths() {
    let task = Task::load(&model_dir("longctx-demo")).unwrap();
    assert!(task.context(1023, 0).is_err());
    assert!(task.context(2 * task.pairs + 2, 0).is_err());
    assert!(task.context(2 * task.pairs + 4, 0).is_ok());
    assert!(Task::load(Path::new("/nonexistent")).is_err());
}
