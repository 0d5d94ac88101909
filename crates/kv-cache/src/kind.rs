//! What a layer caches, and the allocation policy the estimates reproduce.

use std::ops::Range;

use crate::{KvError, Result};

/// How a layer's attention sees the past, hence what its cache must keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// RoPE layer with `attention_chunk_size = chunk`: the query at `p` sees keys
    /// `C·floor(p/C) ..= p`, so the cache holds at most `chunk` positions and restarts at every
    /// multiple of `chunk`.
    Chunked {
        /// The chunk size `C` (> 0).
        chunk: usize,
    },
    /// NoPE layer (or a RoPE layer without a chunk size): sees every earlier key, so the cache
    /// grows with the context.
    Global,
}

impl LayerKind {
    /// The chunk size, for chunked layers.
    pub fn chunk(self) -> Option<usize> {
        match self {
            LayerKind::Chunked { chunk } => Some(chunk),
            LayerKind::Global => None,
        }
    }

    /// Rejects `Chunked { chunk: 0 }`.
    pub fn validate(self) -> Result<()> {
        match self {
            LayerKind::Chunked { chunk: 0 } => {
                Err(KvError::InvalidSpec("chunked layer with chunk size 0".into()))
            }
            _ => Ok(()),
        }
    }

    /// Splits `t` new tokens whose first has absolute position `start_pos` into pieces that each
    /// stay inside one chunk. Ranges index the new tokens (`0..t` in total, in order); a global
    /// layer gets one piece. Empty for `t = 0`.
    ///
    /// The attention of a chunked layer appends and attends piece by piece: the queries of a
    /// piece only see keys of their own chunk, which the cache holds until the next piece starts
    /// the next chunk.
    pub fn segments(self, start_pos: usize, t: usize) -> Segments {
        Segments {
            kind: self,
            start_pos,
            t,
            i: 0,
        }
    }

    /// The keys the attention mask lets the query at absolute position `p` see: `j ≤ p`, and for
    /// chunked layers `j / C == p / C`. This is exactly what the layer's cache holds after the
    /// token at `p` was appended.
    pub fn visible(self, p: usize) -> Range<usize> {
        match self {
            LayerKind::Chunked { chunk } if chunk > 0 => (p / chunk) * chunk..p + 1,
            _ => 0..p + 1,
        }
    }

    /// The most positions a layer of this kind holds at once over a context of `n_tokens`.
    pub fn max_held(self, n_tokens: usize) -> usize {
        match self {
            LayerKind::Chunked { chunk } => n_tokens.min(chunk),
            LayerKind::Global => n_tokens,
        }
    }

    /// Capacity (positions per head) a layer of this kind allocates when `needed` positions must
    /// fit and the current capacity is smaller: the next step of [`capacity_ladder`], never more
    /// than the chunk size for chunked layers.
    pub(crate) fn grown_capacity(self, needed: usize) -> Result<usize> {
        let cap = capacity_ladder(needed)?;
        Ok(match self {
            LayerKind::Chunked { chunk } => cap.min(chunk.max(needed)),
            LayerKind::Global => cap,
        })
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
            LayerKind::Chunked { chunk } if chunk > 0 => chunk - (self.start_pos.wrapping_add(i) % chunk),
            _ => t - i,
        };
        let end = i + room.min(t - i);
        self.i = end;
        Some(i..end)
    }
}

/// Smallest position capacity a growing layer allocates.
pub const MIN_CAPACITY: usize = 16;

/// The capacity steps a layer grows through: 0, then the smallest of
/// 16, 24, 32, 48, 64, 96, … (`2^k` and `1.5·2^k`) that is `≥ n`.
///
/// Why a fixed ladder rather than "double the old capacity": the capacity then depends only on
/// the largest number of positions ever held, not on how the appends were split, so
/// [`crate::CacheSpec::estimate`] can predict it exactly. Steps grow by at most 1.5×, so growth
/// copies each element at most about 3 times in total (amortised O(1)) and the slack is below 50 %.
pub fn capacity_ladder(n: usize) -> Result<usize> {
    if n == 0 {
        return Ok(0);
    }
    if n <= MIN_CAPACITY {
        return Ok(MIN_CAPACITY);
    }
    let p = n
        .checked_next_power_of_two()
        .ok_or(KvError::Overflow("capacity"))?;
    let three_quarters = p / 2 + p / 4;
    Ok(if n <= three_quarters { three_quarters } else { p })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_multiples_of_the_chunk() {
        let k = LayerKind::Chunked { chunk: 4 };
        assert_eq!(k.segments(0, 0).collect::<Vec<_>>(), Vec::<Range<usize>>::new());
        assert_eq!(k.segments(0, 4).collect::<Vec<_>>(), vec![0..4]);
        assert_eq!(k.segments(2, 7).collect::<Vec<_>>(), vec![0..2, 2..6, 6..7]);
        assert_eq!(k.segments(4, 3).collect::<Vec<_>>(), vec![0..3]);
        assert_eq!(LayerKind::Global.segments(3, 10).collect::<Vec<_>>(), vec![0..10]);
    }

    #[test]
    fn visible_is_the_chunk_mask() {
        let k = LayerKind::Chunked { chunk: 4 };
        for p in 0..20 {
            let allowed: Vec<usize> = (0..=p).filter(|&j| j / 4 == p / 4).collect();
            assert_eq!(k.visible(p).collect::<Vec<_>>(), allowed);
        }
        assert_eq!(LayerKind::Global.visible(5), 0..6);
    }

    #[test]
    fn ladder_is_monotone_covers_and_has_bounded_slack() {
        assert_eq!(capacity_ladder(0).unwrap(), 0);
        let mut prev = 0;
        for n in 1..5000usize {
            let c = capacity_ladder(n).unwrap();
            assert!(c >= n && c >= prev, "n {n} cap {c}");
            if n > MIN_CAPACITY {
                assert!(2 * c <= 3 * n, "slack above 1.5x at n {n}: {c}");
            }
            prev = c;
        }
        assert_eq!(
            (17..=100)
                .map(|n| capacity_ladder(n).unwrap())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![24, 32, 48, 64, 96, 128]
        );
        assert_eq!(capacity_ladder(usize::MAX), Err(KvError::Overflow("capacity")));
    }

    #[test]
    fn chunked_growth_stops_at_the_chunk() {
        let k = LayerKind::Chunked { chunk: 20 };
        assert_eq!(k.grown_capacity(17).unwrap(), 20);
        assert_eq!(k.grown_capacity(5).unwrap(), 16);
        assert_eq!(LayerKind::Chunked { chunk: 8 }.grown_capacity(3).unwrap(), 8);
        assert_eq!(LayerKind::Global.grown_capacity(17).unwrap(), 24);
    }
}
