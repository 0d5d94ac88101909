//! Parity with transformers' `Llama4TextAttention` and `Llama4TextRotaryEmbedding`
//! (fixtures written by `tools/make_fixtures.py`).

mod common;

use common::{attn_config, fixture, read_json, rel_err, rope_config};
use irope_attn::{Attention, LayerKind, PosEncoding, Rope, SelfAttention};
use llama4_core::Checkpoint;
use ndarray::Ix2;

/// Relative tolerance on the layer output (max abs difference over max |reference|).
const TOL: f64 = 1e-4;

fn check_layer(name: &str, kind: PosEncoding) {
    let (cfg, json_kind) = attn_config(&read_json(&format!("{name}.json")));
    assert_eq!(json_kind, kind);
    let ckpt = Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap();
    let attn = Attention::load(&ckpt.scope("self_attn"), &cfg, kind).unwrap();
    let t = ckpt.shape("hidden").unwrap()[0];
    let h = cfg.hidden_size;
    let x = ckpt
        .root()
        .array("hidden", &[t, h])
        .unwrap()
        .into_dimensionality::<Ix2>()
        .unwrap();
    let want = ckpt
        .root()
        .array("out", &[t, h])
        .unwrap()
        .into_dimensionality::<Ix2>()
        .unwrap();
    // Positions must cross several chunks and temperature steps to test anything.
    if let Some(c) = cfg.attention_chunk_size {
        assert!(t > 3 * c, "{t} tokens, chunk {c}");
    }
    assert!(t as f32 > 3.0 * cfg.floor_scale);
    let got = attn.forward_uncached(x.view(), 0).unwrap();
    let err = rel_err(got.as_slice().unwrap(), want.as_slice().unwrap());
    println!("{name}: max |diff| / max |ref| = {err:.3e} over {t} tokens");
    assert!(err < TOL, "{name}: relative error {err:.3e}");
}

#[test]
fn rope_layer_matches_transformers() {
    check_layer("attn_rope", PosEncoding::Rope);
}

#[test]
fn nope_layer_matches_transformers() {
    check_layer("attn_nope", PosEncoding::NoPe);
}

#[test]
fn rope_layer_with_bias_matches_transformers() {
    check_layer("attn_rope_bias", PosEncoding::Rope);
}

#[test]
fn nope_layer_without_temperature_differs() {
    // The temperature must matter on this fixture, or the NoPE parity test proves nothing about it.
    let (mut cfg, kind) = attn_config(&read_json("attn_nope.json"));
    assert!(cfg.attn_temperature_tuning);
    cfg.attn_temperature_tuning = false;
    let ckpt = Checkpoint::open(fixture("attn_nope.safetensors")).unwrap();
    let attn = Attention::load(&ckpt.scope("self_attn"), &cfg, kind).unwrap();
    let t = ckpt.shape("hidden").unwrap()[0];
    let x = ckpt
        .root()
        .array("hidden", &[t, cfg.hidden_size])
        .unwrap()
        .into_dimensionality::<Ix2>()
        .unwrap();
    let want = ckpt.root().array("out", &[t, cfg.hidden_size]).unwrap();
    let got = attn.forward_uncached(x.view(), 0).unwrap();
    assert!(rel_err(got.as_slice().unwrap(), want.as_slice().unwrap()) > 1e-2);
}

#[test]
fn rope_layer_uses_chunk_mask() {
    // Plain causal instead of the chunk mask must be visibly wrong on this fixture.
    let (mut cfg, kind) = attn_config(&read_json("attn_rope.json"));
    cfg.attention_chunk_size = None;
    let ckpt = Checkpoint::open(fixture("attn_rope.safetensors")).unwrap();
    let attn = Attention::load(&ckpt.scope("self_attn"), &cfg, kind).unwrap();
    assert_eq!(attn.cache_kind(), LayerKind::Global);
    let t = ckpt.shape("hidden").unwrap()[0];
    let x = ckpt
        .root()
        .array("hidden", &[t, cfg.hidden_size])
        .unwrap()
        .into_dimensionality::<Ix2>()
        .unwrap();
    let want = ckpt.root().array("out", &[t, cfg.hidden_size]).unwrap();
    let got = attn.forward_uncached(x.view(), 0).unwrap();
    assert!(rel_err(got.as_slice().unwrap(), want.as_slice().unwrap()) > 1e-2);
}

#[test]
fn inv_freq_matches_transformers() {
    let meta = read_json("rope.json");
    let ckpt = Checkpoint::open(fixture("rope.safetensors")).unwrap();
    let names: Vec<&String> = meta.as_object().unwrap().keys().collect();
    for want_name in ["default", "llama3", "llama3_low_eq_high"] {
        assert!(
            names.iter().any(|n| n.as_str() == want_name),
            "rope.json lacks {want_name}"
        );
    }
    for name in names {
        let v = &meta[name];
        let d = v["head_dim"].as_u64().unwrap() as usize;
        let rope = Rope::new(d, &rope_config(v)).unwrap();
        let want = ckpt.root().vector(&format!("inv_freq_{name}"), d / 2).unwrap();
        let mut worst = 0f64;
        for (j, (&got, &want)) in rope.inv_freq().iter().zip(want.iter()).enumerate() {
            let rel = ((got as f64 - want as f64) / want as f64).abs();
            worst = worst.max(rel);
            assert!(
                rel <= 2.0 * f32::EPSILON as f64,
                "{name}[{j}]: {got:e} vs {want:e}"
            );
        }
        let exact = rope
            .inv_freq()
            .iter()
            .zip(want.iter())
            .filter(|(a, b)| a == b)
            .count();
        println!("{name}: {exact}/{} bit-exact, worst relative {worst:.2e}", d / 2);
    }
}
