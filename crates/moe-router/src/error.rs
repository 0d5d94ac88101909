//! The crate's error type.

/// What can go wrong while building or running a router, an expert bank or a MoE layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading weights or running a kernel failed.
    #[error(transparent)]
    Core(#[from] llama4_core::Error),
    /// `top_k` is 0 or larger than the number of experts.
    #[error("top-k {top_k} must be between 1 and the number of experts ({num_experts})")]
    TopK {
        /// The requested k.
        top_k: usize,
        /// Experts available.
        num_experts: usize,
    },
    /// Two parts (or an input and a part) disagree on a size.
    #[error("{what}: expected {expected}, got {got}")]
    Mismatch {
        /// Which size.
        what: &'static str,
        /// The size required.
        expected: usize,
        /// The size found.
        got: usize,
    },
    /// A routing names an expert that does not exist.
    #[error("token {token} routed to expert {expert}, but there are {num_experts} experts")]
    ExpertOutOfRange {
        /// The token.
        token: usize,
        /// The expert id given.
        expert: usize,
        /// Experts available.
        num_experts: usize,
    },
    /// An expert index past the end of the expert bank.
    #[error("expert {expert} requested, but there are {num_experts} experts")]
    NoSuchExpert {
        /// The index given.
        expert: usize,
        /// Experts available.
        num_experts: usize,
    },
    /// A routing selects the same expert twice for one token.
    #[error("token {token} routed to expert {expert} more than once")]
    DuplicateExpert {
        /// The token.
        token: usize,
        /// The repeated expert id.
        expert: usize,
    },
    /// A router or feed-forward written outside this crate failed; `source` is its own error.
    #[error("{component}: {source}")]
    Component {
        /// What failed (the component's name).
        component: &'static str,
        /// Its error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// An [`Error::Component`]: how a custom router or feed-forward reports its own error.
    pub fn component(
        component: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Component {
            component,
            source: source.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
