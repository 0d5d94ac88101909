#![deny(missing_docs)]
//! Llama 4 models: `config.json` parsing and validation, checkpoint loading, the decoder,
//! generation and the tokenizer.

pub mod config;
mod error;
mod generate;
pub mod gguf_names;
mod gguf_tokenizer;
mod model;
mod multimodal;
mod quant;
mod session;
mod tokenizer;

pub use config::{stop_ids, LayerSpec, ModelConfig, QuantizationConfig, RopeConfig, RopeScaling, TextConfig};
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation, Sampler, SamplingConfig};
pub use gguf_tokenizer::{GgufTokenizer, LLAMA4_PATTERN};
pub use model::{DecoderLayer, FeedForwardLayer, TextModel, Workspace};
pub use multimodal::{
    expand_image_placeholders, scatter_image_features, EncodedImage, ImageTokenIds, MultimodalModel,
    PreparedPrompt,
};
pub use quant::{quantize_checkpoint, QuantizeSummary, SCOPE_METADATA_KEY};
pub use session::{Logits, Session};
pub use tokenizer::{chat_prompt, StreamDecoder, Tokenizer};
