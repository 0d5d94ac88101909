//! Property tests: the tiled online-softmax kernel against the naive formula, on every path.

use half::{bf16, f16};
use llama4_core::kernels::attention::{attention_naive, attention_with, AttnContext};
use llama4_core::kernels::{available_isas, Isa};
use llama4_core::{quantize_q8, KvData, KvPageTable, KvStore, KvView, LayerKind};
use ndarray::Array3;
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Dt {
    F32,
    BF16,
    F16,
    Q8,
}

/// Rows of `d` elements quantised to q8: elements and one scale per row.
fn q8_rows(x: &[f32], d: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let s = x
        .chunks_exact(d)
        .zip(q.chunks_exact_mut(d))
        .map(|(x, q)| quantize_q8(x, q))
        .collect();
    (q, s)
}

/// Pages owned by a test, in one dtype.
enum Page {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    Q8(Vec<i8>, Vec<f32>),
}

struct Table(Vec<Page>);

impl KvPageTable for Table {
    fn pages(&self) -> usize {
        self.0.len()
    }

    fn page(&self, i: usize) -> KvData<'_> {
        match &self.0[i] {
            Page::F32(x) => KvData::F32(x),
            Page::BF16(x) => KvData::BF16(x),
            Page::F16(x) => KvData::F16(x),
            Page::Q8(q, scales) => KvData::Q8 { q, scales },
        }
    }
}

/// Slots of `heads` heads (`stride` elements apart, `row` elements per slot) cut into pages of
/// `page` slots, each `[heads, page, row]`; slots past `len` are zero.
fn split<T: Copy + Default>(
    x: &[T],
    heads: usize,
    len: usize,
    row: usize,
    stride: usize,
    page: usize,
) -> Vec<Vec<T>> {
    (0..len.div_ceil(page))
        .map(|p| {
            let mut out = vec![T::default(); heads * page * row];
            for h in 0..heads {
                for j in 0..page.min(len - p * page) {
                    let src = h * stride + (p * page + j) * row;
                    out[(h * page + j) * row..][..row].copy_from_slice(&x[src..src + row]);
                }
            }
            out
        })
        .collect()
}

/// The view's slots copied into pages of `page` slots.
fn paginate(view: &KvView, page: usize) -> Table {
    let Some((data, stride)) = view.segment(0) else {
        return Table(Vec::new());
    };
    let (h, n, d) = (view.heads, view.len, view.head_dim);
    Table(match data {
        KvData::F32(x) => split(x, h, n, d, stride, page)
            .into_iter()
            .map(Page::F32)
            .collect(),
        KvData::BF16(x) => split(x, h, n, d, stride, page)
            .into_iter()
            .map(Page::BF16)
            .collect(),
        KvData::F16(x) => split(x, h, n, d, stride, page)
            .into_iter()
            .map(Page::F16)
            .collect(),
        KvData::Q8 { q, scales } => split(q, h, n, d, stride, page)
            .into_iter()
            .zip(split(scales, h, n, 1, stride / d, page))
            .map(|(q, s)| Page::Q8(q, s))
            .collect(),
    })
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
    scale: f32,
    q: Vec<f32>,
    kv: Vec<f32>,
    /// Slots per page for a second, paged run of the same keys (0: none).
    page: usize,
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
        prop_oneof![
            Just(LayerKind::Global),
            (1usize..=24).prop_map(|c| LayerKind::chunked(c).unwrap())
        ],
        prop_oneof![Just(Dt::F32), Just(Dt::BF16), Just(Dt::F16), Just(Dt::Q8)],
        0.05f32..2.0,
        prop_oneof![Just(0usize), 1usize..=40, Just(64usize), 65usize..=700],
    )
        .prop_flat_map(
            move |(t, hkv, rep, d, len, pad, first_pos, mask, dt, scale, page)| {
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
                        page,
                    })
            },
        )
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
    let ((kq, ks), (vq, vs)) = (q8_rows(kf, c.d), q8_rows(vf, c.d));
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
        scale: c.scale,
    };
    // A decode step against int8 keys at a head dim of 8, 16 or 32 rounds the scaled query
    // to int8 as well (on the paths that run the decode kernel, all of them for q8): the
    // reference takes the same rounded query.
    let mut q_ref = q.clone();
    if matches!(c.dt, Dt::Q8) && c.t == 1 && matches!(c.d, 8 | 16 | 32) {
        for mut row in q_ref.rows_mut() {
            let scaled: Vec<f32> = row.iter().map(|&x| x * c.scale).collect();
            let mut v = vec![0i8; c.d];
            let s = quantize_q8(&scaled, &mut v);
            for (x, &v) in row.iter_mut().zip(&v) {
                *x = v as f32 * s / c.scale;
            }
        }
    }
    let want = attention_naive(q_ref.view(), &k, &v, &ctx).unwrap();
    let scale = want.iter().fold(0f32, |m, &x| m.max(x.abs())).max(1e-3);
    // A q8 call whose items hold 16 rows or more (prefill; here every item of such a call)
    // runs the bf16-dot kernel on AVX-512 CPUs with BF16. Its reference rounds as the kernel
    // does: the queries times the scale and log2 e (as the kernel holds them), and the
    // dequantised keys and values, to bf16. What is left is the kernel's rounding of the
    // probabilities to bf16 (2^-9 relative) and its short exponential.
    let bf16_dots =
        |isa: Isa| matches!(c.dt, Dt::Q8) && c.t * c.rep >= 16 && isa == Isa::Avx512 && has_avx512_bf16();
    let round = |x: f32| bf16::from_f32(x).to_f32();
    let qs = c.scale * std::f32::consts::LOG2_E;
    let q_bf = q.mapv(|x| round(x * qs) / qs);
    let dequant = |q: &[i8], s: &[f32]| -> Vec<f32> {
        q.iter()
            .enumerate()
            .map(|(i, &x)| round(x as f32 * s[i / c.d]))
            .collect()
    };
    let (kr, vr) = (dequant(&kq, &ks), dequant(&vq, &vs));
    let want_bf = {
        let k = KvView::contiguous(KvData::F32(&kr), c.hkv, c.len, c.d, stride, c.first_pos);
        let v = KvView::contiguous(KvData::F32(&vr), k.heads, k.len, k.head_dim, stride, k.first_pos);
        attention_naive(q_bf.view(), &k, &v, &ctx).unwrap()
    };
    let v_max = vr.iter().fold(0f32, |m, &x| m.max(x.abs()));
    // Every path on views `k`, `v` against the contiguous reference.
    let every_isa = |k: &KvView, v: &KvView, what: &str| -> Result<(), TestCaseError> {
        for isa in available_isas() {
            let got = attention_with(isa, q.view(), k, v, &ctx).unwrap();
            let (want, tol) = if bf16_dots(isa) {
                (&want_bf, 4e-3 * v_max + 1e-5)
            } else {
                (&want, 2e-5 * scale + 1e-6)
            };
            let diff = got
                .iter()
                .zip(want)
                .fold(0f32, |m, (&a, &b)| m.max((a - b).abs()));
            prop_assert!(diff <= tol, "{isa:?}, {what}: max diff {diff:e} (scale {scale})");
        }
        Ok(())
    };
    every_isa(&k, &v, "contiguous")?;
    if c.page > 0 {
        // The same slots in pages: the reference reads them alike, the kernel folds the
        // pieces an item covers, and both agree with the contiguous reference.
        let (kt, vt) = (paginate(&k, c.page), paginate(&v, c.page));
        let paged = |view: &KvView, table| KvView {
            store: KvStore::Paged {
                table,
                page_len: c.page,
            },
            ..*view
        };
        let (kp, vp) = (
            paged(&k, &kt as &dyn KvPageTable),
            paged(&v, &vt as &dyn KvPageTable),
        );
        prop_assert!(kp.is_consistent() && vp.is_consistent());
        prop_assert_eq!(&attention_naive(q_ref.view(), &kp, &vp, &ctx).unwrap(), &want);
        every_isa(&kp, &vp, &format!("pages of {}", c.page))?;
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
