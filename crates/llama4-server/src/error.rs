//! Errors of the server crate (starting it; what a request did wrong is an [`crate::api::ApiError`]).

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading the model, tokenizer or chat template failed.
    #[error(transparent)]
    Model(#[from] llama4_model::Error),
    /// Loading with the experts shared among a group failed, or another rank did.
    #[error(transparent)]
    ExpertParallel(#[from] expert_parallel::Error),
    /// Binding or serving the socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A setting is invalid (a command-line flag, a missing file).
    #[error("{0}")]
    Config(String),
    /// The engine or the HTTP runtime could not start.
    #[error("cannot start: {0}")]
    Start(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
