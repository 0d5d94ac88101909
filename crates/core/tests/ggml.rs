//! ggml weights: dequantisation, activation quantisation and dot products against llama.cpp's
//! own CPU library (`fixtures/ggml/kernels.safetensors`, written by
//! `tools/llamacpp/ggml_kernel_fixtures.py`), and every kernel path against the scalar twin.

use llama4_core::ggml::act::ActRow;
use llama4_core::ggml::dot::{dot_row, linear_reference, rounding_bound};
use llama4_core::ggml::{dequantize, GgmlData, GgmlType};
use llama4_core::kernels::{self, available_isas, Isa};
use llama4_core::safetensors::SafetensorsFile;
use llama4_core::{Buffer, Layout, Weight, WeightData};
use ndarray::{Array2, ArrayView2};
use proptest::prelude::*;

mod common;
use common::random_blocks;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/ggml/kernels.safetensors"
);

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn weight(ty: GgmlType, bytes: Vec<u8>, n: usize, k: usize) -> Weight {
    let data = GgmlData::new(ty, Buffer::from_vec(bytes), n * k).unwrap();
    Weight::new(WeightData::Ggml(Box::new(data)), Layout::OutIn, n, k).unwrap()
}

/// Every kernel path and split of `w` on `x`, each output within the rounding bound of `want`
/// (`abs[r][o]`: `Σ|term|` of that dot product).
fn check_paths(x: &Array2<f32>, w: &Weight, want: &[f32], abs: &[f32], blocks: usize, what: &str) {
    let (t, n) = (x.nrows(), w.out_features());
    for isa in available_isas() {
        for tasks in [Some(1), Some(2), Some(3), None] {
            let mut y = Array2::zeros((t, n));
            kernels::forced::linear_into(isa, tasks, x.view(), w, y.view_mut()).unwrap();
            for (i, (&got, (&want, &abs))) in y.iter().zip(want.iter().zip(abs)).enumerate() {
                let tol = rounding_bound(blocks, abs);
                assert!(
                    (got - want).abs() <= tol,
                    "{what} {isa:?} tasks {tasks:?} [{}, {}]: {got} vs {want} (tolerance {tol:e})",
                    i / n,
                    i % n
                );
            }
        }
    }
}

#[test]
fn every_type_matches_llama_cpp() {
    let file = SafetensorsFile::open(FIXTURE).unwrap();
    let meta = |k: &str| file.header().metadata[k].parse::<usize>().unwrap();
    let (k, n, t) = (meta("k"), meta("n"), meta("t"));
    for ty in GgmlType::SUPPORTED {
        let name = ty.name();
        let raw = |s: &str| file.raw_bytes(&format!("{name}.{s}")).unwrap().to_vec();
        let wbytes = raw("weight");
        let row_bytes = ty.bytes_for(k).unwrap();
        assert_eq!(wbytes.len(), n * row_bytes, "{name}");

        // Dequantisation: llama.cpp's values bit for bit.
        let mut deq = vec![0f32; n * k];
        dequantize(ty, &wbytes, &mut deq);
        assert_eq!(
            bits(&deq),
            bits(&floats(&raw("dequant"))),
            "{name}: dequantisation"
        );

        // Activations: ggml-cpu's `from_float` bit for bit; dot products within rounding.
        let x = floats(&raw("x"));
        let x_dot = raw("x_dot");
        let want = floats(&raw("y"));
        let act_bytes = x_dot.len() / t;
        let dot = ty.dot_type().unwrap();
        let mut abs = vec![0f32; t * n];
        let mut worst = 0f32;
        for r in 0..t {
            let a = ActRow::new(dot, &x[r * k..(r + 1) * k]);
            assert_eq!(
                a.to_ggml_bytes(),
                &x_dot[r * act_bytes..(r + 1) * act_bytes],
                "{name}: activations of token {r} in {dot:?}"
            );
            for o in 0..n {
                let (got, sum_abs) = dot_row(ty, &wbytes[o * row_bytes..(o + 1) * row_bytes], &a);
                let w = want[r * n + o];
                let tol = rounding_bound(k / ty.block_size(), sum_abs);
                assert!(
                    (got - w).abs() <= tol,
                    "{name} [{r}, {o}]: {got} vs llama.cpp {w} ({tol:e})"
                );
                abs[r * n + o] = sum_abs;
                worst = worst.max((got - w).abs() / tol);
            }
        }
        eprintln!("{name}: largest |ours − llama.cpp| is {worst:.3} of the rounding bound");
        let x = Array2::from_shape_vec((t, k), x).unwrap();
        check_paths(
            &x,
            &weight(ty, wbytes, n, k),
            &want,
            &abs,
            k / ty.block_size(),
            name,
        );
    }
}

fn activations(t: usize, k: usize, seed: u64, scale: f32) -> Array2<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    Array2::from_shape_fn((t, k), |_| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
    })
}

/// The scalar twin and each row's `Σ|term|`.
fn twin(x: ArrayView2<f32>, w: &Weight) -> (Vec<f32>, Vec<f32>) {
    let (t, k, n) = (x.nrows(), x.ncols(), w.out_features());
    let WeightData::Ggml(g) = w.data() else {
        unreachable!()
    };
    let x = x.as_standard_layout();
    let xs = x.as_slice().unwrap();
    let mut want = vec![0f32; t * n];
    linear_reference(xs, t, k, n, g, &mut want);
    let row_bytes = g.ty().bytes_for(k).unwrap();
    let mut abs = vec![0f32; t * n];
    for r in 0..t {
        let a = ActRow::new(g.ty().dot_type().unwrap(), &xs[r * k..(r + 1) * k]);
        for o in 0..n {
            abs[r * n + o] = dot_row(g.ty(), &g.bytes()[o * row_bytes..(o + 1) * row_bytes], &a).1;
        }
    }
    (want, abs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    /// Every kernel path (decode and prefill token blocks, one or several tasks) equals the
    /// scalar twin to the rounding bound, on random valid blocks.
    #[test]
    fn kernels_match_the_scalar_twin(
        ty in prop::sample::select(GgmlType::SUPPORTED.to_vec()),
        superblocks in 1usize..4,
        n in 1usize..19,
        t in 1usize..10,
        scale in prop::sample::select(vec![1e-3f32, 1.0, 300.0]),
        seed in any::<u64>(),
    ) {
        let k = 256 * superblocks;
        let w = weight(ty, random_blocks(ty, n * k, seed), n, k);
        let x = activations(t, k, seed ^ 0x5555, scale);
        let (want, abs) = twin(x.view(), &w);
        check_paths(&x, &w, &want, &abs, k / ty.block_size(), ty.name());
    }
}

#[test]
fn prefill_panels_cover_partial_tiles_and_splits() {
    // Prefill packs panels of eight rows and runs tiles of four tokens: token counts with every
    // remainder (4..=11), row counts that leave a partial panel (1, 5, 9 rows past a multiple
    // of eight) and task splits that cut rows into several ranges.
    for ty in GgmlType::SUPPORTED {
        if ty.block_size() == 1 {
            continue;
        }
        // One and two blocks of the 32-value types as well.
        let small: &[(usize, usize)] = if ty.block_size() == 32 {
            &[(7, 32), (13, 64)]
        } else {
            &[]
        };
        for &(n, k) in [(9, 256), (16, 512), (29, 256)].iter().chain(small) {
            let w = weight(ty, random_blocks(ty, n * k, n as u64), n, k);
            for t in 4..12 {
                let x = activations(t, k, t as u64, 2.0);
                let (want, abs) = twin(x.view(), &w);
                check_paths(&x, &w, &want, &abs, k / ty.block_size(), ty.name());
            }
        }
    }
}

#[test]
fn shared_input_calls_equal_one_call_per_weight() {
    use GgmlType::*;
    // Weights sharing one activation type (Q8_K: a Q4_K_M file's q, k and v; Q8_0; Q8_1), row
    // counts that leave partial panels, more weights than one shared call takes (five), and
    // sets that cannot share (mixed activation types, a float weight), which run one by one;
    // 70 tokens quantise in parallel (the split starts at 64).
    let sets: &[&[(GgmlType, usize)]] = &[
        &[(Q4K, 24), (Q4K, 13), (Q6K, 8)],
        &[(Q8_0, 16), (Q8_0, 40), (Q4_0, 9)],
        &[(Q5_1, 11), (Q4_1, 16)],
        &[(Q8_0, 8), (Q8_0, 3), (Q5_0, 17), (Q8_0, 8), (Q4_0, 25)],
        &[(Q4K, 16), (Q8_0, 8)],
        &[(BF16, 9), (Q8_0, 8), (Q8_0, 8)],
    ];
    let k = 512;
    for (si, set) in sets.iter().enumerate() {
        let ws: Vec<Weight> = set
            .iter()
            .enumerate()
            .map(|(j, &(ty, n))| weight(ty, random_blocks(ty, n * k, (si * 8 + j) as u64), n, k))
            .collect();
        let refs: Vec<&Weight> = ws.iter().collect();
        for t in [1, 2, 3, 4, 9, 17, 70] {
            let x = activations(t, k, (si * 100 + t) as u64, 2.0);
            for isa in available_isas() {
                // Each weight alone, one task: the bits every shared call must give.
                let want: Vec<Array2<f32>> = ws
                    .iter()
                    .map(|w| {
                        let mut y = Array2::zeros((t, w.out_features()));
                        kernels::forced::linear_into(isa, Some(1), x.view(), w, y.view_mut()).unwrap();
                        y
                    })
                    .collect();
                for tasks in [Some(1), Some(2), Some(3), None] {
                    let mut ys: Vec<Array2<f32>> = ws
                        .iter()
                        .map(|w| Array2::from_elem((t, w.out_features()), f32::NAN))
                        .collect();
                    let mut views: Vec<_> = ys.iter_mut().map(|y| y.view_mut()).collect();
                    kernels::forced::linear_shared_into(isa, tasks, x.view(), &refs, &mut views).unwrap();
                    for (j, (got, want)) in ys.iter().zip(&want).enumerate() {
                        assert_eq!(
                            bits(got.as_slice().unwrap()),
                            bits(want.as_slice().unwrap()),
                            "set {si} weight {j} ({}) t {t} {isa:?} tasks {tasks:?}",
                            set[j].0
                        );
                    }
                }
            }
        }
    }
    // A shape that does not fit is the error of the one-weight call.
    let w = weight(Q8_0, random_blocks(Q8_0, 8 * k, 1), 8, k);
    let x = activations(2, k, 1, 1.0);
    let (mut a, mut b) = (Array2::zeros((2, 8)), Array2::zeros((2, 7)));
    let err = kernels::linear_shared_into(x.view(), &[&w, &w], &mut [a.view_mut(), b.view_mut()]);
    assert!(err.is_err());
    let err = kernels::linear_shared_into(x.view(), &[&w, &w], &mut [a.view_mut()]);
    assert!(err.is_err());
}

#[test]
fn legacy_types_take_rows_of_32() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        // 3 blocks (all past a group of eight), 19 (two groups and a tail of three).
        for k in [96, 608] {
            let n = 5;
            let w = weight(ty, random_blocks(ty, n * k, 7), n, k);
            for t in [1, 2, 6] {
                let x = activations(t, k, 3, 1.0);
                let (want, abs) = twin(x.view(), &w);
                check_paths(&x, &w, &want, &abs, k / 32, ty.name());
            }
        }
    }
}

#[test]
fn float_types_round_activations_as_ggml() {
    // An activation that f16 and bf16 round: the products use the rounded value.
    let x = Array2::from_shape_vec((1, 2), vec![1.0 + 1.0 / 4096.0, 0.0]).unwrap();
    for (ty, expect) in [
        (GgmlType::F32, 1.0 + 1.0 / 4096.0),
        (GgmlType::F16, 1.0),
        (GgmlType::BF16, 1.0),
    ] {
        let data = GgmlData::from_f32(&[1.0, 1.0], ty).unwrap();
        let w = Weight::new(WeightData::Ggml(Box::new(data)), Layout::OutIn, 1, 2).unwrap();
        let y = kernels::linear(x.view(), &w).unwrap();
        assert_eq!(y[[0, 0]], expect, "{ty}");
    }
}

#[test]
fn partial_ranges_and_slices_dequantise_as_the_whole() {
    for ty in GgmlType::SUPPORTED {
        let k = 512;
        let bytes = random_blocks(ty, 2 * k, 11);
        let data = GgmlData::new(ty, Buffer::from_vec(bytes), 2 * k).unwrap();
        let all = data.to_f32_vec();
        for (start, len) in [(0, 2 * k), (3, 40), (250, 300), (k, k), (1000, 24)] {
            let mut out = vec![0f32; len];
            data.dequantize_into(start, &mut out);
            assert_eq!(bits(&out), bits(&all[start..start + len]), "{ty} {start}+{len}");
        }
        let second = data.slice(k, k);
        assert_eq!(bits(&second.to_f32_vec()), bits(&all[k..]), "{ty}");
        // A batch of two matrices: each equals its half, and a row widens as dequantised.
        let w = llama4_core::BatchedWeight::new(
            WeightData::Ggml(Box::new(data.clone())),
            Layout::OutIn,
            2,
            2,
            256,
        )
        .unwrap();
        let m1 = w.get(1).to_f32_out_in();
        assert_eq!(bits(m1.as_slice().unwrap()), bits(&all[k..]), "{ty}");
        let mut row = vec![0f32; 256];
        w.data().widen_into(768, &mut row);
        assert_eq!(bits(&row), bits(&all[768..]), "{ty}");
    }
}

#[test]
fn bad_storage_is_refused() {
    let q4k = GgmlType::Q4K;
    // Wrong byte count, elements not whole blocks, unsupported type.
    assert!(GgmlData::new(q4k, Buffer::from_vec(vec![0; 143]), 256).is_err());
    assert!(GgmlData::new(q4k, Buffer::from_vec(vec![0; 144]), 255).is_err());
    let err = GgmlData::new(GgmlType::Iq2Xxs, Buffer::from_vec(vec![0; 66]), 256).unwrap_err();
    assert!(err.to_string().contains("IQ2_XXS"), "{err}");
    // Rows must be whole blocks, and the layout `[out, in]`.
    let data = GgmlData::new(q4k, Buffer::from_vec(vec![0; 288]), 512).unwrap();
    assert!(Weight::new(WeightData::Ggml(Box::new(data.clone())), Layout::OutIn, 4, 128).is_err());
    assert!(Weight::new(WeightData::Ggml(Box::new(data.clone())), Layout::InOut, 2, 256).is_err());
    assert!(Weight::new(WeightData::Ggml(Box::new(data)), Layout::OutIn, 2, 256).is_ok());
    assert!(Isa::Portable.is_available());
}
