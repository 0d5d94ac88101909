//! `y = x · Wᵀ` for quantised `[out, in]` weights (see [`crate::quant`] for the arithmetic).
//!
//! Each token's activations are quantised to int8 per group once per call (vectorised, bit for
//! bit the rule of [`quantize_activations`]); output rows are then split into at most one
//! contiguous range per pool thread, each row a sum over groups of an exact integer dot
//! product times two scales.
//!
//! # Paths
//! - [`Isa::Avx512`] on a CPU with AVX-512 VNNI: `vpdpbusd` row kernels (`quant_x86.rs`), and
//!   for prefill a tile kernel with one token per vector lane.
//! - [`Isa::Avx2`], and `Avx512` without VNNI: `vpmaddubsw` / `vpmaddwd` row kernels.
//! - [`Isa::Portable`], and group sizes that are not powers of two (the SIMD kernels map whole
//!   vector lanes to groups): scalar integer dots.
//!
//! Decode (`t ≤ 3`) streams every weight row once for all tokens, with software prefetch ahead
//! of the read. Prefill streams an L2-sized chunk of rows once and passes every token over it:
//! on VNNI in tiles of up to 16 tokens ([`TileActs`]), elsewhere (and for the few tokens left
//! over after whole tiles) in blocks of [`PREFILL_T`] tokens through the row kernel. The row
//! kernel reduces each row's lanes to group sums with permutes; the tile kernel needs no lane
//! reduction, since lanes are tokens, and broadcasts each 4 weight bytes to all of them.

use std::cell::Cell;
use std::sync::OnceLock;

use half::f16;

use super::linear::SMALL_T;
use super::Isa;
use crate::pool::SyncPtr;
use crate::quant::{quantize_activations, QuantData, QuantFormat, Scales};

#[cfg(target_arch = "x86_64")]
#[path = "quant_x86.rs"]
pub(super) mod x86;

/// Tokens per pass of the row kernel in prefill (its register tile holds this many tokens).
pub(super) const PREFILL_T: usize = 4;
/// Weight bytes per prefill chunk: it stays in L2 while every token block passes over it.
pub(super) const CHUNK_BYTES: usize = 256 << 10;
/// Activation rows are padded to a multiple of this many elements (the widest q4 unit), and
/// scale rows to a multiple of [`GROUP_PAD`] groups, with zeros: kernels read whole vectors.
const ELEM_PAD: usize = 128;
const GROUP_PAD: usize = 16;
/// Lanes of the VNNI prefill kernel's vectors (i32 in 512 bits): one token each.
const LANES: usize = 16;
/// Output rows the VNNI tile kernel holds in registers (two accumulators each).
pub(crate) const TILE_ROWS: usize = 8;
/// Fewest tokens worth a tile of their own (q8, q4): a tile costs the same however few of its
/// lanes hold tokens, the row kernel costs per token. Crossovers measured at an expert's shape
/// with `cargo bench --bench quant -- tokens`.
const TILE_MIN_T: [usize; 2] = [7, 11];

/// The kernel family a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    /// AVX-512 with VNNI.
    Vnni,
    /// AVX2 (also AVX-512 CPUs without VNNI).
    Avx2,
    /// Scalar.
    Portable,
}

/// True when the CPU has AVX-512 VNNI (checked once).
fn has_vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

fn choose(isa: Isa, w: &QuantData) -> Path {
    if !w.group().is_power_of_two() {
        return Path::Portable;
    }
    isa_path(isa)
}

/// The integer kernel family for `isa` on this CPU.
pub(super) fn isa_path(isa: Isa) -> Path {
    match isa {
        Isa::Avx512 if has_vnni() => Path::Vnni,
        Isa::Avx512 | Isa::Avx2 => Path::Avx2,
        Isa::Portable => Path::Portable,
    }
}

/// Per-thread activation storage, reused across calls (no allocation per call once warm).
#[derive(Default)]
struct Scratch {
    q: Vec<i8>,
    s: Vec<f32>,
    corr: Vec<i32>,
    /// One token's quantised row before de-interleaving (q4).
    row: Vec<i8>,
}

thread_local! {
    static ACT: Cell<Scratch> = const {
        Cell::new(Scratch { q: Vec::new(), s: Vec::new(), corr: Vec::new(), row: Vec::new() })
    };
    static TILES: Cell<TileScratch> = const {
        Cell::new(TileScratch { x: Vec::new(), s: Vec::new(), corr: Vec::new() })
    };
}

/// Per-thread storage of [`TileActs`], reused across calls.
#[derive(Default)]
struct TileScratch {
    x: Vec<i8>,
    s: Vec<f32>,
    corr: Vec<i32>,
}

/// Quantised activations re-laid for the VNNI tile kernel, in tiles of [`LANES`] lanes.
///
/// q4 (the weight nibble is the unsigned operand): 16 tokens per tile; per tile, `x` holds
/// `k / 8` steps of `[even, odd][16 lanes][4 bytes]` (a step is the 8 elements whose nibbles
/// are 4 weight bytes: elements `8s, 8s + 2, ..` then `8s + 1, 8s + 3, ..`), `s` and `corr`
/// are `[groups][16 lanes]`.
///
/// q8: the weight is the signed operand, so it can be broadcast straight from memory, and the
/// activations carry the bias: `q + 128` as unsigned bytes. 15 tokens per tile; lane 15 holds
/// 128 in every byte, so its sum is `128 · Σ w` of the group, the correction every lane
/// subtracts. `x` holds `k / 4` steps of `[16 lanes][4 bytes]`; `corr` is unused.
///
/// Lanes past the last token are zero (bias included), so they add nothing.
pub(crate) struct TileActs<'a> {
    x: &'a [i8],
    s: &'a [f32],
    corr: &'a [i32],
    /// Bytes of `x` per tile (`16 · k`).
    tile_bytes: usize,
    /// Tokens per tile.
    tokens: usize,
}

/// Tokens per tile of the VNNI tile kernel (see [`TileActs`]).
fn tile_tokens(q4: bool) -> usize {
    if q4 {
        LANES
    } else {
        LANES - 1
    }
}

/// Re-lays `acts` (VNNI layout, `t` tokens) into tiles (see [`TileActs`]).
fn pack_tiles<'a>(
    acts: &Acts,
    t: usize,
    k: usize,
    groups: usize,
    q4: bool,
    ts: &'a mut TileScratch,
) -> TileActs<'a> {
    let tokens = tile_tokens(q4);
    let tiles = t.div_ceil(tokens);
    let tile_bytes = LANES * k;
    ts.x.clear();
    ts.x.resize(tiles * tile_bytes, 0);
    ts.s.clear();
    ts.s.resize(tiles * groups * LANES, 0.0);
    ts.corr.clear();
    ts.corr.resize(tiles * groups * LANES, 0);
    for r in 0..t {
        let (tile, lane) = (r / tokens, r % tokens);
        // Whole padded rows: a q4 unit past `k` is still de-interleaved over 128 elements.
        let src = &acts.q[r * acts.kp..(r + 1) * acts.kp];
        let dst = &mut ts.x[tile * tile_bytes..(tile + 1) * tile_bytes];
        if q4 {
            // Units of 128 elements are de-interleaved: even elements at 0..64, odd at 64..128.
            for st in 0..k / 8 {
                let e = (st / 16) * 128 + (st % 16) * 4;
                let d = (st * 2 * LANES + lane) * 4;
                dst[d..d + 4].copy_from_slice(&src[e..e + 4]);
                dst[d + 4 * LANES..d + 4 * LANES + 4].copy_from_slice(&src[e + 64..e + 68]);
            }
        } else {
            for st in 0..k / 4 {
                let d = (st * LANES + lane) * 4;
                for (o, &v) in dst[d..d + 4].iter_mut().zip(&src[st * 4..st * 4 + 4]) {
                    *o = (v as u8 ^ 0x80) as i8;
                }
            }
        }
        for g in 0..groups {
            let d = (tile * groups + g) * LANES + lane;
            ts.s[d] = acts.s[r * acts.gp + g];
            ts.corr[d] = acts.corr[r * acts.gp + g];
        }
    }
    if !q4 {
        for tile in ts.x.chunks_exact_mut(tile_bytes) {
            for st in tile.chunks_exact_mut(4 * LANES) {
                st[4 * (LANES - 1)..].fill(-128);
            }
        }
    }
    TileActs {
        x: &ts.x,
        s: &ts.s,
        corr: &ts.corr,
        tile_bytes,
        tokens,
    }
}

/// Quantised activations of all tokens of a call.
pub(crate) struct Acts<'a> {
    /// `[t, kp]` int8, zero beyond `k`; for q4 on the SIMD paths each unit of
    /// [`unit_elems`] elements is de-interleaved (even elements, then odd ones).
    q: &'a [i8],
    /// `[t, gp]` activation scales, zero beyond the last group.
    s: &'a [f32],
    /// `[t, gp]`: `bias · Σ q_x` per group, subtracted from the biased integer sums.
    corr: &'a [i32],
    /// Row stride of `q`.
    kp: usize,
    /// Row stride of `s` and `corr`.
    gp: usize,
}

/// Scale storage as the kernels read it.
#[derive(Clone, Copy)]
pub(crate) enum MatScales {
    F32(*const f32),
    F16(*const f16),
}

/// The weight as the kernels read it.
pub(crate) struct Mat {
    vals: *const u8,
    scales: MatScales,
    k: usize,
    n: usize,
    group: usize,
    groups: usize,
    q4: bool,
}

// SAFETY: `Mat` only reads the weight, which outlives the call and is not mutated.
unsafe impl Sync for Mat {}

/// Elements per SIMD unit (one vector of weight bytes) of q4 on `path`.
fn unit_elems(path: Path) -> usize {
    match path {
        Path::Vnni => 128,
        _ => 64,
    }
}

/// Reorders each `unit` elements of `src` as its even elements followed by its odd ones, the
/// order of the low and high nibbles of a q4 unit.
fn deinterleave(src: &[i8], unit: usize, dst: &mut [i8]) {
    for (s, d) in src.chunks_exact(unit).zip(dst.chunks_exact_mut(unit)) {
        let (even, odd) = d.split_at_mut(unit / 2);
        for (j, p) in s.chunks_exact(2).enumerate() {
            even[j] = p[0];
            odd[j] = p[1];
        }
    }
}

/// Quantises one token row with the path's instruction set: `q` and `s` as
/// [`quantize_activations`], `sum` the integer sum of each group.
fn quantize_row(path: Path, x: &[f32], g: usize, q: &mut [i8], s: &mut [f32], sum: &mut [i32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the VNNI path is chosen only on CPUs with AVX-512 (F/BW/VL checked by
        // `Isa::Avx512`); lengths are checked inside.
        Path::Vnni => unsafe { x86::quantize_avx512(x, g, q, s, sum) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 + FMA are checked by `Isa::Avx2` (and implied by `Isa::Avx512`).
        Path::Avx2 => unsafe { x86::quantize_avx2(x, g, q, s, sum) },
        _ => {
            quantize_activations(x, g, q, s);
            for (d, qg) in sum.iter_mut().zip(q.chunks(g)) {
                *d = qg.iter().map(|&v| v as i32).sum();
            }
        }
    }
}

/// Fills `sc` with the quantised activations of `x` (`[t, k]`) laid out for `path`.
fn prepare<'a>(path: Path, x: &[f32], t: usize, k: usize, w: &QuantData, sc: &'a mut Scratch) -> Acts<'a> {
    let g = w.group();
    let groups = k / g;
    let kp = k.next_multiple_of(ELEM_PAD);
    let gp = groups.next_multiple_of(GROUP_PAD);
    sc.q.clear();
    sc.q.resize(t * kp, 0);
    sc.s.clear();
    sc.s.resize(t * gp, 0.0);
    sc.corr.clear();
    sc.corr.resize(t * gp, 0);
    let q4 = w.format() == QuantFormat::Q4;
    // The unsigned weight operand carries this bias (see `quant_x86.rs`).
    let bias = match (path, w.format()) {
        (Path::Vnni, QuantFormat::Q8) => 128,
        (Path::Vnni | Path::Avx2, QuantFormat::Q4) => 8,
        _ => 0,
    };
    let permute = q4 && path != Path::Portable;
    if permute {
        sc.row.clear();
        sc.row.resize(kp, 0);
    }
    for r in 0..t {
        let xr = &x[r * k..(r + 1) * k];
        let qr = &mut sc.q[r * kp..(r + 1) * kp];
        let sr = &mut sc.s[r * gp..r * gp + groups];
        let cr = &mut sc.corr[r * gp..r * gp + groups];
        if permute {
            quantize_row(path, xr, g, &mut sc.row[..k], sr, cr);
            deinterleave(&sc.row, unit_elems(path), qr);
        } else {
            quantize_row(path, xr, g, &mut qr[..k], sr, cr);
        }
        cr.iter_mut().for_each(|c| *c *= bias);
    }
    Acts {
        q: &sc.q,
        s: &sc.s,
        corr: &sc.corr,
        kp,
        gp,
    }
}

/// `y[t, n] = x[t, k] · Wᵀ` for quantised `w` (`[n, k]`).
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
        w.len() == n * k && x.len() == t * k && y.len() == t * n,
        "quantised linear: shapes checked by the caller"
    );
    let path = choose(isa, w);
    let mut sc = ACT.with(Cell::take);
    let acts = prepare(path, x, t, k, w, &mut sc);
    let mat = Mat {
        vals: w.values().as_ptr(),
        scales: match w.scales() {
            Scales::F32(b) => MatScales::F32(b.as_ptr()),
            Scales::F16(b) => MatScales::F16(b.as_ptr()),
        },
        k,
        n,
        group: w.group(),
        groups: k / w.group(),
        q4: w.format() == QuantFormat::Q4,
    };
    // Whole tiles for as many tokens as fill them well; the rest go to the row kernel.
    let tiled = if path == Path::Vnni {
        tiled_tokens(t, mat.q4)
    } else {
        0
    };
    let mut ts = TILES.with(Cell::take);
    let tiles = (tiled > 0).then(|| pack_tiles(&acts, tiled, k, mat.groups, mat.q4, &mut ts));
    let tasks = tasks.unwrap_or_else(|| super::default_tasks(t * k * n));
    let per = n.div_ceil(tasks.max(1)).max(1);
    let count = n.div_ceil(per);
    let yp = SyncPtr(y.as_mut_ptr());
    let run = |i: usize| {
        let (lo, hi) = (i * per, ((i + 1) * per).min(n));
        // SAFETY: `path` is available (chosen from the available `isa`); `mat`, `acts` and
        // `tiles` describe `w` and `x` (shapes asserted above); tasks write disjoint rows
        // `lo..hi`.
        unsafe {
            match &tiles {
                Some(ta) => run_tiles(&mat, w, &acts, ta, tiled, t, lo, hi, yp.get()),
                None => run_rows(path, &mat, w, &acts, t, lo, hi, yp.get()),
            }
        };
    };
    if count <= 1 {
        run(0);
    } else {
        crate::pool::run(count, &run);
    }
    TILES.with(|c| c.set(ts));
    ACT.with(|c| c.set(sc));
}

/// How many of `t` tokens the VNNI tile kernel takes: whole tiles, plus a last partial one
/// when it has at least [`TILE_MIN_T`] tokens (fewer leave too many lanes idle; the row
/// kernel takes them).
fn tiled_tokens(t: usize, q4: bool) -> usize {
    let tokens = tile_tokens(q4);
    let whole = t / tokens * tokens;
    if t - whole >= TILE_MIN_T[q4 as usize] {
        t
    } else {
        whole
    }
}

/// Output rows `lo..hi` of every token: the first `tiled` tokens with the VNNI tile kernel,
/// the rest with the row kernel. An L2-sized chunk of rows is read from memory once and then
/// passed by every tile and token block.
///
/// # Safety
/// As [`x86::tile_vnni`] and [`x86::rows_vnni`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_tiles(
    m: &Mat,
    w: &QuantData,
    acts: &Acts,
    ta: &TileActs,
    tiled: usize,
    t: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
) {
    let row_bytes = w.format().value_bytes(m.k).max(1);
    let chunk = (CHUNK_BYTES / row_bytes).max(TILE_ROWS);
    let mut c0 = lo;
    while c0 < hi {
        let c1 = (c0 + chunk).min(hi);
        for tile in 0..tiled.div_ceil(ta.tokens) {
            let tt = ta.tokens.min(tiled - tile * ta.tokens);
            let mut o = c0;
            while o < c1 {
                let rows = TILE_ROWS.min(c1 - o);
                x86::tile_vnni(m, ta, tile, tt, o, rows, y);
                o += rows;
            }
        }
        let mut r0 = tiled;
        while r0 < t {
            let tt = PREFILL_T.min(t - r0);
            x86::rows_vnni(m, acts, r0, tt, c0, c1, y);
            r0 += tt;
        }
        c0 = c1;
    }
}

/// Never called: the tile path is chosen only with VNNI, which only x86-64 has.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn run_tiles(
    _: &Mat,
    _: &QuantData,
    _: &Acts,
    _: &TileActs,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: *mut f32,
) {
    unreachable!("the VNNI tile path exists only on x86-64")
}

/// A SIMD row kernel: `(weight, activations, first token, tokens, lo, hi, y)`.
type RowKernel = unsafe fn(&Mat, &Acts, usize, usize, usize, usize, *mut f32);

/// Output rows `lo..hi` of every token on `path`.
///
/// # Safety
/// As [`x86::rows_vnni`] / [`x86::rows_avx2`] for the SIMD paths; `y` is valid for `t · n`
/// writes and no other task writes rows `lo..hi`.
#[allow(clippy::too_many_arguments)]
unsafe fn run_rows(
    path: Path,
    mat: &Mat,
    w: &QuantData,
    acts: &Acts,
    t: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    let kernel: Option<RowKernel> = match path {
        Path::Vnni => Some(x86::rows_vnni),
        Path::Avx2 => Some(x86::rows_avx2),
        Path::Portable => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let kernel: Option<RowKernel> = None;
    let Some(kernel) = kernel else {
        return rows_portable(acts, t, mat.k, mat.n, w, lo, hi, y);
    };
    if t <= SMALL_T {
        return kernel(mat, acts, 0, t, lo, hi, y);
    }
    let row_bytes = w.format().value_bytes(mat.k).max(1);
    let chunk = (CHUNK_BYTES / row_bytes).max(1);
    let mut c0 = lo;
    while c0 < hi {
        let c1 = (c0 + chunk).min(hi);
        let mut r0 = 0;
        while r0 < t {
            let tt = PREFILL_T.min(t - r0);
            kernel(mat, acts, r0, tt, c0, c1, y);
            r0 += tt;
        }
        c0 = c1;
    }
}

/// Output rows `lo..hi` of every token, scalar integer dots (activations in natural order).
///
/// # Safety
/// `y` is valid for `t · n` writes; no other task writes rows `lo..hi`.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_portable(
    acts: &Acts,
    t: usize,
    k: usize,
    n: usize,
    w: &QuantData,
    lo: usize,
    hi: usize,
    y: *mut f32,
) {
    let g = w.group();
    let groups = k / g;
    let values = w.values();
    let scales = w.scales();
    for o in lo..hi {
        for r in 0..t {
            let qx = &acts.q[r * acts.kp..r * acts.kp + k];
            let sx = &acts.s[r * acts.gp..r * acts.gp + groups];
            let mut acc = 0f32;
            for gi in 0..groups {
                let xs = &qx[gi * g..(gi + 1) * g];
                let start = o * k + gi * g;
                let isum: i32 = match w.format() {
                    QuantFormat::Q8 => values[start..start + g]
                        .iter()
                        .zip(xs)
                        .map(|(&b, &a)| b as i8 as i32 * a as i32)
                        .sum(),
                    QuantFormat::Q4 => values[start / 2..(start + g) / 2]
                        .iter()
                        .zip(xs.chunks_exact(2))
                        .map(|(&b, a)| {
                            ((b & 0x0f) as i32 - 8) * a[0] as i32 + ((b >> 4) as i32 - 8) * a[1] as i32
                        })
                        .sum(),
                    QuantFormat::F8E4M3 => unreachable!("fp8 is dispatched to kernels::fp8"),
                };
                acc += scales.get(o * groups + gi) * sx[gi] * isum as f32;
            }
            *y.add(r * n + o) = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The SIMD activation quantisers this CPU can run.
    fn simd_paths() -> Vec<Path> {
        let mut p = Vec::new();
        if Isa::Avx512.is_available() && has_vnni() {
            p.push(Path::Vnni);
        }
        if Isa::Avx2.is_available() {
            p.push(Path::Avx2);
        }
        p
    }

    /// Values that stress the rounding rule: ties at `±(j + 0.5) · amax / 127`, zeros of both
    /// signs, subnormals (amax so small that `127 / amax` overflows), NaN and infinities.
    fn special(code: u8, amax: f32, j: u8) -> f32 {
        match code % 12 {
            0 => 0.0,
            1 => -0.0,
            2 => amax * (j as f32 + 0.5) / 127.0,
            3 => -amax * (j as f32 + 0.5) / 127.0,
            4 => f32::NAN,
            5 => f32::INFINITY,
            6 => 1e-45,
            7 => -3e-44,
            8 => amax,
            9 => -amax,
            _ => amax * (j as f32 / 127.0 - 0.5),
        }
    }

    fn check_bit_exact(x: &[f32], g: usize) {
        let groups = x.len() / g;
        let (mut q0, mut s0) = (vec![0i8; x.len()], vec![0f32; groups]);
        quantize_activations(x, g, &mut q0, &mut s0);
        let sum0: Vec<i32> = q0.chunks(g).map(|c| c.iter().map(|&v| v as i32).sum()).collect();
        for path in simd_paths() {
            let (mut q, mut s, mut sum) = (vec![1i8; x.len()], vec![1f32; groups], vec![1i32; groups]);
            quantize_row(path, x, g, &mut q, &mut s, &mut sum);
            assert_eq!(q, q0, "{path:?} group {g}: q");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&s), bits(&s0), "{path:?} group {g}: scales");
            assert_eq!(sum, sum0, "{path:?} group {g}: sums");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every SIMD activation quantiser equals `quantize_activations` bit for bit.
        #[test]
        fn activation_quantisation_is_bit_exact(
            g in prop::sample::select(vec![32usize, 64, 128, 256]),
            groups in 1usize..5,
            amax in prop::sample::select(vec![1.0f32, 3.7e-3, 1e-38, 2e-44, 6.5e4, 3e38]),
            rare in 0u32..100,
            seed in any::<u64>(),
        ) {
            let mut s = seed | 1;
            let x: Vec<f32> = (0..g * groups)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    let (code, j) = ((s >> 8) as u8, (s >> 16) as u8 % 127);
                    // Mostly ordinary values; special ones in about `rare`% of elements.
                    if ((s >> 32) % 100) < rare as u64 {
                        special(code, amax, j)
                    } else {
                        special(10, amax, j)
                    }
                })
                .collect();
            check_bit_exact(&x, g);
        }
    }

    #[test]
    fn deinterleave_splits_each_unit_into_even_then_odd() {
        let src: Vec<i8> = (0..128).map(|i| i as i8).collect();
        let mut dst = vec![0i8; 128];
        deinterleave(&src, 64, &mut dst);
        assert_eq!(&dst[..4], &[0, 2, 4, 6]);
        assert_eq!(&dst[32..36], &[1, 3, 5, 7]);
        assert_eq!(&dst[64..68], &[64, 66, 68, 70]);
        assert_eq!(dst[127], 127);
    }
}
