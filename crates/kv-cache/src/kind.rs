//! The allocation policy of a layer's cache, which the estimates reproduce. What a layer keeps
//! is its [`LayerKind`] (from `llama4-core`, where the chunk rule is written once).

use crate::{KvError, Result};

/// Bytes of one head's keys a page holds when the spec leaves the page length open
/// ([`crate::CacheSpec::page_len`] 0): large enough that a page boundary (where attention's
/// read-ahead starts over and partial softmaxes merge) costs little beside reading the page
/// (64 KiB pages read 20-28% slower than one buffer in the attention bench, 256 KiB 11-13%),
/// small enough that a short sequence does not hold much it never uses.
pub const PAGE_BYTES: usize = 256 * 1024;

/// Smallest automatic page length, in positions (one attention key tile).
pub const MIN_PAGE_LEN: usize = 64;

/// Positions per page for vectors of `vector_bytes`: the largest power of two whose keys of one
/// head fit in [`PAGE_BYTES`], at least [`MIN_PAGE_LEN`].
pub(crate) fn auto_page_len(vector_bytes: usize) -> usize {
    let mut p = MIN_PAGE_LEN;
    while p * 2 * vector_bytes.max(1) <= PAGE_BYTES {
        p *= 2;
    }
    p
}

/// Positions a layer allocates (whole pages of `page_len`) to hold `held` positions.
pub(crate) fn paged_capacity(page_len: usize, held: usize) -> Result<usize> {
    held.div_ceil(page_len.max(1))
        .checked_mul(page_len)
        .ok_or(KvError::Overflow("capacity"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_lengths_follow_the_vector_size() {
        // The demo's bf16 vectors (16 × 2 bytes), Scout's bf16 (128 × 2) and q8 (128 + 4).
        assert_eq!(auto_page_len(32), 8192);
        assert_eq!(auto_page_len(256), 1024);
        assert_eq!(auto_page_len(132), 1024);
        assert_eq!(auto_page_len(1 << 20), MIN_PAGE_LEN);
        assert_eq!(paged_capacity(16, 0).unwrap(), 0);
        assert_eq!(paged_capacity(16, 1).unwrap(), 16);
        assert_eq!(paged_capacity(16, 33).unwrap(), 48);
        assert_eq!(paged_capacity(2, usize::MAX), Err(KvError::Overflow("capacity")));
    }
}
