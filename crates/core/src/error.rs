//! The error type shared by the workspace's loading and kernel code.

use std::path::PathBuf;

use crate::DType;

/// Everything that can go wrong while reading checkpoints or calling kernels.
///
/// Variants are structured so that callers (and tests) can tell the cases apart; every variant
/// that concerns a file names it, and every variant that concerns a tensor names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or mapping a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A path given as an input file is a directory, FIFO, socket, device or a symbolic link
    /// that cannot be followed: refused before it is opened (a FIFO would block, a device
    /// would be read without end).
    #[error("{path}: is {what}, not a regular file")]
    NotRegularFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        what: String,
    },
    /// An input file is longer than the cap for its kind (see [`crate::input`]).
    #[error("{path}: {bytes} bytes exceed the limit of {limit} bytes ({limit_name})")]
    InputTooLarge {
        /// The file.
        path: PathBuf,
        /// Its length (or the bytes read before giving up).
        bytes: u64,
        /// The cap.
        limit: u64,
        /// The cap's name.
        limit_name: &'static str,
    },
    /// A tensor holds NaN or an infinity ([`crate::Checkpoint::check_finite`]).
    #[error(
        "tensor `{name}` in {path} holds {value} at element {index}: the checkpoint's weights are \
         broken (NaN/Inf); re-download or re-convert it"
    )]
    NonFiniteWeight {
        /// The full tensor name.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// Flat index of the first non-finite element.
        index: usize,
        /// That element (NaN, inf or -inf), widened to f64.
        value: f64,
    },
    /// The file is shorter than the 8-byte header length, or than the header it announces.
    #[error("{path}: truncated safetensors file ({file_len} bytes, need at least {needed})")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        file_len: u64,
        /// The bytes the header says must be there.
        needed: u64,
    },
    /// The header length is absurd (over the limit), or `8 + len` overflows.
    #[error("{path}: safetensors header length {header_len} is invalid")]
    HeaderLength {
        /// The file.
        path: PathBuf,
        /// The announced header length.
        header_len: u64,
    },
    /// The header is not the JSON object the format describes.
    #[error("{path}: malformed safetensors header: {reason}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's dtype is not one this library reads.
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The dtype string from the header.
        dtype: String,
    },
    /// Size arithmetic on a tensor's shape or offsets overflowed.
    #[error("{path}: tensor `{name}`: size arithmetic overflows")]
    Overflow {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor's byte range lies (partly) outside the data section.
    #[error("{path}: tensor `{name}` spans bytes {start}..{end} of a {data_len}-byte data section")]
    OutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Start offset from the header.
        start: u64,
        /// End offset from the header.
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },
    /// A tensor's byte range does not match its dtype and shape.
    #[error("{path}: tensor `{name}` has {got} bytes, its dtype and shape {shape:?} need {expected}")]
    ByteLength {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes implied by dtype and shape.
        expected: u64,
        /// Bytes given by the offsets.
        got: u64,
    },
    /// Two tensors share bytes.
    #[error("{path}: tensors `{first}` and `{second}` overlap")]
    Overlap {
        /// The file.
        path: PathBuf,
        /// One tensor.
        first: String,
        /// The other.
        second: String,
    },
    /// A directory holds neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoCheckpoint {
        /// The directory.
        dir: PathBuf,
    },
    /// `model.safetensors.index.json` is not what the format describes.
    #[error("{path}: malformed index: {reason}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A shard named by the index does not exist.
    #[error("{index}: shard {shard} does not exist")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard.
        shard: PathBuf,
    },
    /// A tensor is not in the checkpoint (or not in the shard the index names).
    #[error("tensor `{name}` not found in {path}")]
    MissingTensor {
        /// The full tensor name.
        name: String,
        /// The checkpoint directory or file searched.
        path: PathBuf,
    },
    /// A tensor exists but its shape is not the one the caller needs.
    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {got:?}")]
    ShapeMismatch {
        /// The full tensor name.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// The shape the caller needs.
        expected: Vec<usize>,
        /// The shape stored.
        got: Vec<usize>,
    },
    /// A tensor exists but its dtype is not one the caller accepts.
    #[error("tensor `{name}` in {path}: dtype {got} not accepted here")]
    DtypeMismatch {
        /// The full tensor name.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// The dtype stored.
        got: DType,
    },
    /// A weight cannot be quantised, or quantised data is inconsistent.
    #[error("quantisation: {0}")]
    Quant(String),
    /// A stored quantised tensor (`N.qweight` + `N.qscale`) disagrees with its file's
    /// quantisation metadata, or the metadata is missing or malformed.
    #[error("quantised tensor `{name}` in {path}: {reason}")]
    QuantTensor {
        /// The full tensor name (`N`, without the suffixes).
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF header is not what the format describes.
    #[error("{path}: malformed GGUF header at byte {offset}: {reason}")]
    GgufHeader {
        /// The file.
        path: PathBuf,
        /// Where the offending field starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A GGUF header announces more bytes than the file holds.
    #[error("{path}: truncated GGUF file ({file_len} bytes; {needed} more needed at byte {offset})")]
    GgufTruncated {
        /// The file.
        path: PathBuf,
        /// Where the missing bytes start.
        offset: u64,
        /// The bytes the header says must be there.
        needed: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A count or length in a GGUF header is over this reader's limit.
    #[error("{path}: GGUF {what} {value} is over the limit {limit}")]
    GgufLimit {
        /// The file.
        path: PathBuf,
        /// What was counted.
        what: &'static str,
        /// The announced value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// Arguments of a kernel or layer call have inconsistent shapes.
    #[error("{op}: {detail}")]
    Shape {
        /// The operation called.
        op: &'static str,
        /// What does not fit.
        detail: String,
    },
    /// A component written outside this workspace (a custom attention, router or feed-forward)
    /// failed; `source` is its own error.
    #[error("{component}: {source}")]
    Component {
        /// What failed (the component's name).
        component: &'static str,
        /// Its error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Component`]: how a custom component reports its own error type.
    pub fn component(
        component: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Component {
            component,
            source: source.into(),
        }
    }

    /// A [`Error::Shape`] for operation `op`.
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape {
            op,
            detail: detail.into(),
        }
    }
}
