//! Helpers shared by the benches.

// The core crate's test generator, so benches and tests draw from one LCG.
#[path = "../../crates/core/tests/common/values.rs"]
mod lcg;

/// Deterministic values in [-0.5, 0.5) (the contents do not affect speed).
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    // Halving is exact, so these are the values the benches have always used.
    lcg::values(len, seed).into_iter().map(|v| v * 0.5).collect()
}
