//! Sizes shared by every layer of a cache, the memory report, and the estimates.

use llama4_core::KvDtype;

use crate::kind::{auto_page_len, paged_capacity};
use crate::{KvError, LayerKind, Result};

/// Shape and storage dtype of every layer's cache: keys and values are `[kv_heads, ·, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheSpec {
    /// Key/value heads `Hkv`.
    pub kv_heads: usize,
    /// Elements per head vector `D`.
    pub head_dim: usize,
    /// Storage format; appended f32 values are rounded to it (nearest, ties to even; q8
    /// vectors to their own scale, see [`KvDtype::Q8`]).
    pub dtype: KvDtype,
    /// Positions per page; 0 chooses one from the vector size ([`crate::PAGE_BYTES`] of one
    /// head's keys). A chunked layer's pages are never longer than its chunk.
    pub page_len: usize,
}

/// Bytes held by a cache, split by layer kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemoryBytes {
    /// All [`LayerKind::Chunked`] layers together.
    pub chunked: u64,
    /// All [`LayerKind::Global`] layers together.
    pub global: u64,
}

impl MemoryBytes {
    /// Chunked plus global.
    pub fn total(&self) -> u64 {
        self.chunked + self.global
    }

    pub(crate) fn add(&mut self, kind: LayerKind, bytes: u64) -> Result<()> {
        let slot = match kind {
            LayerKind::Chunked { .. } => &mut self.chunked,
            LayerKind::Global => &mut self.global,
        };
        *slot = slot.checked_add(bytes).ok_or(KvError::Overflow("memory bytes"))?;
        Ok(())
    }
}

impl CacheSpec {
    /// A spec; see [`CacheSpec::validate`] for what a cache accepts. `dtype` is a
    /// [`KvDtype`] or a float [`llama4_core::DType`].
    pub fn new(kv_heads: usize, head_dim: usize, dtype: impl Into<KvDtype>) -> Self {
        Self {
            kv_heads,
            head_dim,
            dtype: dtype.into(),
            page_len: 0,
        }
    }

    /// The same spec with pages of `page_len` positions (0: automatic).
    pub fn with_page_len(self, page_len: usize) -> Self {
        Self { page_len, ..self }
    }

    /// Positions per page of a layer of `kind`.
    pub fn page_len_for(&self, kind: LayerKind) -> usize {
        let p = match self.page_len {
            0 => auto_page_len(self.dtype.vector_bytes(self.head_dim)),
            p => p,
        };
        kind.chunk().map_or(p, |c| p.min(c))
    }

    /// Rejects zero heads or a zero head dim.
    pub fn validate(&self) -> Result<()> {
        if self.kv_heads == 0 || self.head_dim == 0 {
            return Err(KvError::InvalidSpec(format!(
                "kv_heads {} and head_dim {} must be positive",
                self.kv_heads, self.head_dim
            )));
        }
        Ok(())
    }

    /// Bytes one layer allocates for a capacity of `positions`: keys and values,
    /// `2 · Hkv · positions · bytes per vector` (`D · sizeof(dtype)`, or `D + 4` for q8).
    pub fn layer_bytes(&self, positions: usize) -> Result<u64> {
        let vector = (self.head_dim as u64)
            .checked_mul(4)
            .and_then(|_| u64::try_from(self.dtype.vector_bytes(self.head_dim)).ok())
            .ok_or(KvError::Overflow("layer bytes"))?;
        [2, self.kv_heads as u64, positions as u64, vector]
            .into_iter()
            .try_fold(1u64, |acc, x| acc.checked_mul(x))
            .ok_or(KvError::Overflow("layer bytes"))
    }

    /// Bytes a [`crate::KvCache`] over `kinds` holds after `n_tokens` positions were
    /// appended, however the appends were split (or after [`crate::KvCache::reserve`]`(n)`):
    /// each layer holds whole pages for the most positions it held (`min(n, C)` for a chunked
    /// layer, `n` for a global one). Allocates nothing.
    pub fn estimate(&self, kinds: &[LayerKind], n_tokens: usize) -> Result<MemoryBytes> {
        self.validate()?;
        let mut out = MemoryBytes::default();
        for &kind in kinds {
            let positions = paged_capacity(self.page_len_for(kind), kind.max_held(n_tokens))?;
            out.add(kind, self.layer_bytes(positions)?)?;
        }
        Ok(out)
    }
}
