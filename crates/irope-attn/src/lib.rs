#![deny(missing_docs)]
//! Llama 4 text attention ("iRoPE"): RoPE layers (llama3-scaled frequencies, interleaved
//! pairs, optional QK norm, chunked mask) interleaved with NoPE layers (no positions, optional
//! temperature tuning, causal mask over the whole context), both with grouped-query heads.
//!
//! - [`Rope`]: frequencies as transformers computes them, angles for the positions at hand.
//! - [`MaskKind`]: the chunk mask as a pure function of two absolute positions.
//! - [`attention`]: a tiled online-softmax kernel over key/value views ([`llama4_core::KvView`],
//!   f32, bf16 or f16) that a cache hands out; [`attention_naive`] is its plain twin.
//! - [`Attention`]: the layer, loaded from `model.layers.{i}.self_attn`.
//!
//! ```
//! use irope_attn::MaskKind;
//! let m = MaskKind::Chunked(8192);
//! assert!(m.allowed(8191, 0));
//! assert!(!m.allowed(8192, 8191)); // a new chunk starts: not a sliding window
//! ```

mod config;
mod kernel;
mod layer;
mod mask;
mod rope;

pub use config::{AttnConfig, LayerKind, RopeConfig, RopeScaling};
pub use kernel::{
    attention, attention_into, attention_naive, attention_with, attention_with_into, isa, supported_isas,
    AttentionScratch, AttnContext, Isa,
};
pub use layer::{Attention, Projected};
pub use mask::MaskKind;
pub use rope::{temperature, Rope};
