//! This crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong reading images and configs, or running the vision tower.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading weights or a kernel call failed (shape errors included).
    #[error(transparent)]
    Core(#[from] llama4_core::Error),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse (or does not have the expected fields and types).
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A config parses but its values are inconsistent or unsupported.
    #[error("invalid config: {0}")]
    Config(String),
    /// A config value exceeds the bound this crate sets on it (a named constant of this crate):
    /// it would size work or memory before the weights or the image could confirm it.
    #[error("invalid config: `{field}` = {value} exceeds {limit_name} = {limit}")]
    ConfigLimit {
        /// The offending field (or product of fields).
        field: &'static str,
        /// Its value.
        value: u64,
        /// The bound.
        limit: u64,
        /// The bound's name.
        limit_name: &'static str,
    },
    /// A directory holds neither `processor_config.json` (with image-processor settings) nor
    /// `preprocessor_config.json`.
    #[error("{dir}: no processor_config.json or preprocessor_config.json with image-processor settings")]
    NoProcessorConfig {
        /// The directory.
        dir: PathBuf,
    },
    /// A GGUF file is not a Llama 4 vision projector this crate can run: another architecture
    /// or projector type, or a `clip.*` key missing or of the wrong type.
    #[error("{path}: not a Llama 4 multimodal projector: {reason}")]
    Mmproj {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// The bytes are not in a format this crate recognises (neither PNG nor JPEG signature).
    #[error("not a PNG or JPEG image (unrecognised signature)")]
    UnknownImageFormat,
    /// The bytes are an image format other than PNG and JPEG.
    #[error("unsupported image format {format} (PNG and JPEG are supported)")]
    UnsupportedImageFormat {
        /// The format detected.
        format: String,
    },
    /// The image has no pixels.
    #[error("empty image ({width}×{height})")]
    EmptyImage {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The image has more than [`MAX_PIXELS`](crate::MAX_PIXELS) pixels; detected from the header,
    /// before decoding.
    #[error("image of {width}×{height} exceeds the limit of {max_pixels} pixels")]
    ImageTooLarge {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The limit.
        max_pixels: u64,
    },
    /// The data ends before the image does.
    #[error("truncated image: {0}")]
    TruncatedImage(String),
    /// The data is malformed.
    #[error("corrupt image: {0}")]
    CorruptImage(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Core(llama4_core::Error::shape(op, detail))
    }
}

impl Error {
    /// An error of [`llama4_core::input`] as this crate reports it: a file that cannot be read
    /// is [`Error::Io`].
    pub(crate) fn input(e: llama4_core::Error) -> Self {
        match e {
            llama4_core::Error::Io { path, source } => Error::Io { path, source },
            e => Error::Core(e),
        }
    }
}
