#![deny(missing_docs)]
//! Llama 4 models: `config.json` parsing and validation, checkpoint loading, the decoder,
//! generation and the tokenizer.

pub mod config;
mod error;

pub use config::{LayerSpec, ModelConfig, RopeConfig, RopeScaling, TextConfig};
pub use error::{Error, Result};
