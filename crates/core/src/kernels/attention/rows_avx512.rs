//! The AVX-512 prefill kernel: query rows in lanes.
//!
//! During prefill an item holds many query rows (tokens × the heads of one kv group) that all
//! read the same keys. Here 16 rows share one vector, lane `r` holding row `r`, so that:
//! - scores: `s_j = Σ_i q_i · k_j[i]` is `D` fused multiply-adds of the transposed queries
//!   (held in registers for the whole item block) by a broadcast key element, with no
//!   horizontal sums and no padding of the head dim beyond the next multiple of 16;
//! - softmax: the running max, the exponentials and the sums run across keys, lane-wise;
//! - `P·V`: `acc_i += p_j · v_j[i]`, the accumulators of 16 dims × 16 rows in registers.
//!
//! Each tile of keys and values is widened to f32 once per item and then serves every row
//! block of the item from L1. Per row block, keys outside the union of its rows' visible
//! ranges are not touched (causal: keys past the block's last row; chunked: keys before its
//! chunk), and tiles that every row sees whole skip the per-key masks.
//!
//! Lanes past the item's last row hold zero queries; their results are dropped.

// Register blocks are indexed by dim and key in lockstep: index loops read best.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::keys_avx512::exp_neg512;
use super::{visible_slots, Args, Item, KvElem, Partial};
use crate::scratch::refill;

/// Rows per vector.
const LANES: usize = 16;
/// Keys per tile: 64 keys × 128 dims × 4 bytes = 32 KiB of widened keys (as much of values).
const TILE: usize = 64;
/// Keys scored together: 8 independent accumulator chains cover the FMA latency.
const KEY_GROUP: usize = 8;

/// What both rows-in-lanes kernels ([`item`], [`super::rows_bf16::item`]) keep per item of
/// `nblk` blocks of [`LANES`] rows: visible ranges and the online-softmax state.
#[derive(Debug, Default)]
pub(super) struct RowState {
    /// Visible key slots of each row (`[blk][LANES]`), empty as `0..0`.
    pub(super) lo: Vec<i32>,
    pub(super) hi: Vec<i32>,
    /// Key ranges of each block of rows.
    pub(super) blocks: Vec<BlockRange>,
    /// Unnormalised outputs, `[blk][dp][LANES]`.
    pub(super) acc: Vec<f32>,
    /// Running max and sum, `[blk][LANES]`.
    pub(super) m: Vec<f32>,
    pub(super) l: Vec<f32>,
}

impl RowState {
    /// Empties the buffers and sizes them for `nblk` blocks of head dim `dp` (padded), with
    /// their initial values.
    pub(super) fn prepare(&mut self, nblk: usize, dp: usize) {
        refill(&mut self.lo, nblk * LANES, 0i32);
        refill(&mut self.hi, nblk * LANES, 0i32);
        self.blocks.clear();
        self.blocks.reserve(nblk);
        refill(&mut self.acc, nblk * dp * LANES, 0f32);
        refill(&mut self.m, nblk * LANES, f32::NEG_INFINITY);
        refill(&mut self.l, nblk * LANES, 0f32);
    }

    /// Garbage in every buffer (tests: a call must not read what an earlier one left).
    #[cfg(test)]
    pub(super) fn poison(&mut self) {
        for x in [&mut self.acc, &mut self.m, &mut self.l] {
            x.fill(f32::NAN);
        }
        self.lo.fill(i32::MAX);
        self.hi.fill(i32::MIN);
        self.blocks.fill(BlockRange {
            ua: 0,
            ub: usize::MAX,
            ia: 0,
            ib: usize::MAX,
        });
    }
}

/// Working space of [`item`], reused from item to item.
#[derive(Debug, Default)]
pub(super) struct Work {
    /// Transposed, scaled queries, `[blk][dp][LANES]`.
    qt: Vec<f32>,
    rows: RowState,
    /// The tile's keys and values widened, `[key][dp]` (zeros past `d`).
    kw: Vec<f32>,
    vw: Vec<f32>,
    /// Scores, then probabilities, of one block against the tile: `[key][LANES]`.
    s: Vec<f32>,
}

impl Work {
    /// Empties the buffers and sizes them for an item of `rows` query rows of dim `d`, with
    /// their initial values. Once done for the largest item of a call (see `run`), doing it
    /// for any item of the call allocates nothing.
    pub(super) fn prepare(&mut self, d: usize, rows: usize) {
        let nblk = rows.div_ceil(LANES);
        let dp = d.div_ceil(LANES) * LANES;
        refill(&mut self.qt, nblk * dp * LANES, 0f32);
        self.rows.prepare(nblk, dp);
        // Room for a key group past the tile: scores of keys past the range are computed on
        // whatever is there (finite: zeros or earlier keys of this item) and never used.
        refill(&mut self.kw, (TILE + KEY_GROUP) * dp, 0f32);
        refill(&mut self.vw, TILE * dp, 0f32);
        refill(&mut self.s, (TILE + KEY_GROUP) * LANES, 0f32);
    }

    /// Garbage in every buffer (tests: a call must not read what an earlier one left).
    #[cfg(test)]
    pub(super) fn poison(&mut self) {
        for x in [&mut self.qt, &mut self.kw, &mut self.vw, &mut self.s] {
            x.fill(f32::NAN);
        }
        self.rows.poison();
    }
}

/// One item on AVX-512 with rows in lanes (see the module doc), its result written to `out`.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL and FMA; `args` passed `check` and `it` lies inside the views.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn item<E: KvElem>(args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
    let d = args.dims.d;
    let rows = (it.t1 - it.t0) * args.dims.group();
    let dp = d.div_ceil(LANES) * LANES;

    work.prepare(d, rows);
    let Work {
        qt,
        rows: st_rows,
        kw,
        vw,
        s,
    } = work;
    let RowState {
        lo,
        hi,
        blocks,
        acc,
        m,
        l,
    } = st_rows;
    block_ranges(args, it, lo, hi, blocks);
    // Transposed, scaled queries `[blk][dp][LANES]`.
    for row in 0..rows {
        let (blk, lane) = (row / LANES, row % LANES);
        for (i, &x) in query_row(args, it, row).iter().enumerate() {
            qt[(blk * dp + i) * LANES + lane] = x * args.ctx.scale;
        }
    }

    let mut st = State {
        dp,
        acc,
        m,
        l,
        kw,
        vw,
        s,
    };
    let kh = &args.k[it.g * args.k_stride..];
    let vh = &args.v[it.g * args.v_stride..];

    for j0 in (it.s0..it.s1).step_by(TILE) {
        let j1 = (j0 + TILE).min(it.s1);
        let Some((wa, wb)) = tile_span(blocks, j0, j1) else {
            continue;
        };
        let (ks, vs) = (
            args.scales(args.k_scales, it.g, wa, wb),
            args.scales(args.v_scales, it.g, wa, wb),
        );
        widen_rows(&kh[wa * d..wb * d], ks, &mut st.kw[(wa - j0) * dp..], d, dp);
        widen_rows(&vh[wa * d..wb * d], vs, &mut st.vw[(wa - j0) * dp..], d, dp);
        for (blk, br) in blocks.iter().enumerate() {
            let (a, b) = (br.ua.max(j0), br.ub.min(j1));
            if a >= b {
                continue;
            }
            let q = qt.as_ptr().add(blk * dp * LANES);
            let ranges = (lo.as_ptr().add(blk * LANES), hi.as_ptr().add(blk * LANES));
            if br.ia <= a && br.ib >= b {
                tile::<false>(&mut st, blk, q, ranges, j0, a, b);
            } else {
                tile::<true>(&mut st, blk, q, ranges, j0, a, b);
            }
        }
    }

    write_out(&st.acc[..], &st.m[..], &st.l[..], 1.0, out, rows, d, dp);
}

/// Query row `row` of item `it` (token-major, then the heads of its group), unscaled: `[D]`.
#[inline(always)]
pub(super) fn query_row<'a, E>(args: &Args<'a, E>, it: Item, row: usize) -> &'a [f32] {
    let (d, rep) = (args.dims.d, args.dims.group());
    let (t, r) = (it.t0 + row / rep, row % rep);
    &args.q[(t * args.dims.hq + it.g * rep + r) * d..][..d]
}

/// Visible key slots of each row of item `it` (`lo..hi` per lane of `[blk][LANES]`, left
/// `0..0` when empty), and per block of rows the union and the intersection of its rows'
/// ranges (a tile inside the intersection needs no masks). Empty rows and padding lanes make
/// the intersection empty.
pub(super) fn block_ranges<E>(
    args: &Args<E>,
    it: Item,
    lo: &mut [i32],
    hi: &mut [i32],
    blocks: &mut Vec<BlockRange>,
) {
    let rep = args.dims.group();
    let rows = (it.t1 - it.t0) * rep;
    for row in 0..rows {
        let t = it.t0 + row / rep;
        let (a, b) = visible_slots(
            args.ctx.mask,
            args.ctx.positions[t],
            args.dims.first_pos,
            args.dims.len,
        );
        let (a, b) = (a.max(it.s0), b.min(it.s1));
        if a < b {
            lo[row] = a as i32;
            hi[row] = b as i32;
        }
    }
    blocks.extend((0..rows.div_ceil(LANES)).map(|blk| {
        let real = (rows - blk * LANES).min(LANES);
        let mut br = BlockRange {
            ua: usize::MAX,
            ub: 0,
            ia: 0,
            ib: usize::MAX,
        };
        for lane in 0..real {
            let (a, b) = (lo[blk * LANES + lane] as usize, hi[blk * LANES + lane] as usize);
            if a < b {
                br.ua = br.ua.min(a);
                br.ub = br.ub.max(b);
            }
            br.ia = br.ia.max(a);
            br.ib = br.ib.min(b);
        }
        br
    }));
}

/// The key slots of tile `j0..j1` that some block reads (`None`: no block reads the tile).
pub(super) fn tile_span(blocks: &[BlockRange], j0: usize, j1: usize) -> Option<(usize, usize)> {
    let (a, b) = blocks
        .iter()
        .filter(|br| br.ua < br.ub)
        .fold((j1, j0), |(a, b), br| {
            (a.min(br.ua.max(j0)), b.max(br.ub.min(j1)))
        });
    (a < b).then_some((a, b))
}

/// An item's result back in `[rows, d]` from accumulators `acc: [blk][dp][LANES]`, with each
/// running max times `m_scale` (the unit the merge reads scores in) and the sums `l`.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_out(
    acc: &[f32],
    m: &[f32],
    l: &[f32],
    m_scale: f32,
    out: Partial,
    rows: usize,
    d: usize,
    dp: usize,
) {
    for (row, dst) in out.acc.chunks_exact_mut(d.max(1)).enumerate().take(rows) {
        let (blk, lane) = (row / LANES, row % LANES);
        for (i, y) in dst.iter_mut().enumerate() {
            *y = acc[(blk * dp + i) * LANES + lane];
        }
    }
    for (y, &x) in out.m.iter_mut().zip(&m[..rows]) {
        *y = x * m_scale;
    }
    out.l.copy_from_slice(&l[..rows]);
}

/// Key slots `ua..ub` that some row of a block sees, and `ia..ib` that all of them see.
#[derive(Clone, Debug)]
pub(super) struct BlockRange {
    pub(super) ua: usize,
    pub(super) ub: usize,
    pub(super) ia: usize,
    pub(super) ib: usize,
}

/// Per-item buffers (in [`Work`]).
struct State<'a> {
    /// Head dim rounded up to whole vectors.
    dp: usize,
    /// Unnormalised outputs, `[blk][dp][LANES]`.
    acc: &'a mut [f32],
    /// Running max and sum, `[blk][LANES]`.
    m: &'a mut [f32],
    l: &'a mut [f32],
    /// The tile's keys and values widened, `[key][dp]` (zeros past `d`).
    kw: &'a mut [f32],
    vw: &'a mut [f32],
    /// Scores, then probabilities, of one block against the tile: `[key][LANES]`.
    s: &'a mut [f32],
}

/// `dst[j·dp .. j·dp + d] = src[j·d .. (j+1)·d]` widened (times `scales[j]` for a scaled
/// format; `scales` is empty for floats), for every key `j` of `src`.
#[inline(always)]
fn widen_rows<E: KvElem>(src: &[E], scales: &[f32], dst: &mut [f32], d: usize, dp: usize) {
    if d == dp && scales.is_empty() {
        E::widen(src, &mut dst[..src.len()]);
    } else {
        for (j, s) in src.chunks_exact(d).enumerate() {
            let row = &mut dst[j * dp..j * dp + d];
            E::widen(s, row);
            if let Some(&scale) = scales.get(j) {
                row.iter_mut().for_each(|x| *x *= scale);
            }
        }
    }
}

/// The rows of block `blk` (transposed queries at `q`, visible slots at `ranges`) against key
/// slots `a..b` of the tile starting at slot `j0`: scores, online-softmax update, `P·V`.
/// `MASKED`: some row sees only part of `a..b`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn tile<const MASKED: bool>(
    st: &mut State,
    blk: usize,
    q: *const f32,
    ranges: (*const i32, *const i32),
    j0: usize,
    a: usize,
    b: usize,
) {
    let dp = st.dp;
    let n = b - a;
    let nc = dp / LANES;
    let kw = st.kw.as_ptr().add((a - j0) * dp);
    let vw = st.vw.as_ptr().add((a - j0) * dp);
    let s = st.s.as_mut_ptr();

    // Scores, 16 dims at a time (accumulated in `s` across chunks).
    for c in 0..nc {
        let qv: [__m512; LANES] = std::array::from_fn(|i| _mm512_loadu_ps(q.add((c * LANES + i) * LANES)));
        for g in (0..n).step_by(KEY_GROUP) {
            let mut z: [__m512; KEY_GROUP] = if c == 0 {
                [_mm512_setzero_ps(); KEY_GROUP]
            } else {
                std::array::from_fn(|u| _mm512_loadu_ps(s.add((g + u) * LANES)))
            };
            let kp = kw.add(g * dp + c * LANES);
            for i in 0..LANES {
                for u in 0..KEY_GROUP {
                    z[u] = _mm512_fmadd_ps(qv[i], _mm512_set1_ps(*kp.add(u * dp + i)), z[u]);
                }
            }
            for u in 0..KEY_GROUP {
                _mm512_storeu_ps(s.add((g + u) * LANES), z[u]);
            }
        }
    }

    // Online softmax, lane-wise.
    let (lo, hi) = if MASKED {
        (_mm512_loadu_epi32(ranges.0), _mm512_loadu_epi32(ranges.1))
    } else {
        (_mm512_setzero_si512(), _mm512_setzero_si512())
    };
    let visible = |j: usize| -> __mmask16 {
        let jv = _mm512_set1_epi32((a + j) as i32);
        _mm512_cmple_epi32_mask(lo, jv) & _mm512_cmplt_epi32_mask(jv, hi)
    };
    let mp = st.m.as_mut_ptr().add(blk * LANES);
    let lp = st.l.as_mut_ptr().add(blk * LANES);
    let m_old = _mm512_loadu_ps(mp);
    // Running maxima and sums in 4 independent chains: one chain would wait on the latency of
    // every max and add.
    let mut mxs = [m_old; 4];
    let max_of = |mx: __m512, j: usize| {
        let sj = _mm512_loadu_ps(s.add(j * LANES));
        if MASKED {
            _mm512_mask_max_ps(mx, visible(j), mx, sj)
        } else {
            _mm512_max_ps(mx, sj)
        }
    };
    let n4 = n / 4 * 4;
    for j in (0..n4).step_by(4) {
        for u in 0..4 {
            mxs[u] = max_of(mxs[u], j + u);
        }
    }
    for j in n4..n {
        mxs[0] = max_of(mxs[0], j);
    }
    let mx = _mm512_max_ps(_mm512_max_ps(mxs[0], mxs[1]), _mm512_max_ps(mxs[2], mxs[3]));
    // A row that has seen no key yet keeps -inf; its alpha comes out 0 (exp of NaN is 0
    // in `exp_neg512`), harmless on its zero sums.
    let alpha = exp_neg512(_mm512_sub_ps(m_old, mx));
    let mut totals = [_mm512_setzero_ps(); 4];
    let exp_at = |total: __m512, j: usize| {
        let p = s.add(j * LANES);
        let e = exp_neg512(_mm512_sub_ps(_mm512_loadu_ps(p), mx));
        let e = if MASKED {
            _mm512_maskz_mov_ps(visible(j), e)
        } else {
            e
        };
        _mm512_storeu_ps(p, e);
        _mm512_add_ps(total, e)
    };
    for j in (0..n4).step_by(4) {
        for u in 0..4 {
            totals[u] = exp_at(totals[u], j + u);
        }
    }
    for j in n4..n {
        totals[0] = exp_at(totals[0], j);
    }
    let total = _mm512_add_ps(
        _mm512_add_ps(totals[0], totals[1]),
        _mm512_add_ps(totals[2], totals[3]),
    );
    _mm512_storeu_ps(lp, _mm512_fmadd_ps(_mm512_loadu_ps(lp), alpha, total));
    _mm512_storeu_ps(mp, mx);

    // P·V, 16 dims at a time.
    let acc = st.acc.as_mut_ptr().add(blk * dp * LANES);
    for c in 0..nc {
        let ap = acc.add(c * LANES * LANES);
        let mut x: [__m512; LANES] =
            std::array::from_fn(|i| _mm512_mul_ps(alpha, _mm512_loadu_ps(ap.add(i * LANES))));
        let vp = vw.add(c * LANES);
        for j in 0..n {
            let pj = _mm512_loadu_ps(s.add(j * LANES));
            let vj = vp.add(j * dp);
            for i in 0..LANES {
                x[i] = _mm512_fmadd_ps(pj, _mm512_set1_ps(*vj.add(i)), x[i]);
            }
        }
        for i in 0..LANES {
            _mm512_storeu_ps(ap.add(i * LANES), x[i]);
        }
    }
}
