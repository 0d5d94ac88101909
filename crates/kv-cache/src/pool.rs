//! A byte budget for the pages of many caches (one per engine, shared by its sessions).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{KvError, Result};

/// A byte budget that caches draw their pages from. Clones share the budget: give one to every
/// cache of an engine ([`crate::KvCache::with_pool`]) and the keys and values of all its
/// sequences together never exceed it. A page counts while any cache holds it (a page shared
/// between caches counts once) and returns to the budget when the last one lets it go.
#[derive(Clone, Debug)]
pub struct PagePool {
    inner: Arc<Budget>,
}

#[derive(Debug)]
struct Budget {
    limit: u64,
    used: AtomicU64,
}

impl PagePool {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        Self {
            inner: Arc::new(Budget {
                limit: bytes,
                used: AtomicU64::new(0),
            }),
        }
    }

    /// The budget, in bytes.
    pub fn budget(&self) -> u64 {
        self.inner.limit
    }

    /// Bytes of the pages caches of this pool hold now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// Counts `bytes` against the budget until the returned lease is dropped.
    ///
    /// # Errors
    /// [`KvError::Budget`] when they do not fit; nothing is counted then.
    pub(crate) fn lease(&self, bytes: u64) -> Result<Lease> {
        let b = &self.inner;
        let mut used = b.used.load(Ordering::Relaxed);
        loop {
            let Some(after) = used.checked_add(bytes).filter(|&a| a <= b.limit) else {
                return Err(KvError::Budget {
                    requested: bytes,
                    used,
                    budget: b.limit,
                });
            };
            match b
                .used
                .compare_exchange_weak(used, after, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Ok(Lease {
                        budget: self.inner.clone(),
                        bytes,
                    })
                }
                Err(now) => used = now,
            }
        }
    }
}

/// Bytes counted against a [`PagePool`] while this lives.
#[derive(Debug)]
pub(crate) struct Lease {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_count_until_dropped_and_refuse_beyond_the_budget() {
        let pool = PagePool::new(100);
        let a = pool.lease(60).unwrap();
        let b = pool.clone().lease(40).unwrap();
        assert_eq!(pool.used(), 100);
        assert_eq!(
            pool.lease(1).unwrap_err(),
            KvError::Budget {
                requested: 1,
                used: 100,
                budget: 100
            }
        );
        drop(a);
        assert_eq!(pool.used(), 40);
        let c = pool.lease(60).unwrap();
        drop((b, c));
        assert_eq!(pool.used(), 0);
        assert!(matches!(pool.lease(u64::MAX), Err(KvError::Budget { .. })));
    }
}
