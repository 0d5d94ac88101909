#![deny(missing_docs)]
//! Llama 4 models: `config.json` parsing and validation, checkpoint loading, the decoder,
//! generation, the tokenizer and chat templates, and batched passes over several sequences.
//!
//! A [`TextModel`] holds the weights (memory-mapped, in their stored dtype); a [`Session`] holds
//! one sequence's cache and buffers, and either borrows the model or shares it through an
//! `Arc`. Every path (one sequence, several at once with [`forward_batch`], or no cache at all
//! with [`TextModel::forward_uncached`]) runs the same decoder body, [`DecoderLayer::forward`].
//! Each layer's parts can be swapped: the attention ([`AttentionLayer::Custom`], any
//! [`irope_attn::SelfAttention`]), the feed-forward ([`FeedForwardLayer::Custom`], any
//! [`moe_router::FeedForward`]) or an MoE layer's router ([`TextModel::replace_routers`]).
//!
//! The embedded demo model sorts digits. Load it, stream a greedy answer, run two sessions on
//! one shared model from two threads, then swap its routers:
//!
//! ```
//! use std::ops::ControlFlow;
//! use std::sync::Arc;
//!
//! use llama4_model::moe_router::SoftmaxTopKRouter;
//! use llama4_model::{stop_ids, DType, GenerateOptions, Session, StreamDecoder, TextModel, Tokenizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo");
//! let model = Arc::new(TextModel::load(dir)?);
//! let tok = Tokenizer::from_dir(dir)?.ok_or("no tokenizer.json")?;
//! let stops = stop_ids(dir, model.config())?;
//! let options = GenerateOptions { max_new_tokens: 16, stop_ids: stops.clone(), ..Default::default() };
//!
//! // A greedy answer, streamed as it is generated.
//! let mut session = Session::new(&*model, DType::BF16)?;
//! let mut stream = StreamDecoder::with_stop_ids(&stops);
//! let mut answer = String::new();
//! session.generate(&tok.encode("<|begin_of_text|>sort 3 1 4 1 5 9 2 6 5 3 =")?, &options, |id| {
//!     answer += &stream.push(&tok, id).unwrap_or_default();
//!     ControlFlow::Continue(())
//! })?;
//! assert_eq!(answer, " 1 1 2 3 3 4 5 5 6 9");
//!
//! // Two sessions sharing the model, each on its own thread.
//! let threads: Vec<_> = ["sort 9 8 7 6 5 4 3 2 1 0 =", "sort 5 0 7 7 2 1 9 3 3 8 ="]
//!     .into_iter()
//!     .map(|prompt| {
//!         let (mut session, tok) = (Session::new(Arc::clone(&model), DType::BF16)?, tok.encode(&format!("<|begin_of_text|>{prompt}"))?);
//!         let options = options.clone();
//!         Ok(std::thread::spawn(move || session.generate(&tok, &options, |_| ControlFlow::Continue(()))))
//!     })
//!     .collect::<llama4_model::Result<_>>()?;
//! for t in threads {
//!     let generation = t.join().expect("no panic")?;
//!     assert!(generation.stopped);
//! }
//!
//! // Research: every MoE layer's router replaced by a softmax top-2 router over its weights.
//! let mut model = Arc::into_inner(model).ok_or("the threads are done")?;
//! let cfg = model.config().clone();
//! let ckpt = llama4_model::llama4_core::Checkpoint::open(dir)?;
//! model.replace_routers(|layer, _moe| {
//!     let scope = ckpt.scope(&format!("model.layers.{layer}.feed_forward.router"));
//!     Ok(Box::new(SoftmaxTopKRouter::load(&scope, cfg.hidden_size(), cfg.num_local_experts, 2, true)?))
//! })?;
//! let mut session = Session::new(&model, DType::BF16)?;
//! let generation = session.generate(&tok.encode("<|begin_of_text|>sort 3 1 4 1 5 9 2 6 5 3 =")?, &options, |_| ControlFlow::Continue(()))?;
//! assert!(!generation.generated_ids.is_empty());
//! # Ok(()) }
//! ```

mod batch;
pub mod chat;
mod checks;
pub mod config;
mod error;
mod generate;
mod gguf_model;
pub mod gguf_names;
mod gguf_tokenizer;
pub mod heldout;
mod layer;
mod model;
mod multimodal;
#[cfg(feature = "progress-bar")]
mod progress_bar;
mod quant;
mod session;
mod tokenizer;

pub use batch::{forward_batch, BatchEntry};
pub use chat::{ChatOptions, ChatTemplate, TemplateSource, LLAMA4_CHAT_TEMPLATE};
pub use checks::{
    check_chat_tokens, check_logits_finite, check_room, check_text_only_prompt, encode_chat, CHAT_TOKENS,
};
pub use config::{stop_ids, LayerSpec, ModelConfig, QuantizationConfig, RopeConfig, RopeScaling, TextConfig};
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation, Sampler, SamplingConfig, MIN_TEMPERATURE};
pub use gguf_model::{gguf_text_config, is_gguf_path, GgufModel};
pub use gguf_tokenizer::{GgufTokenizer, LLAMA4_PATTERN};
pub use layer::{AttentionLayer, DecoderLayer, FeedForwardLayer, Seq, Workspace};
pub use llama4_core::{DType, KvDtype, LayerKind, LoadProgress, SharedProgress};
pub use model::{LoadOptions, MoeBuilder, TextModel};
pub use multimodal::{
    expand_image_placeholders, scatter_image_features, EncodedImage, ImageTokenIds, MultimodalModel,
    PreparedPrompt,
};
#[cfg(feature = "progress-bar")]
pub use progress_bar::TerminalProgress;
pub use quant::{
    quant_policy, quantize_checkpoint, quantize_checkpoint_with_progress, tensor_role, QuantizeSummary,
    SCOPE_METADATA_KEY,
};
pub use session::{Logits, Session};
pub use tokenizer::{chat_prompt, StreamDecoder, Tokenizer};
/// The component crates, re-exported so a caller needs only this crate to swap a part.
pub use {irope_attn, kv_cache, llama4_core, moe_router, vision_encoder};
