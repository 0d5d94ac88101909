//! The block decode kernel of the AVX2 and portable paths ([`super::body`]'s `decode`) against
//! the naive formula, at its edges: every head dim it takes, group sizes 1 to 8, every cache
//! dtype, key counts that are not multiples of the block (and fewer keys than a block), masks
//! whose visible range starts or ends inside a block (chunked layers, a query before the last
//! cached key), padded head strides, and views long enough that the keys are split between
//! threads and merged.

use half::{bf16, f16};
use ndarray::Array3;

use super::body::{exp_nonpos, takes_decode, BLOCK};
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
    let k = KvView::contiguous(kd, c.hkv, c.len, c.d, stride, c.first_pos);
    let v = KvView::contiguous(vd, k.heads, k.len, k.head_dim, stride, k.first_pos);
    let positions = [c.pos];
    let ctx = AttnContext {
        positions: &positions,
        mask: &c.mask,
        scale: c.scale,
    };
    // Against int8 keys the kernel rounds the scaled query to int8 as well (when the head dim
    // divides 32): the reference takes the same rounded query, so that what remains is the
    // order of the float operations.
    let q_ref = if c.dtype == 3 && 32 % c.d == 0 {
        let mut r = q.clone();
        for mut row in r.rows_mut() {
            let scaled: Vec<f32> = row.iter().map(|&x| x * c.scale).collect();
            let mut v = vec![0i8; c.d];
            let s = quantize_q8(&scaled, &mut v);
            for (x, &v) in row.iter_mut().zip(&v) {
                *x = v as f32 * s / c.scale;
            }
        }
        r
    } else {
        q.clone()
    };
    let want = attention_naive(q_ref.view(), &k, &v, &ctx).unwrap();
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

/// The decode kernel's exp on its domain, `x <= 0`: within 3e-7 relative of e^x in f64 down to
/// -87, exactly 0 below it and at -inf, on every vocabulary the kernel runs on.
#[test]
fn decode_exp_is_accurate_where_softmax_evaluates_it() {
    fn worst<S: Simd>() -> f64 {
        let mut worst = 0f64;
        let mut x = [0f32; simd::MAX_LANES];
        let mut y = [0f32; simd::MAX_LANES];
        // Every 1/4096 from -87 to 0, and the lane edges of the rounding to n.
        let xs: Vec<f32> = (0..=87 * 4096).map(|i| -(i as f32) / 4096.0).collect();
        for chunk in xs.chunks(S::LANES) {
            x[..chunk.len()].copy_from_slice(chunk);
            // SAFETY: the caller checked the CPU supports `S`; the buffers hold MAX_LANES.
            unsafe { S::store(y.as_mut_ptr(), exp_nonpos::<S>(S::load(x.as_ptr()))) };
            for (&a, &b) in chunk.iter().zip(&y) {
                let e = (a as f64).exp();
                worst = worst.max((b as f64 - e).abs() / e);
            }
        }
        for v in [f32::NEG_INFINITY, -87.5, -100.0, -1e30] {
            x.fill(v);
            // SAFETY: as above.
            unsafe { S::store(y.as_mut_ptr(), exp_nonpos::<S>(S::load(x.as_ptr()))) };
            assert_eq!(y[0], 0.0, "e^{v}");
        }
        worst
    }
    let portable = worst::<simd::Portable>();
    assert!(portable < 3e-7, "portable: {portable:e}");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2() -> f64 {
            worst::<simd::Avx2>()
        }
        // SAFETY: AVX2 and FMA were detected just above.
        let w = unsafe { avx2() };
        assert!(w < 3e-7, "avx2: {w:e}");
    }
}
