//! The item kernel of the AVX2 and portable paths, generic over the crate's vector vocabulary:
//! a tile of keys and values is widened to f32, then each query row scores it, updates its
//! online softmax and accumulates the tile's values.

use super::{visible_slots, Args, Dims, Item, KvElem, Partial, KEY_TILE};
use crate::kernels::simd::{self, load_partial, store_partial, Simd, MAX_LANES};
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
    }
}

/// Runs item `it` on `isa` (AVX2 or portable; any other runs portable).
pub(super) fn item<E: KvElem>(isa: Isa, args: &Args<E>, it: Item, work: &mut Work, out: Partial) {
    match isa {
        // SAFETY: the caller passes an ISA only if this CPU has it.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { item_avx2(args, it, work, out) },
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

/// `a·b` over `d` elements (two interleaved accumulators): the keys of a partial block.
#[inline(always)]
unsafe fn dot<S: Simd>(a: *const f32, b: *const f32, d: usize) -> f32 {
    let mut acc = [S::splat(0.0); 2];
    let mut i = 0;
    while i < d {
        let c = (d - i).min(S::LANES);
        let k = (i / S::LANES) & 1;
        acc[k] = S::fma(ld::<S>(a.add(i), c, 0.0), ld::<S>(b.add(i), c, 0.0), acc[k]);
        i += c;
    }
    S::hsum(S::add(acc[0], acc[1]))
}

/// `s[j] = q·k_j` for the `s.len()` keys `keys: [s.len(), d]`, `LANES` keys per pass: each
/// loaded piece of `q` meets `LANES` keys in independent accumulators, which one shuffle-add
/// tree ([`Simd::sum_each`]) then sums into a vector of `LANES` scores (no horizontal sum per key). Fewer than `LANES`
/// keys left over take one dot product each.
#[inline(always)]
unsafe fn scores<S: Simd>(q: &[f32], keys: &[f32], d: usize, s: &mut [f32]) {
    let n = s.len();
    debug_assert!(q.len() >= d && keys.len() >= n * d);
    let (pq, pk) = (q.as_ptr(), keys.as_ptr());
    let mut j = 0;
    while j + S::LANES <= n {
        let block = pk.add(j * d);
        let mut acc = [S::splat(0.0); MAX_LANES];
        let mut i = 0;
        while i < d {
            let w = (d - i).min(S::LANES);
            let qv = ld::<S>(pq.add(i), w, 0.0);
            let col = block.add(i);
            for (jj, a) in acc.iter_mut().enumerate().take(S::LANES) {
                *a = S::fma(qv, ld::<S>(col.add(jj * d), w, 0.0), *a);
            }
            i += w;
        }
        S::store(s.as_mut_ptr().add(j), S::sum_each(&acc));
        j += S::LANES;
    }
    for (jj, x) in s.iter_mut().enumerate().skip(j) {
        *x = dot::<S>(pq, pk.add(jj * d), d);
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

    work.prepare(d, rows);
    let Work {
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
        for (ti, &(lo, hi)) in vis.iter().enumerate() {
            let (a, b) = (lo.max(j0), hi.min(j1));
            if a >= b {
                continue;
            }
            let keys = &ktile[(a - j0) * d..(b - j0) * d];
            let vals = &vtile[(a - j0) * d..(b - j0) * d];
            for r in 0..rep {
                let row = ti * rep + r;
                let qr = &qbuf[row * d..(row + 1) * d];
                let sc = &mut s[..b - a];
                scores::<S>(qr, keys, d, sc);
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
