//! Quantised weights: the stored encoding, error bounds of quantisation, and the kernels
//! against `quant::linear_reference`.

use llama4_core::quant::{self, linear_reference, quantize};
use llama4_core::{kernels, DType, Error, Layout, QuantFormat, QuantSpec, ScaleType, Weight};
use ndarray::Array2;

use llama4_testkit::values;

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

/// Every kernel path this CPU has, with 1 to 3 tasks, on `x` (`[t, k]`).
fn all_paths(x: &Array2<f32>, w: &Weight) -> Vec<(String, Array2<f32>)> {
    let mut out = Vec::new();
    for isa in kernels::available_isas() {
        for tasks in 1..=3 {
            let mut y = Array2::from_elem((x.nrows(), w.out_features()), f32::NAN);
            kernels::forced::linear_into(isa, Some(tasks), x.view(), w, y.view_mut()).unwrap();
            out.push((format!("{isa:?} tasks={tasks}"), y));
        }
    }
    out
}

fn quant_of(w: &Weight) -> &quant::QuantData {
    match w.data() {
        llama4_core::WeightData::Quant(q) => q,
        _ => panic!("not quantised"),
    }
}

/// `Σ_g |s_w · s_x · isum|` for every output: the scale of the f32 rounding a kernel may
/// differ from the reference by (only the order of the sum over groups is free).
fn magnitudes(x: &[f32], t: usize, k: usize, n: usize, w: &quant::QuantData) -> Vec<f32> {
    let g = w.group();
    let groups = k / g;
    let (mut qx, mut sx) = (vec![0i8; k], vec![0f32; groups]);
    let mut out = vec![0f32; t * n];
    for r in 0..t {
        quant::quantize_activations(&x[r * k..(r + 1) * k], g, &mut qx, &mut sx);
        for o in 0..n {
            out[r * n + o] = (0..groups)
                .map(|gi| {
                    let isum: i32 = (gi * g..(gi + 1) * g)
                        .map(|i| w.q(o * k + i) * qx[i] as i32)
                        .sum();
                    (w.scales().get(o * groups + gi) * sx[gi] * isum as f32).abs()
                })
                .sum();
        }
    }
    out
}

fn check_against_reference(t: usize, k: usize, n: usize, spec: QuantSpec, seed: u64) {
    let w = Weight::from_out_in(
        Array2::from_shape_vec((n, k), values(n * k, seed))
            .unwrap()
            .view(),
        DType::F32,
    )
    .quantized(spec)
    .unwrap();
    let q = quant_of(&w);
    let x = Array2::from_shape_vec((t, k), values(t * k, seed ^ 0x9e37)).unwrap();
    let xs = x.as_slice().unwrap();
    let mut want = vec![0f32; t * n];
    linear_reference(xs, t, k, n, q, &mut want);
    let mag = magnitudes(xs, t, k, n, q);
    for (path, y) in all_paths(&x, &w) {
        for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * mag[i] + 1e-30,
                "{path} {spec:?} t={t} k={k} n={n}: y[{}, {}] = {a}, reference {b}",
                i / n,
                i % n
            );
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(160))]

    /// Every path and split agrees with `linear_reference` up to the order of the f32 sum over
    /// groups.
    #[test]
    fn every_path_matches_reference(
        format in proptest::sample::select(vec![QuantFormat::Q8, QuantFormat::Q4]),
        scales in proptest::sample::select(vec![ScaleType::F32, ScaleType::F16]),
        group in proptest::sample::select(vec![32usize, 64, 128]),
        t in proptest::prop_oneof![1usize..=3, 4usize..=40],
        half_n in 0usize..40,
        k_mult in 1usize..=18,
        seed in proptest::prelude::any::<u64>(),
    ) {
        let k = (k_mult * group).min(600 / group * group);
        check_against_reference(t, k, 2 * half_n + 1, QuantSpec::new(format, group).with_scales(scales), seed);
    }
}

#[test]
fn large_shapes_and_other_groups_match_reference() {
    // Several blocks of groups per row, L2 chunking in prefill, group sizes the SIMD paths
    // handle (256) or leave to the scalar path (96, not a power of two).
    for (t, k, n, group) in [
        (1, 4096, 33, 32),
        (3, 2048, 17, 256),
        (9, 1024, 300, 128),
        (37, 1024, 300, 64),
        (5, 960, 7, 96),
    ] {
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            for scales in [ScaleType::F32, ScaleType::F16] {
                check_against_reference(t, k, n, QuantSpec::new(format, group).with_scales(scales), 5);
            }
        }
    }
}

/// Integer-valued rows whose largest magnitude is QMAX (weights) and 127 (activations) have
/// scales of exactly 1, so every path must give the exact integer `Σ q_w · q_x` (below 2^24).
#[test]
fn zero_constant_and_extreme_rows_are_exact() {
    let k = 384;
    for format in [QuantFormat::Q8, QuantFormat::Q4] {
        let qm = format.qmax() as f32;
        let mut rng = values(64 * k, 21).into_iter();
        let mut int = |m: f32| (rng.next().unwrap() * m).round().clamp(-m, m);
        let mut rows: Vec<Vec<f32>> = vec![
            vec![0.0; k],
            vec![qm; k],
            vec![-qm; k],
            (0..k).map(|i| if i % 2 == 0 { qm } else { -qm }).collect(),
            (0..k).map(|i| if i % 3 == 0 { -qm } else { 0.0 }).collect(),
        ];
        for _ in 0..6 {
            let mut r: Vec<f32> = (0..k).map(|_| int(qm)).collect();
            // Every group holds ±QMAX, so every scale is 1.
            for g in 0..k / 32 {
                r[g * 32 + 5] = if g % 2 == 0 { qm } else { -qm };
            }
            rows.push(r);
        }
        let n = rows.len();
        let wf: Vec<f32> = rows.concat();
        let mut xrows: Vec<Vec<f32>> = vec![vec![0.0; k], vec![127.0; k], vec![-127.0; k]];
        for _ in 0..3 {
            let mut r: Vec<f32> = (0..k).map(|_| int(127.0)).collect();
            for g in 0..k / 32 {
                r[g * 32 + 9] = 127.0;
            }
            xrows.push(r);
        }
        let t = xrows.len();
        let x = Array2::from_shape_vec((t, k), xrows.concat()).unwrap();
        for group in [32, 64, 128] {
            for scales in [ScaleType::F32, ScaleType::F16] {
                let w = Weight::from_out_in(
                    Array2::from_shape_vec((n, k), wf.clone()).unwrap().view(),
                    DType::F32,
                )
                .quantized(QuantSpec::new(format, group).with_scales(scales))
                .unwrap();
                for i in 0..quant_of(&w).scales().len() {
                    let s = quant_of(&w).scales().get(i);
                    assert!(s == 1.0 || s == 0.0, "scale {s}");
                }
                // All tokens at once (prefill) and one to three at a time (decode).
                for rows_at_once in [t, 3, 1] {
                    for r0 in (0..t).step_by(rows_at_once) {
                        let r1 = (r0 + rows_at_once).min(t);
                        let xs = x.slice(ndarray::s![r0..r1, ..]).to_owned();
                        for (path, y) in all_paths(&xs, &w) {
                            for r in r0..r1 {
                                for o in 0..n {
                                    let want: f64 =
                                        (0..k).map(|i| wf[o * k + i] as f64 * x[[r, i]] as f64).sum();
                                    assert_eq!(
                                        y[[r - r0, o]] as f64,
                                        want,
                                        "{path} {format:?} group {group} {scales:?}: row {o}, token {r}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
