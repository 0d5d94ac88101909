//! Property tests: RoPE invariants.

use irope_attn::{Rope, RopeConfig, RopeScaling};
use ndarray::Array3;
use proptest::prelude::*;

fn rope_config() -> impl Strategy<Value = RopeConfig> {
    let scaling = prop_oneof![
        Just(RopeScaling::Default),
        (1f64..32.0, 0.5f64..2.0, 0f64..4.0, 16usize..16384).prop_map(|(factor, low, extra, orig)| {
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                // low = high (Scout-Instruct) included.
                high_freq_factor: if extra < 1.0 { low } else { low + extra },
                original_max_position_embeddings: orig as f64,
            }
        }),
    ];
    (
        prop_oneof![Just(10_000.0f64), Just(500_000.0), 100.0f64..1e7],
        scaling,
    )
        .prop_map(|(theta, scaling)| RopeConfig { theta, scaling })
}

proptest! {
    #[test]
    fn rope_at_position_zero_is_identity(
        cfg in rope_config(),
        half in 1usize..=64,
        x in proptest::collection::vec(-10f32..10.0, 3 * 128),
    ) {
        let d = 2 * half;
        let rope = Rope::new(d, &cfg).unwrap();
        prop_assert!(rope.inv_freq().iter().all(|f| f.is_finite() && *f > 0.0));
        let mut a = Array3::from_shape_vec((1, 3, d), x[..3 * d].to_vec()).unwrap();
        let before = a.clone();
        rope.apply(a.view_mut(), &[0]).unwrap();
        prop_assert_eq!(a, before);
    }

    #[test]
    fn rope_preserves_pair_norms(
        cfg in rope_config(),
        half in 1usize..=64,
        positions in proptest::collection::vec(0usize..10_485_760, 1..4),
        x in proptest::collection::vec(-10f32..10.0, 4 * 2 * 128),
    ) {
        let d = 2 * half;
        let t = positions.len();
        let rope = Rope::new(d, &cfg).unwrap();
        let mut a = Array3::from_shape_vec((t, 2, d), x[..t * 2 * d].to_vec()).unwrap();
        let before = a.clone();
        rope.apply(a.view_mut(), &positions).unwrap();
        for (r, b) in a.as_slice().unwrap().chunks(2).zip(before.as_slice().unwrap().chunks(2)) {
            let n1 = (r[0] as f64).hypot(r[1] as f64);
            let n0 = (b[0] as f64).hypot(b[1] as f64);
            prop_assert!((n1 - n0).abs() <= 4e-7 * n0.max(1e-3), "{n1} vs {n0}");
        }
    }
}
