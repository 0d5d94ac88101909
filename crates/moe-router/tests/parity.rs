//! Parity with transformers 5.23.0 `Llama4TextMoe` (fixtures written by `tools/make_fixtures.py`).
//!
//! Tolerance, per output tensor: `max |ours − ref| ≤ 1e-4 · max |ref|`.

mod common;

use std::path::PathBuf;

use llama4_core::{Checkpoint, DType, Error as CoreError};
use moe_router::{Error, FeedForward, Llama4Router, Moe, MoeConfig, SoftmaxTopKRouter, WeightPlacement};
use ndarray::{Array2, Ix2};

const REL_TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/components")
        .join(name)
}

fn config(name: &str) -> MoeConfig {
    let path = fixture(&format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let get = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {}", path.display())) as usize
    };
    MoeConfig::llama4(
        get("hidden_size"),
        get("intermediate_size"),
        get("num_local_experts"),
        get("num_experts_per_tok"),
    )
}

fn tensor(ckpt: &Checkpoint, name: &str, rows: usize, cols: usize) -> Array2<f32> {
    ckpt.root()
        .array(name, &[rows, cols])
        .unwrap()
        .into_dimensionality::<Ix2>()
        .unwrap()
}

fn check(what: &str, got: &Array2<f32>, want: &Array2<f32>) {
    let (diff, scale) = common::max_abs_diff(got.view(), want.view());
    println!(
        "{what}: max |Δ| = {diff:.3e}, max |ref| = {scale:.3e}, relative {:.3e}",
        diff / scale
    );
    assert!(
        diff <= REL_TOL * scale,
        "{what}: max |Δ| {diff:e} exceeds {REL_TOL} · {scale:e}"
    );
}

fn parity(name: &str, tokens: usize, dtype: DType) {
    let cfg = config(name);
    let ckpt = Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap();
    let scope = ckpt.scope("feed_forward");
    let moe = Moe::load(&scope, &cfg).unwrap();
    assert_eq!(
        moe.experts().gate_up_proj().dtype(),
        Some(dtype),
        "weights kept in their stored dtype"
    );
    let router = Llama4Router::load(
        &scope.scope("router"),
        cfg.hidden_size,
        cfg.num_experts,
        cfg.top_k,
    )
    .unwrap();

    let x = tensor(&ckpt, &format!("x_t{tokens}"), tokens, cfg.hidden_size);
    let want_logits = tensor(
        &ckpt,
        &format!("router_logits_t{tokens}"),
        tokens,
        cfg.num_experts,
    );
    let want_out = tensor(&ckpt, &format!("out_t{tokens}"), tokens, cfg.hidden_size);

    check(
        &format!("{name} T={tokens} router logits"),
        &router.logits(x.view()).unwrap(),
        &want_logits,
    );
    let out = moe.forward_with_routing(x.view()).unwrap();
    check(&format!("{name} T={tokens} output"), &out.output, &want_out);

    // The routing must be the one the reference logits imply.
    let from_ref = moe_router::sigmoid_top_k(want_logits.view(), cfg.top_k).unwrap();
    assert_eq!(
        out.routing.experts(),
        from_ref.experts(),
        "{name}: selected experts"
    );
    assert_eq!(moe.router().top_k(), cfg.top_k);
    // And the statistics must have seen every token k times.
    let counted: u64 = moe.stats().tokens_per_expert().iter().sum();
    assert_eq!(counted, (tokens * cfg.top_k) as u64);
    // FeedForward::forward is the same computation.
    assert_eq!(moe.forward(x.view()).unwrap(), out.output);
}

macro_rules! parity_tests {
    ($($test:ident: $name:literal, $t:literal, $dtype:expr;)*) => {
        $(#[test] fn $test() { parity($name, $t, $dtype); })*
    };
}

parity_tests! {
    top1_f32_t1: "moe_top1_f32", 1, DType::F32;
    top1_f32_t37: "moe_top1_f32", 37, DType::F32;
    top2_f32_t1: "moe_top2_f32", 1, DType::F32;
    top2_f32_t37: "moe_top2_f32", 37, DType::F32;
    top1_bf16_t1: "moe_top1_bf16", 1, DType::BF16;
    top1_bf16_t37: "moe_top1_bf16", 37, DType::BF16;
    top2_bf16_t1: "moe_top2_bf16", 1, DType::BF16;
    top2_bf16_t37: "moe_top2_bf16", 37, DType::BF16;
}

#[test]
fn loading_checks_shapes_and_names_the_tensor() {
    let ckpt = Checkpoint::open(fixture("moe_top1_f32.safetensors")).unwrap();
    let scope = ckpt.scope("feed_forward");
    let good = config("moe_top1_f32");

    let wrong_i = MoeConfig {
        intermediate_size: good.intermediate_size + 1,
        ..good
    };
    match Moe::load(&scope, &wrong_i) {
        Err(Error::Core(CoreError::ShapeMismatch {
            name, expected, got, ..
        })) => {
            assert_eq!(name, "feed_forward.experts.gate_up_proj");
            assert_eq!(
                expected,
                vec![good.num_experts, good.hidden_size, 2 * wrong_i.intermediate_size]
            );
            assert_eq!(
                got,
                vec![good.num_experts, good.hidden_size, 2 * good.intermediate_size]
            );
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }

    let wrong_e = MoeConfig {
        num_experts: good.num_experts * 2,
        ..good
    };
    match Moe::load(&scope, &wrong_e) {
        Err(Error::Core(CoreError::ShapeMismatch { name, .. })) => {
            assert_eq!(name, "feed_forward.router.weight")
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }

    let wrong_k = MoeConfig {
        top_k: good.num_experts + 1,
        ..good
    };
    assert!(matches!(
        Moe::load(&scope, &wrong_k),
        Err(Error::TopK { top_k, num_experts }) if top_k == good.num_experts + 1 && num_experts == good.num_experts
    ));

    match Moe::load(&ckpt.scope("model.layers.0.feed_forward"), &good) {
        Err(Error::Core(CoreError::MissingTensor { name, .. })) => {
            assert_eq!(name, "model.layers.0.feed_forward.router.weight")
        }
        other => panic!("expected a missing tensor, got {other:?}"),
    }
}

/// The pitfalls LLAMA4.md lists must be visible against the fixtures: weighting the expert's
/// output, or softmax weights, each move the output far beyond the tolerance.
#[test]
fn known_pitfalls_break_parity() {
    let name = "moe_top2_f32";
    let cfg = config(name);
    let ckpt = Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap();
    let scope = ckpt.scope("feed_forward");
    let x = tensor(&ckpt, "x_t37", 37, cfg.hidden_size);
    let want = tensor(&ckpt, "out_t37", 37, cfg.hidden_size);

    let on_output = Moe::load(&scope, &cfg)
        .unwrap()
        .with_weight_placement(WeightPlacement::ExpertOutput);
    let (diff, scale) = common::max_abs_diff(on_output.forward(x.view()).unwrap().view(), want.view());
    println!("weight on output: relative {:.3e}", diff / scale);
    assert!(diff > 100.0 * REL_TOL * scale);

    let softmax = SoftmaxTopKRouter::load(
        &scope.scope("router"),
        cfg.hidden_size,
        cfg.num_experts,
        cfg.top_k,
        true,
    )
    .unwrap();
    let with_softmax = Moe::load(&scope, &cfg)
        .unwrap()
        .with_router(Box::new(softmax))
        .unwrap();
    let (diff, scale) = common::max_abs_diff(with_softmax.forward(x.view()).unwrap().view(), want.view());
    println!("softmax router: relative {:.3e}", diff / scale);
    assert!(diff > 100.0 * REL_TOL * scale);
}
