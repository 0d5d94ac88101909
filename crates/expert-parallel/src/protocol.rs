//! What rank 0 sends the others, and in which order.
//!
//! Every message starts with a broadcast header of [`HEADER`] words from rank 0:
//! - `START` once, after loading: the model's [`fingerprint`]. Every rank answers with a
//!   reduction of `size` flags (its own slot 1 when it failed to load or holds another model),
//!   then rank 0 broadcasts the verdict (one word, 1 = go).
//! - `RUN layer rows top_k` per MoE layer call: a broadcast of the payload (the layer's input
//!   `[rows, H]`, the routing weights `[rows, k]` as f32 bits, the expert ids `[rows, k]`), then
//!   a reduction of `rows · H + 1` floats: each rank's contribution and, last, its failure flag.
//! - `STOP`: the workers return.

use llama4_model::TextConfig;

/// Words in a header.
pub(crate) const HEADER: usize = 12;
/// Header words after the opcode that carry the fingerprint.
pub(crate) const FINGERPRINT: usize = 8;

/// A header's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Stop = 0,
    Start = 1,
    Run = 2,
}

impl Op {
    pub(crate) fn from_word(w: u32) -> Option<Op> {
        [Op::Stop, Op::Start, Op::Run]
            .into_iter()
            .find(|op| *op as u32 == w)
    }
}

/// A `RUN` header.
pub(crate) fn run_header(layer: u32, rows: u32, top_k: u32) -> [u32; HEADER] {
    let mut h = [0; HEADER];
    h[..4].copy_from_slice(&[Op::Run as u32, layer, rows, top_k]);
    h
}

/// A `START` header carrying `fingerprint`.
pub(crate) fn start_header(fingerprint: [u32; FINGERPRINT]) -> [u32; HEADER] {
    let mut h = [0; HEADER];
    h[0] = Op::Start as u32;
    h[1..1 + FINGERPRINT].copy_from_slice(&fingerprint);
    h
}

/// A `STOP` header.
pub(crate) fn stop_header() -> [u32; HEADER] {
    [Op::Stop as u32; HEADER]
}

/// What every rank must agree on: the shapes the payloads and shares depend on, and the
/// group size. Two checkpoints of one shape but other weights are not told apart: the same
/// checkpoint on every host is the caller's part.
pub(crate) fn fingerprint(config: &TextConfig, ranks: usize) -> [u32; FINGERPRINT] {
    // Layer flags as bits (Scout and Maverick have 48 layers; more fold in by xor).
    let mut moe_bits = 0u32;
    for i in config.moe_layers() {
        moe_bits ^= 1 << (i % 32);
    }
    [
        config.hidden_size(),
        config.intermediate_size,
        config.num_local_experts,
        config.num_experts_per_tok,
        config.layers.len(),
        moe_bits as usize,
        config.vocab_size,
        ranks,
    ]
    .map(|v| v as u32)
}

/// Bytes one MoE layer call moves (see the module doc), as [`crate::CommStats`] counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exchange {
    /// What rank 0 broadcasts: the header, the rows `[T, H]` and their routing (`T · k` weights
    /// and `T · k` expert ids), 4 bytes each.
    pub broadcast: u64,
    /// What the reduction sums: every rank's `T · H` contribution and its failure flag (rank
    /// 0's own does not leave the host; the other `N − 1` travel).
    pub reduce: u64,
}

/// The bytes of one MoE layer call over `rows` tokens of a model of `config` among `ranks`
/// processes.
pub fn exchange_bytes(config: &TextConfig, rows: usize, ranks: usize) -> Exchange {
    let (h, k) = (config.hidden_size() as u64, config.num_experts_per_tok as u64);
    let rows = rows as u64;
    Exchange {
        broadcast: 4 * (HEADER as u64 + rows * h + 2 * rows * k),
        reduce: 4 * (rows * h + 1) * ranks as u64,
    }
}
