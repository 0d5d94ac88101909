//! Meta's FP8 checkpoints (`quantization_config.quant_method = "fbgemm_fp8"`): the committed
//! tiny checkpoint (tools/make_fp8_fixture.py) against transformers' float model run on the
//! dequantised weights, the config's quantisation field, and fp8 through `quantize_checkpoint`.

use std::ops::ControlFlow;
use std::path::PathBuf;

use llama4_core::{DType, QuantFormat, QuantScope, QuantSpec};
use llama4_model::config::QuantizationConfig;
use llama4_model::{
    quantize_checkpoint, Error, GenerateOptions, Logits, ModelConfig, SamplingConfig, Session, TextModel,
};
use ndarray::s;
use tempfile::TempDir;

mod common;
use common::{rel_err, text_reference};

const TOL: f32 = 1e-4;

fn dir() -> PathBuf {
    common::fixture_dir("fp8")
}

fn scout() -> PathBuf {
    common::fixture_dir("scout")
}

/// Uncached, cached prefill and cached greedy decoding of `model` against the reference.
fn check_model(model: &TextModel, what: &str) {
    let r = text_reference(&dir());
    let n = r.generated.len();
    let all: Vec<u32> = r.prompt.iter().chain(&r.generated).copied().collect();
    let full = model.forward_uncached(&all).unwrap();
    let e_full = rel_err(full.view(), r.logits_full.view());

    let mut session = Session::new(model, DType::F32).unwrap();
    let prefill = session.prefill(&r.prompt, Logits::All).unwrap();
    let e_prefill = rel_err(prefill.view(), r.logits_full.slice(s![..r.prompt.len(), ..]));

    let mut session = Session::new(model, DType::F32).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingConfig::greedy(),
        stop_ids: vec![],
        keep_logits: true,
    };
    let g = session
        .generate(&r.prompt, &opts, |_| ControlFlow::Continue(()))
        .unwrap();
    let e_steps = rel_err(g.logits.as_ref().unwrap().view(), r.step_logits.view());
    println!("{what}: uncached {e_full:.2e}, prefill {e_prefill:.2e}, decode steps {e_steps:.2e} (max |Δ| / max |ref|)");
    assert!(e_full < TOL, "{what}: uncached logits off by {e_full:e}");
    assert!(e_prefill < TOL, "{what}: prefill logits off by {e_prefill:e}");
    assert_eq!(g.generated_ids, r.generated, "{what}: greedy ids differ");
    assert!(e_steps < TOL, "{what}: per-step logits off by {e_steps:e}");
}

#[test]
fn fp8_checkpoint_matches_transformers_on_dequantised_weights() {
    let model = TextModel::load(dir()).unwrap();
    // 2 dense MLPs × 3 linears + 2 MoE layers × (2 expert tensors + 3 shared-expert linears).
    assert_eq!(model.checkpoint().quantized_weights(), 16);
    check_model(&model, "fp8");
}

#[test]
fn config_reads_fbgemm_fp8() {
    let cfg = ModelConfig::from_dir(dir()).unwrap();
    match cfg.quantization {
        Some(QuantizationConfig::FbgemmFp8 {
            activation_scale_ub,
            modules_to_not_convert,
        }) => {
            assert_eq!(activation_scale_ub, Some(1200.0));
            assert!(modules_to_not_convert.contains(&"model.layers.1.feed_forward.router".to_string()));
        }
        other => panic!("{other:?}"),
    }
    assert!(ModelConfig::from_dir(scout()).unwrap().quantization.is_none());
    // Multimodal configs carry it at the top level.
    let mm = br#"{"model_type": "llama4", "text_config": {"num_hidden_layers": 1},
                 "quantization_config": {"quant_method": "fbgemm_fp8"}}"#;
    assert!(matches!(
        ModelConfig::from_json_bytes(mm).unwrap().quantization,
        Some(QuantizationConfig::FbgemmFp8 {
            activation_scale_ub: None,
            ..
        })
    ));
    let null = br#"{"quantization_config": null, "num_hidden_layers": 1}"#;
    assert!(ModelConfig::from_json_bytes(null).unwrap().quantization.is_none());
}

fn config_error(quant: &str) -> Error {
    let json = format!(r#"{{"num_hidden_layers": 1, "quantization_config": {quant}}}"#);
    ModelConfig::from_json_bytes(json.as_bytes()).unwrap_err()
}

#[test]
fn unsupported_quantization_configs_are_refused() {
    for (quant, why) in [
        (
            r#"{"quant_method": "gptq", "bits": 4}"#,
            "`gptq` is not supported",
        ),
        (
            r#"{"quant_method": "fp8", "weight_block_size": [128, 128]}"#,
            "`fp8` is not supported",
        ),
        (r#"{"bits": 4}"#, "quant_method"),
        (r#""fbgemm_fp8""#, "not an object"),
        (
            r#"{"quant_method": "fbgemm_fp8", "activation_scale_ub": "big"}"#,
            "activation_scale_ub",
        ),
        (
            r#"{"quant_method": "fbgemm_fp8", "modules_to_not_convert": [1]}"#,
            "modules_to_not_convert",
        ),
        (
            r#"{"quant_method": "fbgemm_fp8", "modules_to_not_convert": "lm_head"}"#,
            "modules_to_not_convert",
        ),
    ] {
        let e = config_error(quant);
        assert!(
            matches!(&e, Error::Config { field: "quantization_config", reason } if reason.contains(why)),
            "{quant}: {e}"
        );
    }
}

/// A copy of the fixture with config.json's `quantization_config` replaced by `quant`.
fn fixture_with_quant(quant: serde_json::Value) -> TempDir {
    let tmp = TempDir::new().unwrap();
    for f in ["model.safetensors", "reference.safetensors"] {
        std::fs::copy(dir().join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] = quant;
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    tmp
}

#[test]
fn a_checkpoint_with_another_method_does_not_load() {
    let tmp = fixture_with_quant(serde_json::json!({"quant_method": "compressed-tensors"}));
    let e = TextModel::load(tmp.path()).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Config {
                field: "quantization_config",
                ..
            }
        ),
        "{e}"
    );
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn logits(m: &TextModel) -> Vec<f32> {
    let r = text_reference(&dir());
    m.forward_uncached(&r.prompt).unwrap().iter().copied().collect()
}

#[test]
fn quantize_checkpoint_keeps_fp8_tensors() {
    // A q8 policy over an FP8 checkpoint: the fp8 tensors and their scales are copied byte for
    // byte and read as fp8 again; the float projections it selects become q8.
    let out = TempDir::new().unwrap();
    let p = llama4_model::quant_policy(QuantSpec::new(QuantFormat::Q8, 32), QuantScope::AllLinear);
    let summary = quantize_checkpoint(dir(), out.path(), &p).unwrap();
    // 4 layers × q/k/v/o and lm_head.
    assert_eq!(summary.quantized, 17);
    let src = llama4_core::Checkpoint::open(dir()).unwrap();
    let saved = llama4_core::Checkpoint::open(out.path()).unwrap();
    for name in src.tensor_names() {
        if src.info(name).unwrap().dtype == "F8_E4M3" {
            assert_eq!(
                src.raw_bytes(name).unwrap(),
                saved.raw_bytes(name).unwrap(),
                "{name}"
            );
            let scale = format!("{name}_scale");
            assert_eq!(
                src.raw_bytes(&scale).unwrap(),
                saved.raw_bytes(&scale).unwrap(),
                "{scale}"
            );
        }
    }
    let m1 = TextModel::load_with_quantization(dir(), Some(p)).unwrap();
    let m2 = TextModel::load(out.path()).unwrap();
    assert_eq!(m2.checkpoint().quantized_weights(), 16 + 17);
    assert!(
        same_bits(&logits(&m1), &logits(&m2)),
        "saved and load-time q8 differ"
    );
}

/// Rust's own fp8 of a float checkpoint: written by `quantize_checkpoint`, read back bit for bit
/// (weights and logits) as quantising at load time gives.
#[test]
fn fp8_policy_round_trips_through_a_saved_checkpoint() {
    for scope in [QuantScope::Experts, QuantScope::AllLinear] {
        let p = llama4_model::quant_policy(QuantSpec::fp8(), scope);
        let out = TempDir::new().unwrap();
        let summary = quantize_checkpoint(scout(), out.path(), &p).unwrap();
        assert!(summary.quantized > 0);
        let file = llama4_core::safetensors::SafetensorsFile::open(&summary.path).unwrap();
        let gu = file
            .info("model.layers.0.feed_forward.experts.gate_up_proj.qweight")
            .unwrap();
        assert_eq!(gu.dtype, "F8_E4M3");
        let m1 = TextModel::load_with_quantization(scout(), Some(p)).unwrap();
        let m2 = TextModel::load(out.path()).unwrap();
        assert_eq!(m2.checkpoint().quantized_weights(), summary.quantized);
        let prompt: Vec<u32> = (3..25).collect();
        let a = m1.forward_uncached(&prompt).unwrap();
        let b = m2.forward_uncached(&prompt).unwrap();
        assert!(
            same_bits(a.as_slice().unwrap(), b.as_slice().unwrap()),
            "{scope:?}"
        );
    }
}
