//! Attention over keys and values stored elsewhere (a cache owns them; this reads
//! [`KvView`]s), tiled over keys with an online softmax: memory stays `O(tile)` per work item,
//! never `[T, T]`.
//!
//! Work is split by key/value head (and by blocks of query tokens): the `Hq / Hkv` query heads
//! that share a kv head are processed together, so each key and value is read from memory once
//! per call, whatever the group size ([`plan`]).
//!
//! On AVX-512 there are three item kernels: [`keys_avx512`], register-blocked over keys so that
//! decoding (a few query rows) at long context is bound by memory bandwidth, and
//! [`rows_avx512`], which puts 16 query rows in the lanes of a vector for prefill (many rows per
//! item), where the arithmetic, not memory, is the limit; with AVX-512 BF16, [`rows_bf16`] does
//! the same with bf16 dot products for the q8 cache, whose elements carry no more precision
//! than bf16. The AVX2 and portable paths share one body generic over the crate's vector
//! vocabulary ([`body`]).
//!
//! The instruction set is the crate's ([`super::active_isa`], `LLAMA4_KERNEL`). Every buffer of
//! a call (work items, partial results, the kernels' working space) lives in an
//! [`AttentionScratch`] that the caller keeps, so that decoding allocates nothing per step.

use half::{bf16, f16};
use ndarray::{Array3, ArrayView3, ArrayViewMut3};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::simd::{Elem, QueryI8};
use super::Isa;
use crate::layer_kind::AttentionMask;
use crate::{Error, KvData, KvView, Result};

mod body;
#[cfg(test)]
mod decode_tests;
#[cfg(target_arch = "x86_64")]
mod keys_avx512;
mod naive;
#[cfg(all(test, target_arch = "x86_64"))]
mod path_tests;
mod plan;
#[cfg(target_arch = "x86_64")]
mod rows_avx512;
#[cfg(target_arch = "x86_64")]
mod rows_bf16;
#[cfg(test)]
mod tests;

pub use naive::attention_naive;

/// Everything the kernel needs besides the tensors.
#[derive(Clone, Copy)]
pub struct AttnContext<'a> {
    /// Absolute position of each query row.
    pub positions: &'a [usize],
    /// Which keys each query sees (on absolute positions): a [`crate::LayerKind`], or any
    /// other contiguous window ending at the query.
    pub mask: &'a dyn AttentionMask,
    /// Multiplier of `q·k` before the softmax (`1/sqrt(D)` in Llama 4).
    pub scale: f32,
}

impl std::fmt::Debug for AttnContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttnContext")
            .field("positions", &self.positions.len())
            .field("scale", &self.scale)
            .finish_non_exhaustive()
    }
}

/// Keys per tile: 64 keys × 128 dims × 4 bytes = 32 KiB of widened keys (and as much of values)
/// per tile, which stays in L1/L2 while every query row of the group uses it.
const KEY_TILE: usize = 64;
/// Query vectors (tokens × heads of one group) per work item: bounds the accumulators to
/// 64 × D floats and leaves enough items to keep the threads busy during prefill.
const ROWS_PER_ITEM: usize = 64;
/// Query vectors per work item where [`rows_bf16`] runs them: it rounds each tile of keys and
/// values to bf16 once per item, so more rows share that work.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const ROWS_PER_ITEM_BF16: usize = 256;
/// Below this many keys per work item, decoding does not split the keys further.
const MIN_KEYS_PER_SPLIT: usize = 1024;
/// From this many query rows per item on, AVX-512 runs the rows-in-lanes kernel
/// ([`rows_avx512`]): a full vector of rows. Below, the key-blocked kernel wastes fewer lanes.
const MIN_ROWS_FOR_ROWS_KERNEL: usize = 16;

/// Which AVX-512 item kernel runs (tests force each one; elsewhere [`Path::Auto`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// By the number of query rows of the item ([`MIN_ROWS_FOR_ROWS_KERNEL`]).
    Auto,
    /// Always the key-blocked kernel.
    #[cfg_attr(not(test), allow(dead_code))]
    Keys,
    /// Always a rows-in-lanes kernel: [`rows_bf16`] for the formats that take it
    /// ([`KvElem::BF16_DOTS`]) where the CPU has AVX-512 BF16, else [`rows_avx512`].
    #[cfg_attr(not(test), allow(dead_code))]
    Rows,
    /// Always a rows-in-lanes kernel, [`rows_bf16`] whatever the format where the CPU has
    /// AVX-512 BF16.
    #[cfg_attr(not(test), allow(dead_code))]
    RowsBf16,
}

/// A stored key/value element.
trait KvElem: Elem {
    /// The elements (and scales, empty for float formats) of `data` when it holds this dtype.
    fn typed<'a>(data: KvData<'a>) -> Option<(&'a [Self], &'a [f32])>;

    /// `dst[i] = src[i]` as f32 (same lengths).
    fn widen(src: &[Self], dst: &mut [f32]);

    /// The elements as f32 when they are f32 (read in place, not copied); `None` otherwise.
    #[inline(always)]
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        let _ = src;
        None
    }

    /// Whether a decode step (a call of one query token) scores these keys with integer dot
    /// products against its query rounded to int8 ([`crate::kernels::simd::QueryI8`]), where
    /// the decode kernel runs and the head dim divides 32.
    const INT_DOT: bool = false;

    /// Whether prefill runs [`rows_bf16`] on CPUs that have AVX-512 BF16: for a format whose
    /// own elements carry no more than bf16's 8 significant bits, rounding the queries and
    /// probabilities to bf16 as well halves the arithmetic at no precision that was there.
    const BF16_DOTS: bool = false;

    /// Elements `p[0..16]` (those `m` selects; others read as zero) as f32, unscaled.
    ///
    /// # Safety
    /// AVX-512F/BW; every selected element readable.
    ///
    /// Implementations carry `#[target_feature]` themselves, as [`keys_avx512::Elem::load32`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, m: __mmask16) -> __m512;

    /// Whether [`keys_avx512`] reads this dtype. Items it would run go to the AVX2 body
    /// otherwise; the rows-in-lanes kernel reads every dtype.
    const KEYS_AVX512: bool = true;

    /// The AVX-512 key-blocked item kernel for this dtype.
    ///
    /// # Safety
    /// As [`keys_avx512::item`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item, work: &mut keys_avx512::Work, out: Partial);
}

impl KvElem for f32 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load16(p: *const Self, m: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(m, p)
    }

    fn typed<'a>(data: KvData<'a>) -> Option<(&'a [Self], &'a [f32])> {
        match data {
            KvData::F32(x) => Some((x, &[])),
            _ => None,
        }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item, work: &mut keys_avx512::Work, out: Partial) {
        keys_avx512::item(args, it, work, out)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
}

impl KvElem for bf16 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load16(p: *const Self, m: __mmask16) -> __m512 {
        let raw = _mm256_maskz_loadu_epi16(m, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
    }

    fn typed<'a>(data: KvData<'a>) -> Option<(&'a [Self], &'a [f32])> {
        match data {
            KvData::BF16(x) => Some((x, &[])),
            _ => None,
        }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item, work: &mut keys_avx512::Work, out: Partial) {
        keys_avx512::item(args, it, work, out)
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

/// [`KvData::Q8`]: int8 elements, each vector times its scale. On AVX-512, items of many rows
/// (prefill) run a rows-in-lanes kernel, which applies each key's and value's scale as it
/// widens them ([`rows_bf16`] with AVX-512 BF16, else [`rows_avx512`]); the rest (decoding)
/// run the AVX2 body, which scores in integers.
impl KvElem for i8 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load16(p: *const Self, m: __mmask16) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)))
    }

    fn typed<'a>(data: KvData<'a>) -> Option<(&'a [Self], &'a [f32])> {
        match data {
            KvData::Q8 { q, scales } => Some((q, scales)),
            _ => None,
        }
    }

    /// As llama.cpp scores a q8_0 key cache: the query rounded to int8 like the keys, the dot
    /// products exact in integers, both scales applied after.
    const INT_DOT: bool = true;

    const KEYS_AVX512: bool = false;

    const BF16_DOTS: bool = true;

    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(_: &Args<Self>, _: Item, _: &mut keys_avx512::Work, _: Partial) {
        unreachable!("`kernel` never picks the key-blocked kernel for q8")
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s as f32;
        }
    }
}

impl KvElem for f16 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load16(p: *const Self, m: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
    }

    fn typed<'a>(data: KvData<'a>) -> Option<(&'a [Self], &'a [f32])> {
        match data {
            KvData::F16(x) => Some((x, &[])),
            _ => None,
        }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn item_avx512(args: &Args<Self>, it: Item, work: &mut keys_avx512::Work, out: Partial) {
        keys_avx512::item(args, it, work, out)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
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
    if k.heads != v.heads
        || k.len != v.len
        || k.head_dim != v.head_dim
        || k.first_pos != v.first_pos
        || k.segment_len() != v.segment_len()
    {
        return bad(format!(
            "keys ({} heads, {} slots, dim {}, first {}) and values ({}, {}, {}, {}) differ",
            k.heads, k.len, k.head_dim, k.first_pos, v.heads, v.len, v.head_dim, v.first_pos
        ));
    }
    if !k.is_consistent() || !v.is_consistent() {
        return bad("a key/value view claims slots outside its data".into());
    }
    if k.heads == 0 || !hq.is_multiple_of(k.heads) {
        return bad(format!("{hq} query heads over {} kv heads", k.heads));
    }
    if k.head_dim != d {
        return bad(format!("query head dim {d}, key head dim {}", k.head_dim));
    }
    if !k.same_dtype(v) {
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
    attention_with(super::active_isa(), q, k, v, ctx)
}

/// [`attention`] on a chosen instruction-set path (for tests and benches); a path this CPU
/// lacks falls back to [`Isa::Portable`].
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
    attention_with_into(super::active_isa(), q, k, v, ctx, out, scratch)
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
    let isa = if isa.is_available() { isa } else { Isa::Portable };
    let first = k.segment(0).map(|(data, _)| data);
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
    let call = plan::Call {
        isa,
        path,
        q: qs,
        dims,
        ctx,
        seg: k.segment_len(),
    };
    match first {
        // Nothing held (a paged view without pages): every row sees no key.
        None => o.fill(0.0),
        Some(KvData::F32(_)) => call.run::<f32>(k, v, o, scratch),
        Some(KvData::BF16(_)) => call.run::<bf16>(k, v, o, scratch),
        Some(KvData::F16(_)) => call.run::<f16>(k, v, o, scratch),
        Some(KvData::Q8 { .. }) => call.run::<i8>(k, v, o, scratch),
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
    /// The scaled queries rounded to int8 ([`Args::qi`]), once per call.
    qi: Vec<QueryI8>,
    /// Working space of the item kernels, one per pool task.
    work: Vec<Work>,
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
/// task's space is sized for the call before it starts (see [`plan`]), so whether a call
/// allocates depends on its shapes only; and the memory belongs to whoever owns the scratch.
#[derive(Debug, Default)]
struct Work {
    body: body::Work,
    #[cfg(target_arch = "x86_64")]
    keys: keys_avx512::Work,
    #[cfg(target_arch = "x86_64")]
    rows: rows_avx512::Work,
    #[cfg(target_arch = "x86_64")]
    rows_bf16: rows_bf16::Work,
    /// An item's partial result over a later page, before it is folded into the first's.
    spill: Spill,
}

/// Room for one item's [`Partial`] result.
#[derive(Debug, Default)]
struct Spill {
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Spill {
    /// Room for items of up to `rows` query rows of dim `d` (never shrinks).
    fn prepare(&mut self, d: usize, rows: usize) {
        if self.m.len() < rows || self.acc.len() < rows * d {
            self.acc.resize(self.acc.len().max(rows * d), 0.0);
            self.m.resize(self.m.len().max(rows), 0.0);
            self.l.resize(self.l.len().max(rows), 0.0);
        }
    }
}

impl Work {
    /// Sizes the space of `kernel` for items of up to `rows` query rows of dim `d`.
    fn prepare(&mut self, kernel: Kernel, d: usize, rows: usize) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Keys => self.keys.prepare(d, rows),
            #[cfg(target_arch = "x86_64")]
            Kernel::Rows => self.rows.prepare(d, rows),
            #[cfg(target_arch = "x86_64")]
            Kernel::RowsBf16 => self.rows_bf16.prepare(d, rows),
            Kernel::Body => self.body.prepare(d, rows),
        }
    }
}

/// The read-only inputs of every work item.
struct Args<'a, E> {
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    k_stride: usize,
    v_stride: usize,
    /// Scales of a scaled format (empty for floats), `scale_stride` apart per head.
    k_scales: &'a [f32],
    v_scales: &'a [f32],
    scale_stride: usize,
    /// The scaled query rows rounded to int8, `[T · Hq]`, when a decode step scores int8 keys
    /// in integers ([`KvElem::INT_DOT`]); else empty.
    qi: &'a [QueryI8],
    dims: Dims,
    ctx: &'a AttnContext<'a>,
    /// The next segment's elements, when the item being run goes on into it.
    ahead: Option<Ahead<'a, E>>,
}

/// Keys and values (and scales) of the segment after an item's, laid out as its own: decoding
/// reads ahead into them as it nears a page's end.
struct Ahead<'a, E> {
    k: &'a [E],
    v: &'a [E],
    k_scales: &'a [f32],
    v_scales: &'a [f32],
}

impl<E> Args<'_, E> {
    /// Scales of key (or value) slots `j0..j1` of kv head `g` (empty for float formats).
    #[inline(always)]
    fn scales<'s>(&self, s: &'s [f32], g: usize, j0: usize, j1: usize) -> &'s [f32] {
        if s.is_empty() {
            s
        } else {
            &s[g * self.scale_stride + j0..g * self.scale_stride + j1]
        }
    }
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
fn visible_slots(mask: &dyn AttentionMask, pos: usize, first_pos: usize, len: usize) -> (usize, usize) {
    let lo = mask.first_visible(pos).max(first_pos) - first_pos;
    let hi = (pos + 1).saturating_sub(first_pos).min(len);
    (lo, hi)
}

/// The item kernels, as far as their working space goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// [`keys_avx512::item`].
    #[cfg(target_arch = "x86_64")]
    Keys,
    /// [`rows_avx512::item`].
    #[cfg(target_arch = "x86_64")]
    Rows,
    /// [`rows_bf16::item`].
    #[cfg(target_arch = "x86_64")]
    RowsBf16,
    /// [`body::item`] (AVX2 and portable).
    Body,
}

/// The kernel that runs an item of `rows` query rows of keys in `E`.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn kernel<E: KvElem>(isa: Isa, path: Path, rows: usize) -> Kernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let by_rows = match path {
                Path::Auto => rows >= MIN_ROWS_FOR_ROWS_KERNEL,
                Path::Keys => false,
                Path::Rows | Path::RowsBf16 => true,
            };
            let bf16 = path == Path::RowsBf16 || E::BF16_DOTS;
            if by_rows && bf16 && rows_bf16::available() {
                Kernel::RowsBf16
            } else if by_rows {
                Kernel::Rows
            } else if E::KEYS_AVX512 {
                Kernel::Keys
            } else {
                Kernel::Body
            }
        }
        _ => Kernel::Body,
    }
}

fn run_item<E: KvElem>(isa: Isa, path: Path, args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
    let rows = (it.t1 - it.t0) * args.dims.group();
    match kernel::<E>(isa, path, rows) {
        // SAFETY (both AVX-512 kernels): `kernel` picks them for `Isa::Avx512` only, and
        // `attention_path_into` passes an ISA only if it is available.
        #[cfg(target_arch = "x86_64")]
        Kernel::Rows => unsafe { rows_avx512::item(args, it, &mut work.rows, out) },
        // SAFETY: `kernel` picks it only where `rows_bf16::available`.
        #[cfg(target_arch = "x86_64")]
        Kernel::RowsBf16 => unsafe { rows_bf16::item(args, it, &mut work.rows_bf16, out) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Keys => unsafe { E::item_avx512(args, it, &mut work.keys, out) },
        Kernel::Body => body::item(isa, args, it, &mut work.body, out),
    }
}
