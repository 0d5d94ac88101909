//! Whole-model parity with transformers' Llama4ForCausalLM on the committed tiny checkpoints:
//! greedy ids equal, logits within 1e-4 of the largest reference logit, with and without cache.

use std::ops::ControlFlow;
use std::path::PathBuf;

use llama4_core::{DType, LayerKind};
use llama4_model::{GenerateOptions, Logits, SamplingConfig, Session, TextModel};

mod common;
use common::{rel_err, text_reference};

const TOL: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    common::fixture_dir(name)
}

fn check(name: &str) {
    let model = TextModel::load(dir(name)).unwrap();
    let r = text_reference(&dir(name));
    let n = r.generated.len();

    // Without a cache: one pass over prompt + generated tokens.
    let all: Vec<u32> = r.prompt.iter().chain(&r.generated).copied().collect();
    let full = model.forward_uncached(&all).unwrap();
    let e_full = rel_err(full.view(), r.logits_full.view());
    assert!(e_full < TOL, "{name}: uncached logits off by {e_full:e}");

    // Cached prefill returning every position.
    let mut session = Session::new(&model, DType::F32).unwrap();
    let prefill = session.prefill(&r.prompt, Logits::All).unwrap();
    let rows = r.logits_full.slice(ndarray::s![..r.prompt.len(), ..]);
    let e_prefill = rel_err(prefill.view(), rows);
    assert!(e_prefill < TOL, "{name}: prefill logits off by {e_prefill:e}");

    // Cached greedy generation: same ids, same per-step logits.
    let mut session = Session::new(&model, DType::F32).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingConfig::greedy(),
        stop_ids: vec![],
        keep_logits: true,
    };
    let g = session
        .generate(&r.prompt, &opts, |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(g.generated_ids, r.generated, "{name}: greedy ids differ");
    let e_steps = rel_err(g.logits.as_ref().unwrap().view(), r.step_logits.view());
    assert!(e_steps < TOL, "{name}: per-step logits off by {e_steps:e}");

    // The same with pages of a few positions, so that prefill and decode cross page
    // boundaries in every layer (a chunked layer's pages are no longer than its chunk).
    for page in [3, 5] {
        let mut session = Session::new(&model, DType::F32)
            .unwrap()
            .with_page_len(page)
            .unwrap();
        let g = session
            .generate(&r.prompt, &opts, |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(
            g.generated_ids, r.generated,
            "{name}, pages of {page}: greedy ids differ"
        );
        let e = rel_err(g.logits.as_ref().unwrap().view(), r.step_logits.view());
        assert!(e < TOL, "{name}, pages of {page}: per-step logits off by {e:e}");
        let cache = session.cache();
        let global = cache.kinds().position(|k| k == LayerKind::Global).unwrap();
        assert!(cache.layer(global).unwrap().pages() > 2, "{name}: few pages");
    }
    println!("{name}: uncached {e_full:.2e}, prefill {e_prefill:.2e}, decode steps {e_steps:.2e} (max |Δ| / max |ref|)");
}

#[test]
fn scout_like_matches_transformers() {
    check("scout");
}

#[test]
fn maverick_like_bf16_sharded_matches_transformers() {
    check("maverick");
}

#[test]
fn top2_tied_matches_transformers() {
    check("top2_tied");
}
