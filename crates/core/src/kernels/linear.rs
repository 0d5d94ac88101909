//! `y = x · Wᵀ` (`Layout::OutIn`) or `y = x · W` (`Layout::InOut`) for f32 activations and
//! f32 / bf16 / f16 weights read in place.
//!
//! Three regimes:
//! - few tokens (`t ≤ SMALL_T`, decode; `InOut` up to `IN_OUT_T`): memory-bound, so each weight
//!   element is read once and used for all tokens while it is in cache. `OutIn` takes 4 weight
//!   rows at a time as dot products; `InOut` accumulates 4 weight rows at a time into the
//!   (L1-resident) output rows of up to 3 tokens, widening each weight vector once per block.
//! - `OutIn`, two or more tokens (with 16 lanes only batched-decode sizes, see [`BATCH_T`]):
//!   register tiles of 3 weight rows × 4 tokens (8 with 16 lanes) read the weights in place,
//!   widening each vector once per tile; tokens run in groups that stay in cache over L2-sized
//!   blocks of rows.
//! - otherwise (prefill): FMA-bound. A `KC × NR` weight panel is widened to f32 (and, for
//!   `OutIn`, transposed 16×16 in registers) into a small aligned buffer, then a register-tiled
//!   `MR × NR` microkernel (vectors along the output, activations broadcast) runs it against
//!   every token, so each weight element is converted once per call.
//!
//! Work is split across output columns into at most one task per rayon thread; boundaries are
//! multiples of [`SPLIT`] so every task but the last sees whole panels.

use std::cell::Cell;

use super::simd::{load_partial, prefetch, store_partial, Elem, Simd, MAX_LANES};
use crate::pool::SyncPtr;
use crate::Layout;

/// Token counts up to this take the streaming (decode) path.
pub(crate) const SMALL_T: usize = 3;
/// `OutIn` calls of 2 or more tokens take [`batch_out_in`], in groups of tokens whose
/// activations (`t · k` f32) fit in this many floats (512 KiB): every block of weight rows
/// re-reads all activations of its group, so they must stay in cache.
pub(crate) const BATCH_X: usize = 128 * 1024;
/// With 16 lanes, activations of a group of [`batch_out_in`] fit in this many floats (32 KiB, in
/// L1): each tile of three weight rows reads all of its group's activations, and a group that
/// spills to L2 takes up to twice the time per multiply-add. Measured on bf16
/// 1024 × 1024, two threads (AMD EPYC Zen 5), GiB/s of weights: 16 tokens 12.2-12.7 with
/// groups of 32 against 19.4-20.3 with groups of 8, 32 tokens 7.6-7.7 against 10.1-10.3; 8
/// tokens (one group either way) unchanged.
const BATCH_X_16: usize = 8 * 1024;
/// Bytes of weight rows a group of tokens runs over before the next group: the block stays in
/// L2 (512 KiB on Zen 3) for the next group.
const BATCH_BLOCK_BYTES: usize = 256 * 1024;
/// With 16 lanes (AVX-512), whose GEMM tile is twice as wide, only calls of up to this many
/// tokens with activations within [`BATCH_X`] take [`batch_out_in`]: there the two were not
/// compared. With 8 lanes, measured on bf16 weights, one thread (AMD EPYC Zen 3), GFLOP/s:
/// 4 096 × 4 096 at 2 / 4 / 8 / 16 / 32 tokens 39-49 / 61-69 / 68-75 / 60-76 / 72-75, where
/// the one-token kernel run per token gives 20-25 and the packed GEMM 23-60; 4 096 × 1 024 and
/// 4 096 × 4 096 at 48 to 512 tokens 62-76 against the GEMM's 57-76.
pub(crate) const BATCH_T: usize = 32;
/// `InOut` calls of up to this many tokens stream the weight rows once ([`decode_in_out`],
/// tokens in blocks of 3) instead of packing. Measured on bf16 4096 × 4096, one thread (AMD
/// EPYC Zen 3): 31-40 GFLOP/s at 4 to 8 tokens against the GEMM's 20-33; from 12 tokens the
/// GEMM is faster.
pub(crate) const IN_OUT_T: usize = 8;
/// Depth of a packed weight panel: `KC × 32` f32 is 32 KiB, so it stays in L1 across tokens.
const KC: usize = 256;
/// Task boundaries along the output are multiples of this (the widest `NR`).
pub(crate) const SPLIT: usize = 32;
/// Below this many multiply-adds a call runs on the calling thread: forking costs microseconds.
pub(crate) const MIN_PARALLEL_WORK: usize = 1 << 17;

/// One call's operands, shared by its tasks.
pub(crate) struct Job<'a, E> {
    /// `[t, k]` row-major.
    pub x: &'a [f32],
    pub t: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    pub w: &'a [E],
    pub layout: Layout,
    /// `[t, n]` row-major; tasks write disjoint column ranges.
    pub y: SyncPtr<f32>,
}

/// Computes output columns `lo..hi` (all tokens) of `job`.
///
/// # Safety
/// The CPU supports `S`; `job`'s slices have the sizes its fields state; no other task writes
/// columns `lo..hi`.
#[inline(always)]
pub(crate) unsafe fn run_range<S: Simd, E: Elem>(job: &Job<E>, lo: usize, hi: usize) {
    if lo >= hi {
        return;
    }
    let batch = S::LANES <= 8 || (job.t <= BATCH_T && job.t * job.k <= BATCH_X);
    if job.layout == Layout::OutIn && job.t >= 2 && batch {
        batch_out_in::<S, E>(job, lo, hi);
    } else if job.t <= SMALL_T || (job.layout == Layout::InOut && job.t <= IN_OUT_T) {
        match job.layout {
            Layout::OutIn => decode_out_in::<S, E>(job, lo, hi),
            Layout::InOut => decode_in_out::<S, E>(job, lo, hi, 0, job.k, job.y.0),
        }
    } else {
        // The buffer is moved out and back rather than used inside `with`'s closure: a closure
        // is compiled without the caller's target features, so the kernel would not inline.
        let mut buf = PACK.with(Cell::take);
        gemm::<S, E>(job, lo, hi, &mut buf);
        PACK.with(|b| b.set(buf));
    }
}

/// `InOut`, few tokens: the partial sum over input rows `i0..i1` of every output column, written
/// to `out` (`[t, n]`). Splitting a decode call along the input lets each task stream one
/// contiguous block of the weight instead of a strided half of every row.
///
/// # Safety
/// As [`run_range`], with `job.layout == InOut`, `job.t <= SMALL_T`, `i0 <= i1 <= job.k`, and
/// `out` valid for `t · n` writes that no other task makes.
#[inline(always)]
pub(crate) unsafe fn run_rows<S: Simd, E: Elem>(job: &Job<E>, i0: usize, i1: usize, out: *mut f32) {
    debug_assert!(job.layout == Layout::InOut && job.t <= SMALL_T);
    decode_in_out::<S, E>(job, 0, job.n, i0, i1, out)
}

/// `OutIn`, few tokens: `y[r, o] = x[r] · W[o]`, four weight rows at a time (two vectors each
/// per step: eight independent accumulators keep the FMA latency hidden).
#[inline(always)]
unsafe fn decode_out_in<S: Simd, E: Elem>(job: &Job<E>, lo: usize, hi: usize) {
    let (k, n, l) = (job.k, job.n, S::LANES);
    let (x, w, y) = (job.x.as_ptr(), job.w.as_ptr(), job.y.0);
    let k2 = k - k % (2 * l);
    let k1 = k - k % l;
    let mut o = lo;
    while o + 4 <= hi {
        let rows = [0, 1, 2, 3].map(|j| w.add((o + j) * k));
        // The next four rows, prefetched at the pace this block is consumed: the hardware
        // prefetcher stops at page boundaries, software prefetch does not.
        let next = w.wrapping_add((o + 4) * k).cast::<u8>();
        let step_bytes = 4 * 2 * l * std::mem::size_of::<E>();
        for r in 0..job.t {
            let xr = x.add(r * k);
            let mut acc = [[S::splat(0.0); 2]; 4];
            let mut i = 0;
            while i < k2 {
                if r == 0 && o + 4 < hi {
                    let p = next.wrapping_add(i / (2 * l) * step_bytes);
                    let mut b = 0;
                    while b < step_bytes {
                        prefetch(p.wrapping_add(b));
                        b += 64;
                    }
                }
                let x0 = S::load(xr.add(i));
                let x1 = S::load(xr.add(i + l));
                for j in 0..4 {
                    acc[j][0] = S::fma(E::load::<S>(rows[j].add(i)), x0, acc[j][0]);
                    acc[j][1] = S::fma(E::load::<S>(rows[j].add(i + l)), x1, acc[j][1]);
                }
                i += 2 * l;
            }
            if i < k1 {
                let x0 = S::load(xr.add(i));
                for j in 0..4 {
                    acc[j][0] = S::fma(E::load::<S>(rows[j].add(i)), x0, acc[j][0]);
                }
            }
            for j in 0..4 {
                let mut s = S::hsum(S::add(acc[j][0], acc[j][1]));
                for i in k1..k {
                    s += *xr.add(i) * (*rows[j].add(i)).to_f32();
                }
                *y.add(r * n + o + j) = s;
            }
        }
        o += 4;
    }
    while o < hi {
        let row = w.add(o * k);
        for r in 0..job.t {
            let xr = x.add(r * k);
            let mut acc = [S::splat(0.0); 2];
            let mut i = 0;
            while i < k2 {
                acc[0] = S::fma(E::load::<S>(row.add(i)), S::load(xr.add(i)), acc[0]);
                acc[1] = S::fma(E::load::<S>(row.add(i + l)), S::load(xr.add(i + l)), acc[1]);
                i += 2 * l;
            }
            if i < k1 {
                acc[0] = S::fma(E::load::<S>(row.add(i)), S::load(xr.add(i)), acc[0]);
            }
            let mut s = S::hsum(S::add(acc[0], acc[1]));
            for i in k1..k {
                s += *xr.add(i) * (*row.add(i)).to_f32();
            }
            *y.add(r * n + o) = s;
        }
        o += 1;
    }
}

/// `OutIn`, two or more tokens: `y[r, o] = x[r] · W[o]` as register tiles of [`BATCH_J`]
/// weight rows × up to [`BATCH_R`] tokens ([`BATCH_R_WIDE`] with 16 lanes), reading the
/// weights in place: each weight vector is widened once per tile and feeds `R` multiply-adds.
/// Tokens run in groups whose activations stay in cache ([`BATCH_X`], [`BATCH_X_16`]) over
/// blocks of weight rows that stay in L2 for the next group.
#[inline(always)]
unsafe fn batch_out_in<S: Simd, E: Elem>(job: &Job<E>, lo: usize, hi: usize) {
    let k = job.k.max(1);
    let x_floats = if S::LANES > 8 { BATCH_X_16 } else { BATCH_X };
    let group = (x_floats / k / BATCH_R * BATCH_R).clamp(BATCH_R, BATCH_GROUP);
    let block = (BATCH_BLOCK_BYTES / (k * std::mem::size_of::<E>()) / BATCH_J * BATCH_J).max(BATCH_J);
    let mut o0 = lo;
    while o0 < hi {
        let o1 = (o0 + block).min(hi);
        let mut g0 = 0;
        while g0 < job.t {
            let g1 = (g0 + group).min(job.t);
            batch_rows::<S, E>(job, (o0, o1), (g0, g1), hi);
            g0 = g1;
        }
        o0 = o1;
    }
}

/// Rows `o0..o1` of `y` for tokens `g0..g1`; prefetches the rows after each block of
/// [`BATCH_J`] (up to `hi`) while the first token tile runs.
#[inline(always)]
unsafe fn batch_rows<S: Simd, E: Elem>(
    job: &Job<E>,
    (o0, o1): (usize, usize),
    (g0, g1): (usize, usize),
    hi: usize,
) {
    let mut o = o0;
    while o < o1 {
        let j = BATCH_J.min(o1 - o);
        let next = if o + j < hi { o + j } else { o };
        let mut r0 = g0;
        while r0 < g1 {
            let r = if S::LANES > 8 && g1 - r0 >= BATCH_R_WIDE {
                BATCH_R_WIDE
            } else {
                BATCH_R.min(g1 - r0)
            };
            let fetch = r0 == g0 && next != o;
            match (r, j) {
                (BATCH_R_WIDE, 3) => batch_tile::<S, E, BATCH_R_WIDE, 3>(job, o, r0, next, fetch),
                (BATCH_R_WIDE, 2) => batch_tile::<S, E, BATCH_R_WIDE, 2>(job, o, r0, next, fetch),
                (BATCH_R_WIDE, 1) => batch_tile::<S, E, BATCH_R_WIDE, 1>(job, o, r0, next, fetch),
                (4, 3) => batch_tile::<S, E, 4, 3>(job, o, r0, next, fetch),
                (3, 3) => batch_tile::<S, E, 3, 3>(job, o, r0, next, fetch),
                (2, 3) => batch_tile::<S, E, 2, 3>(job, o, r0, next, fetch),
                (1, 3) => batch_tile::<S, E, 1, 3>(job, o, r0, next, fetch),
                (4, 2) => batch_tile::<S, E, 4, 2>(job, o, r0, next, fetch),
                (3, 2) => batch_tile::<S, E, 3, 2>(job, o, r0, next, fetch),
                (2, 2) => batch_tile::<S, E, 2, 2>(job, o, r0, next, fetch),
                (1, 2) => batch_tile::<S, E, 1, 2>(job, o, r0, next, fetch),
                (4, 1) => batch_tile::<S, E, 4, 1>(job, o, r0, next, fetch),
                (3, 1) => batch_tile::<S, E, 3, 1>(job, o, r0, next, fetch),
                (2, 1) => batch_tile::<S, E, 2, 1>(job, o, r0, next, fetch),
                _ => batch_tile::<S, E, 1, 1>(job, o, r0, next, fetch),
            }
            r0 += r;
        }
        o += j;
    }
}

/// Most tokens in one group of [`batch_out_in`], however short the rows.
const BATCH_GROUP: usize = 32;
/// Tokens per register tile of [`batch_out_in`].
const BATCH_R: usize = 4;
/// Tokens per register tile of [`batch_out_in`] with 16 lanes, whose 32 registers hold
/// `8 × 3` accumulators: each widened weight vector then feeds eight multiply-adds instead of
/// four. Measured on bf16 1024 × 1024 `[out, in]`, two threads (AMD EPYC Zen 5), two
/// alternated rounds, GiB/s of weights: 8 tokens 36.4 / 32.3 with tiles of 4 against 37.7 /
/// 38.8, 16 tokens 16.9 / 17.6 against 20.5 / 21.2; with the weight in cache, 8 tokens 38.3
/// against 46.6 (one run each).
const BATCH_R_WIDE: usize = 8;
/// Weight rows per register tile of [`batch_out_in`]: `R·J` accumulators, `J` widened weight
/// vectors and one activation vector fill the 16 AVX2 registers.
const BATCH_J: usize = 3;

/// `y[r0 + a, o + b] = x[r0 + a] · W[o + b]` for `a < R`, `b < J`; with `fetch`, prefetches
/// rows `next..next + J` at the pace this tile reads its own.
#[inline(always)]
unsafe fn batch_tile<S: Simd, E: Elem, const R: usize, const J: usize>(
    job: &Job<E>,
    o: usize,
    r0: usize,
    next: usize,
    fetch: bool,
) {
    let (k, n, l) = (job.k, job.n, S::LANES);
    let k1 = k - k % l;
    let w = job.w.as_ptr();
    let x = job.x.as_ptr().add(r0 * k);
    let rows: [*const E; J] = std::array::from_fn(|b| w.add((o + b) * k));
    let ahead: [*const u8; J] = std::array::from_fn(|b| w.wrapping_add((next + b) * k).cast::<u8>());
    // Vectors per cache line of weights: prefetch one line per row that often.
    let per_line = (64 / (l * std::mem::size_of::<E>())).max(1);
    let mut acc = [[S::splat(0.0); J]; R];
    let mut i = 0;
    let mut step = 0;
    while i < k1 {
        if fetch && step % per_line == 0 {
            for p in ahead {
                prefetch(p.wrapping_add(i * std::mem::size_of::<E>()));
            }
        }
        let wv: [S::V; J] = std::array::from_fn(|b| E::load::<S>(rows[b].add(i)));
        for (a, acc) in acc.iter_mut().enumerate() {
            let xv = S::load(x.add(a * k + i));
            for b in 0..J {
                acc[b] = S::fma(wv[b], xv, acc[b]);
            }
        }
        i += l;
        step += 1;
    }
    let y = job.y.0;
    for (a, acc) in acc.iter().enumerate() {
        for b in 0..J {
            let mut s = S::hsum(acc[b]);
            for i in k1..k {
                s += *x.add(a * k + i) * (*rows[b].add(i)).to_f32();
            }
            *y.add((r0 + a) * n + o + b) = s;
        }
    }
}

/// `InOut`, few tokens: `y[r, lo..hi] = Σ_{i in i0..i1} x[r, i] · W[i, lo..hi]`, four weight rows
/// per pass over an output chunk small enough to stay in L1, so the weight streams contiguously
/// once. `y` has row stride `job.n`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn decode_in_out<S: Simd, E: Elem>(
    job: &Job<E>,
    lo: usize,
    hi: usize,
    i0: usize,
    i1: usize,
    y: *mut f32,
) {
    let (k, n, t, l) = (job.k, job.n, job.t, S::LANES);
    let (x, w) = (job.x.as_ptr(), job.w.as_ptr());
    // t chunks of `chunk` f32 in ≤ 32 KiB.
    let chunk = ((8192 / t) / SPLIT * SPLIT).max(SPLIT);
    let mut c0 = lo;
    while c0 < hi {
        let c1 = (c0 + chunk).min(hi);
        let cv = c0 + (c1 - c0) / l * l;
        for r in 0..t {
            std::ptr::write_bytes(y.add(r * n + c0), 0, c1 - c0);
        }
        let mut i = i0;
        while i < i1 {
            let step = (i1 - i).min(4);
            let wr = [0, 1, 2, 3].map(|j| w.add((i + j.min(step - 1)) * n));
            // The next four rows at the same columns: the hardware prefetcher stops at page
            // boundaries, and a row segment is often a page or less.
            let ahead = [0, 1, 2, 3].map(|j| w.wrapping_add((i + 4 + j) * n));
            let fetch = i + 4 < i1;
            // Tokens in blocks of up to 3: each weight vector is widened once per block.
            let mut r0 = 0;
            while r0 < t {
                let rows = InOutRows {
                    x: x.add(r0 * k + i),
                    k,
                    step,
                    y: y.add(r0 * n),
                    n,
                };
                let span = (c0, cv, c1);
                let f = fetch && r0 == 0;
                r0 += match t - r0 {
                    1 => in_out_rows::<S, E, 1>(&rows, &wr, &ahead, f, span),
                    2 => in_out_rows::<S, E, 2>(&rows, &wr, &ahead, f, span),
                    _ => in_out_rows::<S, E, 3>(&rows, &wr, &ahead, f, span),
                };
            }
            i += step;
        }
        c0 = c1;
    }
}

/// A block of token rows for [`in_out_rows`]: activations from `x` (row stride `k`, the step's
/// first input row), outputs at `y` (row stride `n`), `step ≤ 4` weight rows.
struct InOutRows {
    x: *const f32,
    k: usize,
    step: usize,
    y: *mut f32,
    n: usize,
}

/// `y[a, c] += Σ_j x[a, j] · wr[j][c]` for the `R` rows of `rows`, columns `c0..c1` (`cv`: the
/// end of whole vectors); with `fetch`, prefetches `ahead` one cache line per row at a time.
/// Returns `R`.
#[inline(always)]
unsafe fn in_out_rows<S: Simd, E: Elem, const R: usize>(
    rows: &InOutRows,
    wr: &[*const E; 4],
    ahead: &[*const E; 4],
    fetch: bool,
    (c0, cv, c1): (usize, usize, usize),
) -> usize {
    let l = S::LANES;
    // Rows past the end of the range get a zero coefficient (and re-read a valid row).
    let xs: [[f32; 4]; R] = std::array::from_fn(|a| {
        std::array::from_fn(|j| {
            if j < rows.step {
                *rows.x.add(a * rows.k + j)
            } else {
                0.0
            }
        })
    });
    // Loops rather than closures (`map`, `from_fn`) around intrinsics: a closure does not
    // take the caller's target features, and what it does not inline becomes calls.
    let mut xv = [[S::splat(0.0); 4]; R];
    for (xv, xs) in xv.iter_mut().zip(&xs) {
        for (v, &x) in xv.iter_mut().zip(xs) {
            *v = S::splat(x);
        }
    }
    let line = (64 / (l * std::mem::size_of::<E>())).max(1) * l;
    let mut c = c0;
    while c < cv {
        if fetch && (c - c0) % line == 0 {
            for a in ahead {
                prefetch(a.wrapping_add(c));
            }
        }
        let mut wv = [S::splat(0.0); 4];
        for (v, w) in wv.iter_mut().zip(wr) {
            *v = E::load::<S>(w.add(c));
        }
        for (a, xv) in xv.iter().enumerate() {
            let yr = rows.y.add(a * rows.n + c);
            let mut acc = S::load(yr);
            for j in 0..4 {
                acc = S::fma(xv[j], wv[j], acc);
            }
            S::store(yr, acc);
        }
        c += l;
    }
    while c < c1 {
        for (a, xs) in xs.iter().enumerate() {
            let yr = rows.y.add(a * rows.n + c);
            let mut s = *yr;
            for j in 0..4 {
                s += xs[j] * (*wr[j].add(c)).to_f32();
            }
            *yr = s;
        }
        c += 1;
    }
    R
}

thread_local! {
    /// Per-thread packed-panel storage, reused across calls (no allocation per call).
    static PACK: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Blocked GEMM over output columns `lo..hi`: for each `KC` slice of the input dimension and
/// each block of up to `PANELS` `NR`-wide panels, pack the block once, then run the
/// microkernel over all tokens, panel by panel.
///
/// `InOut` weights pack several panels at once: a panel is one cache line of each of `KC`
/// rows, and rows are often a page apart (a 2048-wide bf16 row is 4 KiB), so packing one
/// panel at a time touches a new page per line, which the hardware prefetcher does not
/// follow. A block reads `PANELS` lines per row. `OutIn` panels are read along rows already.
#[inline(always)]
unsafe fn gemm<S: Simd, E: Elem>(job: &Job<E>, lo: usize, hi: usize, buf: &mut Vec<f32>) {
    let nr = 2 * S::LANES;
    let panels = match job.layout {
        Layout::InOut => PANELS,
        Layout::OutIn => 1,
    };
    // 16 spare floats let the panels start on a 64-byte boundary (no split-line loads).
    if buf.len() < panels * KC * nr + 16 {
        buf.resize(panels * KC * nr + 16, 0.0);
    }
    let off = buf.as_ptr().align_offset(64).min(16);
    let pack = buf.as_mut_ptr().add(off);
    let (t, k, n) = (job.t, job.k, job.n);
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        let mut b0 = lo;
        while b0 < hi {
            let bc = (panels * nr).min(hi - b0);
            match job.layout {
                Layout::InOut => pack_in_out::<S, E>(job, k0, kc, b0, bc, pack),
                Layout::OutIn => pack_out_in::<S, E>(job, k0, kc, b0, bc, pack),
            }
            let mut n0 = b0;
            while n0 < b0 + bc {
                let nc = nr.min(b0 + bc - n0);
                let panel = pack.add((n0 - b0) / nr * kc * nr);
                let mut m0 = 0;
                while m0 < t {
                    let mc = S::MR.min(t - m0);
                    let tile = Tile {
                        kc,
                        a: job.x.as_ptr().add(m0 * k + k0),
                        lda: k,
                        b: panel,
                        c: job.y.0.add(m0 * n + n0),
                        ldc: n,
                        nc,
                        accumulate: k0 > 0,
                    };
                    micro_dispatch::<S>(mc, &tile);
                    m0 += mc;
                }
                n0 += nc;
            }
            b0 += bc;
        }
        k0 += kc;
    }
}

/// `NR`-wide panels an `InOut` block packs at once (see [`gemm`]).
const PANELS: usize = 8;

/// Packs `W[k0..k0+kc, n0..n0+nc]` of an `[k, n]` weight as consecutive panels of `kc` rows
/// of `NR` f32 (panel `p` holds columns `n0 + p·NR ..`, the last one zero-padded), reading
/// each weight row's `nc` elements in one pass.
#[inline(always)]
unsafe fn pack_in_out<S: Simd, E: Elem>(
    job: &Job<E>,
    k0: usize,
    kc: usize,
    n0: usize,
    nc: usize,
    pack: *mut f32,
) {
    let (l, nr, n) = (S::LANES, 2 * S::LANES, job.n);
    let w = job.w.as_ptr();
    let full = nc / nr;
    for kk in 0..kc {
        let src = w.add((k0 + kk) * n + n0);
        for p in 0..full {
            let dst = pack.add(p * kc * nr + kk * nr);
            S::store(dst, E::load::<S>(src.add(p * nr)));
            S::store(dst.add(l), E::load::<S>(src.add(p * nr + l)));
        }
        if full * nr < nc {
            let dst = pack.add(full * kc * nr + kk * nr);
            for j in 0..nr {
                let c = full * nr + j;
                *dst.add(j) = if c < nc { (*src.add(c)).to_f32() } else { 0.0 };
            }
        }
    }
}

/// Packs the same panel from an `[n, k]` weight: rows of `W` become columns of the panel, by
/// `LANES × LANES` register transposes (scalar only at ragged edges).
#[inline(always)]
unsafe fn pack_out_in<S: Simd, E: Elem>(
    job: &Job<E>,
    k0: usize,
    kc: usize,
    n0: usize,
    nc: usize,
    pack: *mut f32,
) {
    let (l, nr, k) = (S::LANES, 2 * S::LANES, job.k);
    let w = job.w.as_ptr();
    let kv = kc / l * l;
    if nc == nr {
        let mut rows = [S::splat(0.0); MAX_LANES];
        for half in 0..2 {
            let base = w.add((n0 + half * l) * k + k0);
            let mut kb = 0;
            while kb < kv {
                for (j, row) in rows.iter_mut().take(l).enumerate() {
                    *row = E::load::<S>(base.add(j * k + kb));
                }
                S::transpose(&mut rows);
                for (i, row) in rows.iter().take(l).enumerate() {
                    S::store(pack.add((kb + i) * nr + half * l), *row);
                }
                kb += l;
            }
        }
    }
    let k_start = if nc == nr { kv } else { 0 };
    for kk in k_start..kc {
        for j in 0..nr {
            *pack.add(kk * nr + j) = if j < nc {
                (*w.add((n0 + j) * k + k0 + kk)).to_f32()
            } else {
                0.0
            };
        }
    }
}

/// One microkernel call: `C[M, nc] (+)= A[M, kc] · B[kc, NR]`.
struct Tile {
    kc: usize,
    /// Activations, row stride `lda`.
    a: *const f32,
    lda: usize,
    /// Packed panel, `kc × NR`, 64-byte aligned.
    b: *const f32,
    /// Output, row stride `ldc`; only `nc ≤ NR` columns are valid.
    c: *mut f32,
    ldc: usize,
    nc: usize,
    /// Add to `C` instead of overwriting it (every `KC` slice after the first).
    accumulate: bool,
}

#[inline(always)]
unsafe fn micro_dispatch<S: Simd>(m: usize, tile: &Tile) {
    match m {
        1 => micro::<S, 1>(tile),
        2 => micro::<S, 2>(tile),
        3 => micro::<S, 3>(tile),
        4 => micro::<S, 4>(tile),
        5 => micro::<S, 5>(tile),
        6 => micro::<S, 6>(tile),
        7 => micro::<S, 7>(tile),
        8 => micro::<S, 8>(tile),
        9 => micro::<S, 9>(tile),
        10 => micro::<S, 10>(tile),
        11 => micro::<S, 11>(tile),
        12 => micro::<S, 12>(tile),
        _ => unreachable!("microkernel rows are at most MR ≤ 12"),
    }
}

/// The register tile: `M × 2` vector accumulators; per step of `k` two panel vectors and `M`
/// broadcast activations feed `2M` FMAs.
#[inline(always)]
unsafe fn micro<S: Simd, const M: usize>(tile: &Tile) {
    let l = S::LANES;
    let nr = 2 * l;
    let mut acc0 = [S::splat(0.0); M];
    let mut acc1 = [S::splat(0.0); M];
    let (a, b) = (tile.a, tile.b);
    for kk in 0..tile.kc {
        let b0 = S::load(b.add(kk * nr));
        let b1 = S::load(b.add(kk * nr + l));
        for m in 0..M {
            let av = S::splat(*a.add(m * tile.lda + kk));
            acc0[m] = S::fma(av, b0, acc0[m]);
            acc1[m] = S::fma(av, b1, acc1[m]);
        }
    }
    for m in 0..M {
        let c = tile.c.add(m * tile.ldc);
        if tile.nc == nr {
            let (mut v0, mut v1) = (acc0[m], acc1[m]);
            if tile.accumulate {
                v0 = S::add(v0, S::load(c));
                v1 = S::add(v1, S::load(c.add(l)));
            }
            S::store(c, v0);
            S::store(c.add(l), v1);
        } else {
            for (h, v) in [acc0[m], acc1[m]].into_iter().enumerate() {
                let lo = h * l;
                if tile.nc <= lo {
                    break;
                }
                let cnt = (tile.nc - lo).min(l);
                let p = c.add(lo);
                let v = if tile.accumulate {
                    S::add(
                        v,
                        if cnt == l {
                            S::load(p)
                        } else {
                            load_partial::<S>(p, cnt, 0.0)
                        },
                    )
                } else {
                    v
                };
                if cnt == l {
                    S::store(p, v);
                } else {
                    store_partial::<S>(p, cnt, v);
                }
            }
        }
    }
}
