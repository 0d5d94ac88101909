//! Errors of the cache.

/// Everything a cache call can reject. Each variant carries the numbers needed to see why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// A [`crate::CacheSpec`] or [`crate::LayerKind`] is unusable (a zero size).
    #[error("invalid cache spec: {0}")]
    InvalidSpec(String),
    /// A layer index past the end of the model cache.
    #[error("layer {layer} does not exist: the cache has {layers} layers")]
    NoSuchLayer {
        /// The index asked for.
        layer: usize,
        /// Number of layers in the cache.
        layers: usize,
    },
    /// Keys or values handed to `append` do not have the shape `[T, Hkv, D]` the cache holds.
    #[error("append {what}: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// `"keys"` or `"values"`.
        what: &'static str,
        /// The shape the cache needs (`T` taken from the keys).
        expected: [usize; 3],
        /// The shape given.
        got: [usize; 3],
    },
    /// An append to a chunked layer spans a chunk boundary. Split it with
    /// [`crate::LayerKind::segments`] and attend after each piece: the queries of the earlier
    /// chunk need keys that the bounded cache drops when the next chunk starts.
    #[error(
        "append of {len} positions from position {start} crosses a chunk boundary (chunk size \
         {chunk}); split it with segments()"
    )]
    CrossesChunk {
        /// Absolute position of the first appended token.
        start: usize,
        /// Number of tokens appended.
        len: usize,
        /// The layer's chunk size.
        chunk: usize,
    },
    /// A page would take the caches of a [`crate::PagePool`] beyond its byte budget.
    #[error("the key/value cache budget of {budget} bytes is spent ({used} in use, {requested} more asked)")]
    Budget {
        /// Bytes asked for.
        requested: u64,
        /// Bytes the pool's caches held then.
        used: u64,
        /// The pool's budget.
        budget: u64,
    },
    /// `truncate` to more positions than the layer has seen.
    #[error("cannot truncate to {requested} positions: only {len} were appended")]
    TruncateBeyond {
        /// The length asked for.
        requested: usize,
        /// Positions appended so far.
        len: usize,
    },
    /// `truncate` into a chunk a chunked layer has already dropped: its keys are gone, so the
    /// caller must reset and prefill the prefix again.
    #[error(
        "cannot truncate to {requested} positions: this chunked layer (chunk size {chunk}) \
         dropped the keys before position {first_held}; reset and prefill again"
    )]
    Evicted {
        /// The length asked for.
        requested: usize,
        /// Absolute position of the oldest key still held.
        first_held: usize,
        /// The layer's chunk size.
        chunk: usize,
    },
    /// The system refused the memory for a layer's keys and values (the layer is unchanged).
    #[error("cannot allocate {bytes} bytes for a layer's keys and values")]
    Alloc {
        /// Bytes of the layer's keys and values at the capacity asked for.
        bytes: u64,
    },
    /// A size computation does not fit in `usize` / `u64`.
    #[error("cache size arithmetic overflows ({0})")]
    Overflow(&'static str),
}

/// `Result` with this crate's [`KvError`].
pub type Result<T> = std::result::Result<T, KvError>;

/// Lets callers that speak [`llama4_core::Error`] use `?` on cache calls.
impl From<KvError> for llama4_core::Error {
    fn from(e: KvError) -> Self {
        llama4_core::Error::shape("kv-cache", e.to_string())
    }
}
