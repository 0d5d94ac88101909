//! Routers: a linear map from hidden states to per-expert logits, then a selection rule.

use std::fmt::Debug;

use llama4_core::scratch::prefix;
use llama4_core::{Linear, Scope, Weight};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::experts::shape_err;
use crate::routing::{sigmoid_top_k, sigmoid_top_k_into, softmax_top_k, softmax_top_k_into};
use crate::{Error, Result, Routing};

/// Chooses, for every token, which experts run and with what weight.
///
/// Implement it to try another routing rule in a [`crate::Moe`] layer
/// ([`crate::Moe::with_router`]); the layer validates what `route` returns.
pub trait Router: Send + Sync + Debug {
    /// Number of experts `E` the router chooses among.
    fn num_experts(&self) -> usize;

    /// Experts chosen per token `k`.
    fn top_k(&self) -> usize;

    /// Hidden size `H` of the tokens it routes.
    fn hidden_size(&self) -> usize;

    /// The routing of `x`.
    ///
    /// # Shapes
    /// `x: [T, H]` → a [`Routing`] of `T` tokens.
    fn route(&self, x: ArrayView2<f32>) -> Result<Routing>;

    /// Like [`Router::route`], refilling `routing` in place; `buf` is a reusable buffer for the
    /// logits and temporaries (its contents afterwards are unspecified). On error `routing` is
    /// left valid but unspecified.
    ///
    /// The provided implementation calls `route` (and so allocates). This crate's routers
    /// allocate nothing once `routing` and `buf` have served as many tokens.
    ///
    /// # Shapes
    /// `x: [T, H]`; `routing` becomes a routing of `T` tokens.
    fn route_into(&self, x: ArrayView2<f32>, routing: &mut Routing, buf: &mut Vec<f32>) -> Result<()> {
        let _ = buf;
        *routing = self.route(x)?;
        Ok(())
    }

    /// Bytes of stored weights one `route` call reads (for [`crate::RoutingStats`]).
    fn weight_bytes(&self) -> usize {
        0
    }
}

/// The router's linear map `router.weight [E, H]`, shared by the two routers below.
#[derive(Clone, Debug)]
struct RouterLinear {
    linear: Linear,
}

impl RouterLinear {
    fn new(weight: Weight, top_k: usize) -> Result<Self> {
        let e = weight.out_features();
        if top_k == 0 || top_k > e {
            return Err(Error::TopK {
                top_k,
                num_experts: e,
            });
        }
        Ok(RouterLinear {
            linear: Linear::new(weight, None)?,
        })
    }

    fn load(scope: &Scope, hidden_size: usize, num_experts: usize) -> Result<Weight> {
        Ok(scope.weight("weight", [num_experts, hidden_size])?)
    }

    fn logits(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        Ok(self.linear.forward(x)?)
    }

    /// The logits `[T, E]` written into the first `T·E` entries of `buf`, and the rest of `buf`
    /// (`extra` entries, stale) for the caller's temporaries.
    fn logits_into<'b>(
        &self,
        x: ArrayView2<f32>,
        buf: &'b mut Vec<f32>,
        extra: usize,
    ) -> Result<(ArrayView2<'b, f32>, &'b mut [f32])> {
        let (t, e) = (x.nrows(), self.linear.out_features());
        let (logits, rest) = prefix(buf, t * e + extra).split_at_mut(t * e);
        let out = ArrayViewMut2::from_shape((t, e), &mut *logits).map_err(shape_err)?;
        self.linear.forward_into(x, out)?;
        let logits: &'b [f32] = logits;
        Ok((ArrayView2::from_shape((t, e), logits).map_err(shape_err)?, rest))
    }
}

/// Llama 4's router: `logits = x Wᵀ`; per token the top-k experts by RAW logit, each weighted
/// by `sigmoid(logit)` (no softmax, no renormalisation).
///
/// Ties between equal logits go to the lower expert index (see [`crate::top_k_into`]).
#[derive(Clone, Debug)]
pub struct Llama4Router {
    linear: RouterLinear,
    top_k: usize,
}

impl Llama4Router {
    /// A router over `weight` (`[E, H]` as an `nn.Linear`, or any layout mapping `H → E`)
    /// choosing `top_k` experts per token.
    pub fn new(weight: Weight, top_k: usize) -> Result<Self> {
        Ok(Llama4Router {
            linear: RouterLinear::new(weight, top_k)?,
            top_k,
        })
    }

    /// Loads `weight [E, H]` from `scope` (`model.layers.{i}.feed_forward.router`).
    pub fn load(scope: &Scope, hidden_size: usize, num_experts: usize, top_k: usize) -> Result<Self> {
        Self::new(RouterLinear::load(scope, hidden_size, num_experts)?, top_k)
    }

    /// The raw router logits (the second output of transformers' `Llama4TextMoe`).
    ///
    /// # Shapes
    /// `x: [T, H]` → `[T, E]`.
    pub fn logits(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        self.linear.logits(x)
    }

    /// The router's weight.
    pub fn weight(&self) -> &Weight {
        self.linear.linear.weight()
    }
}

impl Router for Llama4Router {
    fn num_experts(&self) -> usize {
        self.linear.linear.weight().out_features()
    }

    fn top_k(&self) -> usize {
        self.top_k
    }

    fn hidden_size(&self) -> usize {
        self.linear.linear.weight().in_features()
    }

    fn route(&self, x: ArrayView2<f32>) -> Result<Routing> {
        sigmoid_top_k(self.logits(x)?.view(), self.top_k)
    }

    fn route_into(&self, x: ArrayView2<f32>, routing: &mut Routing, buf: &mut Vec<f32>) -> Result<()> {
        let (logits, _) = self.linear.logits_into(x, buf, 0)?;
        sigmoid_top_k_into(logits, self.top_k, routing)
    }

    fn weight_bytes(&self) -> usize {
        self.linear.linear.weight().nbytes()
    }
}

/// The research alternative: top-k experts by logit, weighted by their softmax probability
/// over all experts, optionally renormalised over the selected ones (Mixtral renormalises).
#[derive(Clone, Debug)]
pub struct SoftmaxTopKRouter {
    linear: RouterLinear,
    top_k: usize,
    renormalize: bool,
}

impl SoftmaxTopKRouter {
    /// A router over `weight` (mapping `H → E`) choosing `top_k` experts per token.
    pub fn new(weight: Weight, top_k: usize, renormalize: bool) -> Result<Self> {
        Ok(SoftmaxTopKRouter {
            linear: RouterLinear::new(weight, top_k)?,
            top_k,
            renormalize,
        })
    }

    /// Loads `weight [E, H]` from `scope`, the same tensor Llama 4's router uses.
    pub fn load(
        scope: &Scope,
        hidden_size: usize,
        num_experts: usize,
        top_k: usize,
        renormalize: bool,
    ) -> Result<Self> {
        Self::new(
            RouterLinear::load(scope, hidden_size, num_experts)?,
            top_k,
            renormalize,
        )
    }

    /// The raw router logits.
    ///
    /// # Shapes
    /// `x: [T, H]` → `[T, E]`.
    pub fn logits(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        self.linear.logits(x)
    }

    /// Whether the selected probabilities are rescaled to sum to 1.
    pub fn renormalize(&self) -> bool {
        self.renormalize
    }

    /// The router's weight.
    pub fn weight(&self) -> &Weight {
        self.linear.linear.weight()
    }
}

impl Router for SoftmaxTopKRouter {
    fn num_experts(&self) -> usize {
        self.linear.linear.weight().out_features()
    }

    fn top_k(&self) -> usize {
        self.top_k
    }

    fn hidden_size(&self) -> usize {
        self.linear.linear.weight().in_features()
    }

    fn route(&self, x: ArrayView2<f32>) -> Result<Routing> {
        softmax_top_k(self.logits(x)?.view(), self.top_k, self.renormalize)
    }

    fn route_into(&self, x: ArrayView2<f32>, routing: &mut Routing, buf: &mut Vec<f32>) -> Result<()> {
        let e = self.linear.linear.weight().out_features();
        let (logits, probs) = self.linear.logits_into(x, buf, e)?;
        softmax_top_k_into(logits, self.top_k, self.renormalize, probs, routing)
    }

    fn weight_bytes(&self) -> usize {
        self.linear.linear.weight().nbytes()
    }
}
