//! Errors of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading weights, or a kernel call, failed.
    #[error(transparent)]
    Core(#[from] llama4_core::Error),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or does not have the fields' types.
    #[error("{path}: malformed config: {reason}")]
    ConfigJson {
        /// The file.
        path: PathBuf,
        /// What serde reported.
        reason: String,
    },
    /// A config value is missing, out of range, or inconsistent with another.
    #[error("invalid config: `{field}`: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// The feed-forward (router, experts, MLP) rejected its input.
    #[error(transparent)]
    Moe(#[from] moe_router::Error),
    /// The key/value cache rejected an operation.
    #[error(transparent)]
    Cache(#[from] kv_cache::KvError),
    /// The prompt (plus the tokens to generate) does not fit the context.
    #[error("{tokens} tokens exceed the context limit of {limit}")]
    ContextOverflow {
        /// Tokens requested.
        tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} entries")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A call that needs tokens got none.
    #[error("{0} needs at least one token")]
    Empty(&'static str),
    /// `tokenizer.json` could not be read, or text could not be encoded or decoded.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Sampling parameters out of range.
    #[error("invalid sampling setting: {0}")]
    Sampling(String),
    /// The vision side (config, weights, image processing) failed.
    #[error(transparent)]
    Vision(#[from] vision_encoder::Error),
    /// An image file's bytes could not be decoded.
    #[error("{path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: vision_encoder::Error,
    },
    /// The prompt's `<|image|>` placeholders and the images given differ in number.
    #[error("the prompt has {placeholders} <|image|> placeholder(s) but {images} image(s) were given")]
    ImageCount {
        /// `<|image|>` tokens in the prompt.
        placeholders: usize,
        /// Images given.
        images: usize,
    },
    /// The expanded prompt's `<|patch|>` tokens and the projected image tokens differ in number.
    #[error(
        "the prompt has {patch_tokens} <|patch|> token(s) but the images give {features} image token(s)"
    )]
    ImageFeatureCount {
        /// `<|patch|>` tokens in the expanded prompt.
        patch_tokens: usize,
        /// Rows of projected image features.
        features: usize,
    },
    /// A quantised checkpoint cannot be written from this source to this destination.
    #[error("{path}: cannot write a quantised checkpoint: {reason}")]
    QuantizeCheckpoint {
        /// The source or destination concerned.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A special token of the image layout is not in the tokenizer.
    #[error("the tokenizer has no `{token}` token (needed to lay out images in the prompt)")]
    MissingImageToken {
        /// The token's text.
        token: &'static str,
    },
    /// A chat template does not compile, or rendering it failed.
    #[error("chat template: {reason}")]
    ChatTemplate {
        /// What went wrong.
        reason: String,
    },
    /// The chat template rejected the conversation (its `raise_exception`).
    #[error("the chat template rejected the conversation: {0}")]
    ChatRejected(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
