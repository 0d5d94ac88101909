//! The crate's error type.

/// What can go wrong while planning, loading or running an expert-parallel model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] llama4_model::Error),
    /// A MoE layer's parts failed.
    #[error(transparent)]
    Moe(#[from] moe_router::Error),
    /// Reading weights failed.
    #[error(transparent)]
    Core(#[from] llama4_core::Error),
    /// The experts cannot be shared as asked (more processes than experts, no processes).
    #[error("cannot share {experts} experts among {ranks} processes: {reason}")]
    Plan {
        /// Experts per MoE layer.
        experts: usize,
        /// Processes.
        ranks: usize,
        /// Why not.
        reason: &'static str,
    },
    /// The message layer failed (MPI, or the in-process group).
    #[error("transport: {0}")]
    Transport(String),
    /// Another process did not load its share, loaded another model, or failed while running.
    #[error("{0}")]
    Group(String),
    /// A message that this protocol does not send arrived (processes of different builds).
    #[error("protocol: {0}")]
    Protocol(String),
    /// Reading `/proc/self/pagemap` failed.
    #[error("measuring resident pages: {0}")]
    Resident(#[from] std::io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
