//! Borrowed views of cached keys and values: the contract between the cache (which owns the
//! storage) and attention (which reads it).

use half::{bf16, f16};

/// Elements of cached keys or values in their storage dtype.
#[derive(Clone, Copy, Debug)]
pub enum KvData<'a> {
    /// f32 storage.
    F32(&'a [f32]),
    /// bf16 storage.
    BF16(&'a [bf16]),
    /// f16 storage.
    F16(&'a [f16]),
}

/// Keys (or values) of one layer, laid out `[heads, len, head_dim]`: head `h`, position slot `j`
/// starts at element `h · head_stride + j · head_dim`. `head_stride ≥ len · head_dim` lets a
/// cache hand out a prefix of a larger allocation without copying.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    /// The elements.
    pub data: KvData<'a>,
    /// Number of key/value heads.
    pub heads: usize,
    /// Number of positions held.
    pub len: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// Elements between the starts of consecutive heads.
    pub head_stride: usize,
    /// Absolute position of slot 0 (a chunked cache restarts at chunk boundaries).
    pub first_pos: usize,
}

impl<'a> KvView<'a> {
    /// True when every slot the view claims lies inside `data`.
    pub fn is_consistent(&self) -> bool {
        let n = match self.data {
            KvData::F32(d) => d.len(),
            KvData::BF16(d) => d.len(),
            KvData::F16(d) => d.len(),
        };
        let Some(row) = self.len.checked_mul(self.head_dim) else {
            return false;
        };
        if self.heads == 0 || row == 0 {
            return true;
        }
        self.head_stride >= row
            && (self.heads - 1)
                .checked_mul(self.head_stride)
                .and_then(|s| s.checked_add(row))
                .is_some_and(|end| end <= n)
    }
}
