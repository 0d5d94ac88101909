//! Llama 4 Scout's cache sizes: bounded (chunked layers capped at 8192) vs. every layer cached in
//! full, as a port that treats the chunk mask as plain causal attention would.

use crate::{CacheSpec, DType, LayerKind};

/// Scout's text decoder: 48 layers, every 4th (`(i + 1) % 4 == 0`) NoPE/global, chunk 8192.
fn scout_kinds() -> Vec<LayerKind> {
    (0..48)
        .map(|i| {
            if (i + 1) % 4 == 0 {
                LayerKind::Global
            } else {
                LayerKind::chunked(8192).unwrap()
            }
        })
        .collect()
}

#[test]
fn scout_bounded_vs_all_full() {
    const GIB: f64 = (1u64 << 30) as f64;
    let spec = CacheSpec::new(8, 128, DType::BF16);
    let kinds = scout_kinds();
    let full: Vec<LayerKind> = vec![LayerKind::Global; kinds.len()];
    assert_eq!(kinds.iter().filter(|k| **k == LayerKind::Global).count(), 12);
    // 2 (K, V) · 8 heads · 128 · 2 bytes.
    let per_pos: u64 = 2 * 8 * 128 * 2;
    println!("Scout KV cache, bf16 (K = 1024 tokens, M = 1024²; GiB = 2³⁰ B)");
    println!("{:>5} {:>14} {:>14} {:>7}", "N", "bounded", "all-full", "ratio");
    for (name, n) in [("128K", 128usize << 10), ("1M", 1 << 20), ("10M", 10 << 20)] {
        let b = spec.estimate(&kinds, n).unwrap();
        let f = spec.estimate(&full, n).unwrap();
        // The formula: 12 global layers hold N positions, 36 chunked ones min(N, 8192) (whole
        // pages of 1024 positions, which divide all of these).
        assert_eq!(spec.page_len_for(LayerKind::Global), 1024);
        assert_eq!(b.global, 12 * n as u64 * per_pos);
        assert_eq!(b.chunked, 36 * n.min(8192) as u64 * per_pos);
        assert_eq!(f.total(), 48 * n as u64 * per_pos);
        // Bounded is close to a quarter of full once N ≫ C (12 of 48 layers grow).
        assert!(b.total() * 3 < f.total(), "{name}: {b:?} vs {f:?}");
        println!(
            "{name:>5} {:>10.3} GiB {:>10.3} GiB {:>7.3}",
            b.total() as f64 / GIB,
            f.total() as f64 / GIB,
            b.total() as f64 / f.total() as f64,
        );
        println!(
            "      bounded split: chunked {:.3} GiB + global {:.3} GiB",
            b.chunked as f64 / GIB,
            b.global as f64 / GIB
        );
    }
}
