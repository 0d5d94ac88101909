//! Invariants of the caches over random layer mixes, dtypes and append patterns.

use half::{bf16, f16};
use kv_cache::{CacheSpec, DType, KvCache, KvDtype, KvError, LayerKind};
use ndarray::{s, Array3, ArrayView3};
use proptest::prelude::*;

/// Deterministic pseudo-random `[t, hkv, d]` values in [-2, 2) from `seed`.
fn random_tokens(t: usize, hkv: usize, d: usize, seed: u64) -> Array3<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    Array3::from_shape_fn((t, hkv, d), |_| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    })
}

/// What storing `x` in `dtype` and reading it back must give (round to nearest).
fn round(dtype: KvDtype, x: f32) -> f32 {
    match dtype {
        KvDtype::F32 => x,
        KvDtype::BF16 => bf16::from_f32(x).to_f32(),
        KvDtype::F16 => f16::from_f32(x).to_f32(),
        KvDtype::Q8 => unreachable!("the strategy draws float formats only"),
    }
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)]
}

fn kind() -> impl Strategy<Value = LayerKind> {
    prop_oneof![
        Just(LayerKind::Global),
        (1usize..13).prop_map(|chunk| LayerKind::chunked(chunk).unwrap())
    ]
}

fn spec() -> impl Strategy<Value = CacheSpec> {
    // Short pages (or the automatic length) so that appends cross page boundaries.
    (
        1usize..4,
        1usize..6,
        dtype(),
        prop_oneof![Just(0usize), 1usize..=9],
    )
        .prop_map(|(h, d, t, page)| CacheSpec::new(h, d, t).with_page_len(page))
}

/// Appends `k`/`v` (`[T, Hkv, D]`) to every layer, each split where its chunks require.
fn append_all(c: &mut KvCache, k: ArrayView3<f32>, v: ArrayView3<f32>) {
    let t = k.dim().0;
    for layer in 0..c.num_layers() {
        for piece in c.segments(layer, t).unwrap() {
            c.append(
                layer,
                k.slice(s![piece.clone(), .., ..]),
                v.slice(s![piece, .., ..]),
            )
            .unwrap();
        }
    }
}

/// Everything a reader can observe of each layer: first position, and contents as f32.
fn observe(c: &KvCache) -> Vec<(usize, Array3<f32>, Array3<f32>)> {
    (0..c.num_layers())
        .map(|i| {
            let l = c.layer(i).unwrap();
            assert!(l.view().k.is_consistent() && l.view().v.is_consistent());
            (l.first_pos(), l.keys_f32(), l.values_f32())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random-size pieces (each split at chunk boundaries) give the same views as appending the
    /// whole sequence at once, and the memory the estimate predicts for `n` tokens.
    #[test]
    fn pieces_equal_at_once(
        kinds in prop::collection::vec(kind(), 1..5),
        spec in spec(),
        n in 0usize..70,
        sizes in prop::collection::vec(1usize..16, 1..40),
        seed in any::<u64>(),
    ) {
        let k = random_tokens(n, spec.kv_heads, spec.head_dim, seed);
        let v = random_tokens(n, spec.kv_heads, spec.head_dim, !seed);
        let mut whole = KvCache::new(&kinds, spec).unwrap();
        append_all(&mut whole, k.view(), v.view());

        let mut pieces = KvCache::new(&kinds, spec).unwrap();
        let mut at = 0;
        for size in sizes.iter().copied().cycle() {
            if at == n { break; }
            let end = (at + size).min(n);
            append_all(&mut pieces, k.slice(s![at..end, .., ..]), v.slice(s![at..end, .., ..]));
            at = end;
        }
        prop_assert_eq!(whole.len(), n);
        prop_assert_eq!(pieces.len(), n);
        prop_assert_eq!(observe(&whole), observe(&pieces));
        let est = spec.estimate(&kinds, n).unwrap();
        prop_assert_eq!(whole.memory_bytes(), est);
        prop_assert_eq!(pieces.memory_bytes(), est);
    }

    /// After every append, a chunked layer holds at most C positions, exactly the ones the chunk
    /// mask lets the last query see, with the values appended at those positions.
    #[test]
    fn chunked_layer_holds_exactly_the_mask_keys(
        chunk in 1usize..13,
        spec in spec(),
        sizes in prop::collection::vec(1usize..20, 1..30),
        seed in any::<u64>(),
    ) {
        let kind = LayerKind::chunked(chunk).unwrap();
        let n: usize = sizes.iter().sum();
        let k = random_tokens(n, spec.kv_heads, spec.head_dim, seed);
        let mut c = KvCache::new(&[kind], spec).unwrap();
        let mut at = 0;
        for size in sizes {
            let block = k.slice(s![at..at + size, .., ..]);
            for piece in c.segments(0, size).unwrap() {
                c.append(0, block.slice(s![piece.clone(), .., ..]), block.slice(s![piece, .., ..]))
                    .unwrap();
                let l = c.layer(0).unwrap();
                let p = l.next_pos() - 1;
                prop_assert!(l.held() <= chunk && l.capacity() < chunk + l.page_len());
                // The mask, written out: keys j ≤ p with j / C == p / C.
                let allowed: Vec<usize> = (0..=p).filter(|&j| j / chunk == p / chunk).collect();
                let held: Vec<usize> = (l.first_pos()..l.next_pos()).collect();
                prop_assert_eq!(&held, &allowed);
                let view = l.view().k;
                prop_assert_eq!((view.first_pos, view.len), (allowed[0], allowed.len()));
                let want = k
                    .slice(s![allowed[0]..=p, .., ..])
                    .permuted_axes([1, 0, 2])
                    .mapv(|x| round(spec.dtype, x));
                prop_assert_eq!(l.keys_f32(), want);
            }
            at += size;
        }
    }

    /// Values read back from bf16 / f16 storage are within half an ulp of the f32 appended:
    /// relative error ≤ 2⁻⁸ for bf16 (8 significant bits), ≤ 2⁻¹¹ for f16 (11 bits) in f16's
    /// normal range; f32 storage is exact.
    #[test]
    fn half_precision_round_trip(
        vals in prop::collection::vec(
            prop_oneof![6.2e-5f32..6.5e4, -6.5e4f32..-6.2e-5],
            1..64
        ),
        dt in dtype(),
    ) {
        let n = vals.len();
        let x = Array3::from_shape_vec((n, 1, 1), vals).unwrap();
        let mut c = KvCache::new(&[LayerKind::Global], CacheSpec::new(1, 1, dt)).unwrap();
        c.append(0, x.view(), x.view()).unwrap();
        let back = c.layer(0).unwrap().values_f32();
        let tol = match dt {
            DType::F32 => 0.0,
            DType::BF16 => 2f32.powi(-8),
            DType::F16 => 2f32.powi(-11),
        };
        for (a, b) in x.iter().zip(back.iter()) {
            prop_assert!((a - b).abs() <= tol * a.abs(), "{dt}: {a} read back as {b}");
        }
    }

    /// Truncating to `m` then appending `b` equals appending `a[..m] ++ b` to a fresh cache; when
    /// a chunked layer already dropped position `m`'s chunk, truncate refuses with `Evicted` and
    /// changes nothing.
    #[test]
    fn truncate_then_append_equals_the_shorter_sequence(
        kinds in prop::collection::vec(kind(), 1..5),
        spec in spec(),
        n in 0usize..50,
        m_frac in 0.0f64..=1.0,
        extra in 1usize..20,
        seed in any::<u64>(),
    ) {
        let m = ((n as f64 * m_frac) as usize).min(n);
        let (h, d) = (spec.kv_heads, spec.head_dim);
        let a = random_tokens(n, h, d, seed);
        let b = random_tokens(extra, h, d, seed ^ 0x5555);
        let mut c = KvCache::new(&kinds, spec).unwrap();
        append_all(&mut c, a.view(), a.mapv(|x| x * 0.5).view());

        // A chunked layer holds [C·floor((n−1)/C), n) after n tokens; m before that start and
        // not on a chunk boundary cannot be reached.
        let expected_err = kinds.iter().find_map(|k| match k.chunk() {
            Some(chunk) => {
                let first = if n == 0 { 0 } else { (n - 1) / chunk * chunk };
                (m < first && m % chunk != 0).then_some(KvError::Evicted {
                    requested: m, first_held: first, chunk,
                })
            }
            None => None,
        });
        let before = observe(&c);
        match expected_err {
            Some(e) => {
                prop_assert_eq!(c.truncate(m), Err(e));
                prop_assert_eq!(observe(&c), before);
                prop_assert_eq!(c.len(), n);
            }
            None => {
                c.truncate(m).unwrap();
                prop_assert_eq!(c.len(), m);
                append_all(&mut c, b.view(), b.mapv(|x| x * 0.5).view());

                let mut fresh = KvCache::new(&kinds, spec).unwrap();
                let head = a.slice(s![..m, .., ..]);
                append_all(&mut fresh, head, head.mapv(|x| x * 0.5).view());
                append_all(&mut fresh, b.view(), b.mapv(|x| x * 0.5).view());
                prop_assert_eq!(c.len(), m + extra);
                prop_assert_eq!(observe(&c), observe(&fresh));
            }
        }
        prop_assert_eq!(c.truncate(n + extra + 1).is_err(), true);
    }

    /// `reserve(n)` then filling `n` tokens allocates nothing more and holds the estimate,
    /// which is within one page per layer of the positions held.
    #[test]
    fn reserve_then_fill_is_the_estimate(
        kinds in prop::collection::vec(kind(), 1..5),
        spec in spec(),
        n in 0usize..300,
        seed in any::<u64>(),
    ) {
        let k = random_tokens(n, spec.kv_heads, spec.head_dim, seed);
        let mut c = KvCache::new(&kinds, spec).unwrap();
        c.reserve(n).unwrap();
        let reserved = c.memory_bytes();
        append_all(&mut c, k.view(), k.view());
        let est = spec.estimate(&kinds, n).unwrap();
        prop_assert_eq!(c.memory_bytes(), est);
        prop_assert_eq!(reserved, est);
        let per_pos = spec.layer_bytes(1).unwrap();
        for (i, &kind) in kinds.iter().enumerate() {
            let l = c.layer(i).unwrap();
            let held = kind.max_held(n) as u64;
            prop_assert!(l.memory_bytes() >= held * per_pos);
            prop_assert!(l.memory_bytes() < (held + l.page_len() as u64) * per_pos);
        }
    }
}
