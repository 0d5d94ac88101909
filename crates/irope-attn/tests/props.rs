//! Property tests: the tiled online-softmax kernel against the naive formula, and RoPE
//! invariants.

use half::{bf16, f16};
use irope_attn::{
    attention_naive, attention_with, supported_isas, AttnContext, MaskKind, Rope, RopeConfig, RopeScaling,
};
use llama4_core::{KvData, KvView};
use ndarray::Array3;
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Dt {
    F32,
    BF16,
    F16,
}

#[derive(Debug, Clone)]
struct Case {
    t: usize,
    hkv: usize,
    rep: usize,
    d: usize,
    len: usize,
    pad: usize,
    first_pos: usize,
    positions: Vec<usize>,
    mask: MaskKind,
    dt: Dt,
    scale: f32,
    q: Vec<f32>,
    kv: Vec<f32>,
}

fn case(max_len: usize, max_t: usize, reps: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Case> {
    (
        1..=max_t,
        1usize..=3,
        reps,
        // Small dims, and around 128 (Scout's) for the register-blocked value path.
        prop_oneof![1usize..=40, 120usize..=136],
        0..=max_len,
        0usize..=3,
        0usize..=40,
        prop_oneof![Just(MaskKind::Causal), (1usize..=24).prop_map(MaskKind::Chunked)],
        prop_oneof![Just(Dt::F32), Just(Dt::BF16), Just(Dt::F16)],
        0.05f32..2.0,
        any::<u64>(),
    )
        .prop_flat_map(move |(t, hkv, rep, d, len, pad, first_pos, mask, dt, scale, _)| {
            let nq = t * hkv * rep * d;
            let nkv = 2 * hkv * (len + pad) * d;
            // Queries mostly inside the cached range (some before it or past it: those see few
            // or no keys).
            let pos = proptest::collection::vec(first_pos.saturating_sub(3)..=first_pos + len + 3, t);
            (
                pos,
                proptest::collection::vec(-2f32..2.0, nq),
                proptest::collection::vec(-1f32..1.0, nkv),
            )
                .prop_map(move |(positions, q, kv)| Case {
                    t,
                    hkv,
                    rep,
                    d,
                    len,
                    pad,
                    first_pos,
                    positions,
                    mask,
                    dt,
                    scale,
                    q,
                    kv,
                })
        })
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let hq = c.hkv * c.rep;
    let q = Array3::from_shape_vec((c.t, hq, c.d), c.q.clone()).unwrap();
    let stride = (c.len + c.pad) * c.d;
    let (kf, vf) = c.kv.split_at(c.kv.len() / 2);
    let kb: Vec<bf16> = kf.iter().map(|&x| bf16::from_f32(x)).collect();
    let vb: Vec<bf16> = vf.iter().map(|&x| bf16::from_f32(x)).collect();
    let kh: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
    let vh: Vec<f16> = vf.iter().map(|&x| f16::from_f32(x)).collect();
    let (kd, vd) = match c.dt {
        Dt::F32 => (KvData::F32(kf), KvData::F32(vf)),
        Dt::BF16 => (KvData::BF16(&kb), KvData::BF16(&vb)),
        Dt::F16 => (KvData::F16(&kh), KvData::F16(&vh)),
    };
    let k = KvView {
        data: kd,
        heads: c.hkv,
        len: c.len,
        head_dim: c.d,
        head_stride: stride,
        first_pos: c.first_pos,
    };
    let v = KvView { data: vd, ..k };
    let ctx = AttnContext {
        positions: &c.positions,
        mask: c.mask,
        scale: c.scale,
    };
    let want = attention_naive(q.view(), &k, &v, &ctx).unwrap();
    let scale = want.iter().fold(0f32, |m, &x| m.max(x.abs())).max(1e-3);
    for isa in supported_isas() {
        let got = attention_with(isa, q.view(), &k, &v, &ctx).unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (&a, &b)| m.max((a - b).abs()));
        prop_assert!(
            diff <= 2e-5 * scale + 1e-6,
            "{isa:?}: max diff {diff:e} (scale {scale})"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tiled_equals_naive(c in case(200, 12, 1..=4)) {
        check(&c)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Long views: several tiles per query, and (decoding) keys split across threads.
    #[test]
    fn tiled_equals_naive_long(c in case(3000, 3, 1..=4)) {
        check(&c)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Groups of 5 to 8 query heads per kv head (Scout's 5, and more): the AVX-512 path blocks
    /// rows by 5, so these mix full and partial row blocks within and across tokens.
    #[test]
    fn tiled_equals_naive_large_groups(c in case(400, 5, 5..=8)) {
        check(&c)?;
    }
}

fn rope_config() -> impl Strategy<Value = RopeConfig> {
    let scaling = prop_oneof![
        Just(RopeScaling::Default),
        (1f32..32.0, 0.5f32..2.0, 0f32..4.0, 16usize..16384).prop_map(|(factor, low, extra, orig)| {
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                // low = high (Scout-Instruct) included.
                high_freq_factor: if extra < 1.0 { low } else { low + extra },
                original_max_position_embeddings: orig,
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
