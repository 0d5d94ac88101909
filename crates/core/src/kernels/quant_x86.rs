//! x86 kernels of the quantised linear map: activation quantisation (AVX-512, AVX2) and the
//! row kernels (AVX-512 VNNI, AVX2).
//!
//! # Row kernel shape
//! One weight row is streamed once for `T ≤ 4` tokens. Its bytes are read in *units* of one
//! vector; an integer multiply-add instruction leaves one `i32` lane per 4 weight bytes, so
//! every lane belongs to exactly one group (groups are powers of two ≥ 32 here). A *block* of
//! `LANES` consecutive groups (16 for AVX-512, 8 for AVX2) is reduced by a tree of lane
//! permutes and adds into one vector holding each group's exact integer sum, which is then
//! corrected for the unsigned bias, converted to f32 and multiplied by `s_w · s_x` (one
//! vector multiply and one FMA for `LANES` groups).
//!
//! The unsigned operand is the weight: `q + 128` for q8 on VNNI (`vpdpbusd` is unsigned ×
//! signed), the stored nibble `q + 8` for q4; the caller's `corr` holds `bias · Σ q_x` per
//! group to subtract. AVX2 q8 moves the weight's sign onto the activation instead
//! (`|w| · sign(x, w)`, at most 2 · 128 · 127 per `maddubs` pair: no int16 saturation) and
//! needs no correction; AVX2 q4 pairs are at most 2 · 15 · 127.
//!
//! For q4 the low nibbles of a unit are the even elements and the high nibbles the odd ones,
//! so the caller stores each token's activations de-interleaved per unit (see
//! [`super::deinterleave`]); the weight is then used as stored.

#![allow(clippy::missing_safety_doc)]

use std::arch::x86_64::*;

use super::{Acts, Mat, MatScales, TileActs, TILE_ROWS};

/// Bytes ahead of the current read that the row kernels prefetch: the hardware prefetcher
/// stops at 4 KiB page boundaries, which a q8 row of 4096 reaches every row.
pub(in crate::kernels) const PF_BYTES: usize = 4096;

#[inline(always)]
pub(in crate::kernels) fn prefetch(p: *const u8) {
    // SAFETY: SSE is part of x86_64; a prefetch never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

// ---------------------------------------------------------------------------------------------
// Activation quantisation
// ---------------------------------------------------------------------------------------------

/// [`crate::quant::quantize_activations`] with AVX-512, bit for bit, plus `Σ q` per group.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `x.len()` is a multiple of `group`, itself a multiple of 16;
/// `q.len() ≥ x.len()`, `s.len()` and `sum.len() ≥ x.len() / group`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_avx512(x: &[f32], group: usize, q: &mut [i8], s: &mut [f32], sum: &mut [i32]) {
    let groups = x.len() / group;
    assert!(q.len() >= x.len() && s.len() >= groups && sum.len() >= groups && group.is_multiple_of(16));
    for gi in 0..groups {
        let xp = x.as_ptr().add(gi * group);
        let qp = q.as_mut_ptr().add(gi * group);
        // `max(|x|, m)` returns `m` when `|x|` is NaN, as `f32::max` does in the scalar fold.
        let mut m = _mm512_setzero_ps();
        let mut i = 0;
        while i < group {
            m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xp.add(i))), m);
            i += 16;
        }
        let amax = _mm512_reduce_max_ps(m);
        if amax > 0.0 && amax.is_finite() {
            let inv = _mm512_set1_ps(127.0 / amax);
            s[gi] = amax / 127.0;
            let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
            let mut acc = _mm512_setzero_si512();
            let mut i = 0;
            while i < group {
                let v = _mm512_mul_ps(_mm512_loadu_ps(xp.add(i)), inv);
                let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
                // NaN lanes become 0, as `NaN as i8` does.
                let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
                let qi = _mm512_maskz_cvtps_epi32(ord, r);
                acc = _mm512_add_epi32(acc, qi);
                _mm_storeu_si128(qp.add(i).cast(), _mm512_cvtepi32_epi8(qi));
                i += 16;
            }
            sum[gi] = _mm512_reduce_add_epi32(acc);
        } else {
            s[gi] = if amax.is_finite() { 0.0 } else { f32::NAN };
            std::ptr::write_bytes(qp, 0, group);
            sum[gi] = 0;
        }
    }
}

/// Horizontal max of 8 lanes (no NaN).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hmax256(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

/// Horizontal sum of 8 f32 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(in crate::kernels) unsafe fn hsum256(v: __m256) -> f32 {
    let m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_add_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

/// Horizontal sum of 8 i32 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum256_epi32(v: __m256i) -> i32 {
    let m = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let m = _mm_add_epi32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
    let m = _mm_add_epi32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
    _mm_cvtsi128_si32(m)
}

/// [`crate::quant::quantize_activations`] with AVX2, bit for bit, plus `Σ q` per group.
///
/// # Safety
/// The CPU has AVX2/FMA; `x.len()` is a multiple of `group`, itself a multiple of 32;
/// `q.len() ≥ x.len()`, `s.len()` and `sum.len() ≥ x.len() / group`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_avx2(x: &[f32], group: usize, q: &mut [i8], s: &mut [f32], sum: &mut [i32]) {
    let groups = x.len() / group;
    assert!(q.len() >= x.len() && s.len() >= groups && sum.len() >= groups && group.is_multiple_of(32));
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    // Undoes the lane interleaving of the two 128-bit packs.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for gi in 0..groups {
        let xp = x.as_ptr().add(gi * group);
        let qp = q.as_mut_ptr().add(gi * group);
        let mut m = _mm256_setzero_ps();
        let mut i = 0;
        while i < group {
            m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xp.add(i)), abs_mask), m);
            i += 8;
        }
        let amax = hmax256(m);
        if amax > 0.0 && amax.is_finite() {
            let inv = _mm256_set1_ps(127.0 / amax);
            s[gi] = amax / 127.0;
            let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
            let mut acc = _mm256_setzero_si256();
            let mut i = 0;
            while i < group {
                let mut qi = [_mm256_setzero_si256(); 4];
                for (j, d) in qi.iter_mut().enumerate() {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(xp.add(i + 8 * j)), inv);
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                    let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
                    let ord = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
                    *d = _mm256_and_si256(_mm256_cvtps_epi32(r), ord);
                    acc = _mm256_add_epi32(acc, *d);
                }
                let ab = _mm256_packs_epi32(qi[0], qi[1]);
                let cd = _mm256_packs_epi32(qi[2], qi[3]);
                let b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
                _mm256_storeu_si256(qp.add(i).cast(), b);
                i += 32;
            }
            sum[gi] = hsum256_epi32(acc);
        } else {
            s[gi] = if amax.is_finite() { 0.0 } else { f32::NAN };
            std::ptr::write_bytes(qp, 0, group);
            sum[gi] = 0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI rows
// ---------------------------------------------------------------------------------------------

/// Permute indices that halve the lanes per group: for inputs with `L = 2^i` lanes per group,
/// `IDX512[i]` = (first halves, second halves) of every group of `a` then of `b`.
const IDX512: [[[i32; 16]; 2]; 5] = {
    let mut t = [[[0i32; 16]; 2]; 5];
    let mut li = 1;
    while li < 5 {
        let l = 1usize << li;
        let h = l / 2;
        let m = 16 / l;
        let mut p = 0;
        while p < 16 {
            let (q, r) = (p / h, p % h);
            let src = if q < m { 0 } else { 16 };
            let base = src + (q % m) * l + r;
            t[li][0][p] = base as i32;
            t[li][1][p] = (base + h) as i32;
            p += 1;
        }
        li += 1;
    }
    t
};

/// One block of 16 groups of one row, for `T` tokens.
struct Blk512<const T: usize> {
    /// Weight bytes of the block's first element.
    w: *const u8,
    /// Valid weight bytes from `w` to the end of the row.
    rem: usize,
    /// Each token's (de-interleaved for q4) activations at the block's first element.
    x: [*const i8; T],
    /// Elements per leaf (one group, or one unit holding several groups).
    le: usize,
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn leaf512<const T: usize, const Q4: bool>(b: &Blk512<T>, j: usize) -> [__m512i; T] {
    let mut acc = [_mm512_setzero_si512(); T];
    let (ue, shift) = if Q4 { (128, 1) } else { (64, 0) };
    let e0 = j * b.le;
    let mut e = e0;
    while e < e0 + b.le {
        let off = e >> shift;
        if off >= b.rem {
            break;
        }
        let wp = b.w.add(off);
        prefetch(wp.wrapping_add(PF_BYTES));
        let left = b.rem - off;
        let wv = if left >= 64 {
            _mm512_loadu_si512(wp.cast())
        } else {
            _mm512_maskz_loadu_epi8((1u64 << left) - 1, wp.cast())
        };
        if Q4 {
            let nib = _mm512_set1_epi8(0x0f);
            let lo = _mm512_and_si512(wv, nib);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), nib);
            for (a, x) in acc.iter_mut().zip(b.x) {
                let xp = x.add(e);
                *a = _mm512_dpbusd_epi32(*a, lo, _mm512_loadu_si512(xp.cast()));
                *a = _mm512_dpbusd_epi32(*a, hi, _mm512_loadu_si512(xp.add(64).cast()));
            }
        } else {
            let wu = _mm512_xor_si512(wv, _mm512_set1_epi8(-128));
            for (a, x) in acc.iter_mut().zip(b.x) {
                *a = _mm512_dpbusd_epi32(*a, wu, _mm512_loadu_si512(x.add(e).cast()));
            }
        }
        e += ue;
    }
    acc
}

/// Merges `a` and `b` (each `16 / l` groups of `l` lanes) into one vector of their groups, `l / 2`
/// lanes each, `a`'s first.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn comb512<const T: usize>(a: [__m512i; T], b: [__m512i; T], l: usize) -> [__m512i; T] {
    let li = l.trailing_zeros() as usize;
    let i0 = _mm512_loadu_si512(IDX512[li][0].as_ptr().cast());
    let i1 = _mm512_loadu_si512(IDX512[li][1].as_ptr().cast());
    let mut out = a;
    for i in 0..T {
        out[i] = _mm512_add_epi32(
            _mm512_permutex2var_epi32(a[i], i0, b[i]),
            _mm512_permutex2var_epi32(a[i], i1, b[i]),
        );
    }
    out
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn t2_512<const T: usize, const Q4: bool>(b: &Blk512<T>, j: usize, l: usize) -> [__m512i; T] {
    comb512(leaf512::<T, Q4>(b, j), leaf512::<T, Q4>(b, j + 1), l)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn t4_512<const T: usize, const Q4: bool>(b: &Blk512<T>, j: usize, l: usize) -> [__m512i; T] {
    comb512(t2_512::<T, Q4>(b, j, l), t2_512::<T, Q4>(b, j + 2, l), l / 2)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn t8_512<const T: usize, const Q4: bool>(b: &Blk512<T>, j: usize, l: usize) -> [__m512i; T] {
    comb512(t4_512::<T, Q4>(b, j, l), t4_512::<T, Q4>(b, j + 4, l), l / 4)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn t16_512<const T: usize, const Q4: bool>(b: &Blk512<T>, j: usize, l: usize) -> [__m512i; T] {
    comb512(t8_512::<T, Q4>(b, j, l), t8_512::<T, Q4>(b, j + 8, l), l / 8)
}

/// Rows `lo..hi` for tokens `r0..r0 + T`; `L0` is the lanes per group of a leaf (= leaves per
/// block).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows512<const T: usize, const Q4: bool, const L0: usize>(
    m: &Mat,
    a: &Acts,
    r0: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
) {
    let (k, g, groups) = (m.k, m.group, m.groups);
    let shift = Q4 as usize;
    let row_bytes = k >> shift;
    let ue = if Q4 { 128 } else { 64 };
    let le = g.max(ue);
    let nblocks = groups.div_ceil(16);
    let xs: [*const i8; T] = std::array::from_fn(|i| a.q.as_ptr().add((r0 + i) * a.kp));
    let ahead_rows = (PF_BYTES / row_bytes.max(1)).max(1);
    for o in lo..hi {
        let wrow = m.vals.add(o * row_bytes);
        let mut accf = [_mm512_setzero_ps(); T];
        for bi in 0..nblocks {
            let e0 = bi * 16 * g;
            let blk = Blk512 {
                w: wrow.add(e0 >> shift),
                rem: row_bytes - (e0 >> shift),
                x: xs.map(|p| p.add(e0)),
                le,
            };
            let sums = match L0 {
                4 => t4_512::<T, Q4>(&blk, 0, 4),
                8 => t8_512::<T, Q4>(&blk, 0, 8),
                _ => t16_512::<T, Q4>(&blk, 0, 16),
            };
            let gb = (groups - bi * 16).min(16);
            let si = o * groups + bi * 16;
            let mask: __mmask16 = if gb == 16 { 0xffff } else { (1u16 << gb) - 1 };
            let sw = match m.scales {
                MatScales::F32(p) => {
                    prefetch(p.wrapping_add(si + ahead_rows * groups).cast());
                    _mm512_maskz_loadu_ps(mask, p.add(si))
                }
                MatScales::F16(p) => {
                    prefetch(p.wrapping_add(si + ahead_rows * groups).cast());
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.add(si).cast()))
                }
            };
            for (i, (f, s)) in accf.iter_mut().zip(sums).enumerate() {
                let gi = (r0 + i) * a.gp + bi * 16;
                let isum = _mm512_sub_epi32(s, _mm512_loadu_si512(a.corr.as_ptr().add(gi).cast()));
                let sc = _mm512_mul_ps(sw, _mm512_loadu_ps(a.s.as_ptr().add(gi)));
                *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, *f);
            }
        }
        for (i, f) in accf.into_iter().enumerate() {
            *y.add((r0 + i) * m.n + o) = _mm512_reduce_add_ps(f);
        }
    }
}

/// Rows `lo..hi` of `y` for tokens `r0..r0 + tt` (`1 ≤ tt ≤ 4`) with AVX-512 VNNI.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL/VNNI, AVX2, FMA, F16C; `m` and `a` are consistent (see
/// [`Acts`]); the group size is a power of two ≥ 32; no other task writes rows `lo..hi`.
pub(super) unsafe fn rows_vnni(m: &Mat, a: &Acts, r0: usize, tt: usize, lo: usize, hi: usize, y: *mut f32) {
    let l0 = if m.q4 {
        16 * m.group / m.group.max(128)
    } else {
        16 * m.group / m.group.max(64)
    };
    macro_rules! go {
        ($($t:literal),*) => {
            match (tt, m.q4, l0) {
                $(
                    ($t, false, 8) => rows512::<$t, false, 8>(m, a, r0, lo, hi, y),
                    ($t, false, _) => rows512::<$t, false, 16>(m, a, r0, lo, hi, y),
                    ($t, true, 4) => rows512::<$t, true, 4>(m, a, r0, lo, hi, y),
                    ($t, true, 8) => rows512::<$t, true, 8>(m, a, r0, lo, hi, y),
                    ($t, true, _) => rows512::<$t, true, 16>(m, a, r0, lo, hi, y),
                )*
                _ => unreachable!("token blocks are 1 to 4"),
            }
        };
    }
    go!(1, 2, 3, 4)
}

// ---------------------------------------------------------------------------------------------
// AVX2 rows
// ---------------------------------------------------------------------------------------------

/// One block of 8 groups of one row, for `T` tokens (as [`Blk512`]).
struct Blk256<const T: usize> {
    w: *const u8,
    rem: usize,
    x: [*const i8; T],
    le: usize,
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn leaf256<const T: usize, const Q4: bool>(b: &Blk256<T>, j: usize) -> [__m256i; T] {
    let mut acc = [_mm256_setzero_si256(); T];
    let ones = _mm256_set1_epi16(1);
    let (ue, shift) = if Q4 { (64, 1) } else { (32, 0) };
    let e0 = j * b.le;
    let mut e = e0;
    while e < e0 + b.le {
        let off = e >> shift;
        if off >= b.rem {
            break;
        }
        let wp = b.w.add(off);
        if off.is_multiple_of(64) {
            prefetch(wp.wrapping_add(PF_BYTES));
        }
        let left = b.rem - off;
        let wv = if left >= 32 {
            _mm256_loadu_si256(wp.cast())
        } else {
            let mut tmp = [0u8; 32];
            std::ptr::copy_nonoverlapping(wp, tmp.as_mut_ptr(), left);
            _mm256_loadu_si256(tmp.as_ptr().cast())
        };
        if Q4 {
            let nib = _mm256_set1_epi8(0x0f);
            let lo = _mm256_and_si256(wv, nib);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), nib);
            for (a, x) in acc.iter_mut().zip(b.x) {
                let xp = x.add(e);
                let p = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_loadu_si256(xp.cast())),
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xp.add(32).cast())),
                );
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p, ones));
            }
        } else {
            let wa = _mm256_abs_epi8(wv);
            for (a, x) in acc.iter_mut().zip(b.x) {
                let xs = _mm256_sign_epi8(_mm256_loadu_si256(x.add(e).cast()), wv);
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xs), ones));
            }
        }
        e += ue;
    }
    acc
}

/// As [`comb512`] for 8 lanes: `l` lanes per group in, `l / 2` out.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn comb256<const T: usize>(a: [__m256i; T], b: [__m256i; T], l: usize) -> [__m256i; T] {
    // First halves of each group to lanes 0..4, second halves to 4..8.
    let p = match l {
        8 => _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        4 => _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7),
        _ => _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7),
    };
    let mut out = a;
    for i in 0..T {
        let fa = _mm256_permutevar8x32_epi32(a[i], p);
        let fb = _mm256_permutevar8x32_epi32(b[i], p);
        out[i] = _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(fa, fb),
            _mm256_permute2x128_si256::<0x31>(fa, fb),
        );
    }
    out
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn t2_256<const T: usize, const Q4: bool>(b: &Blk256<T>, j: usize, l: usize) -> [__m256i; T] {
    comb256(leaf256::<T, Q4>(b, j), leaf256::<T, Q4>(b, j + 1), l)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn t4_256<const T: usize, const Q4: bool>(b: &Blk256<T>, j: usize, l: usize) -> [__m256i; T] {
    comb256(t2_256::<T, Q4>(b, j, l), t2_256::<T, Q4>(b, j + 2, l), l / 2)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn t8_256<const T: usize, const Q4: bool>(b: &Blk256<T>, j: usize, l: usize) -> [__m256i; T] {
    comb256(t4_256::<T, Q4>(b, j, l), t4_256::<T, Q4>(b, j + 4, l), l / 4)
}

/// As [`rows512`] with 8-lane vectors and blocks of 8 groups.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows256<const T: usize, const Q4: bool, const L0: usize>(
    m: &Mat,
    a: &Acts,
    r0: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
) {
    let (k, g, groups) = (m.k, m.group, m.groups);
    let shift = Q4 as usize;
    let row_bytes = k >> shift;
    let ue = if Q4 { 64 } else { 32 };
    let le = g.max(ue);
    let nblocks = groups.div_ceil(8);
    let xs: [*const i8; T] = std::array::from_fn(|i| a.q.as_ptr().add((r0 + i) * a.kp));
    let ahead_rows = (PF_BYTES / row_bytes.max(1)).max(1);
    for o in lo..hi {
        let wrow = m.vals.add(o * row_bytes);
        let mut accf = [_mm256_setzero_ps(); T];
        for bi in 0..nblocks {
            let e0 = bi * 8 * g;
            let blk = Blk256 {
                w: wrow.add(e0 >> shift),
                rem: row_bytes - (e0 >> shift),
                x: xs.map(|p| p.add(e0)),
                le,
            };
            let sums = match L0 {
                4 => t4_256::<T, Q4>(&blk, 0, 4),
                _ => t8_256::<T, Q4>(&blk, 0, 8),
            };
            let gb = (groups - bi * 8).min(8);
            let si = o * groups + bi * 8;
            let sw = match m.scales {
                MatScales::F32(p) => {
                    prefetch(p.wrapping_add(si + ahead_rows * groups).cast());
                    if gb == 8 {
                        _mm256_loadu_ps(p.add(si))
                    } else {
                        let mut tmp = [0f32; 8];
                        std::ptr::copy_nonoverlapping(p.add(si), tmp.as_mut_ptr(), gb);
                        _mm256_loadu_ps(tmp.as_ptr())
                    }
                }
                MatScales::F16(p) => {
                    prefetch(p.wrapping_add(si + ahead_rows * groups).cast());
                    let mut tmp = [0u16; 8];
                    std::ptr::copy_nonoverlapping(p.add(si).cast::<u16>(), tmp.as_mut_ptr(), gb);
                    _mm256_cvtph_ps(_mm_loadu_si128(tmp.as_ptr().cast()))
                }
            };
            for (i, (f, s)) in accf.iter_mut().zip(sums).enumerate() {
                let gi = (r0 + i) * a.gp + bi * 8;
                let isum = _mm256_sub_epi32(s, _mm256_loadu_si256(a.corr.as_ptr().add(gi).cast()));
                let sc = _mm256_mul_ps(sw, _mm256_loadu_ps(a.s.as_ptr().add(gi)));
                *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, *f);
            }
        }
        for (i, f) in accf.into_iter().enumerate() {
            *y.add((r0 + i) * m.n + o) = hsum256(f);
        }
    }
}

/// Rows `lo..hi` of `y` for tokens `r0..r0 + tt` (`1 ≤ tt ≤ 4`) with AVX2.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C; otherwise as [`rows_vnni`].
pub(super) unsafe fn rows_avx2(m: &Mat, a: &Acts, r0: usize, tt: usize, lo: usize, hi: usize, y: *mut f32) {
    let l0 = if m.q4 { 8 * m.group / m.group.max(64) } else { 8 };
    macro_rules! go {
        ($($t:literal),*) => {
            match (tt, m.q4, l0) {
                $(
                    ($t, false, _) => rows256::<$t, false, 8>(m, a, r0, lo, hi, y),
                    ($t, true, 4) => rows256::<$t, true, 4>(m, a, r0, lo, hi, y),
                    ($t, true, _) => rows256::<$t, true, 8>(m, a, r0, lo, hi, y),
                )*
                _ => unreachable!("token blocks are 1 to 4"),
            }
        };
    }
    go!(1, 2, 3, 4)
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI token tiles (prefill)
// ---------------------------------------------------------------------------------------------

/// `R` output rows of one tile of tokens (`tt` of them real) with AVX-512 VNNI, tokens in
/// lanes: each step broadcasts 4 weight bytes of a row to every lane and multiply-adds them
/// with the 4 activation bytes of each token, so no lane reduction is needed and one
/// activation vector serves all `R` rows. Integer sums are closed per group (corrected for the
/// unsigned operand's bias, scaled by `s_w · s_x`) into f32 accumulators.
///
/// q8 broadcasts the signed weight bytes straight from memory (`vpdpbusd`'s signed operand
/// takes a broadcast); the bias sits on the activations and lane 15 sums it (see
/// [`TileActs`]). q4 unpacks the nibbles in registers, so the weight is the unsigned operand.
///
/// Rows `o0..o0 + rows` are written (`1 ≤ rows ≤ R`); the kernel computes `R` rows, repeating
/// the last real one, so tails need no other code.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile512<const R: usize, const Q4: bool>(
    m: &Mat,
    ta: &TileActs,
    tile: usize,
    tt: usize,
    o0: usize,
    rows: usize,
    y: *mut f32,
) {
    let row_bytes = if Q4 { m.k / 2 } else { m.k };
    let w: [*const u8; R] = std::array::from_fn(|r| m.vals.add((o0 + r.min(rows - 1)) * row_bytes));
    // A step is 4 weight bytes: 4 elements (q8), or 8 elements as two nibble vectors (q4).
    let (step_x, spg) = if Q4 { (128, m.group / 8) } else { (64, m.group / 4) };
    let mut xp = ta.x.as_ptr().add(tile * ta.tile_bytes);
    let sp = ta.s.as_ptr().add(tile * m.groups * 16);
    let cp = ta.corr.as_ptr().add(tile * m.groups * 16);
    let nib = _mm512_set1_epi8(0x0f);
    let lane15 = _mm512_set1_epi32(15);
    let mut accf = [_mm512_setzero_ps(); R];
    let mut off = 0;
    for gi in 0..m.groups {
        let mut acc = [_mm512_setzero_si512(); R];
        for _ in 0..spg {
            if Q4 {
                let xe = _mm512_loadu_si512(xp.cast());
                let xo = _mm512_loadu_si512(xp.add(64).cast());
                for (a, wr) in acc.iter_mut().zip(w) {
                    let b = _mm512_set1_epi32(wr.add(off).cast::<i32>().read_unaligned());
                    let lo = _mm512_and_si512(b, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(b), nib);
                    *a = _mm512_dpbusd_epi32(*a, lo, xe);
                    *a = _mm512_dpbusd_epi32(*a, hi, xo);
                }
            } else {
                let xv = _mm512_loadu_si512(xp.cast());
                for (a, wr) in acc.iter_mut().zip(w) {
                    let b = _mm512_set1_epi32(wr.add(off).cast::<i32>().read_unaligned());
                    *a = _mm512_dpbusd_epi32(*a, xv, b);
                }
            }
            xp = xp.add(step_x);
            off += 4;
        }
        let sx = _mm512_loadu_ps(sp.add(gi * 16));
        let cx = _mm512_loadu_si512(cp.add(gi * 16).cast());
        for (r, (f, a)) in accf.iter_mut().zip(acc).enumerate() {
            let si = (o0 + r.min(rows - 1)) * m.groups + gi;
            let sw = match m.scales {
                MatScales::F32(p) => _mm512_set1_ps(*p.add(si)),
                MatScales::F16(p) => _mm512_cvtph_ps(_mm256_set1_epi16(p.add(si).cast::<i16>().read())),
            };
            let corr = if Q4 {
                cx
            } else {
                _mm512_permutexvar_epi32(lane15, a)
            };
            let isum = _mm512_sub_epi32(a, corr);
            *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(sx, sw), *f);
        }
    }
    let mut out = [[0f32; 16]; R];
    for (o, f) in out.iter_mut().zip(accf) {
        _mm512_storeu_ps(o.as_mut_ptr(), f);
    }
    for lane in 0..tt {
        let yr = y.add((tile * ta.tokens + lane) * m.n + o0);
        for (r, o) in out.iter().enumerate().take(rows) {
            *yr.add(r) = o[lane];
        }
    }
}

/// Output rows `o0..o0 + rows` (`rows ≤ TILE_ROWS`) for the `tt` tokens of tile `tile`.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL/VNNI, AVX2, FMA, F16C; `ta` holds the packed activations of the
/// call whose weight is `m` (see [`TileActs`]); `y` is valid for `t · n` writes and no other
/// task writes these rows.
pub(super) unsafe fn tile_vnni(
    m: &Mat,
    ta: &TileActs,
    tile: usize,
    tt: usize,
    o0: usize,
    rows: usize,
    y: *mut f32,
) {
    if m.q4 {
        tile512::<TILE_ROWS, true>(m, ta, tile, tt, o0, rows, y)
    } else {
        tile512::<TILE_ROWS, false>(m, ta, tile, tt, o0, rows, y)
    }
}
