//! The block decode kernel of the AVX2 and portable paths ([`super::body`]'s `decode`) against
//! the naive formula, at its edges: every head dim it takes, group sizes 1 to 8, every cache
//! dtype, key counts that are not multiples of the block (and fewer keys than a block), masks
//! whose visible range starts or ends inside a block (chunked layers, a query before the last
//! cached key), padded head strides, and views long enough that the keys are split between
//! threads and merged.

use half::{bf16, f16};
use ndarray::Array3;

use super::body::{takes_decode, BLOCK};
use super::{attention_naive, attention_path, AttnContext, Path};
use crate::kernels::simd::{self, Simd};
use crate::kernels::{available_isas, Isa};
use crate::{quantize_q8, KvData, KvView, LayerKind};
use llama4_testkit::values;

/// One decode call: a query at `pos` over `len` cached keys from `first_pos`.
#[derive(Debug, Clone, Copy)]
struct Case {
    hkv: usize,
    g: usize,
    d: usize,
    len: usize,
    first_pos: usize,
    pos: usize,
    mask: LayerKind,
    dtype: u8,
    scale: f32,
}

/// Max |got − naive| of `c` on every AVX2/portable path, and the naive output's largest
/// magnitude.
fn diff(c: &Case, seed: u64) -> (f32, f32) {
    let hq = c.hkv * c.g;
    let q = Array3::from_shape_vec((1, hq, c.d), values(hq * c.d, seed)).unwrap();
    // Two spare slots per head: the kernel must stop at `len`.
    let stride = (c.len + 2) * c.d;
    let kf = values(c.hkv * stride, seed + 1);
    let vf = values(c.hkv * stride, seed + 2);
    let kb: Vec<bf16> = kf.iter().map(|&x| bf16::from_f32(x)).collect();
    let vb: Vec<bf16> = vf.iter().map(|&x| bf16::from_f32(x)).collect();
    let kh: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
    let vh: Vec<f16> = vf.iter().map(|&x| f16::from_f32(x)).collect();
    let quant = |x: &[f32]| {
        let mut q = vec![0i8; x.len()];
        let s: Vec<f32> = x
            .chunks_exact(c.d)
            .zip(q.chunks_exact_mut(c.d))
            .map(|(x, q)| quantize_q8(x, q))
            .collect();
        (q, s)
    };
    let ((kq, ks), (vq, vs)) = (quant(&kf), quant(&vf));
    let (kd, vd) = match c.dtype {
        0 => (KvData::F32(&kf), KvData::F32(&vf)),
        1 => (KvData::BF16(&kb), KvData::BF16(&vb)),
        2 => (KvData::F16(&kh), KvData::F16(&vh)),
        _ => (
            KvData::Q8 { q: &kq, scales: &ks },
            KvData::Q8 { q: &vq, scales: &vs },
        ),
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
    let positions = [c.pos];
    let ctx = AttnContext {
        positions: &positions,
        mask: &c.mask,
        scale: c.scale,
    };
    let want = attention_naive(q.view(), &k, &v, &ctx).unwrap();
    let top = want.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let mut worst = 0f32;
    for isa in available_isas() {
        if isa == Isa::Avx512 {
            continue;
        }
        let got = attention_path(isa, Path::Auto, q.view(), &k, &v, &ctx).unwrap();
        let e = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (&a, &b)| m.max((a - b).abs()));
        // NaN compares false with everything: make it the worst.
        worst = if e.is_nan() { f32::INFINITY } else { worst.max(e) };
    }
    (worst, top)
}

#[test]
fn decode_kernel_takes_short_head_dims_of_one_token() {
    for d in [8, 16, 24, 32] {
        assert!(takes_decode::<simd::Portable>(1, d), "d {d}");
        assert!(!takes_decode::<simd::Portable>(2, d), "d {d}, 2 tokens");
    }
    for d in [1, 4, 12, 17, 40, 64, 128] {
        assert!(!takes_decode::<simd::Portable>(1, d), "d {d}");
    }
    assert_eq!(<simd::Portable as Simd>::LANES, BLOCK);
    #[cfg(target_arch = "x86_64")]
    assert!(takes_decode::<simd::Avx2>(1, 16));
}

#[test]
fn decode_kernel_equals_naive_at_its_edges() {
    // Key counts around the block (8) and the split tile (64), and long enough to split
    // between threads (pieces of >= 1024 keys).
    let lens = [1, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 203, 2600 + 5];
    let mut seed = 0;
    let mut cases = 0;
    for d in [8, 16, 24, 32] {
        for g in [1, 2, 3, 4, 8] {
            for dtype in 0..4u8 {
                for (i, &len) in lens.iter().enumerate() {
                    // Cycle the other dimensions through the cases.
                    let hkv = 1 + (i + g) % 2;
                    let first_pos = [0, 5, 11][(i + dtype as usize) % 3];
                    let last = first_pos + len - 1;
                    let mut shapes = vec![
                        // The query at the last cached key: every key visible.
                        (LayerKind::Global, last),
                        // A query before the end: the range ends inside a block.
                        (LayerKind::Global, first_pos + len / 2),
                    ];
                    // Chunks whose start cuts a block at various offsets.
                    for chunk in [3, 13, 100] {
                        shapes.push((LayerKind::chunked(chunk).unwrap(), last));
                    }
                    for (mask, pos) in shapes {
                        seed += 7;
                        let c = Case {
                            hkv,
                            g,
                            d,
                            len,
                            first_pos,
                            pos,
                            mask,
                            dtype,
                            scale: if seed % 2 == 0 {
                                1.0 / (d as f32).sqrt()
                            } else {
                                1.5
                            },
                        };
                        let (e, top) = diff(&c, seed);
                        assert!(
                            e <= 2e-5 * top.max(1e-3) + 1e-6,
                            "{c:?}: max diff {e:e} (top {top})"
                        );
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 4 * 5 * 4 * 13 * 5);
}

/// Scores far apart: the running maximum moves by much (rescales of the accumulators), a
/// block's lanes underflow to probability 0, and the last key of a tail block dominates.
#[test]
fn decode_kernel_survives_large_score_ranges() {
    for dtype in 0..4u8 {
        for len in [9, 40, 1500] {
            let c = Case {
                hkv: 2,
                g: 2,
                d: 16,
                len,
                first_pos: 0,
                pos: len - 1,
                mask: LayerKind::Global,
                dtype,
                scale: 40.0,
            };
            let (e, top) = diff(&c, 1000 + len as u64);
            assert!(
                e <= 2e-5 * top.max(1e-3) + 1e-6,
                "{c:?}: max diff {e:e} (top {top})"
            );
        }
    }
}
