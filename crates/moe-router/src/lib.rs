#![deny(missing_docs)]
//! Llama 4's mixture-of-experts feed-forward, in parts a researcher can swap.
//!
//! - [`Router`]: tokens `[T, H]` → per-token expert ids and weights ([`Routing`]).
//!   [`Llama4Router`] is the reference rule (linear, top-k on RAW logits, `sigmoid` weights,
//!   no renormalisation); [`SoftmaxTopKRouter`] the usual alternative.
//! - Routing itself is pure functions over plain data ([`sigmoid_top_k`], [`softmax_top_k`],
//!   their in-place `_into` forms, [`top_k_into`], [`ExpertGroups`]), testable without weights.
//! - [`Experts`]: the fused checkpoint tensors `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`.
//! - [`Mlp`]: the dense SwiGLU MLP, used as the shared expert and as the dense feed-forward.
//! - [`Moe`]: groups tokens by expert, runs each selected expert once over its group, scatters
//!   the results back and adds the shared expert. Unselected experts' weights are never read.
//!   [`WeightPlacement`] says whether the routing weight scales the expert's input (Llama 4)
//!   or its output. [`RoutingStats`] counts tokens per expert and weight bytes read.
//! - [`FeedForward`]: the trait a decoder layer holds, implemented by [`Mlp`] and [`Moe`].
//!   [`FeedForward::forward_into`] writes into a caller's `[T, H]` output and keeps every
//!   intermediate in a reused [`Scratch`]: once the scratch has served as many tokens, a call
//!   allocates nothing (as do [`Router::route_into`] and [`ExpertGroups::regroup`] below it).
//!
//! ```
//! use llama4_core::{BatchedWeight, DType, Layout, Weight, WeightData};
//! use moe_router::{Experts, FeedForward, Llama4Router, Mlp, Moe, Scratch, WeightPlacement};
//! use ndarray::Array2;
//!
//! # fn main() -> moe_router::Result<()> {
//! let (h, i, e) = (8, 4, 4);
//! let fill = |n: usize| WeightData::from_f32(&(0..n).map(|j| ((j % 7) as f32 - 3.0) / 10.0).collect::<Vec<_>>(), DType::F32);
//! let router = Llama4Router::new(Weight::new(fill(e * h), Layout::OutIn, e, h)?, 1)?;
//! let experts = Experts::new(
//!     BatchedWeight::new(fill(e * h * 2 * i), Layout::InOut, e, 2 * i, h)?,
//!     BatchedWeight::new(fill(e * i * h), Layout::InOut, e, h, i)?,
//! )?;
//! let shared = Mlp::new(
//!     Weight::new(fill(i * h), Layout::OutIn, i, h)?,
//!     Weight::new(fill(i * h), Layout::OutIn, i, h)?,
//!     Weight::new(fill(h * i), Layout::OutIn, h, i)?,
//! )?;
//! let moe = Moe::new(Box::new(router), experts, Some(shared), WeightPlacement::ExpertInput)?;
//! let x = Array2::from_elem((3, h), 0.5f32);
//! let y = moe.forward(x.view())?;
//! assert_eq!(y.dim(), (3, h));
//! assert_eq!(moe.stats().tokens_per_expert().iter().sum::<u64>(), 3);
//!
//! // Decoding: one Scratch per sequence, reused by every call.
//! let mut scratch = Scratch::default();
//! let mut out = Array2::zeros((1, h));
//! let token = x.slice(ndarray::s![..1, ..]);
//! moe.forward_into(token, out.view_mut(), &mut scratch)?;
//! assert_eq!(out, moe.forward(token)?);
//! # Ok(())
//! # }
//! ```

mod error;
mod experts;
mod mlp;
mod moe;
mod router;
mod routing;
mod scratch;
mod stats;

pub use error::{Error, Result};
pub use experts::Experts;
pub use mlp::{FeedForward, Mlp};
pub use moe::{Moe, MoeConfig, MoeOutput, WeightPlacement};
pub use router::{Llama4Router, Router, SoftmaxTopKRouter};
pub use routing::{
    sigmoid, sigmoid_top_k, sigmoid_top_k_into, softmax_top_k, softmax_top_k_into, top_k, top_k_into,
    ExpertGroups, Routing,
};
pub use scratch::Scratch;
pub use stats::RoutingStats;
