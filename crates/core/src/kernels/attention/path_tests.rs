//! Each AVX-512 item kernel, forced whatever the row count, against the naive formula: the
//! rows-in-lanes kernel on partial lane blocks (few rows), on causal and chunked masks cutting
//! through tiles and row blocks, on GQA groups, every K/V dtype and head dims 16, 64, 128
//! and odd ones; the key-blocked kernel on prefill-sized calls it no longer gets by default.
//! q8 against the naive formula over its dequantised values (a decode step of q8 scores in
//! integers, so calls of one token check the rows kernel only).

use crate::{KvData, KvView, LayerKind};
use half::{bf16, f16};
use ndarray::Array3;
use proptest::prelude::*;

use super::{attention_naive, attention_path, AttnContext, Path};
use crate::kernels::{available_isas, Isa};

#[derive(Clone, Copy, Debug)]
enum Dt {
    F32,
    BF16,
    F16,
    Q8,
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
    mask: LayerKind,
    dt: Dt,
    q: Vec<f32>,
    kv: Vec<f32>,
}

/// Prefill-shaped calls: a run of consecutive positions ending at (or near) the last cached
/// key, or (a third of the time) arbitrary positions around the cached range.
fn case(max_len: usize, max_t: usize) -> impl Strategy<Value = Case> {
    (
        1..=max_t,
        1usize..=2,
        1usize..=5,
        prop_oneof![
            Just(16usize),
            Just(64),
            Just(128),
            (0usize..20).prop_map(|h| 2 * h + 1),
            Just(67)
        ],
        0..=max_len,
        0usize..=2,
        0usize..=40,
        prop_oneof![
            Just(LayerKind::Global),
            (1usize..=24).prop_map(|c| LayerKind::chunked(c).unwrap()),
            (60usize..=200).prop_map(|c| LayerKind::chunked(c).unwrap())
        ],
        prop_oneof![Just(Dt::F32), Just(Dt::BF16), Just(Dt::F16), Just(Dt::Q8)],
        0usize..3,
    )
        .prop_flat_map(move |(t, hkv, rep, d, len, pad, first_pos, mask, dt, kind)| {
            let nq = t * hkv * rep * d;
            let nkv = 2 * hkv * (len + pad) * d;
            let end = first_pos + len;
            let positions = if kind == 0 {
                proptest::collection::vec(first_pos.saturating_sub(3)..=end + 3, t).boxed()
            } else {
                // The last token at the last slot, or a few past it (keys not cached yet).
                (0usize..=2)
                    .prop_map(move |extra| {
                        let last = (end + extra).max(t) - 1;
                        (last + 1 - t..=last).collect::<Vec<_>>()
                    })
                    .boxed()
            };
            (
                positions,
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
                    q,
                    kv,
                })
        })
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    if !available_isas().contains(&Isa::Avx512) {
        return Ok(());
    }
    let hq = c.hkv * c.rep;
    let q = Array3::from_shape_vec((c.t, hq, c.d), c.q.clone()).unwrap();
    let stride = (c.len + c.pad) * c.d;
    let (kf, vf) = c.kv.split_at(c.kv.len() / 2);
    let kb: Vec<bf16> = kf.iter().map(|&x| bf16::from_f32(x)).collect();
    let vb: Vec<bf16> = vf.iter().map(|&x| bf16::from_f32(x)).collect();
    let kh: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
    let vh: Vec<f16> = vf.iter().map(|&x| f16::from_f32(x)).collect();
    let quant = |x: &[f32]| {
        let mut q = vec![0i8; x.len()];
        let s: Vec<f32> = if c.d == 0 {
            Vec::new()
        } else {
            x.chunks_exact(c.d)
                .zip(q.chunks_exact_mut(c.d))
                .map(|(x, q)| crate::quantize_q8(x, q))
                .collect()
        };
        (q, s)
    };
    let ((kq, ks), (vq, vs)) = (quant(kf), quant(vf));
    let (kd, vd) = match c.dt {
        Dt::F32 => (KvData::F32(kf), KvData::F32(vf)),
        Dt::BF16 => (KvData::BF16(&kb), KvData::BF16(&vb)),
        Dt::F16 => (KvData::F16(&kh), KvData::F16(&vh)),
        Dt::Q8 => (
            KvData::Q8 { q: &kq, scales: &ks },
            KvData::Q8 { q: &vq, scales: &vs },
        ),
    };
    let k = KvView::contiguous(kd, c.hkv, c.len, c.d, stride, c.first_pos);
    let v = KvView::contiguous(vd, k.heads, k.len, k.head_dim, stride, k.first_pos);
    let ctx = AttnContext {
        positions: &c.positions,
        mask: &c.mask,
        scale: 1.0 / (c.d.max(1) as f32).sqrt(),
    };
    let want = attention_naive(q.view(), &k, &v, &ctx).unwrap();
    let scale = want.iter().fold(0f32, |m, &x| m.max(x.abs())).max(1e-3);
    let paths: &[Path] = match c.dt {
        Dt::Q8 if c.t == 1 => &[Path::Rows],
        _ => &[Path::Rows, Path::Keys, Path::Auto],
    };
    // Where the bf16 kernel runs, its roundings (see `rows_bf16`) bound the error instead.
    let bf16_kernel = super::rows_bf16::available();
    let tol = |path: Path| match (path, c.dt) {
        (Path::RowsBf16, _) | (Path::Rows | Path::Auto, Dt::Q8) if bf16_kernel => 2e-2 * scale + 1e-4,
        _ => 2e-5 * scale + 1e-6,
    };
    for &path in paths.iter().chain(&[Path::RowsBf16]) {
        let got = attention_path(Isa::Avx512, path, q.view(), &k, &v, &ctx).unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (&a, &b)| m.max((a - b).abs()));
        if std::env::var_os("PATH_TESTS_PRINT").is_some() {
            eprintln!(
                "{path:?} {:?} d {} len {} diff/scale {:e}",
                c.dt,
                c.d,
                c.len,
                diff / scale
            );
        }
        prop_assert!(diff <= tol(path), "{path:?}: max diff {diff:e} (scale {scale})");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn avx512_paths_equal_naive(c in case(200, 40)) {
        check(&c)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Many tiles per row block: unmasked middle tiles between masked edges.
    #[test]
    fn avx512_paths_equal_naive_long(c in case(2000, 24)) {
        check(&c)?;
    }
}
