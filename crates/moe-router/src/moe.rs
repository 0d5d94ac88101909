//! The MoE layer: route, group tokens by expert, run each selected expert once over its group,
//! scatter back, add the shared expert.

use std::ops::Range;

use llama4_core::{kernels, Scope, Weight};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::scratch::{check_output, standard, with_standard_output, Buffers};
use crate::{
    Error, ExpertGroups, Experts, FeedForward, Llama4Router, Mlp, Result, Router, Routing, RoutingStats,
    Scratch,
};

/// Where a routing weight is applied.
///
/// Because SwiGLU is not linear, `expert(w·x)` and `w·expert(x)` differ: Llama 4 scales the
/// input; most other MoE models (Mixtral, DeepSeek) scale the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightPlacement {
    /// `y = expert(w · x)`: Llama 4.
    #[default]
    ExpertInput,
    /// `y = w · expert(x)`: Mixtral, DeepSeek.
    ExpertOutput,
}

/// Sizes and routing choices of a MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// Width `I` of each expert and of the shared expert.
    pub intermediate_size: usize,
    /// Number of routed experts `E` (`num_local_experts`).
    pub num_experts: usize,
    /// Experts per token `k` (`num_experts_per_tok`).
    pub top_k: usize,
    /// Where the routing weight is applied.
    pub weight_placement: WeightPlacement,
}

impl MoeConfig {
    /// Llama 4's choices for the given sizes: weight on the expert input.
    pub fn llama4(hidden_size: usize, intermediate_size: usize, num_experts: usize, top_k: usize) -> Self {
        MoeConfig {
            hidden_size,
            intermediate_size,
            num_experts,
            top_k,
            weight_placement: WeightPlacement::ExpertInput,
        }
    }
}

/// A forward call's output together with the routing that produced it.
#[derive(Clone, Debug)]
pub struct MoeOutput {
    /// The layer output, `[T, H]`.
    pub output: Array2<f32>,
    /// The experts each token used and their weights.
    pub routing: Routing,
}

/// A mixture-of-experts feed-forward: `out = shared_expert(x) + Σ_selected y_e`, where only
/// the experts some token selected run (each once, over the tokens that chose it).
///
/// An expert no token chose costs nothing: its weights are never read.
///
/// A layer may hold only some of its routed experts ([`Moe::partial`]): the router still
/// chooses among all `E`, and rows routed to experts held elsewhere get nothing from them here.
/// Partial layers over disjoint shares of `0..E`, the shared expert in one of them, add up to
/// the whole layer: what expert parallelism computes on each process.
#[derive(Debug)]
pub struct Moe {
    router: Box<dyn Router>,
    /// The experts held: `first_expert .. first_expert + experts.num_experts()` of the router's.
    experts: Experts,
    first_expert: usize,
    shared_expert: Option<Mlp>,
    weight_placement: WeightPlacement,
    stats: RoutingStats,
}

impl Moe {
    /// A layer from its parts; sizes must agree (`router` and `experts` on `E` and `H`, the
    /// shared expert on `H`). `shared_expert` is optional for research variants; Llama 4
    /// always has one.
    pub fn new(
        router: Box<dyn Router>,
        experts: Experts,
        shared_expert: Option<Mlp>,
        weight_placement: WeightPlacement,
    ) -> Result<Self> {
        if router.num_experts() != experts.num_experts() {
            return Err(Error::Mismatch {
                what: "router expert count",
                expected: experts.num_experts(),
                got: router.num_experts(),
            });
        }
        Self::partial(router, experts, 0, shared_expert, weight_placement)
    }

    /// A layer that holds only routed experts `first_expert .. first_expert + n` of the
    /// router's `E` (`experts` holds those `n`, in order): rows routed to other experts get
    /// nothing from them here (see the type's doc). `n` may be 0.
    ///
    /// # Errors
    /// [`Error::Mismatch`] when the share does not lie in `0..E` or a hidden size disagrees.
    pub fn partial(
        router: Box<dyn Router>,
        experts: Experts,
        first_expert: usize,
        shared_expert: Option<Mlp>,
        weight_placement: WeightPlacement,
    ) -> Result<Self> {
        check_router(router.as_ref(), &experts, first_expert)?;
        if let Some(s) = &shared_expert {
            if s.hidden_size() != experts.hidden_size() {
                return Err(Error::Mismatch {
                    what: "shared expert hidden size",
                    expected: experts.hidden_size(),
                    got: s.hidden_size(),
                });
            }
        }
        let stats = RoutingStats::new(router.num_experts());
        Ok(Moe {
            router,
            experts,
            first_expert,
            shared_expert,
            weight_placement,
            stats,
        })
    }

    /// Loads a Llama 4 MoE layer from `scope` (`model.layers.{i}.feed_forward`): `router.weight`,
    /// `experts.{gate_up_proj,down_proj}` and `shared_expert.{gate,up,down}_proj.weight`, with
    /// shape checks against `config`.
    pub fn load(scope: &Scope, config: &MoeConfig) -> Result<Self> {
        Self::load_partial(scope, config, 0..config.num_experts, true)
    }

    /// Loads the router, routed experts `experts` only (see [`Experts::load_range`]: the
    /// others' bytes are never read) and, when `shared_expert`, the shared expert: one
    /// process's share of a layer ([`Moe::partial`]).
    ///
    /// # Errors
    /// As [`Moe::load`]; a shape error when `experts` does not lie in `0..E`.
    pub fn load_partial(
        scope: &Scope,
        config: &MoeConfig,
        experts: Range<usize>,
        shared_expert: bool,
    ) -> Result<Self> {
        let c = config;
        let router = Llama4Router::load(&scope.scope("router"), c.hidden_size, c.num_experts, c.top_k)?;
        let first = experts.start;
        let experts = Experts::load_range(
            &scope.scope("experts"),
            c.num_experts,
            c.hidden_size,
            c.intermediate_size,
            experts,
        )?;
        let shared = if shared_expert {
            Some(Mlp::load(
                &scope.scope("shared_expert"),
                c.hidden_size,
                c.intermediate_size,
            )?)
        } else {
            None
        };
        Self::partial(Box::new(router), experts, first, shared, c.weight_placement)
    }

    /// The same layer with another router (statistics are kept: `E` is unchanged).
    pub fn with_router(mut self, router: Box<dyn Router>) -> Result<Self> {
        self.set_router(router)?;
        Ok(self)
    }

    /// Replaces the router in place (for a layer already inside a model), returning the old one.
    pub fn set_router(&mut self, router: Box<dyn Router>) -> Result<Box<dyn Router>> {
        if router.num_experts() != self.router.num_experts() {
            return Err(Error::Mismatch {
                what: "router expert count",
                expected: self.router.num_experts(),
                got: router.num_experts(),
            });
        }
        check_router(router.as_ref(), &self.experts, self.first_expert)?;
        Ok(std::mem::replace(&mut self.router, router))
    }

    /// The same layer with the routing weight applied at `placement`.
    pub fn with_weight_placement(mut self, placement: WeightPlacement) -> Self {
        self.weight_placement = placement;
        self
    }

    /// The router.
    pub fn router(&self) -> &dyn Router {
        self.router.as_ref()
    }

    /// The routed experts this layer holds (all `E`, unless [`Moe::partial`]); expert `e` of
    /// the bank is the router's `first_expert + e` ([`Moe::expert_range`]).
    pub fn experts(&self) -> &Experts {
        &self.experts
    }

    /// The router's ids of the experts held: `0..E` for a whole layer.
    pub fn expert_range(&self) -> Range<usize> {
        self.first_expert..self.first_expert + self.experts.num_experts()
    }

    /// Experts the router chooses among (`E`, held here or not).
    pub fn num_experts(&self) -> usize {
        self.router.num_experts()
    }

    /// The shared expert, if any.
    pub fn shared_expert(&self) -> Option<&Mlp> {
        self.shared_expert.as_ref()
    }

    /// Where routing weights are applied.
    pub fn weight_placement(&self) -> WeightPlacement {
        self.weight_placement
    }

    /// Counters accumulated over every forward call (tokens per expert, weight bytes read).
    pub fn stats(&self) -> &RoutingStats {
        &self.stats
    }

    /// Bytes of stored weights the smallest possible decode step reads: the router, the shared
    /// expert and `top_k` experts.
    pub fn min_decode_weight_bytes(&self) -> usize {
        self.router.weight_bytes()
            + self.shared_expert.as_ref().map_or(0, Mlp::weight_bytes)
            + self.router.top_k() * self.experts.expert_bytes()
    }

    /// Routes `x` and applies the layer, returning the routing too.
    ///
    /// # Shapes
    /// `x: [T, H]` → output `[T, H]`, routing of `T` tokens.
    pub fn forward_with_routing(&self, x: ArrayView2<f32>) -> Result<MoeOutput> {
        self.check_input(x)?;
        let routing = self.router.route(x)?;
        let output = self.forward_routed(x, &routing)?;
        Ok(MoeOutput { output, routing })
    }

    /// Applies the layer to `x` with a routing chosen elsewhere (forced routing, ablations).
    ///
    /// # Shapes
    /// `x: [T, H]`, `routing` of `T` tokens over `E` experts → `[T, H]`.
    pub fn forward_routed(&self, x: ArrayView2<f32>, routing: &Routing) -> Result<Array2<f32>> {
        let (t, h) = self.check_input(x)?;
        self.check_routing(routing, t)?;
        let groups = ExpertGroups::from_routing(routing);
        let mut out = Array2::zeros((t, h));
        let Some(os) = out.as_slice_mut() else {
            unreachable!("a fresh array is contiguous")
        };
        let x = x.as_standard_layout();
        self.run_groups(x.view(), &groups, os, &mut Buffers::default())?;
        Ok(out)
    }

    /// [`Moe::forward_routed`] into `out` (`[T, H]`, overwritten), reusing `scratch`: with a
    /// routing made elsewhere (on another process of an expert-parallel run), a call allocates
    /// nothing once `scratch` has served as many tokens.
    ///
    /// # Shapes
    /// `x: [T, H]`, `routing` of `T` tokens over `E` experts, `out: [T, H]`.
    pub fn forward_routed_into(
        &self,
        x: ArrayView2<f32>,
        routing: &Routing,
        out: ArrayViewMut2<f32>,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let (t, h) = self.check_input(x)?;
        check_output(out.dim(), t, h)?;
        self.check_routing(routing, t)?;
        let Scratch {
            input,
            groups,
            output,
            work,
            ..
        } = scratch;
        let x = standard(x, input)?;
        groups.regroup(routing);
        with_standard_output(out, output, |out| self.run_groups(x, groups, out, work))
    }

    /// The layer over `x` (standard layout) grouped as `groups`, into the row-major `out`
    /// (`T·H`, overwritten): the shared expert (or zeros), then each selected expert held here
    /// once over its tokens, added in ascending expert order. Updates the statistics.
    fn run_groups(
        &self,
        x: ArrayView2<f32>,
        groups: &ExpertGroups,
        out: &mut [f32],
        work: &mut Buffers,
    ) -> Result<()> {
        let (t, h) = x.dim();
        match &self.shared_expert {
            Some(shared) => shared.forward_slice(x, out, work)?,
            None => out.fill(0.0),
        }
        let Some(xs) = x.as_slice() else {
            unreachable!("callers pass standard-layout inputs")
        };
        let input_scaled = self.weight_placement == WeightPlacement::ExpertInput;
        let Buffers {
            gathered, experts, ..
        } = work;
        gathered.clear();
        gathered.reserve(groups.max_len() * h);
        let held = self.expert_range();
        let mut active = 0;
        for e in groups.active_experts().filter(|e| held.contains(e)) {
            active += 1;
            let (tokens, weights) = (groups.tokens(e), groups.weights(e));
            gathered.clear();
            for (&tok, &w) in tokens.iter().zip(weights) {
                let row = &xs[tok as usize * h..(tok as usize + 1) * h];
                if input_scaled {
                    gathered.extend(row.iter().map(|&v| v * w));
                } else {
                    gathered.extend_from_slice(row);
                }
            }
            let y = self
                .experts
                .run(e - held.start, gathered, tokens.len(), experts)?;
            for ((&tok, &w), yr) in tokens.iter().zip(weights).zip(y.chunks_exact(h)) {
                let orow = &mut out[tok as usize * h..(tok as usize + 1) * h];
                let scale = if input_scaled { 1.0 } else { w };
                orow.iter_mut().zip(yr).for_each(|(o, &v)| *o += scale * v);
            }
        }
        let bytes = self.router.weight_bytes()
            + self.shared_expert.as_ref().map_or(0, Mlp::weight_bytes)
            + active * self.experts.expert_bytes();
        self.stats.record(groups, t, bytes);
        Ok(())
    }

    /// The reference formula, as transformers computes it: EVERY expert over EVERY token with
    /// the dense `[T, E]` weights (0 for unselected experts), summed, plus the shared expert;
    /// scalar kernels with f64 accumulation (of a [`Moe::partial`] layer, the experts it holds).
    /// Reads every weight: for tests only. Statistics are not updated.
    ///
    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    pub fn forward_dense_reference(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        self.check_input(x)?;
        let routing = self.router.route(x)?;
        self.forward_routed_dense_reference(x, &routing)
    }

    /// [`Moe::forward_dense_reference`] with a given routing.
    ///
    /// # Shapes
    /// `x: [T, H]`, `routing` of `T` tokens over `E` experts → `[T, H]`.
    pub fn forward_routed_dense_reference(
        &self,
        x: ArrayView2<f32>,
        routing: &Routing,
    ) -> Result<Array2<f32>> {
        let (t, h) = self.check_input(x)?;
        self.check_routing(routing, t)?;
        let i = self.experts.intermediate_size();
        let dense = routing.dense_weights();
        let mut out = match &self.shared_expert {
            Some(s) => {
                let xo = x.to_owned();
                let act = scalar_swiglu(
                    &scalar_linear(&xo, s.gate_proj()),
                    &scalar_linear(&xo, s.up_proj()),
                );
                scalar_linear(&act, s.down_proj())
            }
            None => Array2::zeros((t, h)),
        };
        for e in self.expert_range() {
            let w = dense.column(e);
            let mut xin = x.to_owned();
            if self.weight_placement == WeightPlacement::ExpertInput {
                for (mut row, &wt) in xin.rows_mut().into_iter().zip(w.iter()) {
                    row.mapv_inplace(|v| v * wt);
                }
            }
            let local = e - self.first_expert;
            let gate_up = scalar_linear(&xin, &self.experts.gate_up_proj().get(local));
            let (gate, up) = match self.experts.up_proj() {
                Some(u) => (gate_up, scalar_linear(&xin, &u.get(local))),
                None => (
                    gate_up.slice(ndarray::s![.., ..i]).to_owned(),
                    gate_up.slice(ndarray::s![.., i..]).to_owned(),
                ),
            };
            let mut y = scalar_linear(&scalar_swiglu(&gate, &up), &self.experts.down_proj().get(local));
            if self.weight_placement == WeightPlacement::ExpertOutput {
                for (mut row, &wt) in y.rows_mut().into_iter().zip(w.iter()) {
                    row.mapv_inplace(|v| v * wt);
                }
            }
            out += &y;
        }
        Ok(out)
    }

    fn check_input(&self, x: ArrayView2<f32>) -> Result<(usize, usize)> {
        let (t, h) = x.dim();
        if h != self.experts.hidden_size() {
            return Err(Error::Mismatch {
                what: "input width (H)",
                expected: self.experts.hidden_size(),
                got: h,
            });
        }
        Ok((t, h))
    }

    fn check_routing(&self, routing: &Routing, tokens: usize) -> Result<()> {
        if routing.num_tokens() != tokens {
            return Err(Error::Mismatch {
                what: "routed tokens",
                expected: tokens,
                got: routing.num_tokens(),
            });
        }
        if routing.num_experts() != self.num_experts() {
            return Err(Error::Mismatch {
                what: "routing expert count",
                expected: self.num_experts(),
                got: routing.num_experts(),
            });
        }
        Ok(())
    }
}

impl FeedForward for Moe {
    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        Ok(self.forward_with_routing(x)?.output)
    }

    /// Routes with [`Router::route_into`] and regroups in place; the routing of the call is
    /// not returned (use [`Moe::forward_with_routing`] for it).
    ///
    /// # Shapes
    /// `x: [T, H]`, `out: [T, H]`.
    fn forward_into(&self, x: ArrayView2<f32>, out: ArrayViewMut2<f32>, scratch: &mut Scratch) -> Result<()> {
        let (t, h) = self.check_input(x)?;
        check_output(out.dim(), t, h)?;
        let Scratch {
            input,
            logits,
            routing,
            groups,
            output,
            work,
            ..
        } = scratch;
        let x = standard(x, input)?;
        self.router.route_into(x, routing, logits)?;
        self.check_routing(routing, t)?;
        groups.regroup(routing);
        with_standard_output(out, output, |out| self.run_groups(x, groups, out, work))
    }
}

/// `router` chooses among experts that include `first .. first + experts.num_experts()`, over
/// the same hidden size.
fn check_router(router: &dyn Router, experts: &Experts, first: usize) -> Result<()> {
    let held_end = first.checked_add(experts.num_experts());
    if held_end.is_none_or(|end| end > router.num_experts()) {
        return Err(Error::Mismatch {
            what: "router expert count (held experts past the router's)",
            expected: held_end.unwrap_or(usize::MAX),
            got: router.num_experts(),
        });
    }
    if router.hidden_size() != experts.hidden_size() {
        return Err(Error::Mismatch {
            what: "router hidden size",
            expected: experts.hidden_size(),
            got: router.hidden_size(),
        });
    }
    Ok(())
}

/// `x · W` through the scalar twin (f64 accumulation).
fn scalar_linear(x: &Array2<f32>, w: &Weight) -> Array2<f32> {
    let t = x.nrows();
    let x = x.as_standard_layout();
    let mut y = Array2::zeros((t, w.out_features()));
    let ys = y.as_slice_mut().expect("fresh array");
    kernels::scalar::linear(x.as_slice().expect("standard layout"), t, w, ys);
    y
}

/// `silu(gate) · up` elementwise with the scalar SiLU.
fn scalar_swiglu(gate: &Array2<f32>, up: &Array2<f32>) -> Array2<f32> {
    gate.mapv(kernels::scalar::silu) * up
}
