//! Which keys a query may see: a pure function of the two absolute positions.

/// The attention mask of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// Key `j` is visible from query `p` when `j ≤ p` (NoPE layers, and RoPE layers whose
    /// `attention_chunk_size` is null).
    Causal,
    /// Chunked attention with chunk size `C`: `j ≤ p` and `j / C == p / C`. The window restarts
    /// at every multiple of `C`; it is not a sliding window of the last `C` keys.
    Chunked(usize),
}

impl MaskKind {
    /// The mask of a layer with chunk size `chunk` (`None`: plain causal).
    pub fn from_chunk_size(chunk: Option<usize>) -> Self {
        match chunk {
            Some(c) => MaskKind::Chunked(c),
            None => MaskKind::Causal,
        }
    }

    /// True when the query at absolute position `q_pos` may attend to the key at `k_pos`.
    ///
    /// A chunk size of 0 is treated as 1 (every token sees only itself) rather than dividing
    /// by zero; configurations validate it away earlier.
    pub fn allowed(self, q_pos: usize, k_pos: usize) -> bool {
        match self {
            MaskKind::Causal => k_pos <= q_pos,
            MaskKind::Chunked(c) => {
                let c = c.max(1);
                k_pos <= q_pos && k_pos / c == q_pos / c
            }
        }
    }

    /// The visible keys of the query at `q_pos` as the inclusive range `first..=q_pos`: both
    /// masks see a contiguous run ending at the query, which lets the kernel skip whole tiles.
    pub fn key_range(self, q_pos: usize) -> (usize, usize) {
        match self {
            MaskKind::Causal => (0, q_pos),
            MaskKind::Chunked(c) => {
                let c = c.max(1);
                (q_pos / c * c, q_pos)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_sees_all_earlier_keys() {
        let m = MaskKind::Causal;
        assert!(m.allowed(0, 0));
        assert!(m.allowed(100_000, 0));
        assert!(m.allowed(17, 17));
        assert!(!m.allowed(17, 18));
    }

    #[test]
    fn chunked_is_chunk_aligned_not_sliding() {
        let m = MaskKind::Chunked(8);
        // Position 8 starts a new chunk: it sees only itself, although keys 1..=7 are within
        // 8 positions (a sliding window of 8 would let it see them).
        assert!(m.allowed(8, 8));
        assert!(!m.allowed(8, 7));
        assert!(!m.allowed(8, 1));
        // The last position of a chunk sees the whole chunk, back to its start.
        for j in 8..=15 {
            assert!(m.allowed(15, j));
        }
        assert!(!m.allowed(15, 7));
        // Never the future, even inside the chunk.
        assert!(!m.allowed(9, 10));
        // Position 0 of chunk 0.
        assert!(m.allowed(0, 0));
        assert!(!m.allowed(0, 1));
    }

    #[test]
    fn chunk_size_null_is_causal() {
        assert_eq!(MaskKind::from_chunk_size(None), MaskKind::Causal);
        assert_eq!(MaskKind::from_chunk_size(Some(8192)), MaskKind::Chunked(8192));
        let m = MaskKind::from_chunk_size(None);
        assert!(m.allowed(20_000, 3));
    }

    #[test]
    fn scout_chunk_boundaries() {
        let m = MaskKind::Chunked(8192);
        assert!(m.allowed(8191, 0));
        assert!(!m.allowed(8192, 8191));
        assert!(m.allowed(16_383, 8192));
        assert_eq!(m.key_range(8191), (0, 8191));
        assert_eq!(m.key_range(8192), (8192, 8192));
        assert_eq!(m.key_range(130_000), (15 * 8192, 130_000)); // 130000 / 8192 = 15.9
    }

    #[test]
    fn key_range_matches_allowed() {
        for mask in [
            MaskKind::Causal,
            MaskKind::Chunked(1),
            MaskKind::Chunked(3),
            MaskKind::Chunked(8),
        ] {
            for p in 0..40 {
                let (lo, hi) = mask.key_range(p);
                for j in 0..48 {
                    assert_eq!(mask.allowed(p, j), lo <= j && j <= hi, "{mask:?} p={p} j={j}");
                }
            }
        }
    }
}
