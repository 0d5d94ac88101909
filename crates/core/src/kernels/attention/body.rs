//! The item kernels of the AVX2 and portable paths, generic over the crate's vector vocabulary.
//!
//! - [`decode`]: one query token at a short head dim (`D = 8, 16, 24, 32`), the decode step at
//!   long context. Keys and values are widened straight from the cache a block of [`BLOCK`]
//!   keys at a time; each query row of the group scores the block into one vector (a key per
//!   lane, no horizontal sum per key), and its softmax moves (max, exp, rescale) once per tile
//!   of blocks. Against int8 keys a decode step rounds its query to int8 too and scores in
//!   integers ([`Simd::dots_i8`]), as llama.cpp does for a q8_0 key cache.
//! - the tiled body (others, e.g. prefill): a tile of keys and values is widened to f32, then
//!   each query row scores it, updates its online softmax and accumulates the tile's values.

use super::{visible_slots, Args, Dims, Item, KvElem, Partial, KEY_TILE};
use crate::kernels::simd::{self, load_partial, store_partial, QueryI8, Simd, MAX_LANES};
use crate::kernels::Isa;
use crate::scratch::refill;

/// Working space of [`item`].
#[derive(Debug, Default)]
pub(super) struct Work {
    /// Scaled queries, `[rows, D]`.
    pub(super) q: Vec<f32>,
    /// Visible key slots of each token, within the item's slots.
    pub(super) vis: Vec<(usize, usize)>,
    /// A tile of keys and of values, widened: `[KEY_TILE, D]`.
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    /// The tile's keys transposed, `[D, KEY_TILE]`, and every row's scores against them,
    /// `[rows, KEY_TILE]`.
    pub(super) kt: Vec<f32>,
    pub(super) s: Vec<f32>,
    /// [`decode`]'s running sums of probabilities, one vector per row: `[rows, MAX_LANES]`.
    pub(super) l: Vec<f32>,
}

impl Work {
    /// Empties the buffers and sizes them for an item of `rows` query rows of dim `d`, all
    /// zeroed. Once done for the largest item of a call, doing it for any item of the call
    /// allocates nothing.
    pub(super) fn prepare(&mut self, d: usize, rows: usize) {
        refill(&mut self.q, rows * d, 0f32);
        // One range per token: at most one per row.
        self.vis.clear();
        self.vis.reserve(rows);
        refill(&mut self.k, KEY_TILE * d, 0f32);
        refill(&mut self.v, KEY_TILE * d, 0f32);
        refill(&mut self.kt, d * KEY_TILE, 0f32);
        refill(&mut self.s, rows * KEY_TILE, 0f32);
        refill(&mut self.l, rows * MAX_LANES, 0f32);
    }
}

/// Runs item `it` on `isa`: AVX2 for AVX2 and AVX-512 (q8 items the AVX-512 kernels do not
/// take), else portable.
pub(super) fn item<E: KvElem>(isa: Isa, args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
    match isa {
        // SAFETY: the caller passes an ISA only if this CPU has it, and AVX-512 implies AVX2
        // (`Isa::is_available`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { item_avx2(args, it, work, out) },
        // SAFETY: the portable vocabulary needs no CPU feature.
        _ => unsafe { item_body::<E, simd::Portable>(args, it, work, out) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn item_avx2<E: KvElem>(args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
    item_body::<E, simd::Avx2>(args, it, work, out)
}

/// `LANES` elements at `p + i` when `n == LANES`, else `n` of them padded with `fill`.
#[inline(always)]
unsafe fn ld<S: Simd>(p: *const f32, n: usize, fill: f32) -> S::V {
    if n == S::LANES {
        S::load(p)
    } else {
        load_partial::<S>(p, n, fill)
    }
}

/// `kt[i·KEY_TILE + j] = keys[j·d + i]` for the tile's `n` keys (`keys: [n, d]`); columns from
/// `n` to the next multiple of `2 · LANES` are zeroed (they are scored, never used).
#[inline(always)]
unsafe fn transpose_tile<S: Simd>(keys: &[f32], n: usize, d: usize, kt: &mut [f32]) {
    debug_assert!(keys.len() >= n * d && kt.len() >= d * KEY_TILE && n <= KEY_TILE);
    let padded = n.next_multiple_of(2 * S::LANES).min(KEY_TILE);
    let (pk, pt) = (keys.as_ptr(), kt.as_mut_ptr());
    for i in 0..d {
        let row = pt.add(i * KEY_TILE);
        for j in 0..n {
            *row.add(j) = *pk.add(j * d + i);
        }
        for j in n..padded {
            *row.add(j) = 0.0;
        }
    }
}

/// `s[r·KEY_TILE + j] = q_r · k_j` for `R` query rows (`q: [R, d]`) and the first `n` keys of
/// a tile transposed by [`transpose_tile`], `2 · LANES` keys at a time: each loaded vector of
/// keys meets all `R` rows (`2R` independent accumulators), and no sum crosses lanes.
#[inline(always)]
unsafe fn scores_rows<S: Simd, const R: usize>(
    q: *const f32,
    kt: *const f32,
    d: usize,
    n: usize,
    s: *mut f32,
) {
    let l = S::LANES;
    let mut j = 0;
    while j < n {
        let mut acc = [[S::splat(0.0); 2]; R];
        for i in 0..d {
            let col = kt.add(i * KEY_TILE + j);
            let (k0, k1) = (S::load(col), S::load(col.add(l)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let qv = S::splat(*q.add(r * d + i));
                acc[0] = S::fma(qv, k0, acc[0]);
                acc[1] = S::fma(qv, k1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            S::store(s.add(r * KEY_TILE + j), acc[0]);
            S::store(s.add(r * KEY_TILE + j + l), acc[1]);
        }
        j += 2 * l;
    }
}

/// [`scores_rows`] for `rows` query rows (`q: [rows, d]`), four at a time.
#[inline(always)]
unsafe fn scores_all<S: Simd>(q: &[f32], rows: usize, kt: &[f32], d: usize, n: usize, s: &mut [f32]) {
    debug_assert!(q.len() >= rows * d && s.len() >= rows * KEY_TILE && kt.len() >= d * KEY_TILE);
    debug_assert!(n <= KEY_TILE && KEY_TILE.is_multiple_of(2 * S::LANES));
    let (pq, pt, ps) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    let mut r = 0;
    while r < rows {
        let (q, s) = (pq.add(r * d), ps.add(r * KEY_TILE));
        match rows - r {
            1 => scores_rows::<S, 1>(q, pt, d, n, s),
            2 => scores_rows::<S, 2>(q, pt, d, n, s),
            3 => scores_rows::<S, 3>(q, pt, d, n, s),
            _ => scores_rows::<S, 4>(q, pt, d, n, s),
        }
        r += 4;
    }
}

/// `B` vectors of outputs at `acc + i`: `y = y · alpha + Σ_j p[j] · vals[j·d + i..]`, the `B`
/// accumulators independent FMA chains held in registers while the rows stream through.
#[inline(always)]
unsafe fn scale_axpy_block<S: Simd, const B: usize>(
    acc: *mut f32,
    alpha: f32,
    p: &[f32],
    vals: *const f32,
    d: usize,
) {
    let mut y = [S::splat(0.0); B];
    for (b, y) in y.iter_mut().enumerate() {
        *y = S::mul(S::load(acc.add(b * S::LANES)), S::splat(alpha));
    }
    for (j, &pj) in p.iter().enumerate() {
        let pv = S::splat(pj);
        let row = vals.add(j * d);
        for (b, y) in y.iter_mut().enumerate() {
            *y = S::fma(pv, S::load(row.add(b * S::LANES)), *y);
        }
    }
    for (b, y) in y.iter().enumerate() {
        S::store(acc.add(b * S::LANES), *y);
    }
}

/// [`scale_axpy_block`] for a whole row of `d = B · LANES` (a short head vector), the keys
/// taken `U` at a time into `U` independent sets of accumulators that are summed at the end:
/// with one chain per vector, `B < 8` chains would wait on FMA latency.
#[inline(always)]
unsafe fn scale_axpy_short<S: Simd, const B: usize, const U: usize>(
    acc: *mut f32,
    alpha: f32,
    p: &[f32],
    vals: *const f32,
) {
    let d = B * S::LANES;
    let mut y = [[S::splat(0.0); B]; U];
    for (b, y) in y[0].iter_mut().enumerate() {
        *y = S::mul(S::load(acc.add(b * S::LANES)), S::splat(alpha));
    }
    let mut j = 0;
    while j + U <= p.len() {
        for (u, y) in y.iter_mut().enumerate() {
            let pv = S::splat(*p.get_unchecked(j + u));
            let row = vals.add((j + u) * d);
            for (b, y) in y.iter_mut().enumerate() {
                *y = S::fma(pv, S::load(row.add(b * S::LANES)), *y);
            }
        }
        j += U;
    }
    for (jj, &pj) in p.iter().enumerate().skip(j) {
        let (pv, row) = (S::splat(pj), vals.add(jj * d));
        for (b, y) in y[0].iter_mut().enumerate() {
            *y = S::fma(pv, S::load(row.add(b * S::LANES)), *y);
        }
    }
    for b in 0..B {
        let mut sum = y[0][b];
        for set in &y[1..] {
            sum = S::add(sum, set[b]);
        }
        S::store(acc.add(b * S::LANES), sum);
    }
}

/// `acc[i] = acc[i] · alpha + Σ_j p[j] · vals[j·d + i]` for `i < d = acc.len()`: a short row
/// (up to four whole vectors) in [`scale_axpy_short`], others in blocks of eight, four and one
/// vectors (a single chain per vector would wait on FMA latency).
#[inline(always)]
unsafe fn scale_axpy_rows<S: Simd>(acc: &mut [f32], alpha: f32, p: &[f32], vals: &[f32]) {
    let d = acc.len();
    debug_assert!(vals.len() >= p.len() * d);
    let (pa, pv) = (acc.as_mut_ptr(), vals.as_ptr());
    if d.is_multiple_of(S::LANES) {
        match d / S::LANES {
            1 => return scale_axpy_short::<S, 1, 8>(pa, alpha, p, pv),
            2 => return scale_axpy_short::<S, 2, 4>(pa, alpha, p, pv),
            3 => return scale_axpy_short::<S, 3, 4>(pa, alpha, p, pv),
            4 => return scale_axpy_short::<S, 4, 2>(pa, alpha, p, pv),
            _ => {}
        }
    }
    let mut i = 0;
    while i + 8 * S::LANES <= d {
        scale_axpy_block::<S, 8>(pa.add(i), alpha, p, pv.add(i), d);
        i += 8 * S::LANES;
    }
    while i + 4 * S::LANES <= d {
        scale_axpy_block::<S, 4>(pa.add(i), alpha, p, pv.add(i), d);
        i += 4 * S::LANES;
    }
    while i < d {
        let c = (d - i).min(S::LANES);
        let mut y = S::mul(ld::<S>(pa.add(i), c, 0.0), S::splat(alpha));
        for (j, &pj) in p.iter().enumerate() {
            y = S::fma(S::splat(pj), ld::<S>(pv.add(j * d + i), c, 0.0), y);
        }
        if c == S::LANES {
            S::store(pa.add(i), y);
        } else {
            store_partial::<S>(pa.add(i), c, y);
        }
        i += c;
    }
}

/// Keys ahead of the tile being computed whose cache lines are requested
/// ([`prefetch_range`]): two tiles, far enough for the lines to arrive from memory meanwhile.
const PREFETCH_AHEAD: usize = 2 * KEY_TILE;

/// Requests every cache line of `x` (a hint: never faults).
#[inline(always)]
fn prefetch_range<T>(x: &[T]) {
    const LINE: usize = 64;
    let (p, bytes) = (x.as_ptr().cast::<u8>(), std::mem::size_of_val(x));
    let mut off = 0;
    while off < bytes {
        simd::prefetch(p.wrapping_add(off));
        off += LINE;
    }
}

/// `dst = src` widened to f32 (the same length), a vector at a time.
#[inline(always)]
unsafe fn widen<S: Simd, E: KvElem>(src: &[E], dst: &mut [f32]) {
    let n = dst.len();
    debug_assert_eq!(src.len(), n);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= n {
        S::store(pd.add(i), E::load::<S>(ps.add(i)));
        i += S::LANES;
    }
    for (y, &x) in dst[i..].iter_mut().zip(&src[i..]) {
        *y = x.to_f32();
    }
}

/// `x[j] *= y[j]` (the same length).
#[inline(always)]
unsafe fn mul_each<S: Simd>(x: &mut [f32], y: &[f32]) {
    let n = x.len();
    debug_assert_eq!(y.len(), n);
    let (px, py) = (x.as_mut_ptr(), y.as_ptr());
    let mut i = 0;
    while i + S::LANES <= n {
        S::store(px.add(i), S::mul(S::load(px.add(i)), S::load(py.add(i))));
        i += S::LANES;
    }
    for (a, &b) in x[i..].iter_mut().zip(&y[i..]) {
        *a *= b;
    }
}

/// The maximum of `x` (`-inf` when empty).
#[inline(always)]
unsafe fn max<S: Simd>(x: &[f32]) -> f32 {
    let mut m = S::splat(f32::NEG_INFINITY);
    for (i, ch) in x.chunks(S::LANES).enumerate() {
        m = S::max(
            m,
            ld::<S>(x.as_ptr().add(i * S::LANES), ch.len(), f32::NEG_INFINITY),
        );
    }
    S::hmax(m)
}

/// `x[j] = e^(x[j] − shift)` in place; returns their sum.
#[inline(always)]
unsafe fn exp_shifted_sum<S: Simd>(x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut sum = S::splat(0.0);
    let mut i = 0;
    while i < n {
        let c = (n - i).min(S::LANES);
        // Padding lanes read -inf and exponentiate to 0: they add nothing to the sum.
        let e = simd::exp::<S>(S::sub(ld::<S>(p.add(i), c, f32::NEG_INFINITY), S::splat(shift)));
        sum = S::add(sum, e);
        if c == S::LANES {
            S::store(p.add(i), e);
        } else {
            store_partial::<S>(p.add(i), c, e);
        }
        i += c;
    }
    S::hsum(sum)
}

/// The kernel: `out` receives the item's unnormalised accumulators and their softmax state.
///
/// # Safety
/// The CPU supports `S`.
#[inline(always)]
unsafe fn item_body<E: KvElem, S: Simd>(args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
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
    if takes_decode::<S>(nt, d) {
        match d / S::LANES {
            1 => return decode::<E, S, 1>(args, it, work, out),
            2 => return decode::<E, S, 2>(args, it, work, out),
            3 => return decode::<E, S, 3>(args, it, work, out),
            4 => return decode::<E, S, 4>(args, it, work, out),
            _ => unreachable!("takes_decode admits 1 to 4 vectors"),
        }
    }

    work.prepare(d, rows);
    let Work {
        q: qbuf,
        vis,
        k: kbuf,
        v: vbuf,
        kt: kt_buf,
        s: sbuf,
        ..
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
    let kh = &args.k[it.g * args.k_stride..];
    let vh = &args.v[it.g * args.v_stride..];

    for j0 in (it.s0..it.s1).step_by(KEY_TILE) {
        let j1 = (j0 + KEY_TILE).min(it.s1);
        let n = j1 - j0;
        let (ks, vs) = (
            args.scales(args.k_scales, it.g, j0, j1),
            args.scales(args.v_scales, it.g, j0, j1),
        );
        let (kt, vt) = (&kh[j0 * d..j1 * d], &vh[j0 * d..j1 * d]);
        // Decoding spends little arithmetic per byte: ask for the keys and values (and scales)
        // of a tile further on now, so that memory works while this tile is computed.
        let (pa, pb) = ((j0 + PREFETCH_AHEAD).min(it.s1), (j1 + PREFETCH_AHEAD).min(it.s1));
        prefetch_range(&kh[pa * d..pb * d]);
        prefetch_range(&vh[pa * d..pb * d]);
        prefetch_range(args.scales(args.k_scales, it.g, pa, pb));
        prefetch_range(args.scales(args.v_scales, it.g, pa, pb));
        // f32 tiles are read in place; other formats are widened once per tile (q8 without
        // its scales, which apply to the scores and probabilities below).
        let (ktile, vtile) = match (E::as_f32(kt), E::as_f32(vt)) {
            (Some(k), Some(v)) => (k, v),
            _ => {
                widen::<S, E>(kt, &mut kbuf[..n * d]);
                widen::<S, E>(vt, &mut vbuf[..n * d]);
                (&kbuf[..n * d], &vbuf[..n * d])
            }
        };
        // Every row against the whole tile at once (keys shared by four rows in registers);
        // a row then reads the part its token sees. Rows that see none of the tile (past the
        // diagonal) are scored too: few, in the last tiles of an item.
        transpose_tile::<S>(ktile, n, d, kt_buf);
        scores_all::<S>(qbuf, rows, kt_buf, d, n, sbuf);
        for (ti, &(lo, hi)) in vis.iter().enumerate() {
            let (a, b) = (lo.max(j0), hi.min(j1));
            if a >= b {
                continue;
            }
            let vals = &vtile[(a - j0) * d..(b - j0) * d];
            for r in 0..rep {
                let row = ti * rep + r;
                let sc = &mut sbuf[row * KEY_TILE + (a - j0)..row * KEY_TILE + (b - j0)];
                if !ks.is_empty() {
                    // q·(s_j k_j) = s_j (q·k_j).
                    mul_each::<S>(sc, &ks[a - j0..b - j0]);
                }
                let m_new = m[row].max(max::<S>(sc));
                // The rescale of what was accumulated before this tile; 0 on the first.
                let alpha = (m[row] - m_new).exp();
                l[row] = l[row] * alpha + exp_shifted_sum::<S>(sc, m_new);
                if !vs.is_empty() {
                    // p_j (s_j v_j) = (p_j s_j) v_j.
                    mul_each::<S>(sc, &vs[a - j0..b - j0]);
                }
                scale_axpy_rows::<S>(&mut acc[row * d..(row + 1) * d], alpha, sc, vals);
                m[row] = m_new;
            }
        }
    }
}

/// Keys per block of [`decode`]: one score per lane of an 8-lane vector.
pub(super) const BLOCK: usize = 8;

/// Keys ahead of the block being computed whose cache lines [`decode`] requests: 8 KiB of bf16
/// keys at `D = 16`, far enough ahead for memory latency, and across page boundaries where the
/// hardware prefetcher stops.
const DECODE_AHEAD: usize = 256;

/// Whether [`decode`] runs an item of `nt` query tokens at head dim `d` on `S`: one token (a
/// decode step; more tokens would each read the keys again) and `d` one to four whole vectors.
#[inline(always)]
pub(super) fn takes_decode<S: Simd>(nt: usize, d: usize) -> bool {
    S::LANES == BLOCK && nt == 1 && d.is_multiple_of(BLOCK) && (1..=4).contains(&(d / BLOCK))
}

/// Requests the cache lines of `bytes` bytes from `p` (a hint: `p` may point anywhere).
#[inline(always)]
fn prefetch_bytes(p: *const u8, bytes: usize) {
    const LINE: usize = 64;
    let mut off = 0;
    while off < bytes {
        simd::prefetch(p.wrapping_add(off));
        off += LINE;
    }
}

/// The q8 scales of a block's `n <= BLOCK` keys at `s`, a key per lane and 0 past `n`; 0 in
/// every lane for float formats (`s` null), whose keys carry no scale.
///
/// # Safety
/// `s` is null or valid for `n` scales.
#[inline(always)]
unsafe fn block_scales<S: Simd>(s: *const f32, n: usize) -> S::V {
    if s.is_null() {
        S::splat(0.0)
    } else if n == BLOCK {
        S::load(s)
    } else {
        load_partial::<S>(s, n, 0.0)
    }
}

/// The query rows of a [`decode`] item and their softmax state in memory, all `[g, ..]`.
struct Rows {
    /// Scaled queries, `[g, D]`.
    q: *const f32,
    /// The same quantised, `[g]`, when the keys are scored in integers; else null.
    qi: *const QueryI8,
    /// Unnormalised outputs, `[g, D]`.
    acc: *mut f32,
    /// Running maxima, `[g]`.
    m: *mut f32,
    /// Running sums, one vector of lane-wise partial sums per row, `[g, MAX_LANES]`.
    l: *mut f32,
}

/// The online-softmax state of `R` query rows of dim `B · LANES`, held in registers while
/// blocks of keys stream by.
struct State<S: Simd, const R: usize, const B: usize> {
    /// Unnormalised outputs.
    acc: [[S::V; B]; R],
    /// Running sums of probabilities, lane-wise (summed once at the end).
    l: [S::V; R],
    /// Running maxima, as scalars and broadcast.
    m: [f32; R],
    mv: [S::V; R],
}

impl<S: Simd, const R: usize, const B: usize> State<S, R, B> {
    /// Rows `r0..r0 + R` of `rows`.
    #[inline(always)]
    unsafe fn load(rows: &Rows, r0: usize) -> Self {
        let lanes = S::LANES;
        let d = B * lanes;
        let mut st = State {
            acc: [[S::splat(0.0); B]; R],
            l: [S::splat(0.0); R],
            m: [0.0; R],
            mv: [S::splat(0.0); R],
        };
        for r in 0..R {
            for bb in 0..B {
                st.acc[r][bb] = S::load(rows.acc.add((r0 + r) * d + bb * lanes));
            }
            st.l[r] = S::load(rows.l.add((r0 + r) * MAX_LANES));
            st.m[r] = *rows.m.add(r0 + r);
            st.mv[r] = S::splat(st.m[r]);
        }
        st
    }

    /// Back into rows `r0..r0 + R` of `rows`.
    #[inline(always)]
    unsafe fn store(&self, rows: &Rows, r0: usize) {
        let lanes = S::LANES;
        let d = B * lanes;
        for r in 0..R {
            for bb in 0..B {
                S::store(rows.acc.add((r0 + r) * d + bb * lanes), self.acc[r][bb]);
            }
            S::store(rows.l.add((r0 + r) * MAX_LANES), self.l[r]);
            *rows.m.add(r0 + r) = self.m[r];
        }
    }
}

/// One block of `n <= BLOCK` keys (and values) at `k` and `v` (with their scales `ks`, `vs` for
/// q8, else null) for the `R` rows of `st`, whose scaled queries are at `q` (`[R, D]`).
///
/// Each key is widened once, straight from the cache into registers, and meets every row: a
/// row's `BLOCK` dot products are independent accumulators that [`Simd::sum_each`] turns into
/// one vector of scores, a key per lane. The row's maximum moves (and what it accumulated is
/// rescaled) only when a score of the block exceeds it, so the common block costs one vector
/// exp per row and no scalar exp. Then each value is widened once and added to every row.
///
/// # Safety
/// `k`, `v` (and `ks`, `vs` when not null) are valid for `n` keys of `B · LANES` elements (or
/// `n` scales); `q` for `R` rows; `S::LANES == BLOCK`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // keys × rows × vectors index several arrays at once
unsafe fn block<E: KvElem, S: Simd, const B: usize, const R: usize>(
    st: &mut State<S, R, B>,
    (q, qi): (*const f32, *const QueryI8),
    k: *const E,
    v: *const E,
    (ks, vs): (*const f32, *const f32),
    n: usize,
) {
    let lanes = S::LANES;
    let d = B * lanes;
    let zero = S::splat(0.0);
    let mut qv = [[zero; B]; R];
    for (r, qr) in qv.iter_mut().enumerate() {
        for (bb, x) in qr.iter_mut().enumerate() {
            *x = S::load(q.add(r * d + bb * lanes));
        }
    }
    let scores = score_block::<E, S, B, R>(&qv, qi, k, ks, n);
    let vsv = block_scales::<S>(vs, n);
    let mut probs = [[0f32; MAX_LANES]; R];
    for r in 0..R {
        let s = scores[r];
        if S::any_gt(s, st.mv[r]) {
            let top = S::hmax(s);
            // The rescale of what was accumulated before; 0 on the first block.
            let alpha = S::splat((st.m[r] - top).exp());
            for y in &mut st.acc[r] {
                *y = S::mul(*y, alpha);
            }
            st.l[r] = S::mul(st.l[r], alpha);
            st.m[r] = top;
            st.mv[r] = S::splat(top);
        }
        let mut p = exp_nonpos::<S>(S::sub(s, st.mv[r]));
        st.l[r] = S::add(st.l[r], p);
        if !vs.is_null() {
            // p_j (s_j v_j) = (p_j s_j) v_j.
            p = S::mul(p, vsv);
        }
        S::store(probs[r].as_mut_ptr(), p);
    }
    // Values: each widened once, added to every row.
    for jj in 0..BLOCK {
        if jj < n {
            let mut vj = [zero; B];
            for (bb, x) in vj.iter_mut().enumerate() {
                *x = E::load::<S>(v.add(jj * d + bb * lanes));
            }
            for r in 0..R {
                let pj = S::splat(probs[r][jj]);
                for bb in 0..B {
                    st.acc[r][bb] = S::fma(pj, vj[bb], st.acc[r][bb]);
                }
            }
        }
    }
}

/// The keys and values of one [`decode`] item: kv head pointers at its first visible slot,
/// their q8 scales (null for float formats), and how many keys.
struct Span<E> {
    k: *const E,
    v: *const E,
    ks: *const f32,
    vs: *const f32,
    n: usize,
    /// Where the keys go on after the last, in the next page (pointers as above, at its first
    /// slot), when the item does; the read-ahead continues there rather than stopping at the
    /// page's end.
    then: Option<(*const E, *const E, (*const f32, *const f32))>,
}

impl<E: KvElem> Span<E> {
    /// Pointers to key `j` of `d` elements: keys, values, and scales (null stays null).
    #[inline(always)]
    unsafe fn at(&self, j: usize, d: usize) -> (*const E, *const E, (*const f32, *const f32)) {
        let sc = |p: *const f32| if p.is_null() { p } else { p.add(j) };
        (self.k.add(j * d), self.v.add(j * d), (sc(self.ks), sc(self.vs)))
    }

    /// Requests the lines of the block `DECODE_AHEAD` keys after key `j` (a hint), in the next
    /// page once past this one's end.
    #[inline(always)]
    fn prefetch(&self, j: usize, d: usize) {
        let bytes = BLOCK * d * std::mem::size_of::<E>();
        let mut ahead = j + DECODE_AHEAD;
        let (mut k, mut v, (mut ks, mut vs)) = (self.k, self.v, (self.ks, self.vs));
        if let Some(then) = self.then.filter(|_| ahead >= self.n) {
            (k, v, (ks, vs)) = then;
            ahead -= self.n;
        }
        prefetch_bytes(k.wrapping_add(ahead * d).cast(), bytes);
        prefetch_bytes(v.wrapping_add(ahead * d).cast(), bytes);
        if !ks.is_null() {
            simd::prefetch(ks.wrapping_add(ahead));
            simd::prefetch(vs.wrapping_add(ahead));
        }
    }
}

/// Keys per tile of [`rows_in_registers`]: the scores of a tile (`R × DECODE_TILE` floats, at
/// most 1 KiB) stay in L1 between its three passes.
const DECODE_TILE: usize = 64;

/// All keys of `span` for a group of exactly `R` rows, their state in registers throughout.
///
/// Tiles of [`DECODE_TILE`] keys go through three passes: every block of the tile is scored
/// ([`score_block`]), then each row's softmax moves once for the whole tile (one max, then the
/// exps), then the values are added. The blocks of a pass do not depend on each other, so the
/// core overlaps them; one block through all three steps at once would be a single chain of
/// dependent instructions (scores, exp, then the value sums), too long for the core to run two
/// blocks side by side. When few accumulators are live (`R · B ≤ 4`), even and odd keys add
/// into separate accumulators to halve the chain of additions.
///
/// # Safety
/// As [`decode`]: `span` is valid for `span.n` keys, `rows` for `R` rows; `S::LANES == BLOCK`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // keys × rows × vectors index several arrays at once
unsafe fn rows_in_registers<E: KvElem, S: Simd, const B: usize, const R: usize>(rows: &Rows, span: &Span<E>) {
    let d = B * S::LANES;
    let two = R * B <= 4;
    let mut st = State::<S, R, B>::load(rows, 0);
    let zero = S::splat(0.0);
    let mut odd = [[zero; B]; R];
    let mut qv = [[zero; B]; R];
    for (r, qr) in qv.iter_mut().enumerate() {
        for (bb, x) in qr.iter_mut().enumerate() {
            *x = S::load(rows.q.add(r * d + bb * S::LANES));
        }
    }
    // Scores, then probabilities (times the value scales for q8), of the tile: `[R, TILE]`.
    let mut p = [[0f32; DECODE_TILE]; R];
    let mut j0 = 0;
    while j0 < span.n {
        let n = (span.n - j0).min(DECODE_TILE);
        let blocks = n.div_ceil(BLOCK);
        for blk in 0..blocks {
            let j = j0 + blk * BLOCK;
            // Decoding spends little arithmetic per byte: ask for keys and values further on
            // now, so that memory works while this tile is computed.
            span.prefetch(j, d);
            let (k, _, (ks, _)) = span.at(j, d);
            let s = score_block::<E, S, B, R>(&qv, rows.qi, k, ks, (n - blk * BLOCK).min(BLOCK));
            for r in 0..R {
                S::store(p[r].as_mut_ptr().add(blk * BLOCK), s[r]);
            }
        }
        // The tile's maximum of each row; the accumulated state is rescaled only when it grows.
        for r in 0..R {
            let pr = p[r].as_ptr();
            let mut top = S::load(pr);
            for blk in 1..blocks {
                top = S::max(top, S::load(pr.add(blk * BLOCK)));
            }
            if S::any_gt(top, st.mv[r]) {
                let top = S::hmax(top);
                // The rescale of what was accumulated before; 0 on the first tile.
                let alpha = S::splat((st.m[r] - top).exp());
                for bb in 0..B {
                    st.acc[r][bb] = S::mul(st.acc[r][bb], alpha);
                    odd[r][bb] = S::mul(odd[r][bb], alpha);
                }
                st.l[r] = S::mul(st.l[r], alpha);
                st.m[r] = top;
                st.mv[r] = S::splat(top);
            }
        }
        // Probabilities, all rows of a block side by side (independent exps), their sums in
        // registers for the tile.
        let mut sum = [zero; R];
        for blk in 0..blocks {
            let j = j0 + blk * BLOCK;
            // p_j (s_j v_j) = (p_j s_j) v_j; lanes past the keys have p = 0.
            let vs = if span.vs.is_null() {
                None
            } else {
                Some(block_scales::<S>(span.vs.add(j), (span.n - j).min(BLOCK)))
            };
            for r in 0..R {
                let pr = p[r].as_mut_ptr().add(blk * BLOCK);
                let x = exp_nonpos::<S>(S::sub(S::load(pr), st.mv[r]));
                sum[r] = S::add(sum[r], x);
                S::store(pr, if let Some(vs) = vs { S::mul(x, vs) } else { x });
            }
        }
        for r in 0..R {
            st.l[r] = S::add(st.l[r], sum[r]);
        }
        let (_, v, _) = span.at(j0, d);
        let load_v = |jj: usize| {
            let mut vj = [zero; B];
            for (bb, x) in vj.iter_mut().enumerate() {
                *x = E::load::<S>(v.add(jj * d + bb * S::LANES));
            }
            vj
        };
        let mut jj = 0;
        while jj + 2 <= n {
            let (va, vb) = (load_v(jj), load_v(jj + 1));
            for r in 0..R {
                let (pa, pb) = (S::splat(p[r][jj]), S::splat(p[r][jj + 1]));
                for bb in 0..B {
                    st.acc[r][bb] = S::fma(pa, va[bb], st.acc[r][bb]);
                    if two {
                        odd[r][bb] = S::fma(pb, vb[bb], odd[r][bb]);
                    } else {
                        st.acc[r][bb] = S::fma(pb, vb[bb], st.acc[r][bb]);
                    }
                }
            }
            jj += 2;
        }
        if jj < n {
            let va = load_v(jj);
            for r in 0..R {
                let pa = S::splat(p[r][jj]);
                for bb in 0..B {
                    st.acc[r][bb] = S::fma(pa, va[bb], st.acc[r][bb]);
                }
            }
        }
        j0 += n;
    }
    if two {
        for r in 0..R {
            for bb in 0..B {
                st.acc[r][bb] = S::add(st.acc[r][bb], odd[r][bb]);
            }
        }
    }
    st.store(rows, 0);
}

/// `e^x` for `x <= 0` (-inf and anything below -87 give 0), within 3e-7 relative.
///
/// Built for the decode kernel's softmax, where every score minus its running maximum is at
/// most 0, so no clamp from above is needed: `e^x = 2^n · e^r` with `n = round(x log2 e)`,
/// `r = x − n ln 2` (ln 2 in two parts, so `r` is exact enough) and `e^r` by its Taylor
/// polynomial of degree 6 on `|r| <= ln 2 / 2` (truncation below 1.3e-7), evaluated by Estrin's
/// scheme so that the chain of dependent operations is short: the exps of a tile then overlap
/// instead of waiting on each other.
#[inline(always)]
pub(super) unsafe fn exp_nonpos<S: Simd>(x: S::V) -> S::V {
    // 1 / k!.
    const C: [f32; 7] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0];
    let lo = S::splat(-87.0);
    let xc = S::max(x, lo);
    let n = S::round(S::mul(xc, S::splat(std::f32::consts::LOG2_E)));
    // ln 2 split in a part exact in f32 products and the remainder.
    let r = S::fma(n, S::splat(-0.693_359_4), xc);
    let r = S::fma(n, S::splat(2.121_944_4e-4), r);
    let r2 = S::mul(r, r);
    let p01 = S::fma(S::splat(C[1]), r, S::splat(C[0]));
    let p23 = S::fma(S::splat(C[3]), r, S::splat(C[2]));
    let p45 = S::fma(S::splat(C[5]), r, S::splat(C[4]));
    let p46 = S::fma(S::splat(C[6]), r2, p45);
    let p03 = S::fma(p23, r2, p01);
    let p = S::fma(p46, S::mul(r2, r2), p03);
    S::select_lt(x, lo, S::splat(0.0), S::mul(p, S::pow2(n)))
}

/// The scores of `R` rows (scaled queries `qv`) against a block of `n <= BLOCK` keys at `k`
/// (times their q8 scales `ks` when not null): one vector per row, a key per lane, lanes past
/// `n` at -inf.
///
/// # Safety
/// `k` (and `ks` when not null) are valid for `n` keys of `B · LANES` elements (or scales).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // keys × rows × vectors index several arrays at once
unsafe fn score_block<E: KvElem, S: Simd, const B: usize, const R: usize>(
    qv: &[[S::V; B]; R],
    qi: *const QueryI8,
    k: *const E,
    ks: *const f32,
    n: usize,
) -> [S::V; R] {
    let lanes = S::LANES;
    let d = B * lanes;
    let zero = S::splat(0.0);
    let ksv = block_scales::<S>(ks, n);
    let pad = if n == BLOCK {
        zero
    } else {
        // Lanes past the block's keys score -inf: probability 0.
        let mut buf = [f32::NEG_INFINITY; MAX_LANES];
        buf[..n].fill(0.0);
        S::load(buf.as_ptr())
    };
    if !qi.is_null() {
        // (s_q v)·(s_j k_j) = s_q s_j (v·k_j), the dot product exact in integers.
        let mut out = [zero; R];
        for (r, o) in out.iter_mut().enumerate() {
            let qr = &*qi.add(r);
            let dots = S::dots_i8(qr, k.cast::<i8>(), n, d);
            *o = S::add(S::mul(dots, S::mul(S::splat(qr.scale), ksv)), pad);
        }
        return out;
    }
    let mut dots = [[zero; MAX_LANES]; R];
    for jj in 0..n {
        let mut kj = [zero; B];
        for (bb, x) in kj.iter_mut().enumerate() {
            *x = E::load::<S>(k.add(jj * d + bb * lanes));
        }
        for r in 0..R {
            let mut y = S::mul(qv[r][0], kj[0]);
            for bb in 1..B {
                y = S::fma(qv[r][bb], kj[bb], y);
            }
            dots[r][jj] = y;
        }
    }
    let mut out = [zero; R];
    for r in 0..R {
        let mut s = S::sum_each(&dots[r]);
        if !ks.is_null() {
            // q·(s_j k_j) = s_j (q·k_j).
            s = S::mul(s, ksv);
        }
        out[r] = S::add(s, pad);
    }
    out
}

/// Rows `r0..r0 + R` of `rows` over one block of `n` keys, their state loaded and stored.
#[inline(always)]
unsafe fn rows_chunk<E: KvElem, S: Simd, const B: usize, const R: usize>(
    rows: &Rows,
    r0: usize,
    k: *const E,
    v: *const E,
    sc: (*const f32, *const f32),
    n: usize,
) {
    let mut st = State::<S, R, B>::load(rows, r0);
    let qi = if rows.qi.is_null() {
        rows.qi
    } else {
        rows.qi.add(r0)
    };
    block::<E, S, B, R>(&mut st, (rows.q.add(r0 * B * S::LANES), qi), k, v, sc, n);
    st.store(rows, r0);
}

/// Rows `0..g` of `rows` over one block of `n` keys, four rows at a time.
#[inline(always)]
unsafe fn rows_in_chunks<E: KvElem, S: Simd, const B: usize>(
    rows: &Rows,
    g: usize,
    k: *const E,
    v: *const E,
    sc: (*const f32, *const f32),
    n: usize,
) {
    let mut r0 = 0;
    while r0 < g {
        match g - r0 {
            1 => rows_chunk::<E, S, B, 1>(rows, r0, k, v, sc, n),
            2 => rows_chunk::<E, S, B, 2>(rows, r0, k, v, sc, n),
            3 => rows_chunk::<E, S, B, 3>(rows, r0, k, v, sc, n),
            _ => rows_chunk::<E, S, B, 4>(rows, r0, k, v, sc, n),
        }
        r0 += 4;
    }
}

/// The decode kernel: item `it` of one query token, head dim `D = B · LANES`, every query row
/// of the group over the item's keys in blocks of [`BLOCK`] ([`block`]): groups of up to four
/// rows keep their state in registers over all keys; larger groups go four rows at a time
/// through each block (the block's keys then come from L1 after the first four). `out`
/// receives the unnormalised accumulators and their softmax state.
///
/// # Safety
/// The CPU supports `S`; [`takes_decode`] holds for the item.
#[inline(always)]
unsafe fn decode<E: KvElem, S: Simd, const B: usize>(
    args: &Args<E>,
    it: Item,
    work: &mut Work,
    out: Partial,
) {
    let Dims {
        hq,
        d,
        len,
        first_pos,
        ..
    } = args.dims;
    debug_assert!(d == B * S::LANES && it.t1 == it.t0 + 1 && S::LANES == BLOCK);
    let g = args.dims.group();
    let ctx = args.ctx;
    let t = it.t0;
    // Only the buffers this kernel uses (their room was made by `prepare`).
    refill(&mut work.q, g * d, 0f32);
    refill(&mut work.l, g * MAX_LANES, 0f32);
    for (dst, &x) in work.q.iter_mut().zip(&args.q[(t * hq + it.g * g) * d..][..g * d]) {
        *dst = x * ctx.scale;
    }
    // The group's query rows rounded to int8, when the call scores its keys in integers.
    let qi = args.qi.get(t * hq + it.g * g..).and_then(|r| r.get(..g));
    let Partial { acc, m, l } = out;
    m.fill(f32::NEG_INFINITY);
    acc.fill(0.0);
    let (lo, hi) = visible_slots(ctx.mask, ctx.positions[t], first_pos, len);
    let (a, b) = (lo.max(it.s0), hi.min(it.s1));
    if a < b {
        let rows = Rows {
            q: work.q.as_ptr(),
            qi: qi.map_or(std::ptr::null(), <[QueryI8]>::as_ptr),
            acc: acc.as_mut_ptr(),
            m: m.as_mut_ptr(),
            l: work.l.as_mut_ptr(),
        };
        // Slot `a` of kv head `it.g` and its scales (checked slices; raw pointers from here).
        let (ks, vs) = if args.k_scales.is_empty() {
            (std::ptr::null(), std::ptr::null())
        } else {
            (
                args.scales(args.k_scales, it.g, a, b).as_ptr(),
                args.scales(args.v_scales, it.g, a, b).as_ptr(),
            )
        };
        let span = Span {
            k: args.k[it.g * args.k_stride + a * d..][..(b - a) * d].as_ptr(),
            v: args.v[it.g * args.v_stride + a * d..][..(b - a) * d].as_ptr(),
            ks,
            vs,
            n: b - a,
            then: args.ahead.as_ref().filter(|_| b == len).map(|n| {
                let sc = |s: &[f32]| {
                    s.get(it.g * args.scale_stride..)
                        .map_or(std::ptr::null(), <[f32]>::as_ptr)
                };
                (
                    n.k.get(it.g * args.k_stride..)
                        .map_or(std::ptr::null(), <[E]>::as_ptr),
                    n.v.get(it.g * args.v_stride..)
                        .map_or(std::ptr::null(), <[E]>::as_ptr),
                    if ks.is_null() {
                        (ks, vs)
                    } else {
                        (sc(n.k_scales), sc(n.v_scales))
                    },
                )
            }),
        };
        match g {
            1 => rows_in_registers::<E, S, B, 1>(&rows, &span),
            2 => rows_in_registers::<E, S, B, 2>(&rows, &span),
            3 => rows_in_registers::<E, S, B, 3>(&rows, &span),
            4 => rows_in_registers::<E, S, B, 4>(&rows, &span),
            _ => {
                let mut j = 0;
                while j + BLOCK <= span.n {
                    span.prefetch(j, d);
                    let (k, v, sc) = span.at(j, d);
                    rows_in_chunks::<E, S, B>(&rows, g, k, v, sc, BLOCK);
                    j += BLOCK;
                }
                if j < span.n {
                    let (k, v, sc) = span.at(j, d);
                    rows_in_chunks::<E, S, B>(&rows, g, k, v, sc, span.n - j);
                }
            }
        }
    }
    for (r, l) in l.iter_mut().enumerate() {
        *l = S::hsum(S::load(work.l.as_ptr().add(r * MAX_LANES)));
    }
}
