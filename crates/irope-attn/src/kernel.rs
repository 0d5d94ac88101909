//! Attention over keys and values stored elsewhere (the cache owns them; this reads
//! [`KvView`]s), tiled over keys with an online softmax: memory stays `O(tile)` per work item,
//! never `[T, T]`.
//!
//! Work is split by key/value head (and by blocks of query tokens): the `Hq / Hkv` query heads
//! that share a kv head are processed together, so each key and value is read from memory once
//! per call, whatever the group size.
//!
//! On AVX-512 there are two item kernels: [`avx512`], register-blocked over keys so that
//! decoding (a few query rows) at long context is bound by memory bandwidth, and [`rows`], which
//! puts 16 query rows in the lanes of a vector for prefill (many rows per item), where the
//! arithmetic, not memory, is the limit. The AVX2 and portable paths (one generic body,
//! [`item_body`]) widen a tile of keys and values to f32 and work row by row: correct, slower.

use std::sync::OnceLock;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use llama4_core::{Error, KvData, KvView, Result};
use ndarray::{Array3, ArrayView3};
use rayon::prelude::*;

use crate::MaskKind;

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(all(test, target_arch = "x86_64"))]
mod path_tests;
#[cfg(target_arch = "x86_64")]
mod rows;

/// Everything the kernel needs besides the tensors.
#[derive(Clone, Copy, Debug)]
pub struct AttnContext<'a> {
    /// Absolute position of each query row.
    pub positions: &'a [usize],
    /// Which keys each query sees (on absolute positions).
    pub mask: MaskKind,
    /// Multiplier of `q·k` before the softmax (`1/sqrt(D)` in Llama 4).
    pub scale: f32,
}

/// Keys per tile: 64 keys × 128 dims × 4 bytes = 32 KiB of widened keys (and as much of values)
/// per tile, which stays in L1/L2 while every query row of the group uses it.
const KEY_TILE: usize = 64;
/// Query vectors (tokens × heads of one group) per work item: bounds the accumulators to
/// 64 × D floats and leaves enough items to keep the threads busy during prefill.
const ROWS_PER_ITEM: usize = 64;
/// Below this many keys per work item, decoding does not split the keys further.
const MIN_KEYS_PER_SPLIT: usize = 1024;
/// From this many query rows per item on, AVX-512 runs the rows-in-lanes kernel ([`rows`]):
/// a full vector of rows. Below, the key-blocked [`avx512`] kernel wastes fewer lanes.
const MIN_ROWS_FOR_ROWS_KERNEL: usize = 16;

/// Which AVX-512 item kernel runs (tests force each one; elsewhere [`Path::Auto`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// By the number of query rows of the item ([`MIN_ROWS_FOR_ROWS_KERNEL`]).
    Auto,
    /// Always the key-blocked kernel.
    #[cfg_attr(not(test), allow(dead_code))]
    Keys,
    /// Always the rows-in-lanes kernel.
    #[cfg_attr(not(test), allow(dead_code))]
    Rows,
}

/// The instruction set the kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F/BW/VL (x86-64).
    Avx512,
    /// AVX2 with FMA (x86-64).
    Avx2,
    /// Whatever the compile target guarantees.
    Portable,
}

/// The path chosen for this CPU, detected once. The environment variable `IROPE_ATTN_ISA`
/// (`avx512`, `avx2`, `portable`) forces a path, if the CPU supports it.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let supported = supported_isas();
        let forced = std::env::var("IROPE_ATTN_ISA")
            .ok()
            .and_then(|s| match s.as_str() {
                "avx512" => Some(Isa::Avx512),
                "avx2" => Some(Isa::Avx2),
                "portable" => Some(Isa::Portable),
                _ => None,
            });
        match forced {
            Some(f) if supported.contains(&f) => f,
            _ => supported[0],
        }
    })
}

/// Every path this CPU can run, fastest first (tests compare each with the naive twin).
pub fn supported_isas() -> Vec<Isa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
        {
            v.push(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2);
        }
    }
    v.push(Isa::Portable);
    v
}

/// A stored key/value element.
trait KvElem: Copy + Send + Sync {
    /// `dst[i] = src[i]` as f32 (same lengths).
    fn widen(src: &[Self], dst: &mut [f32]);

    /// The AVX-512 item kernel for this dtype.
    ///
    /// # Safety
    /// As [`avx512::item`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item) -> Partial;
}

impl KvElem for f32 {
    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item) -> Partial {
        avx512::item(args, it)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for bf16 {
    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item) -> Partial {
        avx512::item(args, it)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // bf16 is the top half of an f32: a shift that vectorises (half's `to_f32` also quiets
        // NaNs, a branch we do not need).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

impl KvElem for f16 {
    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item) -> Partial {
        avx512::item(args, it)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // half converts slices with F16C when the CPU has it.
        src.convert_to_f32_slice(dst);
    }
}

/// Shapes of one call, checked.
#[derive(Clone, Copy, Debug)]
struct Dims {
    t: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    len: usize,
    first_pos: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.hq / self.hkv
    }
}

fn check(q: &ArrayView3<f32>, k: &KvView, v: &KvView, ctx: &AttnContext) -> Result<Dims> {
    let (t, hq, d) = q.dim();
    let bad = |detail: String| Err(Error::shape("attention", detail));
    if ctx.positions.len() != t {
        return bad(format!("{} positions for {t} query rows", ctx.positions.len()));
    }
    if k.heads != v.heads || k.len != v.len || k.head_dim != v.head_dim || k.first_pos != v.first_pos {
        return bad(format!(
            "keys ({} heads, {} slots, dim {}, first {}) and values ({}, {}, {}, {}) differ",
            k.heads, k.len, k.head_dim, k.first_pos, v.heads, v.len, v.head_dim, v.first_pos
        ));
    }
    if !k.is_consistent() || !v.is_consistent() {
        return bad("a key/value view claims slots outside its data".into());
    }
    if k.heads == 0 || hq % k.heads != 0 {
        return bad(format!("{hq} query heads over {} kv heads", k.heads));
    }
    if k.head_dim != d {
        return bad(format!("query head dim {d}, key head dim {}", k.head_dim));
    }
    if std::mem::discriminant(&k.data) != std::mem::discriminant(&v.data) {
        return bad("keys and values in different dtypes".into());
    }
    Ok(Dims {
        t,
        hq,
        hkv: k.heads,
        d,
        len: k.len,
        first_pos: k.first_pos,
    })
}

/// Tiled online-softmax attention with grouped-query heads.
///
/// Query head `h` reads kv head `h / (Hq / Hkv)`. Slot `j` of the views holds the key at
/// absolute position `first_pos + j`; query row `t` (at `positions[t]`) attends to the slots
/// the mask allows. Key ranges the mask excludes are not read at all (a chunked layer reads
/// only its chunk). A query that sees no key gets a zero output. K/V may be f32, bf16 or f16;
/// all arithmetic is f32.
///
/// # Shapes
/// `q: [T, Hq, D]`, `k, v: [Hkv, len, D]` views → `[T, Hq, D]`.
pub fn attention(q: ArrayView3<f32>, k: &KvView, v: &KvView, ctx: &AttnContext) -> Result<Array3<f32>> {
    attention_with(isa(), q, k, v, ctx)
}

/// [`attention`] on a chosen instruction-set path (for tests and benches); an unsupported
/// path falls back to [`Isa::Portable`].
///
/// # Shapes
/// As [`attention`].
pub fn attention_with(
    isa: Isa,
    q: ArrayView3<f32>,
    k: &KvView,
    v: &KvView,
    ctx: &AttnContext,
) -> Result<Array3<f32>> {
    attention_path(isa, Path::Auto, q, k, v, ctx)
}

/// [`attention_with`] with a chosen AVX-512 item kernel.
fn attention_path(
    isa: Isa,
    path: Path,
    q: ArrayView3<f32>,
    k: &KvView,
    v: &KvView,
    ctx: &AttnContext,
) -> Result<Array3<f32>> {
    let dims = check(&q, k, v, ctx)?;
    let isa = if supported_isas().contains(&isa) {
        isa
    } else {
        Isa::Portable
    };
    let q = q.as_standard_layout();
    let qs = q.as_slice().expect("standard layout");
    match (k.data, v.data) {
        (KvData::F32(kd), KvData::F32(vd)) => Ok(run(isa, path, qs, kd, vd, k, v, dims, ctx)),
        (KvData::BF16(kd), KvData::BF16(vd)) => Ok(run(isa, path, qs, kd, vd, k, v, dims, ctx)),
        (KvData::F16(kd), KvData::F16(vd)) => Ok(run(isa, path, qs, kd, vd, k, v, dims, ctx)),
        _ => unreachable!("dtypes checked equal"),
    }
}

/// The read-only inputs of every work item.
struct Args<'a, E> {
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    k_stride: usize,
    v_stride: usize,
    dims: Dims,
    ctx: &'a AttnContext<'a>,
}

/// One unit of parallel work: kv head `g`, query tokens `t0..t1`, key slots `s0..s1`.
#[derive(Clone, Copy, Debug)]
struct Item {
    g: usize,
    t0: usize,
    t1: usize,
    s0: usize,
    s1: usize,
}

/// Partial result of an item: unnormalised accumulators with their running max and sum, so
/// that items that split one query's keys can be merged exactly.
struct Partial {
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

/// Visible key slots `lo..hi` of a query at `pos` (empty when `lo >= hi`).
fn visible_slots(mask: MaskKind, pos: usize, first_pos: usize, len: usize) -> (usize, usize) {
    let (a, b) = mask.key_range(pos);
    let lo = a.max(first_pos) - first_pos;
    let hi = (b + 1).saturating_sub(first_pos).min(len);
    (lo, hi)
}

#[allow(clippy::too_many_arguments)]
fn run<E: KvElem>(
    isa: Isa,
    path: Path,
    q: &[f32],
    kd: &[E],
    vd: &[E],
    k: &KvView,
    v: &KvView,
    dims: Dims,
    ctx: &AttnContext,
) -> Array3<f32> {
    let Dims {
        t,
        hq,
        hkv,
        d,
        len,
        first_pos,
    } = dims;
    let rep = dims.group();
    let mut out = Array3::<f32>::zeros((t, hq, d));
    if t == 0 || len == 0 {
        return out;
    }
    let args = Args {
        q,
        k: kd,
        v: vd,
        k_stride: k.head_stride,
        v_stride: v.head_stride,
        dims,
        ctx,
    };

    // Items: kv heads × query blocks; when that leaves threads idle (decoding with few kv
    // heads), the keys of each item are split too and the pieces merged afterwards.
    let tokens_per_item = (ROWS_PER_ITEM / rep).max(1);
    let mut items = Vec::new();
    for g in 0..hkv {
        for t0 in (0..t).step_by(tokens_per_item) {
            let t1 = (t0 + tokens_per_item).min(t);
            let (mut s0, mut s1) = (usize::MAX, 0);
            for &p in &ctx.positions[t0..t1] {
                let (lo, hi) = visible_slots(ctx.mask, p, first_pos, len);
                if lo < hi {
                    s0 = s0.min(lo);
                    s1 = s1.max(hi);
                }
            }
            if s0 < s1 {
                items.push(Item { g, t0, t1, s0, s1 });
            }
        }
    }
    let threads = rayon::current_num_threads();
    if items.len() < 2 * threads {
        let splits = (2 * threads).div_ceil(items.len().max(1));
        items = items
            .into_iter()
            .flat_map(|it| {
                let n = it.s1 - it.s0;
                let parts = splits.min(n / MIN_KEYS_PER_SPLIT).max(1);
                // Split on tile boundaries so each piece reads whole tiles.
                let step = n.div_ceil(parts).div_ceil(KEY_TILE) * KEY_TILE;
                (it.s0..it.s1)
                    .step_by(step)
                    .map(move |s0| Item {
                        s0,
                        s1: (s0 + step).min(it.s1),
                        ..it
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
    }

    let partials: Vec<(Item, Partial)> = items
        .par_iter()
        .map(|&it| (it, run_item(isa, path, &args, it)))
        .collect();

    // Merge pieces of the same (head, token) rows with the log-sum-exp rule, then normalise.
    let mut m_all = vec![f32::NEG_INFINITY; t * hq];
    let mut l_all = vec![0f32; t * hq];
    let mut acc_all = vec![0f32; t * hq * d];
    for (it, p) in &partials {
        for ti in 0..it.t1 - it.t0 {
            for r in 0..rep {
                let row = ti * rep + r;
                let dst = (it.t0 + ti) * hq + it.g * rep + r;
                let (m1, m2) = (m_all[dst], p.m[row]);
                if m2 == f32::NEG_INFINITY {
                    continue;
                }
                let m = m1.max(m2);
                let (a1, a2) = ((m1 - m).exp(), (m2 - m).exp());
                l_all[dst] = l_all[dst] * a1 + p.l[row] * a2;
                let acc = &mut acc_all[dst * d..(dst + 1) * d];
                for (x, &y) in acc.iter_mut().zip(&p.acc[row * d..(row + 1) * d]) {
                    *x = *x * a1 + y * a2;
                }
                m_all[dst] = m;
            }
        }
    }
    let o = out.as_slice_mut().expect("fresh array");
    for (row, &l) in l_all.iter().enumerate() {
        if l > 0.0 {
            let inv = 1.0 / l;
            for (y, &x) in o[row * d..(row + 1) * d]
                .iter_mut()
                .zip(&acc_all[row * d..(row + 1) * d])
            {
                *y = x * inv;
            }
        }
    }
    out
}

fn run_item<E: KvElem>(isa: Isa, path: Path, args: &Args<E>, it: Item) -> Partial {
    match isa {
        // SAFETY (both AVX-512 kernels and AVX2): `attention_path` only selects a path that
        // `supported_isas` detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let rows = (it.t1 - it.t0) * args.dims.group();
            let by_rows = match path {
                Path::Auto => rows >= MIN_ROWS_FOR_ROWS_KERNEL,
                Path::Keys => false,
                Path::Rows => true,
            };
            if by_rows {
                unsafe { rows::item(args, it) }
            } else {
                unsafe { E::item_avx512(args, it) }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { item_avx2(args, it) },
        _ => item_body::<E, Portable>(args, it),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn item_avx2<E: KvElem>(args: &Args<E>, it: Item) -> Partial {
    item_body::<E, x86::Avx2>(args, it)
}

/// The arithmetic that differs between instruction sets. Implementations are only ever
/// inlined into an item function compiled for their features.
trait Simd {
    /// `a·b` over the common length.
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `a·b + c`.
    fn fma(a: f32, b: f32, c: f32) -> f32;
    /// `acc += Σ_j p[j] · vals[j·d .. (j+1)·d]` with `acc.len() == d`.
    #[inline(always)]
    fn axpy_rows(acc: &mut [f32], p: &[f32], vals: &[f32]) {
        for (&pj, vj) in p.iter().zip(vals.chunks_exact(acc.len())) {
            for (y, &x) in acc.iter_mut().zip(vj) {
                *y = Self::fma(pj, x, *y);
            }
        }
    }
}

/// Plain Rust: 16 independent lanes so the compiler may vectorise without reassociating.
struct Portable;

impl Simd for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        const W: usize = 16;
        let mut acc = [0f32; W];
        let (ca, cb) = (a.chunks_exact(W), b.chunks_exact(W));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..W {
                acc[i] += x[i] * y[i];
            }
        }
        let tail: f32 = ra.iter().zip(rb).map(|(&x, &y)| x * y).sum();
        reduce_sum(acc) + tail
    }

    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Explicit AVX2 dot products: the compiler's own vectorisation of a 16-lane accumulator
    //! came out 2 lanes wide.
    use std::arch::x86_64::*;

    use super::Simd;

    /// AVX2 + FMA.
    pub(super) struct Avx2;

    impl Simd for Avx2 {
        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: only instantiated inside `item_avx2`, which runs after detection.
            unsafe { dot256(a, b) }
        }

        #[inline(always)]
        fn fma(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot256(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY (all loads): `i + 8 <= n`.
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let v = _mm256_add_ps(acc0, acc1);
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        let v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
        let mut total = _mm_cvtss_f32(v);
        while i < n {
            total = a[i].mul_add(b[i], total);
            i += 1;
        }
        total
    }
}

#[inline(always)]
fn reduce_sum<const W: usize>(mut acc: [f32; W]) -> f32 {
    let mut w = W / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    const W: usize = 16;
    let mut acc = [0f32; W];
    let c = x.chunks_exact(W);
    let tail: f32 = c.remainder().iter().sum();
    for ch in c {
        for i in 0..W {
            acc[i] += ch[i];
        }
    }
    reduce_sum(acc) + tail
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    const W: usize = 16;
    let mut acc = [f32::NEG_INFINITY; W];
    let c = x.chunks_exact(W);
    let tail = c.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for ch in c {
        for i in 0..W {
            acc[i] = acc[i].max(ch[i]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// `e^x` for `x ≤ 0` (the softmax's arguments), to about 2 ulp, in operations that vectorise
/// (std's `exp` is a libm call per element). Returns 0 below `-87` (and for `-inf`).
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| < 2^9 (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 0.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Cephes expf polynomial on |r| ≤ ln2/2.
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}

#[inline(always)]
fn item_body<E: KvElem, S: Simd>(args: &Args<E>, it: Item) -> Partial {
    let Dims {
        hq,
        d,
        len,
        first_pos,
        ..
    } = args.dims;
    let rep = args.dims.group();
    let ctx = args.ctx;
    let nt = it.t1 - it.t0;
    let rows = nt * rep;

    let mut qbuf = vec![0f32; rows * d];
    let mut vis = Vec::with_capacity(nt);
    for ti in 0..nt {
        let t = it.t0 + ti;
        let (lo, hi) = visible_slots(ctx.mask, ctx.positions[t], first_pos, len);
        vis.push((lo.max(it.s0), hi.min(it.s1)));
        for r in 0..rep {
            let src = &args.q[(t * hq + it.g * rep + r) * d..][..d];
            let dst = &mut qbuf[(ti * rep + r) * d..][..d];
            for (y, &x) in dst.iter_mut().zip(src) {
                *y = x * ctx.scale;
            }
        }
    }

    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut acc = vec![0f32; rows * d];
    let mut kbuf = vec![0f32; KEY_TILE * d];
    let mut vbuf = vec![0f32; KEY_TILE * d];
    let mut s = [0f32; KEY_TILE];
    let kh = &args.k[it.g * args.k_stride..];
    let vh = &args.v[it.g * args.v_stride..];

    for j0 in (it.s0..it.s1).step_by(KEY_TILE) {
        let j1 = (j0 + KEY_TILE).min(it.s1);
        let n = j1 - j0;
        E::widen(&kh[j0 * d..j1 * d], &mut kbuf[..n * d]);
        E::widen(&vh[j0 * d..j1 * d], &mut vbuf[..n * d]);
        for (ti, &(lo, hi)) in vis.iter().enumerate() {
            let (a, b) = (lo.max(j0), hi.min(j1));
            if a >= b {
                continue;
            }
            let keys = &kbuf[(a - j0) * d..(b - j0) * d];
            let vals = &vbuf[(a - j0) * d..(b - j0) * d];
            for r in 0..rep {
                let row = ti * rep + r;
                let qr = &qbuf[row * d..(row + 1) * d];
                let sc = &mut s[..b - a];
                for (x, kj) in sc.iter_mut().zip(keys.chunks_exact(d)) {
                    *x = S::dot(qr, kj);
                }
                let m_new = m[row].max(max(sc));
                let alpha = exp_neg(m[row] - m_new);
                for x in sc.iter_mut() {
                    *x = exp_neg(*x - m_new);
                }
                l[row] = l[row] * alpha + sum(sc);
                let ar = &mut acc[row * d..(row + 1) * d];
                if alpha != 1.0 {
                    ar.iter_mut().for_each(|x| *x *= alpha);
                }
                S::axpy_rows(ar, sc, vals);
                m[row] = m_new;
            }
        }
    }
    Partial { acc, m, l }
}

/// Element `(h, j, i)` of a view as f32.
fn kv_at(view: &KvView, h: usize, j: usize, i: usize) -> f32 {
    let at = h * view.head_stride + j * view.head_dim + i;
    match view.data {
        KvData::F32(x) => x[at],
        KvData::BF16(x) => x[at].to_f32(),
        KvData::F16(x) => x[at].to_f32(),
    }
}

/// The plain formula, for tests: for each query row and head, scores over every slot the mask
/// allows, softmax and weighted sum, all in f64; no tiling, no skipping. Same contract as
/// [`attention`].
///
/// # Shapes
/// `q: [T, Hq, D]`, `k, v: [Hkv, len, D]` views → `[T, Hq, D]`.
pub fn attention_naive(q: ArrayView3<f32>, k: &KvView, v: &KvView, ctx: &AttnContext) -> Result<Array3<f32>> {
    let dims = check(&q, k, v, ctx)?;
    let Dims {
        t,
        hq,
        d,
        len,
        first_pos,
        ..
    } = dims;
    let rep = dims.group();
    let mut out = Array3::<f32>::zeros((t, hq, d));
    for ti in 0..t {
        let p = ctx.positions[ti];
        for h in 0..hq {
            let g = h / rep;
            let slots: Vec<usize> = (0..len).filter(|&j| ctx.mask.allowed(p, first_pos + j)).collect();
            if slots.is_empty() {
                continue;
            }
            let scores: Vec<f64> = slots
                .iter()
                .map(|&j| {
                    let dot: f64 = (0..d)
                        .map(|i| q[[ti, h, i]] as f64 * kv_at(k, g, j, i) as f64)
                        .sum();
                    dot * ctx.scale as f64
                })
                .collect();
            let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let total: f64 = w.iter().sum();
            for i in 0..d {
                let y: f64 = slots
                    .iter()
                    .zip(&w)
                    .map(|(&j, &wj)| wj * kv_at(v, g, j, i) as f64)
                    .sum();
                out[[ti, h, i]] = (y / total) as f32;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_is_close_to_exp() {
        let mut worst = 0f64;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_neg(x) as f64;
            if x >= -87.0 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert_eq!(got, 0.0);
            }
            x += 0.001_7;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn visible_slots_clip_to_view() {
        // A chunked cache restarted at 16: slot 0 is position 16.
        let m = MaskKind::Chunked(8);
        assert_eq!(visible_slots(m, 19, 16, 4), (0, 4));
        assert_eq!(visible_slots(m, 18, 16, 4), (0, 3));
        // A view holding positions 0..24 for a query at 19 sees slots 16..=19.
        assert_eq!(visible_slots(m, 19, 0, 24), (16, 20));
        assert_eq!(visible_slots(MaskKind::Causal, 5, 10, 4), (0, 0));
    }
}
