//! Routing statistics accumulated across forward calls.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ExpertGroups;

/// Counters a MoE layer updates on every forward call and callers read at any time.
///
/// Updated with relaxed atomics once per call (E + 3 additions), so a layer can be shared
/// between threads and read while it runs; the counters are statistics, not synchronisation.
#[derive(Debug)]
pub struct RoutingStats {
    tokens_per_expert: Box<[AtomicU64]>,
    tokens: AtomicU64,
    calls: AtomicU64,
    weight_bytes: AtomicU64,
}

impl RoutingStats {
    /// Zeroed counters for `num_experts` experts.
    pub fn new(num_experts: usize) -> Self {
        RoutingStats {
            tokens_per_expert: (0..num_experts).map(|_| AtomicU64::new(0)).collect(),
            tokens: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            weight_bytes: AtomicU64::new(0),
        }
    }

    /// Adds one forward call over `tokens` tokens, routed as `groups`, that read `weight_bytes`
    /// bytes of weights.
    pub fn record(&self, groups: &ExpertGroups, tokens: usize, weight_bytes: usize) {
        for (e, counter) in self.tokens_per_expert.iter().enumerate() {
            let n = groups.len(e) as u64;
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.weight_bytes
            .fetch_add(weight_bytes as u64, Ordering::Relaxed);
    }

    /// Token assignments per expert since creation or the last [`RoutingStats::reset`]
    /// (`E` counts summing to `k ·` [`RoutingStats::tokens`]).
    pub fn tokens_per_expert(&self) -> Vec<u64> {
        self.tokens_per_expert
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Tokens routed.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    /// Forward calls counted.
    pub fn forward_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Bytes of stored weights the counted calls read: the router's, the shared expert's and
    /// those of each expert that at least one token chose, once per call. Experts no token
    /// chose contribute nothing, which is what this counter lets callers check.
    pub fn weight_bytes_read(&self) -> u64 {
        self.weight_bytes.load(Ordering::Relaxed)
    }

    /// Sets every counter back to 0.
    pub fn reset(&self) {
        for c in self.tokens_per_expert.iter() {
            c.store(0, Ordering::Relaxed);
        }
        self.tokens.store(0, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
        self.weight_bytes.store(0, Ordering::Relaxed);
    }
}
