//! `y = x · Wᵀ` for ggml weights read in place (see [`crate::ggml`] for the arithmetic).
//!
//! - F32 / F16 / BF16: the activations are rounded to the weight's type (as ggml-cpu converts
//!   them to its `vec_dot_type`), then the float kernels of [`super::linear`] run on the
//!   weight's elements.
//! - Quantised types: each token's activations are quantised once per call to the weight
//!   type's dot type (Q8_0, Q8_1 or Q8_K, bit for bit as ggml-cpu; tokens split over the pool
//!   for prefill), then output rows are split into one contiguous range per pool thread, as for
//!   the q8 / q4 kernels ([`super::quant`]). [`linear_shared`] runs several weights of one dot
//!   type on one input (q, k and v; gate and up) with one quantisation and one parallel section.
//!
//! # Paths
//! The integer kernels share the q8 / q4 kernels' families ([`isa_path`]): AVX-512 VNNI
//! (`vpdpbusd` for the 32-value blocks, `vpdpwssd` to apply the k-quants' sub-block scales),
//! AVX2 (`vpmaddubsw` + `vpmaddwd`), both from one generic body in `ggml_x86.rs`, and a
//! portable path (scalar integer dots over the decoded blocks). Decode (`t ≤ 3`) streams each
//! weight row once for all tokens. Prefill on the x86 paths (but Q4_1 / Q5_1, see
//! `x86::has_panel`) unpacks each panel of eight rows
//! once per call into a per-thread buffer and runs every token over it in tiles of four (see
//! `ggml_x86.rs`); the portable path streams an L2-sized chunk of rows and passes the tokens
//! over it in blocks ([`PREFILL_T`] tokens for the k-quants, 4 for the others).

use std::cell::Cell;
use std::marker::PhantomData;

use half::{bf16, f16};

use super::linear::SMALL_T;
use super::quant::{isa_path, Path, CHUNK_BYTES};
use super::Isa;
#[cfg(target_arch = "x86_64")]
use x86::PANEL_ROWS;
#[cfg(not(target_arch = "x86_64"))]
const PANEL_ROWS: usize = 8;
use crate::ggml::act::{quantize_q8_0, quantize_q8_1, quantize_q8_k, round_bf16, round_f16};
use crate::ggml::dot::{decode_32, decode_k};
use crate::ggml::{DotType, GgmlData, GgmlType, QK_K};
use crate::pool::SyncPtr;
use crate::Layout;

#[cfg(target_arch = "x86_64")]
#[path = "ggml_x86.rs"]
mod x86;

/// Tokens per pass of the portable k-quant prefill kernel: each super-block is decoded once
/// for this many tokens.
const PREFILL_T: usize = 8;

/// How many tokens the portable row kernel takes next, `left` tokens remaining: [`PREFILL_T`]
/// (k-quants) or 4 while there are that many, then the rest.
fn next_block(kquant: bool, left: usize) -> usize {
    match left {
        l if kquant && l >= PREFILL_T => PREFILL_T,
        l => l.min(4),
    }
}

/// Per-thread activation storage, reused across calls (no allocation per call once warm).
#[derive(Default)]
struct Scratch {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    bsums: Vec<i16>,
    bsums32: Vec<i16>,
    f: Vec<f32>,
}

thread_local! {
    /// Per-thread packed panel of the prefill kernels, reused across calls.
    #[cfg(target_arch = "x86_64")]
    static PANEL: Cell<Vec<x86::V32>> = const { Cell::new(Vec::new()) };
    static ACT: Cell<Scratch> = const {
        Cell::new(Scratch { q: Vec::new(), d: Vec::new(), s: Vec::new(), bsums: Vec::new(), bsums32: Vec::new(), f: Vec::new() })
    };
}

/// Quantised activations of all tokens of a call, in the weight's dot type.
pub(crate) struct Acts<'a> {
    /// `[t, k]` int8.
    q: &'a [i8],
    /// `[t, nb]` block scales (f16-rounded for Q8_0 / Q8_1, f32 for Q8_K).
    d: &'a [f32],
    /// `[t, nb]` Q8_1 `s`; empty otherwise.
    s: &'a [f32],
    /// `[t, k / 16]` Q8_K sums of each 16 values; empty otherwise.
    bsums: &'a [i16],
    /// `[t, k / 32]` Q8_K sums of each 32 values (the mins of Q4_K / Q5_K apply per 32); empty
    /// otherwise.
    bsums32: &'a [i16],
    /// Row stride of `q`.
    k: usize,
    /// Blocks per row.
    nb: usize,
}

/// The weight as the kernels read it.
pub(crate) struct Mat {
    w: *const u8,
    row_bytes: usize,
    n: usize,
    ty: GgmlType,
}

// SAFETY: `Mat` only reads the weight, which outlives the call and is not mutated.
unsafe impl Sync for Mat {}

/// Tokens below which activations are quantised on the calling thread alone.
const QUANT_PAR_T: usize = 64;

/// Tasks per pool thread of a prefill call (rows of the product, tokens of the quantisation):
/// tasks are claimed as threads come, so finer tasks even out a thread that starts late.
const PREFILL_SPLIT: usize = 4;

/// Fills `sc` with the activations of `x` (`[t, k]`) in `dot` (a quantised dot type), tokens
/// split over up to `tasks` pool threads (each token's row is quantised alone, so the split
/// does not change a bit).
fn prepare<'a>(dot: DotType, x: &[f32], t: usize, k: usize, tasks: usize, sc: &'a mut Scratch) -> Acts<'a> {
    let bs = if dot == DotType::Q8K { QK_K } else { 32 };
    let nb = k / bs;
    // Every value is written below: the buffers only grow, and are not cleared.
    fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
        if v.len() < n {
            v.resize(n, T::default());
        }
    }
    let k16 = if dot == DotType::Q8K { k / 16 } else { 0 };
    let ns = if dot == DotType::Q8_1 { t * nb } else { 0 };
    grow(&mut sc.q, t * k);
    grow(&mut sc.d, t * nb);
    grow(&mut sc.s, ns);
    grow(&mut sc.bsums, t * k16);
    grow(&mut sc.bsums32, t * k16 / 2);
    let (q, d, s) = (
        SyncPtr(sc.q.as_mut_ptr()),
        SyncPtr(sc.d.as_mut_ptr()),
        SyncPtr(sc.s.as_mut_ptr()),
    );
    let (b16, b32) = (SyncPtr(sc.bsums.as_mut_ptr()), SyncPtr(sc.bsums32.as_mut_ptr()));
    let rows = |r0: usize, r1: usize| {
        for r in r0..r1 {
            let xr = &x[r * k..(r + 1) * k];
            // SAFETY: the buffers hold at least `t` rows (grown above); each task writes only the
            // rows `r0..r1` of its own token range.
            let (qr, dr) = unsafe {
                (
                    std::slice::from_raw_parts_mut(q.get().add(r * k), k),
                    std::slice::from_raw_parts_mut(d.get().add(r * nb), nb),
                )
            };
            match dot {
                DotType::Q8_0 => quantize_q8_0(xr, qr, dr),
                DotType::Q8_1 => {
                    // SAFETY: as above (`s` holds `t · nb` values for Q8_1).
                    let sr = unsafe { std::slice::from_raw_parts_mut(s.get().add(r * nb), nb) };
                    quantize_q8_1(xr, qr, dr, sr)
                }
                _ => {
                    // SAFETY: as above (`k16` sums of 16 and `k16 / 2` of 32 per row for Q8_K).
                    let (br, br32) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(b16.get().add(r * k16), k16),
                            std::slice::from_raw_parts_mut(b32.get().add(r * k16 / 2), k16 / 2),
                        )
                    };
                    quantize_q8_k(xr, qr, dr, br);
                    for (s32, p) in br32.iter_mut().zip(br.chunks_exact(2)) {
                        *s32 = p[0] + p[1];
                    }
                }
            }
        }
    };
    if tasks > 1 && t >= QUANT_PAR_T {
        let per = t.div_ceil(tasks * PREFILL_SPLIT);
        crate::pool::run(t.div_ceil(per), &|i| rows(i * per, ((i + 1) * per).min(t)));
    } else {
        rows(0, t);
    }
    Acts {
        q: &sc.q[..t * k],
        d: &sc.d[..t * nb],
        s: &sc.s[..ns],
        bsums: &sc.bsums[..t * k16],
        bsums32: &sc.bsums32[..t * k16 / 2],
        k,
        nb,
    }
}

/// One weight of a [`linear_shared`] call and its output.
pub(super) struct Part<'a> {
    /// `[n, k]`, of the call's quantised dot type.
    w: &'a GgmlData,
    /// `[t, n]`, overwritten: `len` values from `y`, exclusively borrowed for `'a`.
    y: SyncPtr<f32>,
    len: usize,
    _y: PhantomData<&'a mut [f32]>,
}

impl<'a> Part<'a> {
    /// `w` (`[n, k]`) and its output `y` (`[t, n]`).
    pub(super) fn new(w: &'a GgmlData, y: &'a mut [f32]) -> Self {
        Part {
            w,
            y: SyncPtr(y.as_mut_ptr()),
            len: y.len(),
            _y: PhantomData,
        }
    }
}

/// Whether weights of `a` and `b` take the same quantised activations, so that one
/// [`linear_shared`] call can run both.
pub(super) fn same_acts(a: GgmlType, b: GgmlType) -> bool {
    let (da, db) = (a.dot_type(), b.dot_type());
    da == db && matches!(da, Some(DotType::Q8_0 | DotType::Q8_1 | DotType::Q8K))
}

/// `y[t, n] = x[t, k] · Wᵀ` for ggml `w` (`[n, k]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    isa: Isa,
    tasks: Option<usize>,
    x: &[f32],
    t: usize,
    k: usize,
    n: usize,
    w: &GgmlData,
    y: &mut [f32],
) {
    assert!(
        w.len() == n * k && x.len() == t * k && y.len() == t * n,
        "ggml linear: shapes checked by the caller"
    );
    let dot = w.ty().dot_type().expect("GgmlData holds supported types");
    match dot {
        DotType::F32 => {
            let wf: &[f32] = bytemuck::cast_slice(w.bytes());
            super::run_linear(isa, tasks, x, t, k, n, wf, Layout::OutIn, y);
        }
        DotType::F16 | DotType::BF16 => {
            let mut sc = ACT.with(Cell::take);
            sc.f.clear();
            sc.f.extend_from_slice(x);
            if dot == DotType::F16 {
                round_f16(&mut sc.f);
                let wf: &[f16] = bytemuck::cast_slice(w.bytes());
                super::run_linear(isa, tasks, &sc.f, t, k, n, wf, Layout::OutIn, y);
            } else {
                round_bf16(&mut sc.f);
                let wf: &[bf16] = bytemuck::cast_slice(w.bytes());
                super::run_linear(isa, tasks, &sc.f, t, k, n, wf, Layout::OutIn, y);
            }
            ACT.with(|c| c.set(sc));
        }
        _ => linear_shared(isa, tasks, x, t, k, &[Part::new(w, y)]),
    }
}

/// `part.y = x[t, k] · part.wᵀ` for every part: weights of one quantised dot type
/// ([`same_acts`]) on one input, whose activations are quantised once for all of them. Each
/// weight's rows are split as a call of its own would split them, and all those ranges are the
/// tasks of one parallel section, so every output has the bits of [`linear`] on its weight.
pub(super) fn linear_shared(isa: Isa, tasks: Option<usize>, x: &[f32], t: usize, k: usize, parts: &[Part]) {
    let Some(first) = parts.first() else { return };
    let dot = first.w.ty().dot_type().expect("GgmlData holds supported types");
    assert!(
        x.len() == t * k
            && parts.iter().all(|p| {
                let n = p.len / t.max(1);
                p.w.len() == n * k && p.len == t * n && same_acts(p.w.ty(), first.w.ty())
            }),
        "ggml linear: shapes and types checked by the caller"
    );
    let total: usize = parts.iter().map(|p| p.len / t.max(1)).sum();
    if t == 0 || total == 0 {
        return;
    }
    let path = isa_path(isa);
    let tasks = tasks
        .unwrap_or_else(|| super::default_tasks(t * k * total))
        .max(1);
    let mut sc = ACT.with(Cell::take);
    let acts = prepare(dot, x, t, k, tasks, &mut sc);
    // Each part's rows in ranges of `per`, as a call of its own.
    let split = |n: usize| {
        let per = if t > SMALL_T && tasks > 1 {
            // Prefill: whole panels of eight rows per task, and several tasks per thread, so
            // that a thread that starts late (woken late, or preempted) still takes its share.
            n.div_ceil(tasks * PREFILL_SPLIT).next_multiple_of(PANEL_ROWS)
        } else {
            n.div_ceil(tasks).max(1)
        };
        (per, n.div_ceil(per))
    };
    let count: usize = parts.iter().map(|p| split(p.len / t).1).sum();
    let run = |mut i: usize| {
        for p in parts {
            let n = p.len / t;
            let (per, c) = split(n);
            if i >= c {
                i -= c;
                continue;
            }
            let mat = Mat {
                w: p.w.bytes().as_ptr(),
                row_bytes: p.w.ty().bytes_for(k).expect("rows are whole blocks"),
                n,
                ty: p.w.ty(),
            };
            let (lo, hi) = (i * per, ((i + 1) * per).min(n));
            // SAFETY: `path` is available (from the available `isa`); `mat` and `acts`
            // describe `p.w` and `x` (shapes asserted above); tasks write disjoint rows of
            // `p.y`, which is exclusively borrowed for the call.
            unsafe { run_rows(path, &mat, &acts, t, lo, hi, p.y.get()) };
            return;
        }
    };
    if count <= 1 {
        run(0);
    } else {
        crate::pool::run(count, &run);
    }
    ACT.with(|c| c.set(sc));
}

/// A row kernel: `(weight, activations, first token, tokens, lo, hi, y)`; tokens `1..=3` (x86;
/// 4 for the types without panels), or up to [`PREFILL_T`] (portable).
type RowKernel = unsafe fn(&Mat, &Acts, usize, usize, usize, usize, *mut f32);

/// Output rows `lo..hi` of every token on `path`.
///
/// # Safety
/// The path is available; `y` is valid for `t · n` writes and no other task writes rows
/// `lo..hi`.
#[allow(clippy::too_many_arguments)]
unsafe fn run_rows(path: Path, m: &Mat, a: &Acts, t: usize, lo: usize, hi: usize, y: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    let kernel: RowKernel = match path {
        Path::Vnni => x86::rows_vnni,
        Path::Avx2 => x86::rows_avx2,
        Path::Portable => rows_portable,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let kernel: RowKernel = {
        let _ = path;
        rows_portable
    };
    if t <= SMALL_T {
        return kernel(m, a, 0, t, lo, hi, y);
    }
    #[cfg(target_arch = "x86_64")]
    if path != Path::Portable && x86::has_panel(m.ty) {
        let panel = match path {
            Path::Vnni => x86::panels_vnni,
            _ => x86::panels_avx2,
        };
        let mut buf = PANEL.with(Cell::take);
        let len = x86::panel_buf_len(m.ty, a.k);
        if buf.len() < len {
            buf.resize(len, x86::V32([0; 32]));
        }
        panel(m, a, t, lo, hi, y, buf.as_mut_ptr());
        PANEL.with(|c| c.set(buf));
        return;
    }
    // Portable prefill, and the types without panels.
    let chunk = (CHUNK_BYTES / m.row_bytes.max(1)).max(1);
    let kquant = m.ty.dot_type() == Some(DotType::Q8K);
    let mut c0 = lo;
    while c0 < hi {
        let c1 = (c0 + chunk).min(hi);
        let mut r0 = 0;
        while r0 < t {
            let tt = next_block(kquant, t - r0);
            kernel(m, a, r0, tt, c0, c1, y);
            r0 += tt;
        }
        c0 = c1;
    }
}

/// Rows `lo..hi` for tokens `r0..r0 + tt`, scalar integer dots over the decoded blocks.
///
/// # Safety
/// `m` points at `n` rows of `row_bytes`; `y` is valid for `t · n` writes; no other task writes
/// rows `lo..hi`.
unsafe fn rows_portable(m: &Mat, a: &Acts, r0: usize, tt: usize, lo: usize, hi: usize, y: *mut f32) {
    let ts = m.ty.type_size();
    let kquant = m.ty.dot_type() == Some(DotType::Q8K);
    // Q4_1 / Q5_1 (Q8_1 activations) sum as ggml-cpu's AVX2 `vec_dot` does, whose logits the
    // GGUF fixtures hold: per block, eight lanes of four products each, multiplied by
    // `d_w·d_x` and accumulated with one rounding (an FMA); the `m_w·s_x` terms apart; then
    // the lanes reduced and the terms added. Summed block by block instead, the Q5_1 fixture's
    // logits moved by 1.4e-2 (a routing decision near a tie flipped). (The AVX2 kernel sums
    // in yet another order that agrees with llama.cpp on the fixtures.)
    let with_min = !kquant && !a.s.is_empty();
    for o in lo..hi {
        let row = std::slice::from_raw_parts(m.w.add(o * m.row_bytes), m.row_bytes);
        let mut acc = [0f32; PREFILL_T];
        let mut lanes = [[0f32; 8]; PREFILL_T];
        for b in 0..a.nb {
            let blk = &row[b * ts..(b + 1) * ts];
            if kquant {
                let kb = decode_k(m.ty, blk);
                for (i, acc) in acc.iter_mut().enumerate().take(tt) {
                    let r = r0 + i;
                    let xs = &a.q[r * a.k + b * QK_K..r * a.k + (b + 1) * QK_K];
                    let mut isum = 0i32;
                    for (s, (qw, qx)) in kb.q.chunks_exact(16).zip(xs.chunks_exact(16)).enumerate() {
                        let dot: i32 = qw.iter().zip(qx).map(|(&w, &x)| w as i32 * x as i32).sum();
                        isum += kb.sc[s] as i32 * dot;
                    }
                    let bsums = &a.bsums[r * a.k / 16 + b * 16..r * a.k / 16 + b * 16 + 16];
                    let msum: i32 = kb.m.iter().zip(bsums).map(|(&m, &s)| m as i32 * s as i32).sum();
                    let dy = a.d[r * a.nb + b];
                    *acc += kb.d * dy * isum as f32 - kb.dmin * dy * msum as f32;
                }
            } else if with_min {
                let (q, d, mw) = decode_32(m.ty, blk);
                for i in 0..tt {
                    let r = r0 + i;
                    let xs = &a.q[r * a.k + b * 32..r * a.k + b * 32 + 32];
                    let dd = d * a.d[r * a.nb + b];
                    for (lane, (qw, qx)) in lanes[i].iter_mut().zip(q.chunks_exact(4).zip(xs.chunks_exact(4)))
                    {
                        let isum: i32 = qw.iter().zip(qx).map(|(&w, &x)| w as i32 * x as i32).sum();
                        *lane = (isum as f32).mul_add(dd, *lane);
                    }
                    acc[i] += mw * a.s[r * a.nb + b];
                }
            } else {
                let (q, d, _) = decode_32(m.ty, blk);
                for (i, acc) in acc.iter_mut().enumerate().take(tt) {
                    let r = r0 + i;
                    let xs = &a.q[r * a.k + b * 32..r * a.k + b * 32 + 32];
                    let isum: i32 = q.iter().zip(xs).map(|(&w, &x)| w as i32 * x as i32).sum();
                    *acc += d * a.d[r * a.nb + b] * isum as f32;
                }
            }
        }
        for (i, &v) in acc.iter().enumerate().take(tt) {
            // With mins, `acc` holds the sum of the m·s terms; the lanes come first.
            let v = if with_min { reduce_8(&lanes[i]) + v } else { v };
            *y.add((r0 + i) * m.n + o) = v;
        }
    }
}

/// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`: ggml-cpu's reduction of eight lanes on
/// x86 (`hsum_float_8`), which the portable Q4_1 / Q5_1 path reproduces.
fn reduce_8(l: &[f32; 8]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}
