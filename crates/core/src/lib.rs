#![deny(missing_docs)]
//! Shared foundation of the Llama 4 crates: weights in their stored dtype (owned or borrowed from
//! a memory map), checkpoint reading in Hugging Face layout, CPU kernels, and the error type.

pub mod alloc_count;
mod buffer;
mod checkpoint;
mod dtype;
mod error;
mod finite;
pub mod ggml;
pub mod gguf;
pub mod input;
pub mod kernels;
mod kv;
mod layer_kind;
mod linear;
pub mod pool;
pub mod progress;
pub mod quant;
pub mod safetensors;
pub mod scratch;
mod weight;

pub use buffer::Buffer;
pub use checkpoint::{Checkpoint, Scope};
pub use dtype::DType;
pub use error::{Error, Result};
pub use kv::{quantize_q8, KvData, KvDtype, KvPageTable, KvStore, KvView};
pub use layer_kind::{AttentionMask, LayerKind, Segments};
pub use linear::Linear;
pub use progress::{LoadProgress, SharedProgress};
pub use quant::{
    QuantData, QuantFormat, QuantPolicy, QuantScope, QuantSpec, QuantTarget, ScaleType, Scales, TensorRole,
};
pub use weight::{BatchedWeight, Layout, Weight, WeightData};

pub use half::{bf16, f16};
