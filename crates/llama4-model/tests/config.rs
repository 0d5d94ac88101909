//! config.json parsing: the fixtures' quirks, the presets, and every rejected input.

use std::path::PathBuf;

use llama4_model::{Error, LayerSpec, ModelConfig, RopeScaling, TextConfig};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

fn parse(v: Value) -> llama4_model::Result<ModelConfig> {
    ModelConfig::from_json_bytes(v.to_string().as_bytes())
}

/// Scout's vision tower sizes (the rest from transformers' defaults).
fn vision() -> Value {
    json!({
        "hidden_size": 1408, "intermediate_size": 5632, "num_attention_heads": 16,
        "vision_output_dim": 4096, "projector_input_dim": 4096, "projector_output_dim": 4096
    })
}

fn small() -> Value {
    json!({
        "model_type": "llama4_text", "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        "intermediate_size": 32, "intermediate_size_mlp": 64, "num_local_experts": 4
    })
}

fn with(field: &str, value: Value) -> Value {
    let mut v = small();
    v[field] = value;
    v
}

#[track_caller]
fn rejects(v: Value, field: &str) {
    match parse(v) {
        Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
        other => panic!("expected a config error on `{field}`, got {other:?}"),
    }
}

#[test]
fn scout_fixture_integer_temperature_flag_and_empty_no_rope_layers() {
    let cfg = ModelConfig::from_dir(fixture("scout")).unwrap();
    let t = &cfg.text;
    assert_eq!(cfg.text_prefix, "");
    assert!(
        t.attention.attn_temperature_tuning,
        "`attn_temperature_tuning: 4` means on"
    );
    // Empty no_rope_layers means the default: every 4th layer is NoPE.
    let rope: Vec<bool> = t.layers.iter().map(|l| l.rope).collect();
    assert_eq!(rope, [true, true, true, false, true]);
    assert!(t.layers.iter().all(|l| l.moe));
    assert_eq!(t.layers[0].chunk, Some(8));
    assert_eq!(t.layers[3].chunk, None, "NoPE layers attend globally");
    assert_eq!(
        t.attention.rope.scaling,
        RopeScaling::Llama3 {
            factor: 16.0,
            low_freq_factor: 1.0,
            high_freq_factor: 1.0,
            original_max_position_embeddings: 64.0
        }
    );
    assert!(t.attention.use_qk_norm);
    assert_eq!(t.attention.floor_scale, 4.0);
}

#[test]
fn maverick_fixture_legacy_rope_spelling_interleaved_moe_eos_list() {
    let t = ModelConfig::from_dir(fixture("maverick")).unwrap().text;
    assert_eq!(t.attention.rope.theta, 500000.0);
    assert!(
        matches!(t.attention.rope.scaling, RopeScaling::Llama3 { high_freq_factor, .. } if high_freq_factor == 4.0)
    );
    let moe: Vec<usize> = t.moe_layers().collect();
    assert_eq!(moe, [1, 3], "interleave_moe_layer_step 2 without moe_layers");
    assert!(!t.attention.use_qk_norm);
    assert_eq!(t.eos_token_ids, [2, 5]);
    assert_eq!(t.num_local_experts, 32);
}

#[test]
fn top2_fixture_null_chunk_tied_no_head_dim() {
    let t = ModelConfig::from_dir(fixture("top2_tied")).unwrap().text;
    assert_eq!(t.attention.attention_chunk_size, None);
    assert!(
        t.layers.iter().all(|l| l.chunk.is_none()),
        "null chunk size means causal"
    );
    assert_eq!(t.attention.head_dim, 16, "head_dim absent: hidden / heads");
    assert!(t.tie_word_embeddings);
    assert_eq!(t.num_experts_per_tok, 2);
    let rope: Vec<bool> = t.layers.iter().map(|l| l.rope).collect();
    assert_eq!(rope, [true, false, true, false]);
    assert_eq!(t.attention.rope.scaling, RopeScaling::Default);
}

#[test]
fn defaults_absent_chunk_is_8192_absent_rope_is_default() {
    let t = parse(small()).unwrap().text;
    assert_eq!(t.attention.attention_chunk_size, Some(8192));
    assert_eq!(
        t.layers[0],
        LayerSpec {
            rope: true,
            chunk: Some(8192),
            moe: true
        }
    );
    assert_eq!(t.attention.rope.scaling, RopeScaling::Default);
    assert_eq!(t.attention.rope.theta, 500000.0);
    assert_eq!(t.eos_token_ids, Vec::<u32>::new());
}

#[test]
fn multimodal_config_reads_text_config_and_prefix() {
    let v = json!({
        "model_type": "llama4", "text_config": small(), "vision_config": vision(),
        "image_token_index": 200092, "tie_word_embeddings": true
    });
    let cfg = parse(v).unwrap();
    assert_eq!(cfg.text_prefix, "language_model.");
    let mm = cfg.multimodal.expect("multimodal part");
    assert_eq!(mm.image_token_index, 200092);
    assert_eq!(mm.vision.hidden_size, 1408);
    assert_eq!(mm.text_hidden_size, cfg.text.hidden_size());
    assert!(cfg.text.tie_word_embeddings);
}

#[test]
fn presets_have_published_shapes() {
    let scout = TextConfig::scout();
    assert_eq!(scout.layers.len(), 48);
    assert_eq!(scout.layers.iter().filter(|l| !l.rope).count(), 12);
    assert_eq!(scout.moe_layers().count(), 48);
    let maverick = TextConfig::maverick();
    assert_eq!(maverick.moe_layers().count(), 24);
    assert_eq!(maverick.num_local_experts, 128);
    assert_eq!(
        (
            maverick.attention.num_attention_heads,
            maverick.attention.num_key_value_heads,
            maverick.attention.head_dim
        ),
        (40, 8, 128)
    );
}

#[test]
fn malformed_json_is_a_config_json_error() {
    for bytes in [&b"{"[..], b"[1, 2]", b"", b"{\"hidden_size\": \"big\"}"] {
        assert!(
            matches!(ModelConfig::from_json_bytes(bytes), Err(Error::ConfigJson { .. })),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn missing_config_file_is_an_io_error_naming_it() {
    let err = ModelConfig::from_dir("/nonexistent-dir").unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("config.json"));
}

#[test]
fn inconsistent_values_are_rejected_with_their_field() {
    rejects(with("num_key_value_heads", json!(3)), "num_key_value_heads");
    rejects(with("num_attention_heads", json!(0)), "num_attention_heads");
    rejects(with("head_dim", json!(15)), "head_dim");
    rejects(with("hidden_size", json!(66)).clone(), "head_dim");
    rejects(with("moe_layers", json!([0, 4])), "moe_layers");
    rejects(with("moe_layers", json!([-1])), "moe_layers");
    rejects(with("no_rope_layers", json!([1, 2, 1, 1])), "no_rope_layers");
    rejects(with("no_rope_layers", json!([1, 0])), "no_rope_layers");
    rejects(with("layer_types", json!(["full_attention"])), "layer_types");
    rejects(with("layer_types", json!(["a", "b", "c", "d"])), "layer_types");
    rejects(with("num_experts_per_tok", json!(5)), "num_experts_per_tok");
    rejects(with("attention_chunk_size", json!(0)), "attention_chunk_size");
    rejects(with("rms_norm_eps", json!(-1.0)), "rms_norm_eps");
    rejects(with("floor_scale", json!(0)), "floor_scale");
    rejects(with("hidden_act", json!("gelu")), "hidden_act");
    rejects(with("eos_token_id", json!([2, -1])), "eos_token_id");
    rejects(
        with("rope_parameters", json!({"rope_type": "yarn", "rope_theta": 1e4})),
        "rope_type",
    );
    rejects(
        with(
            "rope_parameters",
            json!({"rope_type": "llama3", "rope_theta": 1e4}),
        ),
        "low_freq_factor",
    );
    rejects(
        with(
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                   "original_max_position_embeddings": 8192}),
        ),
        "low_freq_factor",
    );
    rejects(with("model_type", json!("llama")), "model_type");
    rejects(json!({"model_type": "llama4"}), "text_config");
}

#[test]
fn legacy_null_rope_scaling_is_unscaled() {
    let mut v = small();
    v["rope_scaling"] = Value::Null;
    v["rope_theta"] = json!(10000.0);
    let t = parse(v).unwrap().text;
    assert_eq!(t.attention.rope.theta, 10000.0);
    assert_eq!(t.attention.rope.scaling, RopeScaling::Default);
}

#[test]
fn stop_ids_join_config_and_generation_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        with("eos_token_id", json!(2)).to_string(),
    )
    .unwrap();
    let t = ModelConfig::from_dir(dir.path()).unwrap().text;
    assert_eq!(llama4_model::stop_ids(dir.path(), &t).unwrap(), [2]);
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [7, 2, 9]}"#,
    )
    .unwrap();
    assert_eq!(llama4_model::stop_ids(dir.path(), &t).unwrap(), [2, 7, 9]);
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": "x"}"#,
    )
    .unwrap();
    assert!(matches!(
        llama4_model::stop_ids(dir.path(), &t),
        Err(Error::ConfigJson { .. })
    ));
}

#[test]
fn multimodal_config_parses_its_vision_side_once_and_refuses_a_bad_one() {
    // Absent image_token_index takes transformers' default.
    let v = json!({"model_type": "llama4", "text_config": small(), "vision_config": vision()});
    let mm = parse(v).unwrap().multimodal.expect("multimodal part");
    assert_eq!(mm.image_token_index, vision_encoder::DEFAULT_IMAGE_TOKEN_INDEX);

    let bad_vision = json!({
        "model_type": "llama4", "text_config": small(), "vision_config": {"hidden_size": "wide"}
    });
    let err = parse(bad_vision).unwrap_err();
    assert!(
        matches!(err, llama4_model::Error::Vision(_)) && err.to_string().contains("vision_config"),
        "{err}"
    );

    for id in [json!(-1), json!("200092"), json!(1u64 << 40)] {
        let v = json!({
            "model_type": "llama4", "text_config": small(), "vision_config": vision(),
            "image_token_index": id
        });
        let err = parse(v).unwrap_err();
        assert!(err.to_string().contains("image_token_index"), "{err}");
    }

    // Without a vision side the checkpoint runs as text only.
    let no_vision = json!({"model_type": "llama4", "text_config": small()});
    assert!(parse(no_vision).unwrap().multimodal.is_none());
}
