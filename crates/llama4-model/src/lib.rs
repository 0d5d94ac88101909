#![deny(missing_docs)]
//! Llama 4 models: `config.json` parsing and validation, checkpoint loading, the decoder,
//! generation and the tokenizer.

mod batch;
pub mod chat;
mod checks;
pub mod config;
mod error;
mod generate;
mod layer;
mod model;
mod multimodal;
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
pub use layer::{AttentionLayer, DecoderLayer, FeedForwardLayer, Seq, Workspace};
pub use model::{MoeBuilder, TextModel};
pub use multimodal::{
    expand_image_placeholders, scatter_image_features, EncodedImage, ImageTokenIds, MultimodalModel,
    PreparedPrompt,
};
pub use quant::{quantize_checkpoint, QuantizeSummary, SCOPE_METADATA_KEY};
pub use session::{Logits, Session};
pub use tokenizer::{chat_prompt, StreamDecoder, Tokenizer};
