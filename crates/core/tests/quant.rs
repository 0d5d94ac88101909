//! Quantised weights: the stored encoding, error bounds of quantisation, and the kernels
//! against `quant::linear_reference`.

use llama4_core::quant::{self, linear_reference, quantize};
use llama4_core::{kernels, DType, Error, Layout, QuantFormat, QuantSpec, ScaleType, Weight};
use ndarray::Array2;

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect()
}

#[test]
fn dequantised_values_are_within_half_a_step() {
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        for scales in [ScaleType::F32, ScaleType::F16] {
            let spec = QuantSpec::new(format, 32).with_scales(scales);
            let w = values(4 * 64, 7);
            let q = quantize(&w, 64, spec).unwrap();
            assert_eq!(q.spec(), spec);
            let back = q.to_f32_vec();
            for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
                let s = q.scales().get(i / 32);
                assert!(
                    (a - b).abs() <= s * 0.5 + 1e-7,
                    "{format:?} {scales:?} element {i}: {a} vs {b}, step {s}"
                );
                assert!(q.q(i).abs() <= format.qmax());
            }
        }
    }
}

#[test]
fn q4_packs_two_values_per_byte_low_nibble_first() {
    let mut w = vec![0f32; 32];
    w[0] = -7.0;
    w[1] = 7.0;
    w[2] = 1.0;
    let q = quantize(&w, 32, QuantSpec::new(QuantFormat::Q4, 32)).unwrap();
    assert_eq!(q.values().len(), 16);
    assert_eq!(q.scales().get(0), 1.0);
    assert_eq!(q.values()[0], 1 | (15 << 4));
    assert_eq!(q.values()[1], 9 | (8 << 4));
}

#[test]
fn kernel_matches_reference() {
    let (k, n) = (128, 40);
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        let w = Weight::from_out_in(
            Array2::from_shape_vec((n, k), values(n * k, 3)).unwrap().view(),
            DType::F32,
        );
        let wq = w.quantized(QuantSpec::new(format, 64)).unwrap();
        assert_eq!(wq.layout(), Layout::OutIn);
        let quant = match wq.data() {
            llama4_core::WeightData::Quant(q) => q,
            _ => unreachable!(),
        };
        for t in [1, 2, 5, 17] {
            let x = Array2::from_shape_vec((t, k), values(t * k, 11)).unwrap();
            let y = kernels::linear(x.view(), &wq).unwrap();
            let mut want = vec![0f32; t * n];
            linear_reference(x.as_slice().unwrap(), t, k, n, quant, &mut want);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{format:?} t={t}: {a} vs {b}"
                );
            }
            // And close to the float product (the quantisation error, not a kernel error).
            let exact = kernels::linear(x.view(), &w).unwrap();
            let err = (&y - &exact).iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = if format == QuantFormat::Q8 { 0.02 } else { 0.2 };
            assert!(err <= bound * scale, "{format:?}: error {err} vs max {scale}");
        }
    }
}

#[test]
fn bad_specs_and_values_are_errors() {
    let w = values(64, 1);
    let bad = |r: llama4_core::Result<quant::QuantData>| assert!(matches!(r, Err(Error::Quant(_))), "{r:?}");
    bad(quantize(&w, 64, QuantSpec::new(QuantFormat::Q8, 48)));
    bad(quantize(&w, 64, QuantSpec::new(QuantFormat::Q8, 0)));
    bad(quantize(&w, 32, QuantSpec::new(QuantFormat::Q8, 64)));
    let mut nan = w.clone();
    nan[5] = f32::NAN;
    bad(quantize(&nan, 64, QuantSpec::new(QuantFormat::Q4, 32)));
}
