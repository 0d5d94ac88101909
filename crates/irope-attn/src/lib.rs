#![deny(missing_docs)]
//! Llama 4 text attention ("iRoPE"): RoPE layers (llama3-scaled frequencies, interleaved
//! pairs, optional QK norm, chunked attention) interleaved with NoPE layers (no positions,
//! optional temperature tuning, causal attention over the whole context), both with
//! grouped-query heads.
//!
//! - [`SelfAttention`]: the seam a decoder layer holds its attention through (project, attend
//!   over a cache's keys and values, project out); [`Attention`] is Llama 4's.
//! - [`Rope`]: frequencies as transformers computes them, angles for the positions at hand;
//!   [`temperature`]: the NoPE layers' query scaling.
//! - [`LayerKind`]: which keys a query sees (the chunk rule), from `llama4-core`.
//! - [`attention`]: the tiled online-softmax kernel over key/value views (f32, bf16 or f16)
//!   that a cache hands out, from `llama4-core`'s kernels; [`attention_naive`] is its plain
//!   twin.
//!
//! One layer alone, without a cache (the decoder runs the same steps over its cache):
//!
//! ```
//! use irope_attn::{AttnConfig, Attention, PosEncoding, RopeConfig, RopeScaling, SelfAttention};
//! use llama4_core::{DType, Linear, Weight};
//! use ndarray::Array2;
//!
//! # fn main() -> llama4_core::Result<()> {
//! let cfg = AttnConfig {
//!     hidden_size: 16,
//!     num_attention_heads: 4,
//!     num_key_value_heads: 2,
//!     head_dim: 4,
//!     rms_norm_eps: 1e-5,
//!     use_qk_norm: true,
//!     attention_chunk_size: Some(8),
//!     attn_temperature_tuning: true,
//!     floor_scale: 8192.0,
//!     attn_scale: 0.1,
//!     attention_bias: false,
//!     rope: RopeConfig { theta: 500_000.0, scaling: RopeScaling::Default },
//! };
//! let linear = |out: usize, inp: usize| {
//!     let w = Array2::from_shape_fn((out, inp), |(i, j)| ((i * 7 + j * 3) % 11) as f32 / 11.0 - 0.5);
//!     Linear::new(Weight::from_out_in(w.view(), DType::BF16), None)
//! };
//! let attn = Attention::new(linear(16, 16)?, linear(8, 16)?, linear(8, 16)?, linear(16, 16)?, &cfg, PosEncoding::Rope)?;
//! assert_eq!(attn.cache_kind().chunk(), Some(8));
//!
//! let x = Array2::from_elem((20, 16), 0.25f32); // 20 tokens: the chunk restarts at 8 and 16
//! let y = attn.forward_uncached(x.view(), 0)?;
//! assert_eq!(y.dim(), (20, 16));
//! # Ok(()) }
//! ```

mod config;
mod layer;
mod rope;
mod seam;

pub use config::{AttnConfig, PosEncoding, RopeConfig, RopeScaling};
pub use layer::Attention;
pub use llama4_core::kernels::attention::{
    attention, attention_into, attention_naive, attention_with, attention_with_into, AttentionScratch,
    AttnContext,
};
pub use llama4_core::{AttentionMask, LayerKind};
pub use rope::{temperature, Rope};
pub use seam::{AttnShape, Projected, SelfAttention};
