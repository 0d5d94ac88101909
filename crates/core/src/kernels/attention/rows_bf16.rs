//! The AVX-512 BF16 prefill kernel: [`super::rows_avx512`]'s rows in lanes, with `Q·K` and
//! `P·V` as bf16 dot products (`vdpbf16ps`: two products per lane per instruction, where that
//! kernel does one fused multiply-add) and a shorter exponential.
//!
//! Rounding: the scaled queries and the probabilities are rounded to bf16 (8 significant bits),
//! and so are keys and values unless they are bf16 already; products and sums stay f32. That
//! is the precision of a q8 cache's own elements, which is why q8 prefill runs this kernel
//! ([`super::KvElem::BF16_DOTS`]) while the float caches keep f32 arithmetic.
//!
//! Once per tile of [`TILE`] keys and item: the keys are rounded to bf16 (`[key][dp]`, so each
//! 32-bit word holds a pair of adjacent dims) and the values are paired across keys (`[key
//! pair][dp]`, one word holding `v_j[i]` and `v_{j+1}[i]`). Then per block of 16 rows:
//! - scores: `s_j = Σ_m q[2m..2m+2] · k_j[2m..2m+2]`, the query pairs in registers and each key
//!   pair broadcast, in the log2 domain (the queries carry `scale · log2 e`); the running max
//!   is taken as the scores are stored;
//! - softmax: `2^(s - m)` from a degree-3 polynomial and `vscalefps`, the probabilities of keys
//!   `j` and `j + 1` packed as bf16 pairs into one vector;
//! - `P·V`: `acc_i += p[j..j+2] · v[j..j+2][i]`, 16 dims × 16 rows of accumulators. For head
//!   dims up to 16 the probabilities are made inside this loop, so that their exponentials
//!   overlap the dot products.
//!
//! On the demo's heads (head dim 16) over a q8 cache this runs 1.9-2.2× the f32 kernel over a
//! bf16 cache (Zen 5; `cargo bench --bench attention -- attention_prefill`, `demo_q8` against
//! `demo`).
//!
//! Pairs of keys start at even offsets from the tile's first slot, so a block whose keys start
//! (or end) at an odd offset has one key in its first (or last) pair that it does not see: its
//! probability is zero, and the key and value read as zero there.

// Register blocks are indexed by dim and key in lockstep: index loops read best.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::mem::transmute;

use half::bf16;

use super::keys_avx512::exp_neg512;
use super::rows_avx512::{block_ranges, query_row, tile_span, write_out, RowState};
use super::{Args, Item, KvElem, Partial};
use crate::scratch::refill;

/// Rows per vector.
const LANES: usize = 16;
/// Keys per tile (even, so that pairs of keys never straddle tiles): the fixed cost of a tile
/// per block (the max, the rescaling of 16 × `dp` accumulators) spreads over more keys than
/// with 64, and 256 keys × 16 rows of scores (16 KiB) plus the tile's packed keys and values
/// (8 KiB each at head dim 16) stay in L1.
const TILE: usize = 256;
/// Keys scored together: 12 independent accumulator chains cover the latency of `vdpbf16ps`
/// (about 6 cycles at 2 per cycle on Zen 5).
const KEY_GROUP: usize = 12;

/// Working space of [`item`], reused from item to item.
#[derive(Debug, Default)]
pub(super) struct Work {
    /// Query pairs (scaled into the log2 domain, bf16), `[blk][dp / 2][LANES]`.
    qt: Vec<u32>,
    /// Visible ranges and the online-softmax state (the running max in the log2 domain).
    rows: RowState,
    /// The tile's keys in bf16, `[key][dp]`, with room for a key group past the tile.
    kb: Vec<u16>,
    /// The tile's values, bf16 pairs across keys, `[key pair][dp]`.
    vp: Vec<u32>,
    /// Scores of one block against the tile, `[key][LANES]` (room for a key group past it).
    s: Vec<f32>,
    /// Probabilities of one block, bf16 pairs of keys, `[key pair][LANES]`.
    pb: Vec<u32>,
}

impl Work {
    /// Empties the buffers and sizes them for an item of `rows` query rows of dim `d`, with
    /// their initial values. Once done for the largest item of a call, doing it for any item
    /// of the call allocates nothing.
    pub(super) fn prepare(&mut self, d: usize, rows: usize) {
        let nblk = rows.div_ceil(LANES);
        let dp = d.div_ceil(LANES) * LANES;
        refill(&mut self.qt, nblk * dp / 2 * LANES, 0u32);
        self.rows.prepare(nblk, dp);
        refill(&mut self.kb, (TILE + KEY_GROUP) * dp, 0u16);
        refill(&mut self.vp, TILE / 2 * dp, 0u32);
        refill(&mut self.s, (TILE + KEY_GROUP) * LANES, 0f32);
        refill(&mut self.pb, TILE / 2 * LANES, 0u32);
    }

    /// Garbage in every buffer (tests: a call must not read what an earlier one left).
    #[cfg(test)]
    pub(super) fn poison(&mut self) {
        self.rows.poison();
        self.s.fill(f32::NAN);
        // bf16 NaNs.
        self.kb.fill(0x7fc1);
        for x in [&mut self.qt, &mut self.vp, &mut self.pb] {
            x.fill(0x7fc1_7fc1);
        }
    }
}

/// Whether this CPU runs [`item`] (AVX-512 F/BW/VL and BF16).
pub(super) fn available() -> bool {
    super::super::Isa::Avx512.is_available() && is_x86_feature_detected!("avx512bf16")
}

/// One item on AVX-512 BF16 with rows in lanes (see the module doc), its result written to
/// `out`.
///
/// # Safety
/// [`available`]; `args` passed `check` and `it` lies inside the views.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
pub(super) unsafe fn item<E: KvElem>(args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
    let d = args.dims.d;
    let rows = (it.t1 - it.t0) * args.dims.group();
    let dp = d.div_ceil(LANES) * LANES;
    let pp = dp / 2;

    work.prepare(d, rows);
    let Work {
        qt,
        rows: st_rows,
        kb,
        vp,
        s,
        pb,
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
    let qscale = args.ctx.scale * std::f32::consts::LOG2_E;
    for row in 0..rows {
        let (blk, lane) = (row / LANES, row % LANES);
        for (i, pair) in query_row(args, it, row).chunks(2).enumerate() {
            let round = |x: f32| bf16::from_f32(x * qscale).to_bits() as u32;
            qt[(blk * pp + i) * LANES + lane] = round(pair[0]) | pair.get(1).map_or(0, |&x| round(x)) << 16;
        }
    }

    let mut st = State {
        dp,
        acc,
        m,
        l,
        kb,
        vp,
        s,
        pb,
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
        let span = Span { j0, wa, wb, d, dp };
        pack_keys(&kh[..wb * d], ks, st.kb, span);
        pack_pairs(&vh[..wb * d], vs, st.vp, span);
        for (blk, br) in blocks.iter().enumerate() {
            let (a, b) = (br.ua.max(j0), br.ub.min(j1));
            if a >= b {
                continue;
            }
            let q = qt.as_ptr().add(blk * pp * LANES);
            let ranges = (lo.as_ptr().add(blk * LANES), hi.as_ptr().add(blk * LANES));
            let masked = !(br.ia <= a && br.ib >= b);
            match (masked, pp.is_multiple_of(16)) {
                (false, true) => tile::<false, 16>(&mut st, blk, q, ranges, j0, a, b),
                (false, false) => tile::<false, 8>(&mut st, blk, q, ranges, j0, a, b),
                (true, true) => tile::<true, 16>(&mut st, blk, q, ranges, j0, a, b),
                (true, false) => tile::<true, 8>(&mut st, blk, q, ranges, j0, a, b),
            }
        }
    }
    write_out(st.acc, st.m, st.l, std::f32::consts::LN_2, out, rows, d, dp);
}

/// Per-item buffers (in [`Work`]).
struct State<'a> {
    /// Head dim rounded up to whole vectors.
    dp: usize,
    acc: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
    kb: &'a mut [u16],
    vp: &'a mut [u32],
    s: &'a mut [f32],
    pb: &'a mut [u32],
}

/// Word indices that interleave the two halves of a vector of 32 words: `[0, 16, 1, 17, ..]`.
#[inline(always)]
unsafe fn pair_index() -> __m512i {
    let idx: [i16; 32] = std::array::from_fn(|w| ((w / 2) + 16 * (w % 2)) as i16);
    _mm512_loadu_si512(idx.as_ptr().cast())
}

/// `x` and `y` rounded to bf16 and interleaved: word `2r` is `x[r]`, word `2r + 1` is `y[r]`.
#[inline(always)]
unsafe fn pairs(x: __m512, y: __m512, idx: __m512i) -> __m512i {
    _mm512_permutexvar_epi16(idx, transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(y, x)))
}

/// The key slots of a tile that some block reads, `wa..wb` of the tile from slot `j0`, in
/// whole pairs from `pa()` to `pz()` (offsets from `j0`, both even); head dim `d`, padded `dp`.
#[derive(Clone, Copy)]
struct Span {
    j0: usize,
    wa: usize,
    wb: usize,
    d: usize,
    dp: usize,
}

impl Span {
    fn pa(&self) -> usize {
        (self.wa - self.j0) & !1
    }

    fn pz(&self) -> usize {
        (self.wb - self.j0 + 1) & !1
    }

    /// Dims `c..c + 16` of tile slot `j` (offset from `j0`) of `src` (a head's elements from
    /// slot 0, at least to `wb`; `scales` those of slots `wa..wb`, empty for floats), as f32
    /// times the slot's scale; zeros for a slot outside `wa..wb` and dims past `d`.
    ///
    /// # Safety
    /// AVX-512F/BW.
    #[inline(always)]
    unsafe fn load<E: KvElem>(&self, src: &[E], scales: &[f32], j: usize, c: usize) -> __m512 {
        let slot = self.j0 + j;
        if slot < self.wa || slot >= self.wb {
            return _mm512_setzero_ps();
        }
        let live = (self.d - c).min(LANES);
        let m = if live == LANES { !0 } else { (1u16 << live) - 1 };
        // In bounds: `slot < wb` and the mask selects dims below `d`.
        let x = E::load16(src.as_ptr().add(slot * self.d + c), m);
        match scales.get(slot - self.wa) {
            Some(&s) => _mm512_mul_ps(x, _mm512_set1_ps(s)),
            None => x,
        }
    }
}

/// The span's keys from the cache into `kb` (`[slot][dp]` from the tile's first slot),
/// rounded to bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
unsafe fn pack_keys<E: KvElem>(src: &[E], scales: &[f32], kb: &mut [u16], span: Span) {
    let dp = span.dp;
    let kb = &mut kb[..span.pz() * dp];
    for j in span.pa()..span.pz() {
        for c in (0..dp).step_by(LANES) {
            let h = _mm512_cvtneps_pbh(span.load(src, scales, j, c));
            _mm256_storeu_si256(
                kb.as_mut_ptr().add(j * dp + c).cast(),
                transmute::<__m256bh, __m256i>(h),
            );
        }
    }
}

/// The span's values from the cache into `vp` (`[slot pair][dp]` from the tile's first slot),
/// bf16 pairs across keys.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
unsafe fn pack_pairs<E: KvElem>(src: &[E], scales: &[f32], vp: &mut [u32], span: Span) {
    let dp = span.dp;
    let vp = &mut vp[..span.pz() / 2 * dp];
    let idx = pair_index();
    for jp in span.pa() / 2..span.pz() / 2 {
        for c in (0..dp).step_by(LANES) {
            let x = span.load(src, scales, 2 * jp, c);
            let y = span.load(src, scales, 2 * jp + 1, c);
            _mm512_storeu_si512(vp.as_mut_ptr().add(jp * dp + c).cast(), pairs(x, y, idx));
        }
    }
}

/// `2^x` for the softmax's `x ≤ 0`, to about 7.5e-5 relative: below the bf16 rounding the
/// probabilities get next. `vscalefps` underflows to 0 (through subnormals) as `x` falls, so
/// no clamp is needed; a NaN or infinite `x` (lanes of masked keys) gives NaN, which the
/// masks replace. (Adding `2^n` to the exponent as an integer instead of `vscalefps`, and a
/// 16-entry table with a linear term instead of the polynomial, measured no faster on Zen 5.)
#[inline(always)]
unsafe fn exp2_short(x: __m512) -> __m512 {
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    // Fitted to the relative error of `2^f` on [-1/2, 1/2].
    let mut p = _mm512_set1_ps(0.055_171_67);
    for c in [0.242_611_14, 0.693_260_97, 0.999_928_06] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// The rows of block `blk` (query pairs at `q`, visible slots at `ranges`) against key slots
/// `a..b` of the tile starting at slot `j0`: scores, online-softmax update, `P·V`. `MASKED`:
/// some row sees only part of `a..b`. `NC`: query pairs held in registers at a time (8 or 16,
/// dividing `dp / 2`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
unsafe fn tile<const MASKED: bool, const NC: usize>(
    st: &mut State,
    blk: usize,
    q: *const u32,
    ranges: (*const i32, *const i32),
    j0: usize,
    a: usize,
    b: usize,
) {
    let dp = st.dp;
    let pp = dp / 2;
    // From the first key's pair: `off` is 1 when its partner before it is not the block's.
    let ae = j0 + ((a - j0) & !1);
    let off = a - ae;
    let n = b - ae;
    let np = n.div_ceil(2);
    let kb = st.kb.as_ptr().add((ae - j0) * dp);
    let vp = st.vp.as_ptr().add((ae - j0) / 2 * dp);
    let s = st.s.as_mut_ptr();
    let pb = st.pb.as_mut_ptr();

    let (lo, hi) = if MASKED {
        (_mm512_loadu_epi32(ranges.0), _mm512_loadu_epi32(ranges.1))
    } else {
        (_mm512_setzero_si512(), _mm512_setzero_si512())
    };
    let visible = |j: usize| -> __mmask16 {
        let jv = _mm512_set1_epi32((ae + j) as i32);
        _mm512_cmple_epi32_mask(lo, jv) & _mm512_cmplt_epi32_mask(jv, hi)
    };
    let mp = st.m.as_mut_ptr().add(blk * LANES);
    let lp = st.l.as_mut_ptr().add(blk * LANES);
    let m_old = _mm512_loadu_ps(mp);

    // Scores, NC query pairs at a time (accumulated in `s` across chunks); with the last
    // chunk, the running max over keys `off..n` (from `ae`), in 4 chains that do not wait on
    // each other's latency.
    let mut mxs = [m_old; 4];
    for c0 in (0..pp).step_by(NC) {
        let qv: [__m512bh; NC] = std::array::from_fn(|i| {
            transmute::<__m512i, __m512bh>(_mm512_loadu_si512(q.add((c0 + i) * LANES).cast()))
        });
        let last_chunk = c0 + NC == pp;
        for g in (0..n).step_by(KEY_GROUP) {
            let mut z: [__m512; KEY_GROUP] = if c0 == 0 {
                [_mm512_setzero_ps(); KEY_GROUP]
            } else {
                std::array::from_fn(|u| _mm512_loadu_ps(s.add((g + u) * LANES)))
            };
            let kp = kb.add(g * dp + 2 * c0).cast::<i32>();
            for i in 0..NC {
                for u in 0..KEY_GROUP {
                    let k = _mm512_set1_epi32(kp.add(u * pp + i).read_unaligned());
                    z[u] = _mm512_dpbf16_ps(z[u], qv[i], transmute::<__m512i, __m512bh>(k));
                }
            }
            // Every key of the group counts towards the max, or (at the edges) some.
            let whole = g >= off && g + KEY_GROUP <= n;
            for u in 0..KEY_GROUP {
                _mm512_storeu_ps(s.add((g + u) * LANES), z[u]);
                let j = g + u;
                if last_chunk && (whole || (j >= off && j < n)) {
                    mxs[u % 4] = if MASKED {
                        _mm512_mask_max_ps(mxs[u % 4], visible(j), mxs[u % 4], z[u])
                    } else {
                        _mm512_max_ps(mxs[u % 4], z[u])
                    };
                }
            }
        }
    }
    let mx = _mm512_max_ps(_mm512_max_ps(mxs[0], mxs[1]), _mm512_max_ps(mxs[2], mxs[3]));
    // The rescaling of what came before: exact (1) where the max did not move, so that
    // thousands of tiles do not compound an error of the short exponential; a row that has
    // seen no key yet (-inf - -inf) gets 0 on its zero sums.
    let moved = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(m_old, mx);
    let alpha = _mm512_mask_mov_ps(
        _mm512_set1_ps(1.0),
        moved,
        exp_neg512(_mm512_mul_ps(
            _mm512_sub_ps(m_old, mx),
            _mm512_set1_ps(std::f32::consts::LN_2),
        )),
    );
    _mm512_storeu_ps(mp, mx);

    // Probabilities of pair `jp` (keys `2jp`, `2jp + 1` from `ae`); the first and the last
    // pair may hold a key outside `off..n`, which gets 0.
    let zero = _mm512_setzero_ps();
    let p_at = |j: usize| {
        let e = exp2_short(_mm512_sub_ps(_mm512_loadu_ps(s.add(j * LANES)), mx));
        if MASKED {
            _mm512_maskz_mov_ps(visible(j), e)
        } else {
            e
        }
    };
    let idx = pair_index();
    // One register: an array indexed by pair parity went through the stack.
    let mut total = zero;
    let mut pair = |jp: usize| {
        let (j0, j1) = (2 * jp, 2 * jp + 1);
        let (e0, e1) = if jp > 0 && j1 < n {
            (p_at(j0), p_at(j1))
        } else {
            let edge = |j: usize| if j < off || j >= n { zero } else { p_at(j) };
            (edge(j0), edge(j1))
        };
        total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
        transmute::<__m512i, __m512bh>(pairs(e0, e1, idx))
    };

    // P·V, 16 dims at a time. With one chunk (head dim up to 16), the probabilities are made
    // as the loop goes, their exponentials overlapping the dot products; with more, once into
    // `pb`, then read by every chunk.
    let acc = st.acc.as_mut_ptr().add(blk * dp * LANES);
    // A macro, not a closure taking the source of probabilities: a `dyn` one would be called
    // per pair, and generic closures do not exist.
    macro_rules! pv {
        ($c:expr, $p:expr) => {{
            let ap = acc.add($c * LANES);
            let mut x: [__m512; LANES] =
                std::array::from_fn(|i| _mm512_mul_ps(alpha, _mm512_loadu_ps(ap.add(i * LANES))));
            let vc = vp.add($c).cast::<i32>();
            // One pair ahead: the dot products of a pair do not wait on its exponentials.
            let mut p: __m512bh = $p(0);
            for jp in 0..np {
                let p_now = p;
                if jp + 1 < np {
                    p = $p(jp + 1);
                }
                let p = p_now;
                let vj = vc.add(jp * dp);
                for i in 0..LANES {
                    let v = _mm512_set1_epi32(*vj.add(i));
                    x[i] = _mm512_dpbf16_ps(x[i], p, transmute::<__m512i, __m512bh>(v));
                }
            }
            for i in 0..LANES {
                _mm512_storeu_ps(ap.add(i * LANES), x[i]);
            }
        }};
    }
    if dp == LANES {
        pv!(0, pair);
    } else {
        for jp in 0..np {
            _mm512_storeu_si512(
                pb.add(jp * LANES).cast(),
                transmute::<__m512bh, __m512i>(pair(jp)),
            );
        }
        let stored =
            |jp: usize| transmute::<__m512i, __m512bh>(_mm512_loadu_si512(pb.add(jp * LANES).cast()));
        for c in (0..dp).step_by(LANES) {
            pv!(c, stored);
        }
    }
    _mm512_storeu_ps(lp, _mm512_fmadd_ps(_mm512_loadu_ps(lp), alpha, total));
}
