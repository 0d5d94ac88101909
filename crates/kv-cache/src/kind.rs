//! The allocation policy of a layer's cache, which the estimates reproduce. What a layer keeps
//! is its [`LayerKind`] (from `llama4-core`, where the chunk rule is written once).

use crate::{KvError, LayerKind, Result};

/// Capacity (positions per head) a layer of `kind` allocates when `needed` positions must fit
/// and the current capacity is smaller: the next step of [`capacity_ladder`], never more than
/// the chunk size for chunked layers.
pub(crate) fn grown_capacity(kind: LayerKind, needed: usize) -> Result<usize> {
    let cap = capacity_ladder(needed)?;
    Ok(match kind.chunk() {
        Some(chunk) => cap.min(chunk.max(needed)),
        None => cap,
    })
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
        let k = LayerKind::chunked(20).unwrap();
        assert_eq!(grown_capacity(k, 17).unwrap(), 20);
        assert_eq!(grown_capacity(k, 5).unwrap(), 16);
        assert_eq!(grown_capacity(LayerKind::chunked(8).unwrap(), 3).unwrap(), 8);
        assert_eq!(grown_capacity(LayerKind::Global, 17).unwrap(), 24);
    }
}
