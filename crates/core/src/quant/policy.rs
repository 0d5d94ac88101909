//! Load-time quantisation policies: which tensors are quantised, decided the same way when a
//! checkpoint is loaded and when a quantised checkpoint is written. What a tensor is (an expert
//! bank, a projection, anything else) is the model crate's knowledge, given as a function of
//! the tensor's name: this crate knows formats, never a model's names.

use super::QuantSpec;

/// What a tensor is, as far as quantisation goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorRole {
    /// A fused expert bank, 3-D `[E, in, out]`: quantised in either scope.
    Experts,
    /// A 2-D `[out, in]` linear weight that may be quantised with [`QuantScope::AllLinear`].
    Projection,
    /// Never quantised (embeddings, norms, routers, vision towers, ...).
    Other,
}

/// Which weights a [`QuantPolicy`] quantises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantScope {
    /// The routed experts only ([`TensorRole::Experts`]): most of a MoE model's bytes, and each
    /// expert sees few tokens.
    Experts,
    /// The experts and every projection ([`TensorRole::Projection`]).
    AllLinear,
}

impl QuantScope {
    /// The name used in messages: `experts` or `all-linear`.
    pub fn name(self) -> &'static str {
        match self {
            QuantScope::Experts => "experts",
            QuantScope::AllLinear => "all-linear",
        }
    }
}

/// What kind of tensor a [`QuantPolicy`] selected, which fixes its stored orientation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantTarget {
    /// An `nn.Linear` weight, 2-D `[out, in]`.
    Linear,
    /// A fused expert tensor, 3-D `[E, in, out]` ([`Layout::InOut`](crate::Layout) per expert).
    Experts,
}

impl QuantTarget {
    /// The number of dimensions such a tensor has in a checkpoint.
    pub fn ndim(self) -> usize {
        match self {
            QuantTarget::Linear => 2,
            QuantTarget::Experts => 3,
        }
    }
}

/// Load-time quantisation: which weights ([`QuantScope`], with the model's [`TensorRole`]s)
/// are quantised with which [`QuantSpec`]. Set on a [`Checkpoint`](crate::Checkpoint) so that
/// layer code does not change.
#[derive(Clone, Copy, Debug)]
pub struct QuantPolicy {
    /// How selected weights are quantised.
    pub spec: QuantSpec,
    /// Which weights are selected.
    pub scope: QuantScope,
    /// What each tensor is, from its full checkpoint name (the model crate's knowledge).
    role: fn(&str) -> TensorRole,
}

impl QuantPolicy {
    /// Quantise `scope` with `spec`, tensors' roles told by `role`.
    pub fn new(spec: QuantSpec, scope: QuantScope, role: fn(&str) -> TensorRole) -> Self {
        QuantPolicy { spec, scope, role }
    }

    /// Whether the tensor of this full checkpoint name is quantised, and as what.
    ///
    /// Decided from the name alone, the same way at load time and when a quantised checkpoint
    /// is written, so both quantise the same tensors in the same orientation.
    pub fn selects(&self, name: &str) -> Option<QuantTarget> {
        match ((self.role)(name), self.scope) {
            (TensorRole::Experts, _) => Some(QuantTarget::Experts),
            (TensorRole::Projection, QuantScope::AllLinear) => Some(QuantTarget::Linear),
            _ => None,
        }
    }
}

impl PartialEq for QuantPolicy {
    /// Same spec and scope. The role functions are not compared: comparing function pointers
    /// is unreliable, and a process uses one model crate's.
    fn eq(&self, other: &Self) -> bool {
        (self.spec, self.scope) == (other.spec, other.scope)
    }
}
