//! CPU kernels over f32 activations. Each public function checks shapes and then runs the
//! fastest path the CPU supports; [`scalar`] holds the plain twins the tests compare against.
//!
//! # Dispatch
//! The instruction set is chosen once per process ([`active_isa`]): the best of
//! [`Isa::Avx512`] (AVX-512F/BW/DQ/VL), [`Isa::Avx2`] (AVX2 + FMA + F16C) and
//! [`Isa::Portable`] the CPU supports, detected at run time (no `target-cpu=native` needed).
//! The environment variable `LLAMA4_KERNEL=avx512|avx2|portable` forces a path; a forced path
//! the CPU lacks falls back to the detected one.
//!
//! # Numerics
//! Activations stay f32; bf16 / f16 / fp8 weights are widened to f32 exactly and products are
//! accumulated in f32 with FMA. No path rounds activations to a narrower type, except the q8 /
//! q4 integer kernels (see [`crate::quant`]). The order of the additions differs from
//! [`scalar`], so results agree to rounding, not bit for bit.

pub mod attention;
mod elementwise;
mod fp8;
mod ggml;
mod linear;
mod quant;
pub mod scalar;
mod simd;

use std::cell::Cell;
use std::sync::OnceLock;

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};

use crate::ggml::GgmlData;
use crate::pool::SyncPtr;
use crate::{Error, Layout, QuantFormat, Result, Weight, WeightData};
use linear::Job;
use simd::Elem;

/// A kernel implementation, by instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// 16-lane AVX-512 (F, BW, DQ, VL) with FMA and F16C.
    Avx512,
    /// 8-lane AVX2 with FMA and F16C.
    Avx2,
    /// Plain Rust the compiler vectorises for the baseline target; runs everywhere.
    Portable,
}

impl Isa {
    /// Every implementation, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// True when this CPU can run the implementation.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vl")
                    && Isa::Avx2.is_available()
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The name `LLAMA4_KERNEL` accepts: `avx512`, `avx2` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// The implementations this CPU can run, fastest first.
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
}

/// The implementation the public kernels use: `LLAMA4_KERNEL` when set to an available path,
/// else the fastest available. Decided once per process.
pub fn active_isa() -> Isa {
    static ACTIVE: OnceLock<Isa> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let forced = std::env::var("LLAMA4_KERNEL").ok().and_then(|v| {
            let v = v.trim().to_ascii_lowercase();
            Isa::ALL.into_iter().find(|i| i.name() == v)
        });
        match forced {
            Some(isa) if isa.is_available() => isa,
            _ => available_isas()[0],
        }
    })
}

/// Defines `fn $name(isa, args..)` that runs `elementwise::$body` compiled for `isa`.
macro_rules! elementwise_dispatch {
    ($name:ident => $body:ident ($($p:ident : $t:ty),*)) => {
        fn $name(isa: Isa, $($p: $t),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
            unsafe fn avx512($($p: $t),*) {
                elementwise::$body::<simd::Avx512>($($p),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2($($p: $t),*) {
                elementwise::$body::<simd::Avx2>($($p),*)
            }
            assert!(isa.is_available(), "kernel path {isa:?} is not available on this CPU");
            // SAFETY: the CPU supports `isa` (asserted above); the bodies only touch the slices
            // they are given, whose lengths the public callers checked.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => avx512($($p),*),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => avx2($($p),*),
                    _ => elementwise::$body::<simd::Portable>($($p),*),
                }
            }
        }
    };
}

elementwise_dispatch!(rms_row => rms_norm_row(x: &mut [f32], weight: Option<&[f32]>, eps: f32));
elementwise_dispatch!(layer_row => layer_norm_row(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32));
elementwise_dispatch!(softmax_row => softmax_row(x: &mut [f32]));
elementwise_dispatch!(silu_slice => silu(x: &mut [f32]));
elementwise_dispatch!(silu_mul_slice => silu_mul(gate: &mut [f32], up: &[f32]));
elementwise_dispatch!(gelu_slice => gelu(x: &mut [f32]));

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
unsafe fn linear_range_avx512<E: Elem>(job: &Job<E>, lo: usize, hi: usize) {
    linear::run_range::<simd::Avx512, E>(job, lo, hi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn linear_range_avx2<E: Elem>(job: &Job<E>, lo: usize, hi: usize) {
    linear::run_range::<simd::Avx2, E>(job, lo, hi)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
unsafe fn linear_rows_avx512<E: Elem>(job: &Job<E>, i0: usize, i1: usize, out: *mut f32) {
    linear::run_rows::<simd::Avx512, E>(job, i0, i1, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn linear_rows_avx2<E: Elem>(job: &Job<E>, i0: usize, i1: usize, out: *mut f32) {
    linear::run_rows::<simd::Avx2, E>(job, i0, i1, out)
}

/// The partial sum over input rows `i0..i1` of an `InOut` decode `job`, on `isa`, into `out`.
///
/// # Safety
/// As [`linear::run_rows`]; `isa` is available.
unsafe fn linear_rows<E: Elem>(isa: Isa, job: &Job<E>, i0: usize, i1: usize, out: *mut f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => linear_rows_avx512(job, i0, i1, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => linear_rows_avx2(job, i0, i1, out),
        _ => linear::run_rows::<simd::Portable, E>(job, i0, i1, out),
    }
}

/// Output columns `lo..hi` of `job` on `isa`.
///
/// # Safety
/// `isa` is available; `job` is consistent (see [`linear::run_range`]); no other task writes
/// columns `lo..hi`.
unsafe fn linear_range<E: Elem>(isa: Isa, job: &Job<E>, lo: usize, hi: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => linear_range_avx512(job, lo, hi),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => linear_range_avx2(job, lo, hi),
        _ => linear::run_range::<simd::Portable, E>(job, lo, hi),
    }
}

/// `x · Wᵀ` (or `x · W` for [`Layout::InOut`]): applies the linear map `w` to each row of `x`.
///
/// # Shapes
/// `x: [T, in]` → `[T, out]`.
pub fn linear(x: ArrayView2<f32>, w: &Weight) -> Result<Array2<f32>> {
    let mut y = Array2::zeros((x.nrows(), w.out_features()));
    linear_into(x, w, y.view_mut())?;
    Ok(y)
}

/// [`linear`] writing into `y`, which is overwritten.
///
/// # Shapes
/// `x: [T, in]`, `y: [T, out]`.
pub fn linear_into(x: ArrayView2<f32>, w: &Weight, y: ArrayViewMut2<f32>) -> Result<()> {
    linear_with(active_isa(), None, x, w, y)
}

/// `ys[j] = x · W_jᵀ` for several weights on one input (each `ys[j]` overwritten), with the
/// bits of [`linear_into`] once per weight. Quantised ggml weights that take the same
/// activations (the q, k and v projections of a GGUF file; gate and up) quantise `x` once for
/// all of them and run in one parallel section; other weights run one call each.
///
/// # Shapes
/// `x: [T, in]`, `ws[j]: [out_j, in]`, `ys[j]: [T, out_j]`.
pub fn linear_shared_into(x: ArrayView2<f32>, ws: &[&Weight], ys: &mut [ArrayViewMut2<f32>]) -> Result<()> {
    linear_shared_with(active_isa(), None, x, ws, ys)
}

/// Weights one [`ggml::linear_shared`] call takes at most (a stack array of its parts).
const MAX_SHARED: usize = 4;

fn linear_shared_with(
    isa: Isa,
    tasks: Option<usize>,
    x: ArrayView2<f32>,
    ws: &[&Weight],
    ys: &mut [ArrayViewMut2<f32>],
) -> Result<()> {
    let (t, k) = x.dim();
    if ws.len() != ys.len() {
        return Err(Error::shape(
            "linear_shared",
            format!("{} weights, {} outputs", ws.len(), ys.len()),
        ));
    }
    // One quantisation for all only when every weight is a quantised ggml weight of the first
    // one's activation type and every output is contiguous.
    let ggml = |w: &Weight| match w.data() {
        WeightData::Ggml(g) => Some(g.ty()),
        _ => None,
    };
    let first = ws.first().and_then(|w| ggml(w));
    let shared = ws.len() > 1
        && t > 0
        && k > 0
        && ws.iter().zip(ys.iter()).all(|(w, y)| {
            w.in_features() == k
                && y.dim() == (t, w.out_features())
                && y.is_standard_layout()
                && matches!((ggml(w), first), (Some(a), Some(b)) if ggml::same_acts(a, b))
        });
    if !shared {
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            linear_with(isa, tasks, x, w, y.view_mut())?;
        }
        return Ok(());
    }
    assert!(
        isa.is_available(),
        "kernel path {isa:?} is not available on this CPU"
    );
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("a standard-layout array is contiguous");
    fn data(w: &Weight) -> &GgmlData {
        match w.data() {
            WeightData::Ggml(g) => g,
            _ => unreachable!("checked above"),
        }
    }
    let first = data(ws[0]);
    for (wc, yc) in ws.chunks(MAX_SHARED).zip(ys.chunks_mut(MAX_SHARED)) {
        let (mut wi, mut yi) = (wc.iter(), yc.iter_mut());
        // Slots past the chunk's weights stay empty (no rows) and are not passed on.
        let parts: [ggml::Part; MAX_SHARED] = std::array::from_fn(|_| match (wi.next(), yi.next()) {
            (Some(w), Some(y)) => {
                ggml::Part::new(data(w), y.as_slice_mut().expect("checked standard layout"))
            }
            _ => ggml::Part::new(first, &mut []),
        });
        ggml::linear_shared(isa, tasks, x, t, k, &parts[..wc.len()]);
    }
    Ok(())
}

/// Splits `n` output columns into at most `tasks` ranges, each a multiple of the panel width.
fn split(n: usize, tasks: usize) -> (usize, usize) {
    let per = n.div_ceil(tasks.max(1)).div_ceil(linear::SPLIT) * linear::SPLIT;
    let per = per.max(linear::SPLIT);
    (per, n.div_ceil(per))
}

fn linear_with(
    isa: Isa,
    tasks: Option<usize>,
    x: ArrayView2<f32>,
    w: &Weight,
    mut y: ArrayViewMut2<f32>,
) -> Result<()> {
    let (t, k) = x.dim();
    let n = w.out_features();
    if k != w.in_features() || y.dim() != (t, n) {
        return Err(Error::shape(
            "linear",
            format!(
                "x {:?}, weight {}→{}, y {:?}",
                x.dim(),
                w.in_features(),
                n,
                y.dim()
            ),
        ));
    }
    assert!(
        isa.is_available(),
        "kernel path {isa:?} is not available on this CPU"
    );
    if t == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let x = x.as_standard_layout();
    let x = x.as_slice().expect("a standard-layout array is contiguous");
    let run = |y: &mut [f32]| match w.data() {
        WeightData::F32(d) => run_linear(isa, tasks, x, t, k, n, d, w.layout(), y),
        WeightData::BF16(d) => run_linear(isa, tasks, x, t, k, n, d, w.layout(), y),
        WeightData::F16(d) => run_linear(isa, tasks, x, t, k, n, d, w.layout(), y),
        // fp8 multiplies f32 activations by dequantised weights; the integer kernels never see it.
        WeightData::Quant(q) if q.format() == QuantFormat::F8E4M3 => {
            fp8::linear(isa, tasks, x, t, k, n, q, y)
        }
        WeightData::Quant(q) => quant::linear(isa, tasks, x, t, k, n, q, y),
        WeightData::Ggml(g) => ggml::linear(isa, tasks, x, t, k, n, g, y),
    };
    if let Some(y) = y.as_slice_mut() {
        run(y);
    } else {
        // A strided output: compute contiguously, then copy.
        let mut buf = vec![0f32; t * n];
        run(&mut buf);
        y.assign(&ArrayView2::from_shape((t, n), &buf).expect("sized above"));
    }
    Ok(())
}

/// Tasks for a call of `work` multiply-adds: one below [`linear::MIN_PARALLEL_WORK`] (forking
/// costs more than it saves), else one per pool thread.
fn default_tasks(work: usize) -> usize {
    if work < linear::MIN_PARALLEL_WORK {
        1
    } else {
        crate::pool::threads()
    }
}

#[allow(clippy::too_many_arguments)]
fn run_linear<E: Elem>(
    isa: Isa,
    tasks: Option<usize>,
    x: &[f32],
    t: usize,
    k: usize,
    n: usize,
    w: &[E],
    layout: Layout,
    y: &mut [f32],
) {
    debug_assert!(x.len() == t * k && w.len() == k * n && y.len() == t * n);
    let job = Job {
        x,
        t,
        k,
        n,
        w,
        layout,
        y: SyncPtr(y.as_mut_ptr()),
    };
    let tasks = tasks.unwrap_or_else(|| default_tasks(t * k * n));
    if tasks > 1 && t <= linear::SMALL_T && layout == Layout::InOut {
        return split_rows(isa, tasks, &job, y);
    }
    let (per, count) = split(n, tasks);
    // SAFETY: `isa` was checked available by the caller; the slices have the sizes `job`
    // states (checked shapes); the ranges `i·per..` are disjoint.
    if count <= 1 {
        unsafe { linear_range(isa, &job, 0, n) };
    } else {
        crate::pool::run(count, &|i| unsafe {
            linear_range(isa, &job, i * per, ((i + 1) * per).min(n))
        });
    }
}

thread_local! {
    /// Partial sums of split decode calls, reused across calls (no allocation per token).
    static PARTIALS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// An `InOut` decode call split along the input: task 0 writes `y`, the others write partial
/// sums that are then added to it. Each task streams one contiguous block of rows.
fn split_rows<E: Elem>(isa: Isa, tasks: usize, job: &Job<E>, y: &mut [f32]) {
    let (t, k, n) = (job.t, job.k, job.n);
    // Whole groups of four rows per task (the kernel's step).
    let per = k.div_ceil(tasks).next_multiple_of(4);
    let count = k.div_ceil(per);
    let mut partials = PARTIALS.with(Cell::take);
    partials.resize((count - 1) * t * n, 0.0);
    let base = SyncPtr(partials.as_mut_ptr());
    let y_ptr = SyncPtr(y.as_mut_ptr());
    crate::pool::run(count, &|p| {
        let out = if p == 0 {
            y_ptr.get()
        } else {
            base.get().wrapping_add((p - 1) * t * n)
        };
        // SAFETY: `isa` is available (checked by the caller); the row ranges lie inside `k`;
        // each task writes its own `t · n` block (`y` or one partial).
        unsafe { linear_rows(isa, job, p * per, ((p + 1) * per).min(k), out) };
    });
    for part in partials.chunks_exact(t * n) {
        y.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    PARTIALS.with(|b| b.set(partials));
}

/// Runs `f` on each row of `x` as a contiguous slice (copying only strided rows).
fn for_each_row(mut x: ArrayViewMut2<f32>, mut f: impl FnMut(&mut [f32])) {
    for mut row in x.axis_iter_mut(Axis(0)) {
        for_slice(row.view_mut(), &mut f);
    }
}

fn for_slice(mut row: ArrayViewMut1<f32>, f: &mut impl FnMut(&mut [f32])) {
    match row.as_slice_mut() {
        Some(s) => f(s),
        None => {
            let mut tmp = row.to_vec();
            f(&mut tmp);
            row.iter_mut().zip(tmp).for_each(|(d, s)| *d = s);
        }
    }
}

/// Row-wise RMSNorm in place: `x / sqrt(mean(x²) + eps) · weight` (no weight: `· 1`).
///
/// # Shapes
/// `x: [T, H]`, `weight: [H]`.
pub fn rms_norm_inplace(x: ArrayViewMut2<f32>, weight: Option<ArrayView1<f32>>, eps: f32) -> Result<()> {
    rms_norm_with(active_isa(), x, weight, eps)
}

fn rms_norm_with(isa: Isa, x: ArrayViewMut2<f32>, weight: Option<ArrayView1<f32>>, eps: f32) -> Result<()> {
    let h = x.ncols();
    if let Some(w) = &weight {
        if w.len() != h {
            return Err(Error::shape(
                "rms_norm",
                format!("x {:?}, weight [{}]", x.dim(), w.len()),
            ));
        }
    }
    // Borrowed when contiguous (the usual case): no copy per call.
    let w = weight.as_ref().map(|w| w.as_standard_layout());
    let w = w.as_ref().map(|w| w.as_slice().expect("standard layout"));
    for_each_row(x, |row| rms_row(isa, row, w, eps));
    Ok(())
}

/// Row-wise RMSNorm returning a new array.
///
/// # Shapes
/// `x: [T, H]`, `weight: [H]` → `[T, H]`.
pub fn rms_norm(x: ArrayView2<f32>, weight: Option<ArrayView1<f32>>, eps: f32) -> Result<Array2<f32>> {
    let mut y = x.as_standard_layout().into_owned();
    rms_norm_inplace(y.view_mut(), weight, eps)?;
    Ok(y)
}

/// Row-wise LayerNorm in place: `(x − mean) / sqrt(var + eps) · weight + bias`.
///
/// # Shapes
/// `x: [T, H]`, `weight, bias: [H]`.
pub fn layer_norm_inplace(
    x: ArrayViewMut2<f32>,
    weight: ArrayView1<f32>,
    bias: ArrayView1<f32>,
    eps: f32,
) -> Result<()> {
    layer_norm_with(active_isa(), x, weight, bias, eps)
}

fn layer_norm_with(
    isa: Isa,
    x: ArrayViewMut2<f32>,
    weight: ArrayView1<f32>,
    bias: ArrayView1<f32>,
    eps: f32,
) -> Result<()> {
    let h = x.ncols();
    if weight.len() != h || bias.len() != h {
        return Err(Error::shape(
            "layer_norm",
            format!(
                "x {:?}, weight [{}], bias [{}]",
                x.dim(),
                weight.len(),
                bias.len()
            ),
        ));
    }
    let (w, b) = (weight.as_standard_layout(), bias.as_standard_layout());
    let (w, b) = (
        w.as_slice().expect("standard layout"),
        b.as_slice().expect("standard layout"),
    );
    for_each_row(x, |row| layer_row(isa, row, w, b, eps));
    Ok(())
}

/// Row-wise softmax in place; `-inf` entries get probability 0 (a row that is all `-inf` gives
/// NaN, as in PyTorch).
///
/// # Shapes
/// `x: [T, N]`.
pub fn softmax_inplace(x: ArrayViewMut2<f32>) {
    for_each_row(x, |row| softmax_row(active_isa(), row));
}

/// SiLU in place: `x · sigmoid(x)`.
pub fn silu_inplace(x: &mut [f32]) {
    silu_slice(active_isa(), x)
}

/// SwiGLU's gate in place: `gate = silu(gate) · up`.
///
/// # Shapes
/// `gate` and `up` of equal length.
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) -> Result<()> {
    silu_mul_with(active_isa(), gate, up)
}

fn silu_mul_with(isa: Isa, gate: &mut [f32], up: &[f32]) -> Result<()> {
    if gate.len() != up.len() {
        return Err(Error::shape(
            "silu_mul",
            format!("gate {}, up {}", gate.len(), up.len()),
        ));
    }
    silu_mul_slice(isa, gate, up);
    Ok(())
}

/// Exact (erf) GELU in place, `x/2 · (1 + erf(x/√2))`, with erf evaluated to about 1.5e-7
/// absolute.
pub fn gelu_inplace(x: &mut [f32]) {
    gelu_slice(active_isa(), x)
}

/// Every kernel on a named [`Isa`], for tests and benchmarks that compare paths.
///
/// Same contracts as the public kernels above, plus: each function panics when the named path
/// is not [available](Isa::is_available) on this CPU.
#[doc(hidden)]
pub mod forced {
    use super::*;

    /// [`linear_into`](super::linear_into) on `isa`, split into at most `tasks` parallel tasks
    /// (`None`: the automatic choice).
    pub fn linear_into(
        isa: Isa,
        tasks: Option<usize>,
        x: ArrayView2<f32>,
        w: &Weight,
        y: ArrayViewMut2<f32>,
    ) -> Result<()> {
        linear_with(isa, tasks, x, w, y)
    }

    /// [`linear_shared_into`](super::linear_shared_into) on `isa`, each weight's rows split
    /// into at most `tasks` parallel tasks (`None`: the automatic choice).
    pub fn linear_shared_into(
        isa: Isa,
        tasks: Option<usize>,
        x: ArrayView2<f32>,
        ws: &[&Weight],
        ys: &mut [ArrayViewMut2<f32>],
    ) -> Result<()> {
        linear_shared_with(isa, tasks, x, ws, ys)
    }

    /// [`rms_norm_inplace`](super::rms_norm_inplace) on `isa`.
    pub fn rms_norm_inplace(
        isa: Isa,
        x: ArrayViewMut2<f32>,
        weight: Option<ArrayView1<f32>>,
        eps: f32,
    ) -> Result<()> {
        rms_norm_with(isa, x, weight, eps)
    }

    /// [`layer_norm_inplace`](super::layer_norm_inplace) on `isa`.
    pub fn layer_norm_inplace(
        isa: Isa,
        x: ArrayViewMut2<f32>,
        weight: ArrayView1<f32>,
        bias: ArrayView1<f32>,
        eps: f32,
    ) -> Result<()> {
        layer_norm_with(isa, x, weight, bias, eps)
    }

    /// [`softmax_inplace`](super::softmax_inplace) on `isa`.
    pub fn softmax_inplace(isa: Isa, x: ArrayViewMut2<f32>) {
        for_each_row(x, |row| softmax_row(isa, row));
    }

    /// [`silu_inplace`](super::silu_inplace) on `isa`.
    pub fn silu_inplace(isa: Isa, x: &mut [f32]) {
        silu_slice(isa, x)
    }

    /// [`silu_mul_inplace`](super::silu_mul_inplace) on `isa`.
    pub fn silu_mul_inplace(isa: Isa, gate: &mut [f32], up: &[f32]) -> Result<()> {
        silu_mul_with(isa, gate, up)
    }

    /// [`gelu_inplace`](super::gelu_inplace) on `isa`.
    pub fn gelu_inplace(isa: Isa, x: &mut [f32]) {
        gelu_slice(isa, x)
    }
}
