//! The kernel's buffers: reused scratch gives bit-identical results; bad outputs are errors.

use half::{bf16, f16};
use ndarray::{Array3, ArrayViewMut3};

use super::*;
use crate::kernels::available_isas;
use crate::LayerKind;
use llama4_testkit::values;

#[test]
fn visible_slots_clip_to_view() {
    // A chunked cache restarted at 16: slot 0 is position 16.
    let m = LayerKind::chunked(8).unwrap();
    assert_eq!(visible_slots(&m, 19, 16, 4), (0, 4));
    assert_eq!(visible_slots(&m, 18, 16, 4), (0, 3));
    // A view holding positions 0..24 for a query at 19 sees slots 16..=19.
    assert_eq!(visible_slots(&m, 19, 0, 24), (16, 20));
    assert_eq!(visible_slots(&LayerKind::Global, 5, 10, 4), (0, 0));
}

/// One call's inputs: `t` tokens ending at the last of `len` cached keys (from position
/// `first_pos`), `hkv × rep` query heads of dim `d`.
struct Shape {
    t: usize,
    hkv: usize,
    rep: usize,
    d: usize,
    len: usize,
    first_pos: usize,
    mask: LayerKind,
    dtype: u8,
}

impl AttentionScratch {
    /// NaN (or nonsense) in every buffer: a call must not read what an earlier one left.
    fn poison(&mut self) {
        let junk = Item {
            g: usize::MAX,
            t0: 1,
            t1: 0,
            s0: 1,
            s1: 0,
            row0: usize::MAX,
        };
        self.base.fill(junk);
        self.items.fill(junk);
        for x in [
            &mut self.acc,
            &mut self.m,
            &mut self.l,
            &mut self.m_all,
            &mut self.l_all,
            &mut self.q,
        ] {
            x.fill(f32::NAN);
        }
        for w in &mut self.work {
            w.body.q.fill(f32::NAN);
            w.body.vis.fill((usize::MAX, 0));
            w.body.k.fill(f32::NAN);
            w.body.v.fill(f32::NAN);
            w.body.l.fill(f32::NAN);
            #[cfg(target_arch = "x86_64")]
            {
                w.keys.poison();
                w.rows.poison();
                w.rows_bf16.poison();
            }
        }
    }
}

/// `attention_path_into` on `scratch` (poisoned first), into an output filled with NaNs,
/// against `attention_path` (fresh buffers), bit for bit, on every path this CPU runs.
fn into_matches_fresh(sh: &Shape, seed: u64, scratch: &mut AttentionScratch) {
    let hq = sh.hkv * sh.rep;
    let q = Array3::from_shape_vec((sh.t, hq, sh.d), values(sh.t * hq * sh.d, seed)).unwrap();
    let stride = (sh.len + 3) * sh.d;
    let kf = values(sh.hkv * stride, seed + 1);
    let vf = values(sh.hkv * stride, seed + 2);
    let (kb, vb): (Vec<bf16>, Vec<bf16>) = (
        kf.iter().map(|&x| bf16::from_f32(x)).collect(),
        vf.iter().map(|&x| bf16::from_f32(x)).collect(),
    );
    let (kh, vh): (Vec<f16>, Vec<f16>) = (
        kf.iter().map(|&x| f16::from_f32(x)).collect(),
        vf.iter().map(|&x| f16::from_f32(x)).collect(),
    );
    let quant = |x: &[f32]| {
        let mut q = vec![0i8; x.len()];
        let s: Vec<f32> = x
            .chunks_exact(sh.d)
            .zip(q.chunks_exact_mut(sh.d))
            .map(|(x, q)| crate::quantize_q8(x, q))
            .collect();
        (q, s)
    };
    let ((kq, ks), (vq, vs)) = (quant(&kf), quant(&vf));
    let (kd, vd) = match sh.dtype {
        0 => (KvData::F32(&kf), KvData::F32(&vf)),
        1 => (KvData::BF16(&kb), KvData::BF16(&vb)),
        3 => (
            KvData::Q8 { q: &kq, scales: &ks },
            KvData::Q8 { q: &vq, scales: &vs },
        ),
        _ => (KvData::F16(&kh), KvData::F16(&vh)),
    };
    let k = KvView::contiguous(kd, sh.hkv, sh.len, sh.d, stride, sh.first_pos);
    let v = KvView::contiguous(vd, k.heads, k.len, k.head_dim, stride, k.first_pos);
    let last = sh.first_pos + sh.len - 1;
    let positions: Vec<usize> = (last + 1 - sh.t..=last).collect();
    let ctx = AttnContext {
        positions: &positions,
        mask: &sh.mask,
        scale: 1.0 / (sh.d as f32).sqrt(),
    };
    for isa in available_isas() {
        let paths: &[Path] = if isa == Isa::Avx512 {
            &[Path::Auto, Path::Keys, Path::Rows, Path::RowsBf16]
        } else {
            &[Path::Auto]
        };
        for &path in paths {
            let want = attention_path(isa, path, q.view(), &k, &v, &ctx).unwrap();
            let mut got = Array3::from_elem((sh.t, hq, sh.d), f32::NAN);
            scratch.poison();
            attention_path_into(isa, path, q.view(), &k, &v, &ctx, got.view_mut(), scratch).unwrap();
            let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{isa:?} {path:?}, t {} len {} d {}", sh.t, sh.len, sh.d);
        }
    }
}

#[test]
fn into_with_reused_scratch_is_bitwise_fresh() {
    let prefill = |t, d, mask, dtype| Shape {
        t,
        hkv: 2,
        rep: 4,
        d,
        len: t + 40,
        first_pos: 0,
        mask,
        dtype,
    };
    let decode = |t, hkv, rep, d, len, dtype| Shape {
        t,
        hkv,
        rep,
        d,
        len,
        first_pos: 7,
        mask: LayerKind::Global,
        dtype,
    };
    // Larger, then smaller, then larger again (other dims and dtypes), so that stale
    // contents of any reused buffer would show.
    let shapes = [
        prefill(150, 128, LayerKind::chunked(64).unwrap(), 1),
        decode(1, 4, 4, 64, 300, 0),
        // One kv head: keys split between threads.
        decode(3, 1, 5, 67, 3000, 2),
        prefill(20, 16, LayerKind::Global, 0),
        decode(4, 4, 4, 64, 300, 1),
        prefill(170, 67, LayerKind::Global, 2),
        decode(2, 2, 8, 128, 2500, 1),
        decode(1, 1, 5, 64, 5000, 3),
        prefill(90, 40, LayerKind::chunked(32).unwrap(), 3),
    ];
    let mut scratch = AttentionScratch::default();
    for (i, sh) in shapes.iter().enumerate() {
        into_matches_fresh(sh, 10 * i as u64, &mut scratch);
    }
}

#[test]
fn into_rejects_bad_outputs() {
    let (t, hq, d) = (2, 4, 8);
    let q = Array3::from_shape_vec((t, hq, d), values(t * hq * d, 1)).unwrap();
    let kv = values(2 * 5 * d, 2);
    let k = KvView::contiguous(KvData::F32(&kv), 2, 5, d, 5 * d, 0);
    let ctx = AttnContext {
        positions: &[3, 4],
        mask: &LayerKind::Global,
        scale: 1.0,
    };
    let mut scratch = AttentionScratch::default();
    let mut call = |out: ArrayViewMut3<f32>| attention_into(q.view(), &k, &k, &ctx, out, &mut scratch);
    let mut wrong = Array3::<f32>::zeros((t, hq, d + 1));
    assert!(matches!(call(wrong.view_mut()), Err(Error::Shape { .. })));
    let mut short = Array3::<f32>::zeros((t - 1, hq, d));
    assert!(matches!(call(short.view_mut()), Err(Error::Shape { .. })));
    // The right shape, but transposed (`[D, Hq, T]` memory) and strided.
    let mut transposed = Array3::<f32>::zeros((d, hq, t));
    let view = transposed.view_mut().reversed_axes();
    assert_eq!(view.dim(), (t, hq, d));
    assert!(matches!(call(view), Err(Error::Shape { .. })));
    let mut wide = Array3::<f32>::zeros((t, hq, 2 * d));
    let view = wide.slice_mut(ndarray::s![.., .., ..;2]);
    assert!(matches!(call(view), Err(Error::Shape { .. })));
    let mut good = Array3::<f32>::zeros((t, hq, d));
    call(good.view_mut()).unwrap();
    assert_eq!(good, attention(q.view(), &k, &k, &ctx).unwrap());
}

#[test]
fn into_takes_queries_in_any_layout() {
    let (t, hq, d) = (3, 4, 16);
    // `[D, Hq, T]` in memory, seen as `[T, Hq, D]`.
    let qt = Array3::from_shape_vec((d, hq, t), values(t * hq * d, 5)).unwrap();
    let q = qt.view().reversed_axes();
    let kv = values(2 * 9 * d, 6);
    let k = KvView::contiguous(KvData::F32(&kv), 2, 9, d, 9 * d, 0);
    let ctx = AttnContext {
        positions: &[6, 7, 8],
        mask: &LayerKind::Global,
        scale: 0.25,
    };
    let want = attention(q.as_standard_layout().view(), &k, &k, &ctx).unwrap();
    let mut scratch = AttentionScratch::default();
    let mut got = Array3::<f32>::zeros((t, hq, d));
    attention_into(q, &k, &k, &ctx, got.view_mut(), &mut scratch).unwrap();
    assert_eq!(got, want);
}

#[test]
fn scratch_is_send() {
    fn send<T: Send>(_: &T) {}
    send(&AttentionScratch::default());
}
