//! Fixture helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use irope_attn::{AttnConfig, PosEncoding, RopeConfig, RopeScaling};
use serde_json::Value;

pub use llama4_testkit::rel_err;

/// `fixtures/components/<name>` of the workspace.
pub fn fixture(name: &str) -> PathBuf {
    llama4_testkit::fixture(&format!("components/{name}"))
}

pub fn read_json(name: &str) -> Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

/// `rope_theta` + `rope_scaling` (null or a llama3 dict) as a [`RopeConfig`].
pub fn rope_config(v: &Value) -> RopeConfig {
    let scaling = match &v["rope_scaling"] {
        Value::Null => RopeScaling::Default,
        s => match s["rope_type"].as_str() {
            Some("llama3") => RopeScaling::Llama3 {
                factor: num(s, "factor"),
                low_freq_factor: num(s, "low_freq_factor"),
                high_freq_factor: num(s, "high_freq_factor"),
                original_max_position_embeddings: num(s, "original_max_position_embeddings"),
            },
            Some("default") | None => RopeScaling::Default,
            Some(other) => panic!("rope_type {other} not in the fixtures' vocabulary"),
        },
    };
    RopeConfig {
        theta: num(v, "rope_theta"),
        scaling,
    }
}

/// The attention fields of a component json, and the layer kind it was captured from.
pub fn attn_config(v: &Value) -> (AttnConfig, PosEncoding) {
    let tuning = match &v["attn_temperature_tuning"] {
        Value::Bool(b) => *b,
        n => n.as_i64().unwrap_or(0) != 0,
    };
    let cfg = AttnConfig {
        hidden_size: num(v, "hidden_size") as usize,
        num_attention_heads: num(v, "num_attention_heads") as usize,
        num_key_value_heads: num(v, "num_key_value_heads") as usize,
        head_dim: num(v, "head_dim") as usize,
        rms_norm_eps: num(v, "rms_norm_eps") as f32,
        use_qk_norm: v["use_qk_norm"].as_bool().unwrap(),
        attention_chunk_size: v["attention_chunk_size"].as_u64().map(|c| c as usize),
        attn_temperature_tuning: tuning,
        floor_scale: num(v, "floor_scale") as f32,
        attn_scale: num(v, "attn_scale") as f32,
        attention_bias: v["attention_bias"].as_bool().unwrap(),
        rope: rope_config(v),
    };
    let kind = if v["is_rope_layer"].as_bool().unwrap() {
        PosEncoding::Rope
    } else {
        PosEncoding::NoPe
    };
    (cfg, kind)
}
