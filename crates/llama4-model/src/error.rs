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
    /// A config value exceeds the bound this crate sets on it (the bound is a named constant
    /// of [`crate::config`]): the number would size work or memory before any weight could
    /// confirm it.
    #[error("invalid config: `{field}` = {value} exceeds {limit_name} = {limit}")]
    ConfigLimit {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: usize,
        /// The bound.
        limit: usize,
        /// The bound's name.
        limit_name: &'static str,
    },
    /// A size derived from config values overflows `usize`.
    #[error("invalid config: {what} overflows")]
    ConfigOverflow {
        /// The product that overflows, in terms of config fields.
        what: &'static str,
    },
    /// The feed-forward (router, experts, MLP) rejected its input.
    #[error(transparent)]
    Moe(#[from] moe_router::Error),
    /// The key/value cache rejected an operation.
    #[error(transparent)]
    Cache(#[from] kv_cache::KvError),
    /// A layer's cache keeps other keys than its attention needs: the attention was swapped
    /// after the cache was made (make a new one with [`crate::TextModel::new_cache`]).
    #[error("layer {layer}: the cache keeps {cache:?} but the attention needs {attention:?}")]
    CacheKind {
        /// The layer.
        layer: usize,
        /// What the cache keeps.
        cache: llama4_core::LayerKind,
        /// What the layer's attention needs.
        attention: llama4_core::LayerKind,
    },
    /// One entry of a batched pass was refused before anything ran ([`crate::forward_batch`]).
    #[error("batch entry {entry}: {source}")]
    BatchEntry {
        /// Its index in the batch.
        entry: usize,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// The prompt (plus the tokens to generate) does not fit the context.
    #[error("{tokens} tokens exceed the context limit of {limit}")]
    ContextOverflow {
        /// Tokens requested.
        tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// The prompt fits the context but the tokens asked for do not (`max_new_tokens` is the
    /// setting to lower).
    #[error(
        "{prompt} prompt tokens and max_new_tokens {max_new_tokens} exceed the context limit of \
         {limit}: max_new_tokens can be at most {most}"
    )]
    MaxNewTokens {
        /// Positions the prompt takes (with any already in the session).
        prompt: usize,
        /// The `max_new_tokens` asked for.
        max_new_tokens: usize,
        /// The context limit.
        limit: usize,
        /// The largest `max_new_tokens` that fits.
        most: usize,
    },
    /// The logits to sample from hold NaN or an infinity: the model's weights or quantisation
    /// scales hold NaN/Inf, or its activations overflowed.
    #[error(
        "the logit of token {id} is {value}: the model's weights or quantisation scales hold \
         NaN/Inf (Checkpoint::check_finite names the tensor)"
    )]
    NonFiniteLogits {
        /// The first token id whose logit is not finite.
        id: u32,
        /// Its logit.
        value: f32,
    },
    /// A chat prompt was asked for but the tokenizer lacks a special token of the chat format
    /// (or splits it into pieces).
    #[error("the tokenizer has no `{token}` special token, which the Llama 4 chat format needs")]
    MissingChatToken {
        /// The token's text.
        token: &'static str,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} entries")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The system refused memory asked for up front (the call changed nothing).
    #[error("cannot allocate {bytes} bytes for {what}")]
    OutOfMemory {
        /// What the memory was for.
        what: &'static str,
        /// How much was asked for.
        bytes: u64,
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
    /// A `heldout.json` is not a list of `{"prompt", "answer"}` strings.
    #[error("{path}: {reason}")]
    HeldOut {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The chat template rejected the conversation (its `raise_exception`).
    #[error("the chat template rejected the conversation: {0}")]
    ChatRejected(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of [`llama4_core::input`] as this crate reports it: a file that cannot be read
    /// is [`Error::Io`], as for every file this crate reads.
    pub(crate) fn input(e: llama4_core::Error) -> Self {
        match e {
            llama4_core::Error::Io { path, source } => Error::Io { path, source },
            e => Error::Core(e),
        }
    }
}
