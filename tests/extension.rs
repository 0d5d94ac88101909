//! Components written outside the workspace's crates, from public items only, are as good as
//! ours: a router, a feed-forward and an attention, each plugged into a fixture model and
//! checked against transformers' logits (what `tools/make_fixtures.py` recorded).
//!
//! - the router re-implements Llama 4's rule (sigmoid of the top-1 raw logit) with
//!   `Routing::refill`, so the scout fixture's logits must not move;
//! - the feed-forward re-implements the dense SwiGLU MLP with core's kernels and
//!   `Scratch::extra` buffers, in the maverick fixture's dense layers;
//! - the attention is `llama4_examples::sliding_window::SlidingWindow`: with a window longer
//!   than the sequence, on scout's layer 1, it must equal transformers with that layer global.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use llama4_examples::sliding_window::SlidingWindow;
use llama4_model::llama4_core::kernels::{linear_into, silu_mul_inplace};
use llama4_model::llama4_core::scratch::prefix;
use llama4_model::llama4_core::{Linear, Weight};
use llama4_model::moe_router::{sigmoid, top_k_into, FeedForward, Mlp, Router, Routing, Scratch};
use llama4_model::{AttentionLayer, DType, FeedForwardLayer, Logits, Session, TextModel};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    llama4_testkit::fixture(&format!("models/{name}"))
}

/// `logits_full` of a fixture's reference file.
fn reference(name: &str, file: &str) -> (Vec<u32>, Array2<f32>) {
    let bytes = std::fs::read(fixture(name).join(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = llama4_testkit::ids(&st, "prompt_ids")
        .into_iter()
        .chain(llama4_testkit::ids(&st, "generated_ids"))
        .collect();
    (ids, llama4_testkit::matrix(&st, "logits_full"))
}

/// max |a − b| / max |b| over the uncached path and over a cached prefill.
fn errors(model: &TextModel, ids: &[u32], want: &Array2<f32>) -> (f64, f64) {
    let full = model.forward_uncached(ids).unwrap();
    let mut session = Session::new(model, DType::F32).unwrap();
    let cached = session.prefill(ids, Logits::All).unwrap();
    (
        llama4_testkit::rel_err_2d(full.view(), want.view()),
        llama4_testkit::rel_err_2d(cached.view(), want.view()),
    )
}

/// Llama 4's routing rule, written against the public routing API.
#[derive(Debug)]
struct MyRouter {
    linear: Linear,
}

impl Router for MyRouter {
    fn num_experts(&self) -> usize {
        self.linear.out_features()
    }

    fn top_k(&self) -> usize {
        1
    }

    fn hidden_size(&self) -> usize {
        self.linear.in_features()
    }

    fn route(&self, x: ArrayView2<f32>) -> llama4_model::moe_router::Result<Routing> {
        let mut routing = Routing::default();
        self.route_into(x, &mut routing, &mut Vec::new())?;
        Ok(routing)
    }

    fn route_into(
        &self,
        x: ArrayView2<f32>,
        routing: &mut Routing,
        buf: &mut Vec<f32>,
    ) -> llama4_model::moe_router::Result<()> {
        let (t, e) = (x.nrows(), self.num_experts());
        let logits = prefix(buf, t * e);
        let out = ArrayViewMut2::from_shape((t, e), &mut *logits)
            .map_err(|err| llama4_model::moe_router::Error::component("my router", err))?;
        self.linear.forward_into(x, out)?;
        let logits: &[f32] = logits;
        routing.refill(e, 1, t, |token, experts, weights| {
            let row = &logits[token * e..(token + 1) * e];
            top_k_into(row, experts);
            weights[0] = sigmoid(row[experts[0] as usize]);
        })
    }
}

#[test]
fn an_outside_router_equal_to_llama4s_leaves_the_logits_unchanged() {
    let (ids, want) = reference("scout", "reference.safetensors");
    let mut model = TextModel::load(fixture("scout")).unwrap();
    let ckpt = llama4_model::llama4_core::Checkpoint::open(fixture("scout")).unwrap();
    let mut replaced = 0;
    model
        .replace_routers(|layer, moe| {
            replaced += 1;
            let (e, h) = (moe.router().num_experts(), moe.router().hidden_size());
            let scope = ckpt.scope(&format!("model.layers.{layer}.feed_forward.router"));
            Ok(Box::new(MyRouter {
                linear: Linear::new(scope.weight("weight", [e, h])?, None)?,
            }))
        })
        .unwrap();
    assert_eq!(replaced, model.layers().len());
    let (uncached, cached) = errors(&model, &ids, &want);
    println!("outside router: uncached {uncached:.2e}, cached {cached:.2e}");
    assert!(uncached < 1e-5 && cached < 1e-5);
}

/// The dense SwiGLU MLP from core's kernels, its intermediates in `Scratch::extra`.
#[derive(Debug)]
struct MyMlp {
    gate: Weight,
    up: Weight,
    down: Weight,
}

impl FeedForward for MyMlp {
    fn forward(&self, x: ArrayView2<f32>) -> llama4_model::moe_router::Result<Array2<f32>> {
        let mut out = Array2::zeros(x.dim());
        self.forward_into(x, out.view_mut(), &mut Scratch::default())?;
        Ok(out)
    }

    fn forward_into(
        &self,
        x: ArrayView2<f32>,
        out: ArrayViewMut2<f32>,
        scratch: &mut Scratch,
    ) -> llama4_model::moe_router::Result<()> {
        let (t, i) = (x.nrows(), self.gate.out_features());
        let err = |e| llama4_model::moe_router::Error::component("my mlp", e);
        if scratch.extra.len() < 2 {
            scratch.extra.resize_with(2, Vec::new);
        }
        let [g, u] = &mut scratch.extra[..2] else {
            unreachable!("two buffers")
        };
        let (g, u) = (prefix(g, t * i), prefix(u, t * i));
        linear_into(
            x,
            &self.gate,
            ArrayViewMut2::from_shape((t, i), &mut *g).map_err(err)?,
        )?;
        linear_into(
            x,
            &self.up,
            ArrayViewMut2::from_shape((t, i), &mut *u).map_err(err)?,
        )?;
        silu_mul_inplace(g, u)?;
        linear_into(ArrayView2::from_shape((t, i), &*g).map_err(err)?, &self.down, out)?;
        Ok(())
    }
}

#[test]
fn an_outside_feed_forward_replaces_the_dense_layers() {
    let (ids, want) = reference("maverick", "reference.safetensors");
    let mut model = TextModel::load(fixture("maverick")).unwrap();
    let mut replaced = 0;
    for layer in model.layers_mut() {
        if let FeedForwardLayer::Dense(mlp) = &layer.feed_forward {
            let mlp: &Mlp = mlp;
            let mine = MyMlp {
                gate: mlp.gate_proj().clone(),
                up: mlp.up_proj().clone(),
                down: mlp.down_proj().clone(),
            };
            layer.feed_forward = FeedForwardLayer::Custom(Box::new(mine));
            replaced += 1;
        }
    }
    assert!(replaced >= 2, "maverick interleaves dense layers");
    let (uncached, cached) = errors(&model, &ids, &want);
    println!("outside feed-forward: uncached {uncached:.2e}, cached {cached:.2e}");
    assert!(uncached < 1e-4 && cached < 1e-4);
}

#[test]
fn an_outside_attention_with_a_long_window_is_global_attention() {
    let (ids, want) = reference("scout", "reference_layer1_global.safetensors");
    let mut model = TextModel::load(fixture("scout")).unwrap();
    let layer = &mut model.layers_mut()[1];
    let AttentionLayer::Llama4(attn) = &layer.self_attn else {
        panic!("Llama 4's attention as loaded");
    };
    let window = NonZeroUsize::new(ids.len() + 1).unwrap();
    layer.self_attn = AttentionLayer::Custom(Box::new(SlidingWindow::new((**attn).clone(), window)));
    let (uncached, cached) = errors(&model, &ids, &want);
    println!("outside attention: uncached {uncached:.2e}, cached {cached:.2e}");
    assert!(uncached < 1e-4 && cached < 1e-4);

    // A short window is a different model: the reference must not be met by accident.
    let layer = &mut model.layers_mut()[1];
    let AttentionLayer::Custom(_) = &layer.self_attn else {
        unreachable!()
    };
    let short = TextModel::load(fixture("scout")).unwrap();
    let AttentionLayer::Llama4(attn) = &short.layers()[1].self_attn else {
        unreachable!()
    };
    layer.self_attn = AttentionLayer::Custom(Box::new(SlidingWindow::new(
        (**attn).clone(),
        NonZeroUsize::new(3).unwrap(),
    )));
    let (uncached, _) = errors(&model, &ids, &want);
    assert!(uncached > 1e-2, "{uncached:e}");
}
