//! Every kernel path the CPU has, compared with the `kernels::scalar` twins on random shapes,
//! plus the shape errors of the public kernels.
//!
//! Shapes come from proptest; the values come from a small seeded generator so that large
//! inputs do not slow down shrinking.

use llama4_core::kernels::{self, forced, scalar, Isa};
use llama4_core::{DType, Error, Layout, Weight};
use ndarray::{s, Array1, Array2, ArrayView2};
use proptest::prelude::*;

/// SplitMix64: deterministic values from a proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-scale, scale)`.
    fn f32(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.f32(scale)).collect()
    }
    fn array(&mut self, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
        Array2::from_shape_vec((rows, cols), self.vec(rows * cols, scale)).unwrap()
    }
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)]
}

fn layout_strategy() -> impl Strategy<Value = Layout> {
    prop_oneof![Just(Layout::OutIn), Just(Layout::InOut)]
}

/// A random `[out, in]` weight stored in `dtype` and `layout`.
fn weight(rng: &mut Rng, n_out: usize, n_in: usize, dtype: DType, layout: Layout) -> Weight {
    let w = Weight::from_out_in(rng.array(n_out, n_in, 1.0).view(), dtype);
    match layout {
        Layout::OutIn => w,
        // Values are already representable in `dtype`, so this conversion is exact.
        Layout::InOut => w.converted(dtype, layout),
    }
}

/// Checks `got` against the scalar twin with a tolerance scaled by `Σ|x·w|` per output.
fn check_linear(
    x: ArrayView2<f32>,
    w: &Weight,
    got: ArrayView2<f32>,
    what: &str,
) -> Result<(), TestCaseError> {
    let (t, k) = x.dim();
    let n = w.out_features();
    let xs = x.as_standard_layout().into_owned();
    let mut want = vec![0f32; t * n];
    scalar::linear(xs.as_slice().unwrap(), t, w, &mut want);
    let wf = w.to_f32_out_in();
    for r in 0..t {
        for o in 0..n {
            let mag: f32 = (0..k).map(|i| (xs[[r, i]] * wf[[o, i]]).abs()).sum();
            let d = (got[[r, o]] - want[r * n + o]).abs();
            prop_assert!(
                d <= 1e-5 * mag + 1e-6,
                "{what}: y[{r},{o}] = {} want {} (Σ|xw| {mag})",
                got[[r, o]],
                want[r * n + o]
            );
        }
    }
    Ok(())
}

#[test]
fn dispatch_picks_an_available_path() {
    let avail = kernels::available_isas();
    assert!(avail.contains(&Isa::Portable));
    assert!(avail.contains(&kernels::active_isa()));
    assert!(Isa::Portable.is_available());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Small and odd shapes: `in`, `out` from 1, tokens across the decode / GEMM boundary and
    /// beyond one microkernel tile (MR = 12 on AVX-512).
    #[test]
    fn linear_matches_scalar_small(
        t in 1usize..=20,
        n_in in 1usize..=70,
        n_out in 1usize..=80,
        dtype in dtype_strategy(),
        layout in layout_strategy(),
        tasks in 1usize..=3,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let w = weight(&mut rng, n_out, n_in, dtype, layout);
        let x = rng.array(t, n_in, 2.0);
        for isa in kernels::available_isas() {
            let mut y = Array2::from_elem((t, n_out), f32::NAN);
            forced::linear_into(isa, Some(tasks), x.view(), &w, y.view_mut()).unwrap();
            check_linear(x.view(), &w, y.view(), &format!("{isa:?} {dtype:?} {layout:?}"))?;
        }
    }

    /// Input widths past one packed panel depth (256) and several panels of output.
    #[test]
    fn linear_matches_scalar_deep(
        t in prop_oneof![Just(1usize), Just(2), 3usize..=34],
        n_in in 250usize..=600,
        n_out in 30usize..=100,
        dtype in dtype_strategy(),
        layout in layout_strategy(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let w = weight(&mut rng, n_out, n_in, dtype, layout);
        let x = rng.array(t, n_in, 1.0);
        for isa in kernels::available_isas() {
            let mut y = Array2::from_elem((t, n_out), f32::NAN);
            forced::linear_into(isa, Some(2), x.view(), &w, y.view_mut()).unwrap();
            check_linear(x.view(), &w, y.view(), &format!("{isa:?} {dtype:?} {layout:?}"))?;
        }
    }

    #[test]
    fn rms_norm_matches_scalar(t in 1usize..=4, h in 1usize..=100, with_weight in any::<bool>(), seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let x = rng.array(t, h, 3.0);
        let g = Array1::from(rng.vec(h, 1.0));
        let mut want = x.clone();
        for mut row in want.rows_mut() {
            scalar::rms_norm(row.as_slice_mut().unwrap(), with_weight.then_some(g.as_slice().unwrap()), 1e-5);
        }
        for isa in kernels::available_isas() {
            let mut y = x.clone();
            forced::rms_norm_inplace(isa, y.view_mut(), with_weight.then_some(g.view()), 1e-5).unwrap();
            for (a, b) in y.iter().zip(want.iter()) {
                prop_assert!((a - b).abs() <= 2e-6 * b.abs().max(1.0), "{isa:?}: {a} vs {b}");
            }
        }
    }

    /// Every ISA gives the same bits: the sum of squares is taken in f64 (as ggml does), so
    /// the mean does not depend on the vector width, nor do activations quantised after it.
    #[test]
    fn rms_norm_is_the_same_on_every_isa(t in 1usize..=4, h in 1usize..=300, with_weight in any::<bool>(), seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let x = rng.array(t, h, 3.0);
        let g = Array1::from(rng.vec(h, 1.0));
        let mut first: Option<(Isa, Vec<u32>)> = None;
        for isa in kernels::available_isas() {
            let mut y = x.clone();
            forced::rms_norm_inplace(isa, y.view_mut(), with_weight.then_some(g.view()), 1e-5).unwrap();
            let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            match &first {
                Some((isa0, bits0)) => prop_assert_eq!(bits0, &bits, "{:?} against {:?}", isa, isa0),
                None => first = Some((isa, bits)),
            }
        }
    }

    #[test]
    fn layer_norm_matches_scalar(t in 1usize..=4, h in 1usize..=100, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        // An offset makes the mean matter.
        let x = rng.array(t, h, 3.0) + 1.5;
        let g = Array1::from(rng.vec(h, 1.0));
        let b = Array1::from(rng.vec(h, 1.0));
        let mut want = x.clone();
        for mut row in want.rows_mut() {
            scalar::layer_norm(row.as_slice_mut().unwrap(), g.as_slice().unwrap(), b.as_slice().unwrap(), 1e-5);
        }
        for isa in kernels::available_isas() {
            let mut y = x.clone();
            forced::layer_norm_inplace(isa, y.view_mut(), g.view(), b.view(), 1e-5).unwrap();
            for (a, w) in y.iter().zip(want.iter()) {
                prop_assert!((a - w).abs() <= 1e-5 * w.abs().max(1.0), "{isa:?}: {a} vs {w}");
            }
        }
    }

    /// Includes `-inf` entries (masked positions) and large spreads.
    #[test]
    fn softmax_matches_scalar(t in 1usize..=4, n in 1usize..=100, scale in 0.1f32..60.0, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let mut x = rng.array(t, n, scale);
        for r in 0..t {
            for c in 1..n {
                if rng.next().is_multiple_of(5) {
                    x[[r, c]] = f32::NEG_INFINITY;
                }
            }
        }
        let mut want = x.clone();
        for mut row in want.rows_mut() {
            scalar::softmax(row.as_slice_mut().unwrap());
        }
        for isa in kernels::available_isas() {
            let mut y = x.clone();
            forced::softmax_inplace(isa, y.view_mut());
            for (a, w) in y.iter().zip(want.iter()) {
                prop_assert!((a - w).abs() <= 2e-6 * w.abs() + 1e-9, "{isa:?}: {a} vs {w}");
            }
        }
    }

    #[test]
    fn activations_match_scalar(n in 1usize..=100, scale in 0.01f32..30.0, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let x = rng.vec(n, scale);
        let up = rng.vec(n, 2.0);
        for isa in kernels::available_isas() {
            let mut s = x.clone();
            forced::silu_inplace(isa, &mut s);
            let mut g = x.clone();
            forced::gelu_inplace(isa, &mut g);
            let mut sm = x.clone();
            forced::silu_mul_inplace(isa, &mut sm, &up).unwrap();
            for i in 0..n {
                let (ws, wg) = (scalar::silu(x[i]), scalar::gelu(x[i]));
                prop_assert!((s[i] - ws).abs() <= 1e-6 * ws.abs() + 1e-30, "{isa:?} silu({}) = {} want {ws}", x[i], s[i]);
                prop_assert!((sm[i] - ws * up[i]).abs() <= 2e-6 * (ws * up[i]).abs() + 1e-30, "{isa:?} silu_mul");
                // erf is approximated to ~1.5e-7 absolute (≤ 0.75e-7·|x| in GELU), plus a few f32
                // roundings of a value of size ~|x| (≤ 0.6e-7·|x| each): 4e-7·max(|x|, 1) in all.
                prop_assert!((g[i] - wg).abs() <= 4e-7 * x[i].abs().max(1.0), "{isa:?} gelu({}) = {} want {wg}", x[i], g[i]);
            }
        }
    }
}

/// Non-contiguous inputs and outputs go through the same kernels.
#[test]
fn linear_accepts_strided_views() {
    let mut rng = Rng(7);
    for dtype in [DType::F32, DType::BF16] {
        for layout in [Layout::OutIn, Layout::InOut] {
            let w = weight(&mut rng, 37, 45, dtype, layout);
            let xt = rng.array(45, 9, 1.0);
            let x = xt.t();
            let mut big = Array2::from_elem((9, 80), f32::NAN);
            let y = big.slice_mut(s![.., ..;2]).slice_move(s![.., ..37]);
            kernels::linear_into(x, &w, y).unwrap();
            let got = big.slice(s![.., ..;2]).slice_move(s![.., ..37]).to_owned();
            check_linear(x, &w, got.view(), "strided").unwrap();
        }
    }
}

/// `[out, in]` calls of two or more tokens take a register-tiled kernel that runs tokens in
/// groups of at most 128 Ki activations (and 32 tokens) over blocks of 256 KiB of weight rows;
/// with 16 lanes, the packed GEMM beyond those sizes. Both sides of each boundary, groups and
/// blocks with remainders, in one task and in two.
#[test]
fn linear_out_in_batch_and_gemm_boundaries() {
    let mut rng = Rng(17);
    for (t, k) in [
        (27, 4608),
        (28, 4608),
        (29, 4608),
        (33, 4608),
        (32, 1000),
        (33, 1000),
        (70, 300),
    ] {
        for dtype in [DType::BF16, DType::F32] {
            let w = weight(&mut rng, 37, k, dtype, Layout::OutIn);
            let x = rng.array(t, k, 1.0);
            for isa in kernels::available_isas() {
                for tasks in [1, 2] {
                    let mut y = Array2::from_elem((t, 37), f32::NAN);
                    forced::linear_into(isa, Some(tasks), x.view(), &w, y.view_mut()).unwrap();
                    check_linear(x.view(), &w, y.view(), &format!("{isa:?} {dtype:?} t {t} k {k}")).unwrap();
                }
            }
        }
    }
}

/// Shapes large enough to run in parallel under the automatic split, both regimes.
#[test]
fn linear_automatic_split_matches_scalar() {
    let mut rng = Rng(11);
    for (t, layout, dtype) in [
        (1, Layout::OutIn, DType::BF16),
        (1, Layout::InOut, DType::F16),
        (24, Layout::OutIn, DType::F32),
        (24, Layout::InOut, DType::BF16),
    ] {
        let w = weight(&mut rng, 300, 512, dtype, layout);
        let x = rng.array(t, 512, 1.0);
        let y = kernels::linear(x.view(), &w).unwrap();
        check_linear(x.view(), &w, y.view(), "auto").unwrap();
    }
}

/// `[in, out]` prefill packs blocks of several panels per weight row: outputs wider than a
/// block, with a ragged last panel, in one task and in two.
#[test]
fn linear_in_out_prefill_spans_several_panel_blocks() {
    let mut rng = Rng(13);
    for dtype in [DType::F32, DType::BF16] {
        let w = weight(&mut rng, 700, 300, dtype, Layout::InOut);
        let x = rng.array(13, 300, 1.0);
        for isa in kernels::available_isas() {
            for tasks in [1, 2] {
                let mut y = Array2::from_elem((13, 700), f32::NAN);
                forced::linear_into(isa, Some(tasks), x.view(), &w, y.view_mut()).unwrap();
                check_linear(
                    x.view(),
                    &w,
                    y.view(),
                    &format!("{isa:?} {dtype:?} {tasks} tasks"),
                )
                .unwrap();
            }
        }
    }
}

#[test]
fn linear_with_empty_dimensions() {
    let w = Weight::from_out_in(Array2::<f32>::zeros((3, 0)).view(), DType::F32);
    let y = kernels::linear(Array2::<f32>::zeros((2, 0)).view(), &w).unwrap();
    assert_eq!(y, Array2::<f32>::zeros((2, 3)));
    let w = Weight::from_out_in(Array2::<f32>::zeros((3, 4)).view(), DType::BF16);
    let y = kernels::linear(Array2::<f32>::zeros((0, 4)).view(), &w).unwrap();
    assert_eq!(y.dim(), (0, 3));
}

fn assert_shape_error<T: std::fmt::Debug>(r: llama4_core::Result<T>) {
    assert!(
        matches!(r, Err(Error::Shape { .. })),
        "expected Error::Shape, got {r:?}"
    );
}

#[test]
fn shape_errors() {
    let w = Weight::from_out_in(Array2::<f32>::zeros((3, 4)).view(), DType::BF16);
    let wt = w.converted(DType::BF16, Layout::InOut);
    for w in [&w, &wt] {
        // Wrong input width.
        assert_shape_error(kernels::linear(Array2::zeros((2, 5)).view(), w));
        // Wrong output shape (columns, then rows).
        assert_shape_error(kernels::linear_into(
            Array2::zeros((2, 4)).view(),
            w,
            Array2::zeros((2, 4)).view_mut(),
        ));
        assert_shape_error(kernels::linear_into(
            Array2::zeros((2, 4)).view(),
            w,
            Array2::zeros((3, 3)).view_mut(),
        ));
        for isa in kernels::available_isas() {
            let r = forced::linear_into(
                isa,
                None,
                Array2::zeros((1, 3)).view(),
                w,
                Array2::zeros((1, 3)).view_mut(),
            );
            assert_shape_error(r);
        }
    }
    let mut x = Array2::<f32>::ones((2, 4));
    let g3 = Array1::<f32>::ones(3);
    let g4 = Array1::<f32>::ones(4);
    assert_shape_error(kernels::rms_norm_inplace(x.view_mut(), Some(g3.view()), 1e-5));
    assert_shape_error(kernels::rms_norm(x.view(), Some(g3.view()), 1e-5));
    assert_shape_error(kernels::layer_norm_inplace(
        x.view_mut(),
        g3.view(),
        g4.view(),
        1e-5,
    ));
    assert_shape_error(kernels::layer_norm_inplace(
        x.view_mut(),
        g4.view(),
        g3.view(),
        1e-5,
    ));
    assert_shape_error(kernels::silu_mul_inplace(&mut [1.0, 2.0], &[1.0]));
    // Nothing was written by the failed calls.
    assert_eq!(x, Array2::<f32>::ones((2, 4)));
}
