//! Quantised models through our own inference path: exact-match accuracy of the demo model in
//! q8 and q4 against bf16, and quantised checkpoints written by `quantize_checkpoint` that load
//! back bit for bit (weights and logits) without requantising.

use std::ops::ControlFlow;
use std::path::PathBuf;

use llama4_core::quant::{QSCALE_SUFFIX, QWEIGHT_SUFFIX};
use llama4_core::{
    Checkpoint, DType, QuantData, QuantFormat, QuantPolicy, QuantScope, QuantSpec, QuantTarget, ScaleType,
    WeightData,
};
use llama4_model::{
    quant_policy, quantize_checkpoint, stop_ids, Error, GenerateOptions, Logits, SamplingConfig, Session,
    TextModel, Tokenizer,
};
use tempfile::TempDir;

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

/// The held-out set of tests/demo.rs.
fn heldout() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(demo().join("heldout.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["prompt"].as_str().unwrap().to_string(),
                e["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Exact matches (answer text equal and ended by a stop id) of `model` over the held-out set,
/// greedy, as tests/demo.rs counts them.
fn exact_matches(model: &TextModel, cases: &[(String, String)]) -> usize {
    let tok = Tokenizer::from_dir(demo()).unwrap().unwrap();
    let stops = stop_ids(demo(), model.config()).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 16,
        sampling: SamplingConfig::greedy(),
        stop_ids: stops.clone(),
        keep_logits: false,
    };
    cases
        .iter()
        .filter(|(prompt, answer)| {
            let ids = tok.encode(prompt).unwrap();
            let mut session = Session::new(model, DType::F32).unwrap();
            let g = session
                .generate(&ids, &options, |_| ControlFlow::Continue(()))
                .unwrap();
            let text = tok.decode(g.answer_ids()).unwrap();
            &text == answer && g.generated_ids.last().is_some_and(|i| stops.contains(i))
        })
        .count()
}

fn policy(format: QuantFormat, group: usize, scope: QuantScope) -> QuantPolicy {
    quant_policy(QuantSpec::new(format, group), scope)
}

/// q8 within 1 point of bf16 and q4 within 3 points, experts only and all linear weights.
#[test]
fn demo_accuracy_q8_and_q4_against_bf16() {
    let cases = heldout();
    assert!(cases.len() >= 200);
    let n = cases.len() as f64;
    let base = exact_matches(&TextModel::load(demo()).unwrap(), &cases);
    let base_pct = 100.0 * base as f64 / n;
    println!("demo held-out exact match, {} cases:", cases.len());
    println!("  bf16                      {base:>4} = {base_pct:.1}%");
    let mut failures = Vec::new();
    for scope in [QuantScope::Experts, QuantScope::AllLinear] {
        for (format, allowed) in [(QuantFormat::Q8, 1.0), (QuantFormat::Q4, 3.0)] {
            for group in [32, 64] {
                let p = policy(format, group, scope);
                let model = TextModel::load_with_quantization(demo(), Some(p)).unwrap();
                assert!(model.checkpoint().quantized_weights() > 0);
                let got = exact_matches(&model, &cases);
                let pct = 100.0 * got as f64 / n;
                println!(
                    "  {:<3} {:<10} group {group:<3}  {got:>4} = {pct:.1}% ({:+.1} points)",
                    format.name(),
                    scope.name(),
                    pct - base_pct
                );
                if pct < base_pct - allowed {
                    failures.push(format!(
                        "{} {} group {group}: {pct:.1}%",
                        format.name(),
                        scope.name()
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "below bf16 {base_pct:.1}% minus the allowance: {failures:?}"
    );
}

/// Every tensor the policy selects, as (name, data) from `ckpt` (whose policy, if any, applies).
fn quantised_tensors(
    ckpt: &Checkpoint,
    selector: &QuantPolicy,
    source: &Checkpoint,
) -> Vec<(String, QuantData)> {
    let mut names: Vec<&str> = source.tensor_names().collect();
    names.sort_unstable();
    let root = ckpt.root();
    names
        .into_iter()
        .filter_map(|name| {
            let shape = source.shape(name).unwrap();
            let data = match (selector.selects(name)?, shape) {
                (QuantTarget::Linear, &[o, i]) => root.weight(name, [o, i]).unwrap().data().clone(),
                (QuantTarget::Experts, &[e, i, o]) => {
                    root.batched_in_out(name, [e, i, o]).unwrap().data().clone()
                }
                _ => return None,
            };
            match data {
                WeightData::Quant(q) => Some((name.to_string(), *q)),
                other => panic!("`{name}` is not quantised: {:?}", other.dtype()),
            }
        })
        .collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn saved_quantised_checkpoint_reloads_bit_for_bit() {
    let specs = [
        (QuantSpec::new(QuantFormat::Q8, 32), QuantScope::Experts),
        (
            QuantSpec::new(QuantFormat::Q4, 64).with_scales(ScaleType::F16),
            QuantScope::AllLinear,
        ),
        (QuantSpec::new(QuantFormat::Q4, 32), QuantScope::Experts),
        (
            QuantSpec::new(QuantFormat::Q8, 64).with_scales(ScaleType::F16),
            QuantScope::AllLinear,
        ),
    ];
    let prompt: Vec<u32> = {
        let tok = Tokenizer::from_dir(demo()).unwrap().unwrap();
        tok.encode(&heldout()[0].0).unwrap()
    };
    for (spec, scope) in specs {
        let p = quant_policy(spec, scope);
        let out = TempDir::new().unwrap();
        let summary = quantize_checkpoint(demo(), out.path(), &p).unwrap();
        let expected = if scope == QuantScope::Experts { 8 } else { 37 };
        assert_eq!(summary.quantized, expected, "{p:?}");
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(
                summary.files_copied.iter().any(|c| c == f) && out.path().join(f).is_file(),
                "{f}"
            );
        }

        // (a) Every quantised tensor: values and scales identical to load-time quantisation,
        // and the saved ones are borrowed from the map, not requantised.
        let source = Checkpoint::open(demo()).unwrap();
        let at_load = Checkpoint::open(demo()).unwrap().with_quantization(Some(p));
        let saved = Checkpoint::open(out.path()).unwrap();
        let a = quantised_tensors(&at_load, &p, &source);
        let b = quantised_tensors(&saved, &p, &source);
        assert_eq!(a.len(), expected);
        assert_eq!(a.len(), b.len());
        for ((name, qa), (_, qb)) in a.iter().zip(&b) {
            assert_eq!(qa.spec(), qb.spec(), "{name}");
            assert_eq!(&qa.values()[..], &qb.values()[..], "{name} values");
            let sa: Vec<f32> = (0..qa.scales().len()).map(|i| qa.scales().get(i)).collect();
            let sb: Vec<f32> = (0..qb.scales().len()).map(|i| qb.scales().get(i)).collect();
            assert!(same_bits(&sa, &sb), "{name} scales");
            assert!(qb.is_mapped(), "{name} is read from the map");
            assert!(
                saved.contains(&format!("{name}{QWEIGHT_SUFFIX}"))
                    && saved.contains(&format!("{name}{QSCALE_SUFFIX}"))
            );
        }
        // Tensors not selected are copied byte for byte.
        for name in source.tensor_names() {
            if p.selects(name).is_none() {
                assert_eq!(
                    source.raw_bytes(name).unwrap(),
                    saved.raw_bytes(name).unwrap(),
                    "{name}"
                );
            }
        }

        // (b) Whole-model logits: load-time quantised vs saved-and-reloaded, and the saved one
        // with a different policy set (stored tensors are not requantised).
        let m1 = TextModel::load_with_quantization(demo(), Some(p)).unwrap();
        let m2 = TextModel::load(out.path()).unwrap();
        // Selects only tensors the saved file stores quantised (a float tensor it selected
        // would be quantised at load, by design).
        let other = quant_policy(
            QuantSpec::new(QuantFormat::Q4, 32).with_scales(ScaleType::F16),
            QuantScope::Experts,
        );
        let m3 = TextModel::load_with_quantization(out.path(), Some(other)).unwrap();
        assert_eq!(m2.checkpoint().quantized_weights(), expected);
        let l1 = m1.forward_uncached(&prompt).unwrap();
        let bf16 = TextModel::load(demo())
            .unwrap()
            .forward_uncached(&prompt)
            .unwrap();
        assert!(
            !same_bits(l1.as_slice().unwrap(), bf16.as_slice().unwrap()),
            "quantisation changes logits"
        );
        for (which, m) in [("saved", &m2), ("saved, other policy", &m3)] {
            let l = m.forward_uncached(&prompt).unwrap();
            assert!(
                same_bits(l1.as_slice().unwrap(), l.as_slice().unwrap()),
                "{p:?}: {which}: uncached logits differ"
            );
        }
        // The cached path (prefill + decode steps) too.
        let run = |m: &TextModel| {
            let mut s = Session::new(m, DType::F32).unwrap();
            let mut all: Vec<f32> = s.prefill(&prompt, Logits::All).unwrap().iter().copied().collect();
            for &t in &prompt[..4] {
                all.extend(s.step(t).unwrap());
            }
            all
        };
        assert!(same_bits(&run(&m1), &run(&m2)), "{p:?}: cached logits differ");
    }
}

#[test]
fn quantising_refuses_bad_requests() {
    // A group that does not divide an input width: an error naming the tensor, before writing.
    let p = policy(QuantFormat::Q4, 128, QuantScope::Experts);
    let out = TempDir::new().unwrap();
    let err = quantize_checkpoint(demo(), out.path(), &p).unwrap_err();
    assert!(
        matches!(&err, Error::Core(llama4_core::Error::Quant(m)) if m.contains("experts.") && m.contains("group size 128")),
        "{err}"
    );
    assert!(!out.path().join("model.safetensors").exists());
    let err = TextModel::load_with_quantization(demo(), Some(p)).unwrap_err();
    assert!(
        err.to_string().contains("experts.") && err.to_string().contains("group size 128"),
        "{err}"
    );

    // An already quantised source, and the source directory as destination.
    let p = policy(QuantFormat::Q8, 32, QuantScope::Experts);
    quantize_checkpoint(demo(), out.path(), &p).unwrap();
    let again = TempDir::new().unwrap();
    let err = quantize_checkpoint(out.path(), again.path(), &p).unwrap_err();
    assert!(
        matches!(&err, Error::QuantizeCheckpoint { reason, .. } if reason.contains("already quantised")),
        "{err}"
    );
    let err = quantize_checkpoint(out.path(), out.path(), &p).unwrap_err();
    assert!(
        matches!(&err, Error::QuantizeCheckpoint { reason, .. } if reason.contains("source directory")),
        "{err}"
    );
}

/// The written file is valid safetensors for other readers: 8-aligned data section, every
/// tensor aligned for its element size, contiguous offsets, metadata naming the spec.
#[test]
fn written_file_layout() {
    let p = policy(QuantFormat::Q4, 32, QuantScope::AllLinear);
    let out = TempDir::new().unwrap();
    let summary = quantize_checkpoint(demo(), out.path(), &p).unwrap();
    let file = llama4_core::safetensors::SafetensorsFile::open(&summary.path).unwrap();
    let h = file.header();
    assert_eq!(h.data_start % 8, 0);
    assert_eq!(
        h.metadata.get(llama4_core::quant::METADATA_KEY),
        Some(&p.spec.to_metadata())
    );
    assert_eq!(
        h.metadata
            .get(llama4_model::SCOPE_METADATA_KEY)
            .map(String::as_str),
        Some("all-linear")
    );
    let mut ranges: Vec<_> = h.tensors.values().collect();
    ranges.sort_by_key(|t| t.data_offsets);
    let mut end = 0;
    for t in ranges {
        assert_eq!(t.data_offsets.0, end, "contiguous");
        let size = match t.dtype.as_str() {
            "F32" => 4,
            "BF16" | "F16" => 2,
            _ => 1,
        };
        assert_eq!(t.data_offsets.0 % size, 0, "aligned");
        end = t.data_offsets.1;
    }
    assert_eq!(end as u64, summary.bytes_out);
    assert!(summary.bytes_out < summary.bytes_in);
}

#[test]
fn llama4_policies_select_experts_and_text_projections_only() {
    let spec = QuantSpec::new(QuantFormat::Q8, 32);
    let experts = quant_policy(spec, QuantScope::Experts);
    let all = quant_policy(spec, QuantScope::AllLinear);
    let cases: &[(&str, Option<QuantTarget>, Option<QuantTarget>)] = &[
        (
            "model.layers.0.feed_forward.experts.gate_up_proj",
            Some(QuantTarget::Experts),
            Some(QuantTarget::Experts),
        ),
        (
            "language_model.model.layers.3.feed_forward.experts.down_proj",
            Some(QuantTarget::Experts),
            Some(QuantTarget::Experts),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            None,
            Some(QuantTarget::Linear),
        ),
        (
            "model.layers.1.self_attn.o_proj.weight",
            None,
            Some(QuantTarget::Linear),
        ),
        (
            "model.layers.1.feed_forward.shared_expert.down_proj.weight",
            None,
            Some(QuantTarget::Linear),
        ),
        (
            "model.layers.1.feed_forward.gate_proj.weight",
            None,
            Some(QuantTarget::Linear),
        ),
        ("lm_head.weight", None, Some(QuantTarget::Linear)),
        ("language_model.lm_head.weight", None, Some(QuantTarget::Linear)),
        ("model.layers.0.feed_forward.router.weight", None, None),
        ("model.embed_tokens.weight", None, None),
        ("model.layers.0.input_layernorm.weight", None, None),
        ("model.layers.0.self_attn.q_proj.bias", None, None),
        ("model.norm.weight", None, None),
        ("vision_model.model.layers.0.self_attn.q_proj.weight", None, None),
        ("vision_model.model.layers.0.mlp.fc1.weight", None, None),
        ("multi_modal_projector.linear_1.weight", None, None),
        ("model.layers.0.feed_forward.experts", None, None),
    ];
    for &(name, e, a) in cases {
        assert_eq!(experts.selects(name), e, "{name} (experts)");
        assert_eq!(all.selects(name), a, "{name} (all-linear)");
    }
}
