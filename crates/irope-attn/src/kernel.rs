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
//!
//! Every buffer of a call (work items, partial results, the kernels' working space) lives in
//! an [`AttentionScratch`] that the caller keeps, so that decoding allocates nothing per step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use llama4_core::pool::{self, SyncPtr};
use llama4_core::scratch::refill;
use llama4_core::{Error, KvData, KvView, Result};
use ndarray::{Array3, ArrayView3, ArrayViewMut3};

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
        let forced = std::env::var("IROPE_ATTN_ISA")
            .ok()
            .and_then(|s| match s.as_str() {
                "avx512" => Some(Isa::Avx512),
                "avx2" => Some(Isa::Avx2),
                "portable" => Some(Isa::Portable),
                _ => None,
            });
        match forced {
            Some(f) if is_supported(f) => f,
            _ => ALL_ISAS
                .into_iter()
                .find(|&i| is_supported(i))
                .unwrap_or(Isa::Portable),
        }
    })
}

/// Every path, fastest first.
const ALL_ISAS: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

/// Every path this CPU can run, fastest first (tests compare each with the naive twin).
pub fn supported_isas() -> Vec<Isa> {
    ALL_ISAS.into_iter().filter(|&i| is_supported(i)).collect()
}

/// Whether this CPU can run `isa`. Checked on every call: std caches the detection in an
/// atomic, so this neither allocates nor asks the CPU again.
fn is_supported(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 | Isa::Avx2 => false,
        Isa::Portable => true,
    }
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
    unsafe fn item_avx512(args: &Args<Self>, it: Item, work: &mut avx512::Work, out: Partial);
}

impl KvElem for f32 {
    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item, work: &mut avx512::Work, out: Partial) {
        avx512::item(args, it, work, out)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for bf16 {
    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item, work: &mut avx512::Work, out: Partial) {
        avx512::item(args, it, work, out)
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
    unsafe fn item_avx512(args: &Args<Self>, it: Item, work: &mut avx512::Work, out: Partial) {
        avx512::item(args, it, work, out)
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
/// Allocates its output and working buffers; [`attention_into`] reuses the caller's.
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

/// [`attention`] writing into `out`, which is overwritten, with the buffers of `scratch`: a
/// call with no larger shapes than earlier calls on the same scratch allocates nothing.
///
/// # Shapes
/// `q: [T, Hq, D]`, `k, v: [Hkv, len, D]` views, `out: [T, Hq, D]` in standard layout (else
/// an [`Error::Shape`]).
pub fn attention_into(
    q: ArrayView3<f32>,
    k: &KvView,
    v: &KvView,
    ctx: &AttnContext,
    out: ArrayViewMut3<f32>,
    scratch: &mut AttentionScratch,
) -> Result<()> {
    attention_with_into(isa(), q, k, v, ctx, out, scratch)
}

/// [`attention_into`] on a chosen instruction-set path, as [`attention_with`].
///
/// # Shapes
/// As [`attention_into`].
pub fn attention_with_into(
    isa: Isa,
    q: ArrayView3<f32>,
    k: &KvView,
    v: &KvView,
    ctx: &AttnContext,
    out: ArrayViewMut3<f32>,
    scratch: &mut AttentionScratch,
) -> Result<()> {
    attention_path_into(isa, Path::Auto, q, k, v, ctx, out, scratch)
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
    let mut out = Array3::<f32>::zeros(q.dim());
    attention_path_into(
        isa,
        path,
        q,
        k,
        v,
        ctx,
        out.view_mut(),
        &mut AttentionScratch::default(),
    )?;
    Ok(out)
}

/// [`attention_with_into`] with a chosen AVX-512 item kernel.
#[allow(clippy::too_many_arguments)]
fn attention_path_into(
    isa: Isa,
    path: Path,
    q: ArrayView3<f32>,
    k: &KvView,
    v: &KvView,
    ctx: &AttnContext,
    mut out: ArrayViewMut3<f32>,
    scratch: &mut AttentionScratch,
) -> Result<()> {
    let dims = check(&q, k, v, ctx)?;
    if out.dim() != q.dim() {
        return Err(Error::shape(
            "attention",
            format!("output {:?} for queries {:?}", out.dim(), q.dim()),
        ));
    }
    let Some(o) = out.as_slice_mut() else {
        return Err(Error::shape(
            "attention",
            "output not contiguous in standard layout",
        ));
    };
    let isa = if is_supported(isa) { isa } else { Isa::Portable };
    // Queries in another layout are copied into the scratch (moved out meanwhile, as `run`
    // borrows the rest of it).
    let mut q_copy = std::mem::take(&mut scratch.q);
    let qs = match q.as_slice() {
        Some(qs) => qs,
        None => {
            q_copy.clear();
            q_copy.extend(q.iter());
            &q_copy
        }
    };
    match (k.data, v.data) {
        (KvData::F32(kd), KvData::F32(vd)) => run(isa, path, qs, kd, vd, k, v, dims, ctx, o, scratch),
        (KvData::BF16(kd), KvData::BF16(vd)) => run(isa, path, qs, kd, vd, k, v, dims, ctx, o, scratch),
        (KvData::F16(kd), KvData::F16(vd)) => run(isa, path, qs, kd, vd, k, v, dims, ctx, o, scratch),
        _ => unreachable!("dtypes checked equal"),
    }
    scratch.q = q_copy;
    Ok(())
}

/// Reusable buffers of the attention kernel: pass the same one to every call, and calls
/// after the first with no larger shapes allocate nothing.
#[derive(Default)]
pub struct AttentionScratch {
    /// Work items before their keys are split.
    base: Vec<Item>,
    /// Work items of the call.
    items: Vec<Item>,
    /// Partial results, each item at its rows `row0..`: `acc: [rows, D]`, `m, l: [rows]`.
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    /// Merged running max and sum of each output row, `[T · Hq]`.
    m_all: Vec<f32>,
    l_all: Vec<f32>,
    /// The queries in standard layout, when the caller's are in another.
    q: Vec<f32>,
    /// Working space of the item kernels, one per pool task.
    work: Vec<Work>,
    /// Not used by the kernel: [`crate::Attention`] keeps its heads' outputs (`[T, Hq, D]`)
    /// here between the kernel and `o_proj`, so that one scratch serves the whole layer.
    pub(crate) heads: Vec<f32>,
}

impl std::fmt::Debug for AttentionScratch {
    /// Sizes only: the contents are leftovers of the last call.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionScratch")
            .field("items", &self.items.len())
            .field("partial_floats", &self.acc.len())
            .field("workers", &self.work.len())
            .finish_non_exhaustive()
    }
}

/// Working space of the item kernels for one pool task, which runs items one after another.
///
/// One per task in the scratch rather than thread-local buffers: tasks are claimed by
/// whichever thread comes first, so a thread-local buffer would allocate on the first call
/// that a given thread happens to help with, possibly many calls after the first. Here every
/// task's space is sized for the call before it starts (see `run`), so whether a call
/// allocates depends on its shapes only; and the memory belongs to the session that owns
/// the scratch (freed with it).
#[derive(Debug, Default)]
struct Work {
    body: BodyWork,
    #[cfg(target_arch = "x86_64")]
    keys: avx512::Work,
    #[cfg(target_arch = "x86_64")]
    rows: rows::Work,
}

impl Work {
    /// Sizes the space of `kernel` for items of up to `rows` query rows of dim `d`.
    fn prepare(&mut self, kernel: Kernel, d: usize, rows: usize) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Keys => self.keys.prepare(d, rows),
            #[cfg(target_arch = "x86_64")]
            Kernel::Rows => self.rows.prepare(d, rows),
            Kernel::Body => self.body.prepare(d, rows),
        }
    }
}

/// `v` with room for `n` elements in all (`Vec::reserve` counts from the length).
fn reserve_total<T>(v: &mut Vec<T>, n: usize) {
    v.reserve(n.saturating_sub(v.len()));
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

/// One unit of parallel work: kv head `g`, query tokens `t0..t1`, key slots `s0..s1`; its
/// partial result goes to rows `row0..` of the partial buffers.
#[derive(Clone, Copy, Debug)]
struct Item {
    g: usize,
    t0: usize,
    t1: usize,
    s0: usize,
    s1: usize,
    row0: usize,
}

/// Where an item's kernel writes its partial result, overwriting it: unnormalised
/// accumulators `acc: [rows, D]` with their running max `m` and sum `l` (`[rows]`), so that
/// items that split one query's keys can be merged exactly.
struct Partial<'a> {
    acc: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
}

/// Visible key slots `lo..hi` of a query at `pos` (empty when `lo >= hi`).
fn visible_slots(mask: MaskKind, pos: usize, first_pos: usize, len: usize) -> (usize, usize) {
    let (a, b) = mask.key_range(pos);
    let lo = a.max(first_pos) - first_pos;
    let hi = (b + 1).saturating_sub(first_pos).min(len);
    (lo, hi)
}

/// The kernel on checked inputs: `out` (`[T, Hq, D]`) is overwritten.
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
    out: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let Dims {
        t,
        hq,
        hkv,
        d,
        len,
        first_pos,
    } = dims;
    let rep = dims.group();
    // Zero: rows that see no key stay so, and the merge below accumulates here.
    out.fill(0.0);
    if t == 0 || len == 0 {
        return;
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
    let base = &mut scratch.base;
    base.clear();
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
                base.push(Item {
                    g,
                    t0,
                    t1,
                    s0,
                    s1,
                    row0: 0,
                });
            }
        }
    }
    let threads = pool::threads();
    let base_rows = base.iter().map(|it| (it.t1 - it.t0) * rep).sum::<usize>();
    let items = &mut scratch.items;
    items.clear();
    if base.len() < 2 * threads {
        let splits = (2 * threads).div_ceil(base.len().max(1));
        // Room for the most pieces these items can give, so that decoding over a growing
        // cache does not allocate whenever one more split starts.
        reserve_total(items, base.len() * splits);
        reserve_total(&mut scratch.acc, base_rows * splits * d);
        reserve_total(&mut scratch.m, base_rows * splits);
        reserve_total(&mut scratch.l, base_rows * splits);
        for &it in base.iter() {
            let n = it.s1 - it.s0;
            let parts = splits.min(n / MIN_KEYS_PER_SPLIT).max(1);
            // Split on tile boundaries so each piece reads whole tiles.
            let step = n.div_ceil(parts).div_ceil(KEY_TILE) * KEY_TILE;
            items.extend((it.s0..it.s1).step_by(step).map(|s0| Item {
                s0,
                s1: (s0 + step).min(it.s1),
                ..it
            }));
        }
    } else {
        items.extend_from_slice(base);
    }
    let mut rows_total = 0;
    for it in items.iter_mut() {
        it.row0 = rows_total;
        rows_total += (it.t1 - it.t0) * rep;
    }
    // Stale contents are fine: each item's kernel overwrites all of its rows.
    scratch.acc.resize(rows_total * d, 0.0);
    scratch.m.resize(rows_total, 0.0);
    scratch.l.resize(rows_total, 0.0);

    // One task per thread, each claiming items until none is left, with working space of its
    // own, sized for the largest item of each kernel whichever items the task ends up with.
    let workers = threads.min(items.len());
    if scratch.work.len() < threads {
        scratch.work.resize_with(threads, Work::default);
    }
    let mut largest = [(Kernel::Body, 0usize); 3];
    for it in items.iter() {
        let rows = (it.t1 - it.t0) * rep;
        let k = kernel(isa, path, rows);
        let slot = &mut largest[k as usize];
        *slot = (k, slot.1.max(rows));
    }
    for w in &mut scratch.work {
        for &(k, rows) in &largest {
            if rows > 0 {
                w.prepare(k, d, rows);
            }
        }
    }
    let items = &scratch.items[..];
    let next = AtomicUsize::new(0);
    let work = SyncPtr(scratch.work.as_mut_ptr());
    let (acc, m, l) = (
        SyncPtr(scratch.acc.as_mut_ptr()),
        SyncPtr(scratch.m.as_mut_ptr()),
        SyncPtr(scratch.l.as_mut_ptr()),
    );
    pool::run(workers, &|w| {
        // SAFETY: `w < workers <= work.len()`, and the pool runs task `w` once: no other
        // reference to `work[w]` exists while it runs; the vector is not resized meanwhile.
        let work = unsafe { &mut *work.get().add(w) };
        while let Some(&it) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            let rows = (it.t1 - it.t0) * rep;
            // SAFETY: the counter hands each item to one task; items' rows `row0..row0 + rows`
            // are disjoint and inside the partial buffers, sized to their total above. The
            // pool returns only after every task has finished, so these borrows end before
            // the merge reads the buffers.
            let out = unsafe {
                Partial {
                    acc: std::slice::from_raw_parts_mut(acc.get().add(it.row0 * d), rows * d),
                    m: std::slice::from_raw_parts_mut(m.get().add(it.row0), rows),
                    l: std::slice::from_raw_parts_mut(l.get().add(it.row0), rows),
                }
            };
            run_item(isa, path, &args, it, work, out);
        }
    });

    // Merge pieces of the same (head, token) rows with the log-sum-exp rule, then normalise.
    let m_all = refill(&mut scratch.m_all, t * hq, f32::NEG_INFINITY);
    let l_all = refill(&mut scratch.l_all, t * hq, 0f32);
    let (p_acc, p_m, p_l) = (&scratch.acc, &scratch.m, &scratch.l);
    for it in items {
        for ti in 0..it.t1 - it.t0 {
            for r in 0..rep {
                let row = it.row0 + ti * rep + r;
                let dst = (it.t0 + ti) * hq + it.g * rep + r;
                let (m1, m2) = (m_all[dst], p_m[row]);
                if m2 == f32::NEG_INFINITY {
                    continue;
                }
                let m = m1.max(m2);
                let (a1, a2) = ((m1 - m).exp(), (m2 - m).exp());
                l_all[dst] = l_all[dst] * a1 + p_l[row] * a2;
                let acc = &mut out[dst * d..(dst + 1) * d];
                for (x, &y) in acc.iter_mut().zip(&p_acc[row * d..(row + 1) * d]) {
                    *x = *x * a1 + y * a2;
                }
                m_all[dst] = m;
            }
        }
    }
    for (row, &l) in l_all.iter().enumerate() {
        let o = &mut out[row * d..(row + 1) * d];
        if l > 0.0 {
            let inv = 1.0 / l;
            for y in o {
                *y *= inv;
            }
        } else {
            // Accumulated from nothing (or from non-finite scores): no key seen.
            o.fill(0.0);
        }
    }
}

/// The item kernels, as far as their working space goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// [`avx512::item`].
    #[cfg(target_arch = "x86_64")]
    Keys,
    /// [`rows::item`].
    #[cfg(target_arch = "x86_64")]
    Rows,
    /// [`item_body`] (AVX2 and portable).
    Body,
}

/// The kernel that runs an item of `rows` query rows.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn kernel(isa: Isa, path: Path, rows: usize) -> Kernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let by_rows = match path {
                Path::Auto => rows >= MIN_ROWS_FOR_ROWS_KERNEL,
                Path::Keys => false,
                Path::Rows => true,
            };
            if by_rows {
                Kernel::Rows
            } else {
                Kernel::Keys
            }
        }
        _ => Kernel::Body,
    }
}

fn run_item<E: KvElem>(isa: Isa, path: Path, args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
    let rows = (it.t1 - it.t0) * args.dims.group();
    match kernel(isa, path, rows) {
        // SAFETY (both AVX-512 kernels, and AVX2 below): `kernel` picks them for
        // `Isa::Avx512` only, and `attention_path_into` passes an ISA only if `is_supported`.
        #[cfg(target_arch = "x86_64")]
        Kernel::Rows => unsafe { rows::item(args, it, &mut work.rows, out) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Keys => unsafe { E::item_avx512(args, it, &mut work.keys, out) },
        Kernel::Body => match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { item_avx2(args, it, &mut work.body, out) },
            _ => item_body::<E, Portable>(args, it, &mut work.body, out),
        },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn item_avx2<E: KvElem>(args: &Args<E>, it: Item, work: &mut BodyWork, out: Partial) {
    item_body::<E, x86::Avx2>(args, it, work, out)
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

/// Working space of [`item_body`].
#[derive(Debug, Default)]
struct BodyWork {
    /// Scaled queries, `[rows, D]`.
    q: Vec<f32>,
    /// Visible key slots of each token, within the item's slots.
    vis: Vec<(usize, usize)>,
    /// A tile of keys and of values, widened: `[KEY_TILE, D]`.
    k: Vec<f32>,
    v: Vec<f32>,
}

impl BodyWork {
    /// Empties the buffers and sizes them for an item of `rows` query rows of dim `d`, all
    /// zeroed. Once done for the largest item of a call (see `run`), doing it for any item of
    /// the call allocates nothing.
    fn prepare(&mut self, d: usize, rows: usize) {
        refill(&mut self.q, rows * d, 0f32);
        // One range per token: at most one per row.
        self.vis.clear();
        self.vis.reserve(rows);
        refill(&mut self.k, KEY_TILE * d, 0f32);
        refill(&mut self.v, KEY_TILE * d, 0f32);
    }
}

#[inline(always)]
fn item_body<E: KvElem, S: Simd>(args: &Args<E>, it: Item, work: &mut BodyWork, out: Partial) {
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

    work.prepare(d, rows);
    let BodyWork {
        q: qbuf,
        vis,
        k: kbuf,
        v: vbuf,
    } = work;
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

    let Partial { acc, m, l } = out;
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    acc.fill(0.0);
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

    use llama4_testkit::values;

    /// One call's inputs: `t` tokens ending at the last of `len` cached keys (from position
    /// `first_pos`), `hkv × rep` query heads of dim `d`.
    struct Shape {
        t: usize,
        hkv: usize,
        rep: usize,
        d: usize,
        len: usize,
        first_pos: usize,
        mask: MaskKind,
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
                #[cfg(target_arch = "x86_64")]
                {
                    w.keys.poison();
                    w.rows.poison();
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
        let (kd, vd) = match sh.dtype {
            0 => (KvData::F32(&kf), KvData::F32(&vf)),
            1 => (KvData::BF16(&kb), KvData::BF16(&vb)),
            _ => (KvData::F16(&kh), KvData::F16(&vh)),
        };
        let k = KvView {
            data: kd,
            heads: sh.hkv,
            len: sh.len,
            head_dim: sh.d,
            head_stride: stride,
            first_pos: sh.first_pos,
        };
        let v = KvView { data: vd, ..k };
        let last = sh.first_pos + sh.len - 1;
        let positions: Vec<usize> = (last + 1 - sh.t..=last).collect();
        let ctx = AttnContext {
            positions: &positions,
            mask: sh.mask,
            scale: 1.0 / (sh.d as f32).sqrt(),
        };
        for isa in supported_isas() {
            let paths: &[Path] = if isa == Isa::Avx512 {
                &[Path::Auto, Path::Keys, Path::Rows]
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
            mask: MaskKind::Causal,
            dtype,
        };
        // Larger, then smaller, then larger again (other dims and dtypes), so that stale
        // contents of any reused buffer would show.
        let shapes = [
            prefill(150, 128, MaskKind::Chunked(64), 1),
            decode(1, 4, 4, 64, 300, 0),
            // One kv head: keys split between threads.
            decode(3, 1, 5, 67, 3000, 2),
            prefill(20, 16, MaskKind::Causal, 0),
            decode(4, 4, 4, 64, 300, 1),
            prefill(170, 67, MaskKind::Causal, 2),
            decode(2, 2, 8, 128, 2500, 1),
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
        let k = KvView {
            data: KvData::F32(&kv),
            heads: 2,
            len: 5,
            head_dim: d,
            head_stride: 5 * d,
            first_pos: 0,
        };
        let ctx = AttnContext {
            positions: &[3, 4],
            mask: MaskKind::Causal,
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
        let k = KvView {
            data: KvData::F32(&kv),
            heads: 2,
            len: 9,
            head_dim: d,
            head_stride: 9 * d,
            first_pos: 0,
        };
        let ctx = AttnContext {
            positions: &[6, 7, 8],
            mask: MaskKind::Causal,
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
}
