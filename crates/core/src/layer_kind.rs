//! Which earlier keys an attention layer's queries see: the one place the chunk rule is written.
//!
//! The attention kernel ([`crate::kernels::attention`]) reads it through [`AttentionMask`], the
//! cache (`kv-cache`) to know what it must keep, the decoder to split a prefill at chunk
//! boundaries ([`LayerKind::segments`]).

use std::num::NonZeroUsize;
use std::ops::Range;

/// How a layer's attention sees the past, hence what its cache must keep.
///
/// ```
/// use llama4_core::LayerKind;
/// let scout = LayerKind::chunked(8192).unwrap();
/// assert!(scout.allowed(8191, 0));
/// assert!(!scout.allowed(8192, 8191)); // a new chunk starts: not a sliding window
/// assert_eq!(scout.visible(130_000), 15 * 8192..130_001);
/// assert!(LayerKind::chunked(0).is_none()); // a chunk of zero keys means nothing
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// Chunked attention (Llama 4's RoPE layers, `attention_chunk_size = C`): the query at `p`
    /// sees keys `C·floor(p/C) ..= p`. The window restarts at every multiple of `C`; it is not
    /// a sliding window of the last `C` keys. A cache holds at most `C` positions.
    Chunked {
        /// The chunk size `C`.
        chunk: NonZeroUsize,
    },
    /// Causal attention over the whole context (NoPE layers, and RoPE layers whose chunk size
    /// is null): the query at `p` sees keys `0 ..= p`. A cache grows with the context.
    Global,
}

impl LayerKind {
    /// A chunked layer of `chunk` positions; `None` for 0.
    pub fn chunked(chunk: usize) -> Option<Self> {
        NonZeroUsize::new(chunk).map(|chunk| LayerKind::Chunked { chunk })
    }

    /// The kind a config's `attention_chunk_size` gives: `None` is [`LayerKind::Global`];
    /// `Some(0)` is `None` (no such layer).
    pub fn from_chunk_size(chunk: Option<usize>) -> Option<Self> {
        match chunk {
            None => Some(LayerKind::Global),
            Some(c) => Self::chunked(c),
        }
    }

    /// The chunk size, for chunked layers.
    pub fn chunk(self) -> Option<usize> {
        match self {
            LayerKind::Chunked { chunk } => Some(chunk.get()),
            LayerKind::Global => None,
        }
    }

    /// The first key the query at absolute position `p` sees (it sees every key up to `p`).
    pub fn first_visible(self, p: usize) -> usize {
        match self {
            LayerKind::Chunked { chunk } => p - p % chunk.get(),
            LayerKind::Global => 0,
        }
    }

    /// The keys the query at `p` sees: exactly what the layer's cache holds once the token at
    /// `p` was appended.
    pub fn visible(self, p: usize) -> Range<usize> {
        self.first_visible(p)..p + 1
    }

    /// True when the query at `q_pos` may attend to the key at `k_pos`.
    pub fn allowed(self, q_pos: usize, k_pos: usize) -> bool {
        self.first_visible(q_pos) <= k_pos && k_pos <= q_pos
    }

    /// The most positions a cache of this kind holds at once over a context of `n_tokens`.
    pub fn max_held(self, n_tokens: usize) -> usize {
        match self {
            LayerKind::Chunked { chunk } => n_tokens.min(chunk.get()),
            LayerKind::Global => n_tokens,
        }
    }

    /// Splits `t` new tokens whose first is at absolute position `start_pos` into pieces that
    /// each stay inside one chunk. Ranges index the new tokens (`0..t` in total, in order); a
    /// global layer gets one piece. Empty for `t = 0`.
    ///
    /// A chunked layer appends and attends piece by piece: the queries of a piece see only keys
    /// of their own chunk, which the cache holds until the next piece starts the next chunk.
    pub fn segments(self, start_pos: usize, t: usize) -> Segments {
        Segments {
            kind: self,
            start_pos,
            t,
            i: 0,
        }
    }
}

/// The pieces of [`LayerKind::segments`], computed as they are taken (no allocation: this runs
/// once per layer per decode step).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segments {
    kind: LayerKind,
    start_pos: usize,
    t: usize,
    /// Start of the next piece.
    i: usize,
}

impl Iterator for Segments {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let (i, t) = (self.i, self.t);
        if i >= t {
            return None;
        }
        let room = match self.kind {
            // Positions left in the chunk that `start_pos + i` falls in.
            LayerKind::Chunked { chunk } => chunk.get() - (self.start_pos.wrapping_add(i) % chunk.get()),
            LayerKind::Global => t - i,
        };
        let end = i + room.min(t - i);
        self.i = end;
        Some(i..end)
    }
}

/// Which keys a query sees, for the attention kernel: every key from
/// [`AttentionMask::first_visible`] up to the query itself. [`LayerKind`] is Llama 4's; a
/// sliding window of `w` keys is `p.saturating_sub(w - 1)`.
///
/// The visible keys of a query are one contiguous run ending at the query, which lets the
/// kernel skip whole tiles; masks with holes are not expressible here.
pub trait AttentionMask: Sync {
    /// The first key position the query at absolute position `query_pos` sees.
    fn first_visible(&self, query_pos: usize) -> usize;
}

impl AttentionMask for LayerKind {
    fn first_visible(&self, query_pos: usize) -> usize {
        LayerKind::first_visible(*self, query_pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(c: usize) -> LayerKind {
        LayerKind::chunked(c).unwrap()
    }

    #[test]
    fn global_sees_all_earlier_keys() {
        let m = LayerKind::Global;
        assert!(m.allowed(0, 0));
        assert!(m.allowed(100_000, 0));
        assert!(m.allowed(17, 17));
        assert!(!m.allowed(17, 18));
        assert_eq!(m.visible(5), 0..6);
    }

    #[test]
    fn chunked_is_chunk_aligned_not_sliding() {
        let m = chunked(8);
        // Position 8 starts a new chunk: it sees only itself, although keys 1..=7 are within
        // 8 positions (a sliding window of 8 would let it see them).
        assert!(m.allowed(8, 8));
        assert!(!m.allowed(8, 7));
        assert!(!m.allowed(8, 1));
        for j in 8..=15 {
            assert!(m.allowed(15, j));
        }
        assert!(!m.allowed(15, 7));
        assert!(!m.allowed(9, 10));
        assert!(m.allowed(0, 0));
        assert!(!m.allowed(0, 1));
    }

    #[test]
    fn chunk_size_null_is_global_and_zero_is_nothing() {
        assert_eq!(LayerKind::from_chunk_size(None), Some(LayerKind::Global));
        assert_eq!(LayerKind::from_chunk_size(Some(8192)), Some(chunked(8192)));
        assert_eq!(LayerKind::from_chunk_size(Some(0)), None);
        assert_eq!(chunked(8192).chunk(), Some(8192));
        assert_eq!(LayerKind::Global.chunk(), None);
    }

    #[test]
    fn scout_chunk_boundaries() {
        let m = chunked(8192);
        assert!(m.allowed(8191, 0));
        assert!(!m.allowed(8192, 8191));
        assert!(m.allowed(16_383, 8192));
        assert_eq!(m.visible(8191), 0..8192);
        assert_eq!(m.visible(8192), 8192..8193);
        assert_eq!(m.visible(130_000), 15 * 8192..130_001); // 130000 / 8192 = 15.9
    }

    #[test]
    fn visible_is_allowed() {
        for kind in [LayerKind::Global, chunked(1), chunked(3), chunked(8)] {
            for p in 0..40 {
                let vis = kind.visible(p);
                for j in 0..48 {
                    assert_eq!(kind.allowed(p, j), vis.contains(&j), "{kind:?} p={p} j={j}");
                }
            }
        }
    }

    #[test]
    fn segments_split_at_multiples_of_the_chunk() {
        let k = chunked(4);
        let all = |s: Segments| s.collect::<Vec<_>>();
        assert_eq!(all(k.segments(0, 0)), Vec::<Range<usize>>::new());
        assert_eq!(all(k.segments(0, 4)), vec![0..4]);
        assert_eq!(all(k.segments(2, 7)), vec![0..2, 2..6, 6..7]);
        assert_eq!(all(k.segments(4, 3)), vec![0..3]);
        assert_eq!(all(LayerKind::Global.segments(3, 10)), vec![0..10]);
    }

    #[test]
    fn max_held_is_bounded_for_chunked_layers() {
        assert_eq!(chunked(20).max_held(17), 17);
        assert_eq!(chunked(20).max_held(1 << 40), 20);
        assert_eq!(LayerKind::Global.max_held(1 << 40), 1 << 40);
    }
}
