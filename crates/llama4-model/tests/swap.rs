//! Changing one layer's attention through the public API changes every path the same way:
//! layer 1 of the scout fixture (a chunked RoPE layer) made global must give transformers'
//! logits for that configuration (`reference_layer1_global.safetensors`, written by
//! `tools/make_fixtures.py`), through the cached session and the uncached path alike.

use std::ops::ControlFlow;

use llama4_model::irope_attn::SelfAttention;
use llama4_model::{AttentionLayer, DType, Error, GenerateOptions, LayerKind, Logits, Session, TextModel};

mod common;
use common::{fixture_dir, rel_err, text_reference, text_reference_in};

const TOL: f32 = 1e-4;

fn scout_with_layer1_global() -> TextModel {
    let mut model = TextModel::load(fixture_dir("scout")).unwrap();
    let layer = &mut model.layers_mut()[1];
    let AttentionLayer::Llama4(attn) = &layer.self_attn else {
        panic!("layer 1 holds Llama 4's attention as loaded");
    };
    assert_eq!(attn.cache_kind(), LayerKind::chunked(8).unwrap());
    layer.self_attn = AttentionLayer::Llama4(Box::new((**attn).clone().with_cache_kind(LayerKind::Global)));
    model
}

#[test]
fn session_and_uncached_path_follow_a_changed_layer_and_match_transformers() {
    let model = scout_with_layer1_global();
    assert_eq!(model.cache_kinds()[1], LayerKind::Global);
    let r = text_reference_in(&fixture_dir("scout"), "reference_layer1_global.safetensors");
    // The change must matter on this fixture, or the test proves nothing.
    let unchanged = text_reference(&fixture_dir("scout"));
    assert!(rel_err(r.logits_full.view(), unchanged.logits_full.view()) > 1e-2);

    let all: Vec<u32> = r.prompt.iter().chain(&r.generated).copied().collect();
    let full = model.forward_uncached(&all).unwrap();
    let e_full = rel_err(full.view(), r.logits_full.view());

    let mut session = Session::new(&model, DType::F32).unwrap();
    let prefill = session.prefill(&r.prompt, Logits::All).unwrap();
    let e_prefill = rel_err(
        prefill.view(),
        r.logits_full.slice(ndarray::s![..r.prompt.len(), ..]),
    );

    let mut session = Session::new(&model, DType::F32).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: r.generated.len(),
        keep_logits: true,
        ..Default::default()
    };
    let g = session
        .generate(&r.prompt, &opts, |_| ControlFlow::Continue(()))
        .unwrap();
    let e_steps = rel_err(g.logits.as_ref().unwrap().view(), r.step_logits.view());
    println!("layer 1 global: uncached {e_full:.2e}, prefill {e_prefill:.2e}, steps {e_steps:.2e}");
    assert!(e_full < TOL && e_prefill < TOL && e_steps < TOL);
    assert_eq!(g.generated_ids, r.generated);
    // The two paths agree with each other more closely than with the reference.
    let rows = full.slice(ndarray::s![r.prompt.len() - 1..all.len() - 1, ..]);
    assert!(rel_err(g.logits.as_ref().unwrap().view(), rows) < 1e-5);
}

#[test]
fn a_cache_made_before_the_change_is_refused() {
    let original = TextModel::load(fixture_dir("scout")).unwrap();
    let changed = scout_with_layer1_global();
    // A cache laid out for the original layers cannot serve the changed model.
    let mut stale = original.new_cache(DType::F32).unwrap();
    let hidden = changed.embed(&[5, 6, 7]).unwrap();
    match changed.forward_hidden(hidden, &mut stale) {
        Err(Error::CacheKind {
            layer: 1,
            cache,
            attention,
        }) => {
            assert_eq!(cache, LayerKind::chunked(8).unwrap());
            assert_eq!(attention, LayerKind::Global);
        }
        other => panic!("expected a cache-kind error, got {other:?}"),
    }
}
