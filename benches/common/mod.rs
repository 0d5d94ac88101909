//! Helpers shared by the benches.

/// Deterministic values in [-0.5, 0.5) from the workspace's test generator (the contents do not
/// affect speed).
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    // Halving is exact, so these are the values the benches have always used.
    llama4_testkit::values(len, seed)
        .into_iter()
        .map(|v| v * 0.5)
        .collect()
}
