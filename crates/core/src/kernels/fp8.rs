//! `y = x · Wᵀ` for fp8 weights: float8 e4m3fn codes `[n, k]` with one scale per output row
//! (see [`crate::quant`]). Activations stay f32; weights are dequantised exactly.
//!
//! # Widening
//! For a code `c`, the f16 with bits `(c & 0x80) << 8 | (c & 0x7f) << 7` is `fp8(c) · 2^-8`
//! exactly, subnormals included: sign, 4-bit exponent and 3-bit mantissa land in f16's fields
//! and f16's larger bias divides by 2^8. So a sign-extending byte → i16 widening, one shift and
//! one mask make f16 that F16C widens to f32, and the 2^8 is folded into the row scale. The two
//! NaN codes (`0x7f`, `0xff`) would come out as ±480: the kernels track them separately and
//! give NaN, as the scalar definition does.
//!
//! # Paths
//! - decode (`t ≤ 3`, memory-bound): each task streams a contiguous block of rows once, four
//!   rows at a time (two on AVX2 for several tokens), widening `2 · LANES` codes per row and
//!   step and accumulating against every token. On AVX-512 the 32 codes are widened to 16 bits
//!   in one instruction and checked for NaN codes in two.
//! - prefill: each task takes its rows in chunks, and each chunk in slices of [`KSLICE`] inputs:
//!   a slice is dequantised to f32 (bit for bit `fp8 · s`) into an L2-sized buffer and multiplied
//!   by the f32 GEMM of [`super::linear`] against the same slice of every token, the partial
//!   products summed over slices. Each weight is widened once per call; slicing along the input
//!   keeps the GEMM's activation panel in L2 across a chunk's many output panels.
//!
//! [`Isa::Portable`] widens through a 256-entry table.

use std::cell::Cell;

use super::linear::{self, Job, SMALL_T};
use super::simd::{prefetch, Portable, Simd};
use super::Isa;
use crate::pool::SyncPtr;
use crate::quant::{QuantData, FP8_E4M3_TABLE};
use crate::Layout;

/// Bytes of the f32 weight block (chunk rows × slice inputs) a prefill step dequantises: it
/// stays in L2 while every token passes.
const CHUNK_BYTES: usize = 512 << 10;
/// Inputs per prefill slice.
const KSLICE: usize = 512;
/// Prefill chunks are whole multiples of this many rows (the f32 GEMM's widest panel).
const CHUNK_ALIGN: usize = linear::SPLIT;

/// `2^-8 · 2^8`: the factor the f16 widening leaves out, applied with the scale.
const UNWIDEN: f32 = 256.0;

/// The vector operations on fp8 codes, per instruction set.
pub(crate) trait Fp8: Simd {
    /// `LANES` raw codes in a register.
    type Codes: Copy;
    /// What [`Fp8::nan_track`] records.
    type Seen: Copy;
    /// Rows per decode step for `t` tokens (bounded by the register file).
    fn decode_rows(t: usize) -> usize;
    /// Loads `LANES` codes.
    unsafe fn load_codes(p: *const u8) -> Self::Codes;
    /// `fp8(c) · 2^-8` per lane, exact; NaN codes give a finite value (see [`Fp8::nan_lanes`]).
    unsafe fn widen(c: Self::Codes) -> Self::V;
    /// [`Fp8::widen`] of the `2 · LANES` codes at `p`, recording their NaN codes in `seen`
    /// (one widening to 16 bits and one NaN check for both vectors).
    #[inline(always)]
    unsafe fn widen2(p: *const u8, seen: &mut Self::Seen) -> [Self::V; 2] {
        let (a, b) = (Self::load_codes(p), Self::load_codes(p.add(Self::LANES)));
        *seen = Self::nan_track(Self::nan_track(*seen, a), b);
        [Self::widen(a), Self::widen(b)]
    }
    /// No NaN code seen yet.
    unsafe fn nan_none() -> Self::Seen;
    /// Records the NaN codes of `c` in `seen`.
    unsafe fn nan_track(seen: Self::Seen, c: Self::Codes) -> Self::Seen;
    /// True when `seen` recorded a NaN code.
    unsafe fn nan_any(seen: Self::Seen) -> bool;
    /// `v` with NaN in the lanes where `c` is a NaN code.
    unsafe fn nan_lanes(c: Self::Codes, v: Self::V) -> Self::V;
}

impl Fp8 for Portable {
    type Codes = [u8; 8];
    type Seen = ();
    fn decode_rows(_t: usize) -> usize {
        2
    }
    #[inline(always)]
    unsafe fn load_codes(p: *const u8) -> Self::Codes {
        std::ptr::read_unaligned(p as *const [u8; 8])
    }
    #[inline(always)]
    unsafe fn widen(c: Self::Codes) -> Self::V {
        // The table is exact, NaN included; the 2^-8 keeps the contract of the SIMD paths.
        c.map(|c| FP8_E4M3_TABLE[c as usize] * (1.0 / UNWIDEN))
    }
    #[inline(always)]
    unsafe fn nan_none() -> Self::Seen {}
    #[inline(always)]
    unsafe fn nan_track(_seen: Self::Seen, _c: Self::Codes) -> Self::Seen {}
    #[inline(always)]
    unsafe fn nan_any(_seen: Self::Seen) -> bool {
        false
    }
    #[inline(always)]
    unsafe fn nan_lanes(_c: Self::Codes, v: Self::V) -> Self::V {
        v
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::simd::{Avx2, Avx512};
    use super::Fp8;

    /// Sign-extended code → f16 bits of `fp8 · 2^-8`: shifting left by 7 puts the sign at bit
    /// 15 (and a copy at 14, masked off) and exponent and mantissa at bits 13..7.
    const F16_MASK: i16 = 0xbf80_u16 as i16;

    /// The NaN codes 0x7f and 0xff doubled (mod 256): no other code doubles to 0xfe or above,
    /// so the running byte maximum of `c + c` shows whether a NaN code was seen.
    const NAN_TWICE: i8 = 0xfe_u8 as i8;

    impl Fp8 for Avx512 {
        type Codes = __m128i;
        type Seen = __m256i;
        fn decode_rows(_t: usize) -> usize {
            4
        }
        #[inline(always)]
        unsafe fn load_codes(p: *const u8) -> Self::Codes {
            _mm_loadu_si128(p as *const __m128i)
        }
        #[inline(always)]
        unsafe fn widen(c: Self::Codes) -> Self::V {
            let h = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(c));
            _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(F16_MASK)))
        }
        #[inline(always)]
        unsafe fn widen2(p: *const u8, seen: &mut Self::Seen) -> [Self::V; 2] {
            let c = _mm256_loadu_si256(p as *const __m256i);
            *seen = _mm256_max_epu8(*seen, _mm256_add_epi8(c, c));
            let h = _mm512_slli_epi16::<7>(_mm512_cvtepi8_epi16(c));
            let h = _mm512_and_si512(h, _mm512_set1_epi16(F16_MASK));
            [
                _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
                _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
            ]
        }
        #[inline(always)]
        unsafe fn nan_none() -> Self::Seen {
            _mm256_setzero_si256()
        }
        #[inline(always)]
        unsafe fn nan_track(seen: Self::Seen, c: Self::Codes) -> Self::Seen {
            _mm256_max_epu8(seen, _mm256_zextsi128_si256(_mm_add_epi8(c, c)))
        }
        #[inline(always)]
        unsafe fn nan_any(seen: Self::Seen) -> bool {
            _mm256_movemask_epi8(_mm256_cmpeq_epi8(seen, _mm256_set1_epi8(NAN_TWICE))) != 0
        }
        #[inline(always)]
        unsafe fn nan_lanes(c: Self::Codes, v: Self::V) -> Self::V {
            let m = _mm_cmpeq_epi8_mask(_mm_and_si128(c, _mm_set1_epi8(0x7f)), _mm_set1_epi8(0x7f));
            _mm512_mask_mov_ps(v, m, _mm512_set1_ps(f32::NAN))
        }
    }

    impl Fp8 for Avx2 {
        type Codes = __m128i;
        type Seen = __m128i;
        fn decode_rows(t: usize) -> usize {
            // 16 registers: four rows × one token, or two rows × up to three tokens.
            if t == 1 {
                4
            } else {
                2
            }
        }
        #[inline(always)]
        unsafe fn load_codes(p: *const u8) -> Self::Codes {
            _mm_loadl_epi64(p as *const __m128i)
        }
        #[inline(always)]
        unsafe fn widen(c: Self::Codes) -> Self::V {
            let h = _mm_slli_epi16::<7>(_mm_cvtepi8_epi16(c));
            _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(F16_MASK)))
        }
        #[inline(always)]
        unsafe fn widen2(p: *const u8, seen: &mut Self::Seen) -> [Self::V; 2] {
            let c = _mm_loadu_si128(p as *const __m128i);
            *seen = _mm_max_epu8(*seen, _mm_add_epi8(c, c));
            let h = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(c));
            let h = _mm256_and_si256(h, _mm256_set1_epi16(F16_MASK));
            [
                _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
                _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)),
            ]
        }
        #[inline(always)]
        unsafe fn nan_none() -> Self::Seen {
            _mm_setzero_si128()
        }
        #[inline(always)]
        unsafe fn nan_track(seen: Self::Seen, c: Self::Codes) -> Self::Seen {
            _mm_max_epu8(seen, _mm_add_epi8(c, c))
        }
        #[inline(always)]
        unsafe fn nan_any(seen: Self::Seen) -> bool {
            _mm_movemask_epi8(_mm_cmpeq_epi8(seen, _mm_set1_epi8(NAN_TWICE))) != 0
        }
        #[inline(always)]
        unsafe fn nan_lanes(c: Self::Codes, v: Self::V) -> Self::V {
            let m = _mm_cmpeq_epi8(_mm_and_si128(c, _mm_set1_epi8(0x7f)), _mm_set1_epi8(0x7f));
            let m = _mm256_castsi256_ps(_mm256_cvtepi8_epi32(m));
            _mm256_blendv_ps(v, _mm256_set1_ps(f32::NAN), m)
        }
    }
}

/// One call's operands, shared by its tasks.
struct F8Job<'a> {
    /// `[t, k]` row-major.
    x: &'a [f32],
    /// Prefill: the activations as consecutive `[t, kc]` slices of [`KSLICE`] inputs (the
    /// last may be narrower); `x` itself when there is one slice.
    xs: &'a [f32],
    t: usize,
    k: usize,
    n: usize,
    /// `[n, k]` codes.
    codes: &'a [u8],
    w: &'a QuantData,
    /// `[t, n]` row-major; tasks write disjoint column ranges.
    y: SyncPtr<f32>,
}

/// Scale of output row `o`.
#[inline(always)]
fn scale(job: &F8Job, o: usize) -> f32 {
    job.w.scales().get(o)
}

/// `y[t, n] = x[t, k] · Wᵀ` for fp8 `w` (`[n, k]`, one scale per row).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    isa: Isa,
    tasks: Option<usize>,
    x: &[f32],
    t: usize,
    k: usize,
    n: usize,
    w: &QuantData,
    y: &mut [f32],
) {
    assert!(
        w.len() == n * k && w.group() == k && x.len() == t * k && y.len() == t * n,
        "fp8 linear: shapes checked by the caller"
    );
    let tasks = tasks.unwrap_or_else(|| super::default_tasks(t * k * n)).max(1);
    let mut sliced = SLICED.with(Cell::take);
    let xs = if t > SMALL_T && k > KSLICE {
        slice_activations(x, t, k, &mut sliced);
        &sliced[..]
    } else {
        x
    };
    let job = F8Job {
        x,
        xs,
        t,
        k,
        n,
        codes: w.values(),
        w,
        y: SyncPtr(y.as_mut_ptr()),
    };
    if t <= SMALL_T {
        // Whole steps of four rows per task.
        let per = n.div_ceil(tasks).next_multiple_of(4);
        let count = n.div_ceil(per);
        // SAFETY: `isa` is available (checked by the caller); the shapes are asserted above;
        // tasks write disjoint row ranges of `y`.
        crate::pool::run(count, &|i| unsafe {
            decode(isa, &job, i * per, ((i + 1) * per).min(n))
        });
    } else {
        let per = n.div_ceil(tasks).next_multiple_of(CHUNK_ALIGN);
        let count = n.div_ceil(per);
        crate::pool::run(count, &|i| {
            // Moved out and back: a closure is compiled without the kernel's target features.
            let mut sc = PREFILL.with(Cell::take);
            // SAFETY: as above.
            unsafe { prefill(isa, &job, i * per, ((i + 1) * per).min(n), &mut sc) };
            PREFILL.with(|b| b.set(sc));
        });
    }
    SLICED.with(|b| b.set(sliced));
}

/// Copies `x` (`[t, k]`) into consecutive `[t, kc]` slices of [`KSLICE`] inputs.
fn slice_activations(x: &[f32], t: usize, k: usize, out: &mut Vec<f32>) {
    out.clear();
    out.reserve(t * k);
    for k0 in (0..k).step_by(KSLICE) {
        let kc = KSLICE.min(k - k0);
        for r in 0..t {
            out.extend_from_slice(&x[r * k + k0..r * k + k0 + kc]);
        }
    }
}

/// Per-thread prefill buffers, reused across calls.
#[derive(Default)]
struct PrefillScratch {
    /// Dequantised `[rows, kc]` block.
    deq: Vec<f32>,
    /// `[t, rows]` sum over the slices so far.
    acc: Vec<f32>,
    /// `[t, rows]` product of one slice.
    part: Vec<f32>,
}

thread_local! {
    static PREFILL: Cell<PrefillScratch> = const {
        Cell::new(PrefillScratch { deq: Vec::new(), acc: Vec::new(), part: Vec::new() })
    };
    /// The calling thread's sliced activations.
    static SLICED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Defines `unsafe fn $name(isa, args..)` running `$body::<S>` compiled for `isa`.
macro_rules! dispatch {
    ($name:ident => $body:ident ($($p:ident : $t:ty),*)) => {
        /// # Safety
        /// `isa` is available; the arguments satisfy the body's contract.
        unsafe fn $name(isa: Isa, $($p: $t),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
            unsafe fn avx512($($p: $t),*) {
                $body::<super::simd::Avx512>($($p),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2($($p: $t),*) {
                $body::<super::simd::Avx2>($($p),*)
            }
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => avx512($($p),*),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx2($($p),*),
                _ => $body::<Portable>($($p),*),
            }
        }
    };
}

dispatch!(decode => decode_body(job: &F8Job, lo: usize, hi: usize));
dispatch!(prefill => prefill_body(job: &F8Job, lo: usize, hi: usize, sc: &mut PrefillScratch));

/// Decode rows `lo..hi` (all tokens, `t ≤ SMALL_T`).
///
/// # Safety
/// The CPU supports `S`; `job`'s slices have the sizes its fields state; no other task writes
/// rows `lo..hi` of `y`.
#[inline(always)]
unsafe fn decode_body<S: Fp8>(job: &F8Job, lo: usize, hi: usize) {
    match (job.t, S::decode_rows(job.t)) {
        (1, 4) => decode_rows::<S, 1, 4>(job, lo, hi),
        (1, _) => decode_rows::<S, 1, 2>(job, lo, hi),
        (2, 4) => decode_rows::<S, 2, 4>(job, lo, hi),
        (2, _) => decode_rows::<S, 2, 2>(job, lo, hi),
        (3, 4) => decode_rows::<S, 3, 4>(job, lo, hi),
        (3, _) => decode_rows::<S, 3, 2>(job, lo, hi),
        _ => unreachable!("decode handles 1..=SMALL_T tokens"),
    }
}

/// [`decode_body`] for `T` tokens, `R` rows per step: per step of `LANES` codes, each row's
/// codes are widened once and multiplied into all `T` tokens.
#[inline(always)]
unsafe fn decode_rows<S: Fp8, const T: usize, const R: usize>(job: &F8Job, lo: usize, hi: usize) {
    let (k, n, l) = (job.k, job.n, S::LANES);
    let kv = k - k % l;
    let (x, codes, y) = (job.x.as_ptr(), job.codes.as_ptr(), job.y.get());
    let mut o = lo;
    while o < hi {
        let rows = (hi - o).min(R);
        // Rows past the range re-read the last one; their sums are dropped.
        let p: [*const u8; R] = std::array::from_fn(|j| codes.add((o + j.min(rows - 1)) * k));
        // The next step's rows, prefetched at the pace this one is consumed: the hardware
        // prefetcher stops at page boundaries.
        let next = codes.wrapping_add((o + R) * k);
        let fetch = o + R < hi;
        let mut acc = [[S::splat(0.0); T]; R];
        let mut nan = [S::nan_none(); R];
        let mut i = 0;
        // Two vectors of codes per row and step, then one.
        while i + 2 * l <= kv {
            if fetch && i % 64 < 2 * l {
                for j in 0..R {
                    prefetch(next.wrapping_add(j * k + i));
                }
            }
            let x0: [S::V; T] = std::array::from_fn(|r| S::load(x.add(r * k + i)));
            let x1: [S::V; T] = std::array::from_fn(|r| S::load(x.add(r * k + i + l)));
            for j in 0..R {
                let [w0, w1] = S::widen2(p[j].add(i), &mut nan[j]);
                for r in 0..T {
                    acc[j][r] = S::fma(w1, x1[r], S::fma(w0, x0[r], acc[j][r]));
                }
            }
            i += 2 * l;
        }
        if i < kv {
            let xv: [S::V; T] = std::array::from_fn(|r| S::load(x.add(r * k + i)));
            for j in 0..R {
                let c = S::load_codes(p[j].add(i));
                nan[j] = S::nan_track(nan[j], c);
                let wv = S::widen(c);
                for r in 0..T {
                    acc[j][r] = S::fma(wv, xv[r], acc[j][r]);
                }
            }
        }
        for j in 0..rows {
            let s = scale(job, o + j);
            let seen = S::nan_any(nan[j]);
            for (r, &a) in acc[j].iter().enumerate() {
                let mut sum = S::hsum(a);
                for ii in kv..k {
                    sum += *x.add(r * k + ii) * (FP8_E4M3_TABLE[*p[j].add(ii) as usize] * (1.0 / UNWIDEN));
                }
                *y.add(r * n + o + j) = if seen { f32::NAN } else { sum * UNWIDEN * s };
            }
        }
        o += rows;
    }
}

/// Prefill rows `lo..hi` (see the module doc), into `y`.
///
/// # Safety
/// As [`decode_body`], with `t > SMALL_T`.
#[inline(always)]
unsafe fn prefill_body<S: Fp8>(job: &F8Job, lo: usize, hi: usize, sc: &mut PrefillScratch) {
    let (t, k, n) = (job.t, job.k, job.n);
    let kslice = KSLICE.min(k);
    let chunk = (CHUNK_BYTES / (4 * kslice) / CHUNK_ALIGN * CHUNK_ALIGN)
        .max(CHUNK_ALIGN)
        .min(hi - lo);
    for (buf, len) in [
        (&mut sc.deq, chunk * kslice),
        (&mut sc.acc, t * chunk),
        (&mut sc.part, t * chunk),
    ] {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
    }
    let y = job.y.get();
    let mut c0 = lo;
    while c0 < hi {
        let rows = chunk.min(hi - c0);
        let mut k0 = 0;
        while k0 < k {
            let kc = kslice.min(k - k0);
            for j in 0..rows {
                dequant_row::<S>(
                    job.codes.as_ptr().add((c0 + j) * k + k0),
                    kc,
                    scale(job, c0 + j),
                    sc.deq.as_mut_ptr().add(j * kc),
                );
            }
            // The first slice writes the sum; the others a part that is then added.
            let first = k0 == 0;
            let out = if first { &mut sc.acc } else { &mut sc.part };
            let sub = Job {
                x: &job.xs[t * k0..t * (k0 + kc)],
                t,
                k: kc,
                n: rows,
                w: &sc.deq[..rows * kc],
                layout: Layout::OutIn,
                y: SyncPtr(out.as_mut_ptr()),
            };
            linear::run_range::<S, f32>(&sub, 0, rows);
            if !first {
                let mut i = 0;
                let len = t * rows;
                let (acc, part) = (sc.acc.as_mut_ptr(), sc.part.as_ptr());
                while i + S::LANES <= len {
                    S::store(acc.add(i), S::add(S::load(acc.add(i)), S::load(part.add(i))));
                    i += S::LANES;
                }
                while i < len {
                    *acc.add(i) += *part.add(i);
                    i += 1;
                }
            }
            k0 += kc;
        }
        for r in 0..t {
            std::ptr::copy_nonoverlapping(sc.acc.as_ptr().add(r * rows), y.add(r * n + c0), rows);
        }
        c0 += rows;
    }
}

/// `dst[i] = fp8(src[i]) · s` for `i < k`, bit for bit the scalar definition's weight.
#[inline(always)]
unsafe fn dequant_row<S: Fp8>(src: *const u8, k: usize, s: f32, dst: *mut f32) {
    let l = S::LANES;
    let kv = k - k % l;
    let (unwiden, sv) = (S::splat(UNWIDEN), S::splat(s));
    let mut i = 0;
    while i < kv {
        let c = S::load_codes(src.add(i));
        // `· 256` is exact (back to fp8's value), so `· s` rounds once, like `value · s`.
        let v = S::mul(S::mul(S::widen(c), unwiden), sv);
        S::store(dst.add(i), S::nan_lanes(c, v));
        i += l;
    }
    for ii in kv..k {
        *dst.add(ii) = FP8_E4M3_TABLE[*src.add(ii) as usize] * s;
    }
}
