//! The AVX-512 item kernel, blocked for decoding at long context, where every key and value is
//! read once from memory and the arithmetic must keep up with the memory bus.
//!
//! Per tile of [`TILE`] keys and block of up to [`ROW_BLOCK`] query rows:
//! - scores: 4 keys at a time against every row of the block, 16-lane partial dots in
//!   registers (the queries are loaded once per 32 dims for 4 keys), reduced 16 keys at a time
//!   with a transpose-and-add tree instead of a horizontal sum per dot;
//! - softmax: one max, one vectorised exp and one sum per row and tile;
//! - `P·V`: 64 output dims × all rows of the block in registers while the tile's values stream
//!   through (the second half of the dims reads them again from L1).
//!
//! Keys and values are loaded 32 elements at a time. bf16 is widened with one shift and one
//! mask, which yields the even elements in one vector and the odd ones in the other; queries and
//! accumulators are kept in that same order (see [`Elem::slot`]) and put back in order at the
//! end, so no lane shuffles are needed in the inner loops. Head dims that are not a multiple of
//! 32 use masked loads on the last block and zero padding in queries and accumulators.

// Register blocks are indexed by row, key and half in lockstep: index loops read best.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{visible_slots, Args, Item, KvElem, Partial};
use crate::scratch::refill;

/// Keys per tile (the generic body's, on which decoding splits keys between threads).
const TILE: usize = super::KEY_TILE;
/// Query rows per register block: Scout's group of 5 query heads per kv head. 5 rows × 4
/// vectors of accumulators (+4 values) fit the 32 registers in `P·V`; 5 rows × 4 keys of
/// partial dots (+8 widened keys) in the scores.
const ROW_BLOCK: usize = 5;

/// A key/value dtype as the AVX-512 kernel loads it.
pub(super) trait Elem: KvElem {
    /// Whether [`Elem::load32`] returns even/odd elements (bf16) rather than first/last 16.
    const INTERLEAVED: bool;

    /// Elements `p[0..32]` (those `m` selects; others read as zero) as two f32 vectors.
    ///
    /// # Safety
    /// AVX-512F/BW; every selected element readable.
    ///
    /// Implementations carry `#[target_feature]` themselves: without it the intrinsics they
    /// call stayed out-of-line calls, once per key and value (seen in `perf`), even though
    /// the method itself was inlined into the kernel.
    unsafe fn load32(p: *const Self, m: __mmask32) -> (__m512, __m512);

    /// Position of dim `i` in the padded, reordered layout of queries and accumulators.
    #[inline(always)]
    fn slot(i: usize) -> usize {
        let (b, j) = (i / 32, i % 32);
        if Self::INTERLEAVED {
            b * 32 + (j % 2) * 16 + j / 2
        } else {
            i
        }
    }
}

impl Elem for f32 {
    const INTERLEAVED: bool = false;

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load32(p: *const Self, m: __mmask32) -> (__m512, __m512) {
        (
            _mm512_maskz_loadu_ps(m as __mmask16, p),
            _mm512_maskz_loadu_ps((m >> 16) as __mmask16, p.add(16)),
        )
    }
}

impl Elem for bf16 {
    const INTERLEAVED: bool = true;

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load32(p: *const Self, m: __mmask32) -> (__m512, __m512) {
        // A bf16 is the top half of an f32: element 2i sits in the low half of 32-bit lane i,
        // element 2i+1 in the high half.
        let raw = _mm512_maskz_loadu_epi16(m, p as *const i16);
        let even = _mm512_slli_epi32::<16>(raw);
        let odd = _mm512_and_si512(raw, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
        (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
    }
}

impl Elem for f16 {
    const INTERLEAVED: bool = false;

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load32(p: *const Self, m: __mmask32) -> (__m512, __m512) {
        let raw = _mm512_maskz_loadu_epi16(m, p as *const i16);
        (
            _mm512_cvtph_ps(_mm512_castsi512_si256(raw)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(raw)),
        )
    }
}

/// Working space of [`item`], reused from item to item.
#[derive(Debug, Default)]
pub(super) struct Work {
    /// Load mask of each 32-element block of a head vector.
    masks: Vec<__mmask32>,
    /// Scaled queries, `[rows, dp]` in slot order.
    q: Vec<f32>,
    /// Visible key slots of each row, within the item's slots.
    vis: Vec<(usize, usize)>,
    /// Unnormalised outputs, `[rows, dp]` in slot order.
    acc: Vec<f32>,
}

impl Work {
    /// Empties the buffers and sizes them for an item of `rows` query rows of dim `d`, queries
    /// and accumulators zeroed. Once done for the largest item of a call (see `run`), doing it
    /// for any item of the call allocates nothing.
    pub(super) fn prepare(&mut self, d: usize, rows: usize) {
        let nb = d.div_ceil(32);
        self.masks.clear();
        self.masks.reserve(nb);
        refill(&mut self.q, rows * nb * 32, 0f32);
        self.vis.clear();
        self.vis.reserve(rows);
        refill(&mut self.acc, rows * nb * 32, 0f32);
    }

    /// Garbage in every buffer (tests: a call must not read what an earlier one left).
    #[cfg(test)]
    pub(super) fn poison(&mut self) {
        self.masks.fill(0x5555_5555);
        self.q.fill(f32::NAN);
        self.vis.fill((usize::MAX, 0));
        self.acc.fill(f32::NAN);
    }
}

/// Per-item state shared by the row blocks.
struct State<'a, E> {
    args: &'a Args<'a, E>,
    /// Dims rounded up to whole 32-element blocks.
    dp: usize,
    /// Load mask of each 32-element block of a head vector.
    masks: &'a [__mmask32],
    /// Scaled queries, `[rows, dp]` in slot order.
    q: &'a [f32],
    /// Visible key slots of each row, within the item's slots.
    vis: &'a [(usize, usize)],
    /// Running max and sum of each row (the item's partial result).
    m: &'a mut [f32],
    l: &'a mut [f32],
    /// Unnormalised outputs, `[rows, dp]` in slot order.
    acc: &'a mut [f32],
    /// First key of the head.
    kh: *const E,
    vh: *const E,
}

/// One item on AVX-512 (see the module doc), its result written to `out`.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL and FMA; `args` passed `check` and `it` lies inside the views.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn item<E: Elem>(args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
    let d = args.dims.d;
    let hq = args.dims.hq;
    let rep = args.dims.group();
    let ctx = args.ctx;
    let nt = it.t1 - it.t0;
    let rows = nt * rep;
    let nb = d.div_ceil(32);
    let dp = nb * 32;
    work.prepare(d, rows);
    let Work { masks, q, vis, acc } = work;
    masks.extend((0..nb).map(|b| {
        let n = (d - 32 * b).min(32);
        if n == 32 {
            !0
        } else {
            (1u32 << n) - 1
        }
    }));

    for ti in 0..nt {
        let t = it.t0 + ti;
        let (lo, hi) = visible_slots(ctx.mask, ctx.positions[t], args.dims.first_pos, args.dims.len);
        for r in 0..rep {
            vis.push((lo.max(it.s0), hi.min(it.s1)));
            let src = &args.q[(t * hq + it.g * rep + r) * d..][..d];
            let dst = &mut q[(ti * rep + r) * dp..][..dp];
            for (i, &x) in src.iter().enumerate() {
                dst[E::slot(i)] = x * ctx.scale;
            }
        }
    }
    out.m.fill(f32::NEG_INFINITY);
    out.l.fill(0.0);
    let mut st = State {
        args,
        dp,
        masks,
        q,
        vis,
        m: out.m,
        l: out.l,
        acc,
        kh: args.k.as_ptr().add(it.g * args.k_stride),
        vh: args.v.as_ptr().add(it.g * args.v_stride),
    };

    for j0 in (it.s0..it.s1).step_by(TILE) {
        let j1 = (j0 + TILE).min(it.s1);
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            match (rows - r0).min(ROW_BLOCK) {
                1 => block::<E, 1>(&mut st, r0, j0, j1),
                2 => block::<E, 2>(&mut st, r0, j0, j1),
                3 => block::<E, 3>(&mut st, r0, j0, j1),
                4 => block::<E, 4>(&mut st, r0, j0, j1),
                _ => block::<E, 5>(&mut st, r0, j0, j1),
            }
        }
    }

    // Back to dim order, without the padding.
    for (dst, src) in out
        .acc
        .chunks_exact_mut(d.max(1))
        .zip(st.acc.chunks_exact(dp.max(1)))
    {
        for (i, y) in dst.iter_mut().enumerate() {
            *y = src[E::slot(i)];
        }
    }
}

/// Rows `r0..r0 + R` against keys `j0..j1`: scores, online-softmax update, `P·V`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn block<E: Elem, const R: usize>(st: &mut State<E>, r0: usize, j0: usize, j1: usize) {
    // Keys that at least one row sees; rows see sub-ranges of it.
    let mut ua = usize::MAX;
    let mut ub = 0;
    let mut ranges = [(0usize, 0usize); R];
    for (r, range) in ranges.iter_mut().enumerate() {
        let (lo, hi) = st.vis[r0 + r];
        let (a, b) = (lo.max(j0), hi.min(j1));
        if a < b {
            ua = ua.min(a);
            ub = ub.max(b);
            *range = (a, b);
        }
    }
    if ua >= ub {
        return;
    }
    let n = ub - ua;
    let dp = st.dp;
    let d = st.args.dims.d;
    let nb = st.masks.len();

    // Scores, then probabilities in place: `[R][TILE]`.
    let mut s = [[0f32; TILE]; R];
    let q = st.q.as_ptr().add(r0 * dp);
    let kh = st.kh.add(ua * d);
    let vh = st.vh.add(ua * d);
    // Puts 16 sums of the tree below back in key order.
    let unscramble = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for b0 in (0..n).step_by(16) {
        let mut z = [[_mm512_setzero_ps(); 4]; R];
        for (g, zg) in (0..4).map(|g| (g, b0 + 4 * g)) {
            // Past the last key, repeat it (its scores are masked off below).
            let kp: [*const E; 4] = std::array::from_fn(|i| kh.add((zg + i).min(n - 1) * d));
            // The values of these keys, needed after the scores: hardware prefetchers restart at
            // every 4 KiB page and alternate between the K and V streams, which leaves a single
            // core far from memory bandwidth.
            for i in 0..4 {
                prefetch_row(vh.add((zg + i).min(n - 1) * d), d);
            }
            let mut a = [[_mm512_setzero_ps(); R]; 4];
            for (c, &mask) in st.masks.iter().enumerate() {
                let k: [(__m512, __m512); 4] = std::array::from_fn(|i| E::load32(kp[i].add(32 * c), mask));
                for r in 0..R {
                    let qe = _mm512_loadu_ps(q.add(r * dp + 32 * c));
                    let qo = _mm512_loadu_ps(q.add(r * dp + 32 * c + 16));
                    for i in 0..4 {
                        a[i][r] = _mm512_fmadd_ps(qe, k[i].0, a[i][r]);
                        a[i][r] = _mm512_fmadd_ps(qo, k[i].1, a[i][r]);
                    }
                }
            }
            for r in 0..R {
                let y0 = fold_halves(a[0][r], a[1][r]);
                let y1 = fold_halves(a[2][r], a[3][r]);
                z[r][g] = fold_quarters(y0, y1);
            }
        }
        for r in 0..R {
            let w0 = fold_pairs(z[r][0], z[r][1]);
            let w1 = fold_pairs(z[r][2], z[r][3]);
            let sums = _mm512_permutexvar_ps(unscramble, fold_last(w0, w1));
            _mm512_storeu_ps(s[r].as_mut_ptr().add(b0), sums);
        }
    }

    // Online softmax over the tile, per row.
    let nv = n.div_ceil(16);
    let mut alpha = [1f32; R];
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for r in 0..R {
        let row = r0 + r;
        let (a, b) = ranges[r];
        if a >= b {
            s[r] = [0f32; TILE];
            continue;
        }
        let (a, b) = (
            _mm512_set1_epi32((a - ua) as i32),
            _mm512_set1_epi32((b - ua) as i32),
        );
        let mut valid = [0 as __mmask16; TILE / 16];
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for (v, ok) in valid.iter_mut().enumerate().take(nv) {
            let idx = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * v as i32));
            *ok = _mm512_cmpge_epi32_mask(idx, a) & _mm512_cmplt_epi32_mask(idx, b);
            mx = _mm512_mask_max_ps(mx, *ok, mx, _mm512_loadu_ps(s[r].as_ptr().add(16 * v)));
        }
        let m_old = st.m[row];
        let m_new = m_old.max(_mm512_reduce_max_ps(mx));
        alpha[r] = exp_neg(m_old - m_new);
        let mn = _mm512_set1_ps(m_new);
        let mut total = _mm512_setzero_ps();
        for (v, &ok) in valid.iter().enumerate().take(nv) {
            let p = s[r].as_mut_ptr().add(16 * v);
            let e = _mm512_maskz_mov_ps(ok, exp_neg512(_mm512_sub_ps(_mm512_loadu_ps(p), mn)));
            _mm512_storeu_ps(p, e);
            total = _mm512_add_ps(total, e);
        }
        st.l[row] = st.l[row] * alpha[r] + _mm512_reduce_add_ps(total);
        st.m[row] = m_new;
    }

    // P·V, 64 dims at a time (32 for an odd last block). The first pass also prefetches the
    // keys of the next tile.
    let acc = st.acc.as_mut_ptr().add(r0 * dp);
    let ahead = kh.wrapping_add(n * d);
    let mut c = 0;
    while c + 2 <= nb {
        let pf = (c == 0).then_some(ahead);
        let m = &st.masks[c..c + 2];
        pv::<E, R, 2>(acc.add(32 * c), dp, vh.add(32 * c), d, m, &s, &alpha, n, pf);
        c += 2;
    }
    if c < nb {
        let pf = (c == 0).then_some(ahead);
        let m = &st.masks[c..c + 1];
        pv::<E, R, 1>(acc.add(32 * c), dp, vh.add(32 * c), d, m, &s, &alpha, n, pf);
    }
}

/// Prefetches the `d` elements at `p` into L2. Prefetches never fault, so `p` may lie past the
/// item's keys (formed with wrapping arithmetic only).
#[inline(always)]
unsafe fn prefetch_row<E>(p: *const E, d: usize) {
    let bytes = d * std::mem::size_of::<E>();
    let p = p as *const i8;
    for off in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off));
    }
}

/// `acc[r][..32·B] = alpha[r] · acc[r][..32·B] + Σ_j p[r][j] · v[j][..32·B]` for `j < n`,
/// accumulators in registers; with `prefetch`, also prefetches `n` rows of `v_stride` elements
/// from there.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv<E: Elem, const R: usize, const B: usize>(
    acc: *mut f32,
    acc_stride: usize,
    v: *const E,
    v_stride: usize,
    masks: &[__mmask32],
    p: &[[f32; TILE]; R],
    alpha: &[f32; R],
    n: usize,
    prefetch: Option<*const E>,
) {
    let mut x = [[[_mm512_setzero_ps(); 2]; B]; R];
    for r in 0..R {
        let al = _mm512_set1_ps(alpha[r]);
        for (b, xb) in x[r].iter_mut().enumerate() {
            for (h, xh) in xb.iter_mut().enumerate() {
                *xh = _mm512_mul_ps(al, _mm512_loadu_ps(acc.add(r * acc_stride + 32 * b + 16 * h)));
            }
        }
    }
    for j in 0..n {
        let row = v.add(j * v_stride);
        if let Some(p) = prefetch {
            prefetch_row(p.wrapping_add(j * v_stride), v_stride);
        }
        let vals: [(__m512, __m512); B] = std::array::from_fn(|b| E::load32(row.add(32 * b), masks[b]));
        for r in 0..R {
            let pj = _mm512_set1_ps(p[r][j]);
            for b in 0..B {
                x[r][b][0] = _mm512_fmadd_ps(pj, vals[b].0, x[r][b][0]);
                x[r][b][1] = _mm512_fmadd_ps(pj, vals[b].1, x[r][b][1]);
            }
        }
    }
    for r in 0..R {
        for (b, xb) in x[r].iter().enumerate() {
            for (h, xh) in xb.iter().enumerate() {
                _mm512_storeu_ps(acc.add(r * acc_stride + 32 * b + 16 * h), *xh);
            }
        }
    }
}

// The reduction tree: 16 vectors of 16 partial sums (4 groups of 4 keys) → one vector holding
// the 16 totals. Each step adds two halves of each input and packs the results of two inputs.

/// Lanes 0..8 ← halves of `a` added, lanes 8..16 ← of `b`.
#[inline(always)]
unsafe fn fold_halves(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(a, b),
        _mm512_shuffle_f32x4::<0xEE>(a, b),
    )
}

/// From two outputs of [`fold_halves`]: 128-bit quarter `i` ← the 4 partials of key `i`.
#[inline(always)]
unsafe fn fold_quarters(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(a, b),
        _mm512_shuffle_f32x4::<0xDD>(a, b),
    )
}

/// Within each quarter: lanes 0, 1 ← 2 partials of `a`'s key, lanes 2, 3 ← of `b`'s.
#[inline(always)]
unsafe fn fold_pairs(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b))
}

/// Within each quarter `q`: lane `i` ← total of key `4i + q`.
#[inline(always)]
unsafe fn fold_last(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_ps::<0x88>(a, b), _mm512_shuffle_ps::<0xDD>(a, b))
}

/// [`exp_neg`] on 16 lanes (the same steps, with fused multiply-adds).
#[inline(always)]
pub(super) unsafe fn exp_neg512(x: __m512) -> __m512 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0;
    let lo = _mm512_set1_ps(-87.0);
    let xc = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_setzero_ps());
    let magic = _mm512_set1_ps(MAGIC);
    let t = _mm512_fmadd_ps(xc, _mm512_set1_ps(LOG2E), magic);
    let n = _mm512_sub_ps(t, magic);
    let ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(magic));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        ni,
        _mm512_set1_epi32(127),
    )));
    // Below -87 (and -inf): 0, as the scalar twin.
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lo);
    _mm512_maskz_mul_ps(keep, e, scale)
}

/// `e^x` for `x ≤ 0` (the softmax's arguments), to about 2 ulp, in operations that vectorise
/// (std's `exp` is a libm call per element). Returns 0 below `-87` (and for `-inf`).
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::exp_neg;

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
}
