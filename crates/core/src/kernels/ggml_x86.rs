//! x86 row kernels of the ggml types: one generic body per block family, compiled for AVX2 and
//! for AVX-512 VNNI (the [`Dot`] implementations are the only difference).
//!
//! Decode (`t ≤ 3`, the row kernels): every weight block is unpacked in registers into 32-byte
//! vectors of small integers, once for all tokens:
//!
//! - 32-value blocks (Q4_0, Q5_0, Q8_0: signed values; Q4_1, Q5_1: unsigned): one vector per
//!   block. Signed values are multiplied with the sign moved onto the activation (`|w|` times
//!   `sign(x, w)`, at most 2 · 128 · 127 per `maddubs` pair); each block's 8 lane sums are
//!   converted to f32 and added with the block's `d_w · d_x` (and `m_w · s_x`).
//! - k-quants (Q8_K activations): eight vectors of unsigned values per super-block, and the
//!   sub-block scales as 16-bit lanes: lanes 0..8 of a vector's products belong to its first 16
//!   values, lanes 8..16 to the next 16, so `madd(maddubs(u, x), scales)` applies one scale per
//!   16 values (at most 2 · 63 · 127 per pair). An offset `o` (Q3_K 4, Q6_K 32) is removed
//!   exactly as `o · Σ sc · bsum`; the mins as `Σ m · bsum` (Q8_K's sums of each 16 values).
//!
//! All integer sums are exact; each lane is converted to f32 once per block.
//!
//! Prefill (`t > 3`, the panel kernels at the end of this file): eight rows at a time are
//! unpacked once per call into a buffer laid out so that no horizontal sums are needed; with
//! AVX-512 VNNI two such panels side by side in 512-bit vectors.

// Index loops state the block layouts most plainly.
#![allow(clippy::needless_range_loop)]
#![allow(clippy::missing_safety_doc)]

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::super::quant::x86::{hsum256, prefetch, PF_BYTES};
use super::{Acts, Mat};
use crate::ggml::{GgmlType, QK_K};

/// How unsigned × signed byte products are summed into i32 lanes.
trait Dot {
    /// `acc` plus, per i32 lane, the sum of the four products `u·s` of its bytes.
    unsafe fn dot4(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
    /// `acc` plus, per i32 lane, `Σ scale · (u·s pair sum)` over its two 16-bit pairs.
    unsafe fn dot_scaled(acc: __m256i, u: __m256i, s: __m256i, scale: __m256i) -> __m256i;
    /// `acc` plus, per i32 lane, `Σ p · w` over its two 16-bit pairs.
    unsafe fn wsum(acc: __m256i, p: __m256i, w: __m256i) -> __m256i;
}

/// `vpmaddubsw` then `vpmaddwd`.
struct Avx2;

impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dot4(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn dot_scaled(acc: __m256i, u: __m256i, s: __m256i, scale: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), scale))
    }
    #[inline(always)]
    unsafe fn wsum(acc: __m256i, p: __m256i, w: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, w))
    }
}

/// `vpdpbusd`, and `vpmaddubsw` then `vpdpwssd` (EVEX encodings: AVX-512 VNNI with VL).
struct Vnni;

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dot4(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }
    #[inline(always)]
    unsafe fn dot_scaled(acc: __m256i, u: __m256i, s: __m256i, scale: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(u, s), scale)
    }
    #[inline(always)]
    unsafe fn wsum(acc: __m256i, p: __m256i, w: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, p, w)
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let h = p.cast::<u16>().read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[inline(always)]
unsafe fn u32_at(p: *const u8) -> u32 {
    p.cast::<u32>().read_unaligned()
}

#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// 16 bytes of nibbles as 32 bytes: low nibbles first, then high nibbles.
#[inline(always)]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p.cast());
    let v = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
}

/// Byte `j` is 0xFF where bit `j` of `bits` is set, else 0.
#[inline(always)]
unsafe fn bits32(bits: u32) -> __m256i {
    // Byte j takes byte j / 8 of `bits`, then tests bit j % 8 of it.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
}

/// The 32 values of a 32-value block (signed or unsigned per type).
#[inline(always)]
unsafe fn unpack32<const TY: u32>(b: *const u8) -> __m256i {
    match TY {
        8 => load(b.add(2)),
        2 => _mm256_sub_epi8(nibbles32(b.add(2)), _mm256_set1_epi8(8)),
        3 => nibbles32(b.add(4)),
        6 => {
            // Without its fifth bit a value is `nibble − 16`: 0xF0 | nibble as a signed byte.
            let high = _mm256_andnot_si256(bits32(u32_at(b.add(2))), _mm256_set1_epi8(0xf0u8 as i8));
            _mm256_or_si256(nibbles32(b.add(6)), high)
        }
        7 => {
            let high = _mm256_and_si256(bits32(u32_at(b.add(4))), _mm256_set1_epi8(0x10));
            _mm256_or_si256(nibbles32(b.add(8)), high)
        }
        _ => unreachable!(),
    }
}

/// The eight i32 lanes of `dot4(u, x)` for one block and one token: `x` signed like the weight
/// for the signed types (`|w| · sign(x, w)`, at most 2 · 128 · 127 per `maddubs` pair).
#[inline(always)]
unsafe fn block_lanes<D: Dot>(signed: bool, u: __m256i, v: __m256i, x: *const i8) -> __m256i {
    let x = load(x.cast());
    let x = if signed { _mm256_sign_epi8(x, v) } else { x };
    D::dot4(_mm256_setzero_si256(), u, x)
}

/// Eight blocks' lane vectors `p[0..8]` reduced to one vector of their eight integer sums, block
/// `j` in lane `j` (exact: each sum is at most 32 · 128 · 127 in magnitude).
#[inline(always)]
unsafe fn block_sums8(p: [__m256i; 8]) -> __m256i {
    // Per 128-bit half, `hadd` pairs neighbours: after two levels a half holds, for four blocks,
    // the sum of its four lanes of each; the halves of blocks 0..4 and 4..8 are then added.
    let q0 = _mm256_hadd_epi32(p[0], p[1]);
    let q1 = _mm256_hadd_epi32(p[2], p[3]);
    let q2 = _mm256_hadd_epi32(p[4], p[5]);
    let q3 = _mm256_hadd_epi32(p[6], p[7]);
    let r0 = _mm256_hadd_epi32(q0, q1);
    let r1 = _mm256_hadd_epi32(q2, q3);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(r0, r1),
        _mm256_permute2x128_si256::<0x31>(r0, r1),
    )
}

/// The f16 at byte `at` of each of the eight blocks from `b` (stride `ts`), widened.
#[inline(always)]
unsafe fn f16x8(b: *const u8, ts: usize, at: usize) -> __m256 {
    let h: [u16; 8] = std::array::from_fn(|j| b.add(j * ts + at).cast::<u16>().read_unaligned());
    _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()))
}

/// Rows `lo..hi`, tokens `r0..r0 + T`, of a 32-value block type (`TY` its GGUF id).
///
/// Blocks go eight at a time: their integer sums are gathered into one vector (one lane per
/// block), converted once and multiplied by the eight `d_w · d_x` in one instruction, so the
/// per-block f32 work is shared by eight blocks; the `m_w · s_x` terms of Q4_1 / Q5_1 likewise.
/// Blocks past the last whole group of eight go one at a time.
#[inline(always)]
unsafe fn rows32<D: Dot, const TY: u32, const T: usize>(
    m: &Mat,
    a: &Acts,
    r0: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
) {
    let ts = m.ty.type_size();
    let signed = matches!(TY, 2 | 6 | 8);
    let xs: [*const i8; T] = std::array::from_fn(|i| a.q.as_ptr().add((r0 + i) * a.k));
    let ds: [*const f32; T] = std::array::from_fn(|i| a.d.as_ptr().add((r0 + i) * a.nb));
    let ss: [*const f32; T] = std::array::from_fn(|i| a.s.as_ptr().wrapping_add((r0 + i) * a.nb));
    let groups = a.nb / 8;
    for o in lo..hi {
        let row = m.w.add(o * m.row_bytes);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut accm = [_mm256_setzero_ps(); T];
        for g in 0..groups {
            let gp = row.add(8 * g * ts);
            prefetch(gp.wrapping_add(PF_BYTES));
            prefetch(gp.wrapping_add(PF_BYTES + 64));
            prefetch(gp.wrapping_add(PF_BYTES + 128));
            prefetch(gp.wrapping_add(PF_BYTES + 8 * ts - 1));
            let dw = f16x8(gp, ts, 0);
            let mut p = [[_mm256_setzero_si256(); 8]; T];
            for j in 0..8 {
                let v = unpack32::<TY>(gp.add(j * ts));
                let u = if signed { _mm256_sign_epi8(v, v) } else { v };
                for i in 0..T {
                    p[i][j] = block_lanes::<D>(signed, u, v, xs[i].add(32 * (8 * g + j)));
                }
            }
            for i in 0..T {
                let dd = _mm256_mul_ps(dw, _mm256_loadu_ps(ds[i].add(8 * g)));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_sums8(p[i])), dd, acc[i]);
            }
            if !signed {
                let mw = f16x8(gp, ts, 2);
                for i in 0..T {
                    accm[i] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(ss[i].add(8 * g)), accm[i]);
                }
            }
        }
        let mut tail = [0f32; T];
        for b in 8 * groups..a.nb {
            let bp = row.add(b * ts);
            let v = unpack32::<TY>(bp);
            let u = if signed { _mm256_sign_epi8(v, v) } else { v };
            let (d, mw) = (f16_at(bp), if signed { 0.0 } else { f16_at(bp.add(2)) });
            for i in 0..T {
                let p = block_lanes::<D>(signed, u, v, xs[i].add(32 * b));
                let scale = _mm256_set1_ps(d * *ds[i].add(b));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i]);
                if !signed {
                    tail[i] += mw * *ss[i].add(b);
                }
            }
        }
        for i in 0..T {
            *y.add((r0 + i) * m.n + o) = hsum256(acc[i]) + (hsum256(accm[i]) + tail[i]);
        }
    }
}

/// A k-quant super-block unpacked: eight vectors of unsigned values (elements `32c..32c + 32`),
/// the scales as sixteen 16-bit lanes (one per 16 values), the mins likewise (zero when the type
/// has none), the offset removed from every value (0, 4 or 32) and the f16 scales widened.
struct KUnpacked {
    u: [__m256i; 8],
    sc: __m256i,
    mins: __m256i,
    d: f32,
    dmin: f32,
}

/// The eight 6-bit scales and the eight 6-bit mins of a Q4_K / Q5_K block's 12 scale bytes, as
/// two little-endian u64 (byte `j` is sub-block `j`'s).
#[inline(always)]
fn scales_k4(p: &[u32; 3]) -> (u64, u64) {
    let [a, b, c] = *p;
    let (m6, m4, m2) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
    let sc_hi = (c & m4) | (((a >> 6) & m2) << 4);
    let mn_hi = ((c >> 4) & m4) | (((b >> 6) & m2) << 4);
    (
        (a & m6) as u64 | ((sc_hi as u64) << 32),
        (b & m6) as u64 | ((mn_hi as u64) << 32),
    )
}

/// The sixteen 6-bit scales of a Q3_K block (before the −32), as 16 bytes.
#[inline(always)]
fn scales_q3k(p: &[u32; 3]) -> [u32; 4] {
    let [a, b, c] = *p;
    let (m4, m2) = (0x0f0f_0f0fu32, 0x0303_0303u32);
    [
        (a & m4) | ((c & m2) << 4),
        (b & m4) | (((c >> 2) & m2) << 4),
        ((a >> 4) & m4) | (((c >> 4) & m2) << 4),
        ((b >> 4) & m4) | (((c >> 6) & m2) << 4),
    ]
}

#[inline(always)]
unsafe fn words3(p: *const u8) -> [u32; 3] {
    [u32_at(p), u32_at(p.add(4)), u32_at(p.add(8))]
}

/// Per-32 values (eight bytes in a u64) as sixteen 16-bit lanes, each repeated for both halves.
#[inline(always)]
unsafe fn per32_to_16(v: u64) -> __m256i {
    let w = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(v as i64));
    _mm256_set_m128i(_mm_unpackhi_epi16(w, w), _mm_unpacklo_epi16(w, w))
}

/// Element `32c + l` set to 0x10 where bit `bit` of `qh[l]` is set.
#[inline(always)]
unsafe fn high_bit(qh: __m256i, bit: u32, value: i8) -> __m256i {
    let mask = _mm256_set1_epi8((1u8 << bit) as i8);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, mask), mask);
    _mm256_and_si256(set, _mm256_set1_epi8(value))
}

#[inline(always)]
unsafe fn unpack_k<const TY: u32>(b: *const u8) -> KUnpacked {
    let lo4 = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    match TY {
        // Q2_K: scales[16] (scale | min << 4), qs[64], d, dmin.
        10 => {
            let s = _mm_loadu_si128(b.cast());
            let m4 = _mm_set1_epi8(0x0f);
            let sc = _mm256_cvtepu8_epi16(_mm_and_si128(s, m4));
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(s), m4));
            let three = _mm256_set1_epi8(3);
            let mut u = [zero; 8];
            for n in 0..2 {
                let q = load(b.add(16 + 32 * n));
                u[4 * n] = _mm256_and_si256(q, three);
                u[4 * n + 1] = _mm256_and_si256(_mm256_srli_epi16::<2>(q), three);
                u[4 * n + 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), three);
                u[4 * n + 3] = _mm256_and_si256(_mm256_srli_epi16::<6>(q), three);
            }
            KUnpacked {
                u,
                sc,
                mins,
                d: f16_at(b.add(80)),
                dmin: f16_at(b.add(82)),
            }
        }
        // Q3_K: hmask[32], qs[64], scales[12], d; value = low 2 bits + 4·high bit − 4.
        11 => {
            let s = scales_q3k(&words3(b.add(96)));
            let s = _mm_set_epi32(s[3] as i32, s[2] as i32, s[1] as i32, s[0] as i32);
            let sc = _mm256_sub_epi16(_mm256_cvtepu8_epi16(s), _mm256_set1_epi16(32));
            let hm = load(b);
            let three = _mm256_set1_epi8(3);
            let mut u = [zero; 8];
            for n in 0..2 {
                let q = load(b.add(32 + 32 * n));
                let low = [
                    _mm256_and_si256(q, three),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(q), three),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), three),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(q), three),
                ];
                for (j, l) in low.into_iter().enumerate() {
                    u[4 * n + j] = _mm256_or_si256(l, high_bit(hm, (4 * n + j) as u32, 4));
                }
            }
            KUnpacked {
                u,
                sc,
                mins: zero,
                d: f16_at(b.add(108)),
                dmin: 0.0,
            }
        }
        // Q4_K: d, dmin, scales[12], qs[128]; Q5_K: d, dmin, scales[12], qh[32], qs[128].
        12 | 13 => {
            let (sc, mins) = scales_k4(&words3(b.add(4)));
            let qs = if TY == 13 { b.add(48) } else { b.add(16) };
            let qh = load(b.add(16));
            let mut u = [zero; 8];
            for j in 0..4 {
                let q = load(qs.add(32 * j));
                let mut l = _mm256_and_si256(q, lo4);
                let mut h = _mm256_and_si256(_mm256_srli_epi16::<4>(q), lo4);
                if TY == 13 {
                    l = _mm256_or_si256(l, high_bit(qh, 2 * j as u32, 16));
                    h = _mm256_or_si256(h, high_bit(qh, 2 * j as u32 + 1, 16));
                }
                u[2 * j] = l;
                u[2 * j + 1] = h;
            }
            KUnpacked {
                u,
                sc: per32_to_16(sc),
                mins: per32_to_16(mins),
                d: f16_at(b),
                dmin: f16_at(b.add(2)),
            }
        }
        // Q6_K: ql[128], qh[64], scales[16] (i8), d; value = 4 low | 2 high bits − 32.
        14 => {
            let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192).cast()));
            let mut u = [zero; 8];
            let (m3, m12, m48, m192) = (
                _mm256_set1_epi8(3),
                _mm256_set1_epi8(12),
                _mm256_set1_epi8(48),
                _mm256_set1_epi8(-64),
            );
            for n in 0..2 {
                let q0 = load(b.add(64 * n));
                let q1 = load(b.add(64 * n + 32));
                let qh = load(b.add(128 + 32 * n));
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3));
                let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, m12));
                let h2 = _mm256_and_si256(qh, m48);
                let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(qh, m192));
                u[4 * n] = _mm256_or_si256(_mm256_and_si256(q0, lo4), h0);
                u[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(q1, lo4), h1);
                u[4 * n + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q0), lo4), h2);
                u[4 * n + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q1), lo4), h3);
            }
            KUnpacked {
                u,
                sc,
                mins: zero,
                d: f16_at(b.add(208)),
                dmin: 0.0,
            }
        }
        _ => unreachable!(),
    }
}

/// `vpshufb` controls of [`scale_pair`]: for `c % 4`, words `2c'` (low half) and `2c' + 1` (high
/// half) of a 128-bit half, each repeated eight times. A table, so that the control is one load
/// (built from `c` at run time it costs a chain of byte inserts per vector).
static SCALE_PICK: [[u8; 32]; 4] = {
    let mut t = [[0u8; 32]; 4];
    let mut c = 0;
    while c < 4 {
        let mut j = 0;
        while j < 32 {
            let word = 2 * c + j / 16;
            t[c][j] = (2 * word + j % 2) as u8;
            j += 1;
        }
        c += 1;
    }
    t
};

/// For vector `c` of a super-block: a 16-bit vector whose lanes 0..8 hold scale `2c` and lanes
/// 8..16 scale `2c + 1`, from the sixteen scales in `sc`.
#[inline(always)]
unsafe fn scale_pair(sc: __m256i, c: usize) -> __m256i {
    // Both 128-bit halves hold scales 0..8 (c < 4) or 8..16; a byte shuffle then picks word
    // 2c' in the low half and 2c' + 1 in the high half.
    let half = if c < 4 {
        _mm256_permute2x128_si256::<0x00>(sc, sc)
    } else {
        _mm256_permute2x128_si256::<0x11>(sc, sc)
    };
    _mm256_shuffle_epi8(half, load(SCALE_PICK[c % 4].as_ptr()))
}

/// Rows `lo..hi`, tokens `r0..r0 + T`, of a k-quant type (`TY` its GGUF id).
#[inline(always)]
unsafe fn rows_k<D: Dot, const TY: u32, const T: usize>(
    m: &Mat,
    a: &Acts,
    r0: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
) {
    let ts = m.ty.type_size();
    // The offset every stored value carries, removed through the scaled block sums.
    let off_shift: i32 = match TY {
        11 => 2,
        14 => 5,
        _ => -1,
    };
    let has_mins = matches!(TY, 10 | 12 | 13);
    let xs: [*const i8; T] = std::array::from_fn(|i| a.q.as_ptr().add((r0 + i) * a.k));
    let ds: [*const f32; T] = std::array::from_fn(|i| a.d.as_ptr().add((r0 + i) * a.nb));
    let bsums: [*const i16; T] = std::array::from_fn(|i| a.bsums.as_ptr().add((r0 + i) * a.k / 16));
    for o in lo..hi {
        let row = m.w.add(o * m.row_bytes);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..a.nb {
            let bp = row.add(b * ts);
            prefetch(bp.wrapping_add(PF_BYTES));
            prefetch(bp.wrapping_add(PF_BYTES + 64));
            prefetch(bp.wrapping_add(PF_BYTES + 128));
            let kb = unpack_k::<TY>(bp);
            let mut isum = [_mm256_setzero_si256(); T];
            for c in 0..8 {
                let scale = scale_pair(kb.sc, c);
                for i in 0..T {
                    let x = load(xs[i].add(QK_K * b + 32 * c).cast());
                    isum[i] = D::dot_scaled(isum[i], kb.u[c], x, scale);
                }
            }
            for i in 0..T {
                let bs = _mm256_loadu_si256(bsums[i].add(16 * b).cast());
                let mut s = isum[i];
                if off_shift >= 0 {
                    let corr = _mm256_madd_epi16(kb.sc, bs);
                    s = _mm256_sub_epi32(s, _mm256_sll_epi32(corr, _mm_cvtsi32_si128(off_shift)));
                }
                let dy = *ds[i].add(b);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(kb.d * dy), acc[i]);
                if has_mins {
                    let msum = _mm256_cvtepi32_ps(_mm256_madd_epi16(kb.mins, bs));
                    acc[i] = _mm256_fnmadd_ps(msum, _mm256_set1_ps(kb.dmin * dy), acc[i]);
                }
            }
        }
        for i in 0..T {
            *y.add((r0 + i) * m.n + o) = hsum256(acc[i]);
        }
    }
}

/// Rows `lo..hi` of `y` for tokens `r0..r0 + tt` (`tt` in `1..=3`, or 4 for Q4_1 and Q5_1),
/// body `D`.
#[inline(always)]
unsafe fn rows<D: Dot>(m: &Mat, a: &Acts, r0: usize, tt: usize, lo: usize, hi: usize, y: *mut f32) {
    macro_rules! go {
        ($($ty:literal => $kind:ident),*) => {
            match (m.ty.id(), tt) {
                $(
                    ($ty, 1) => $kind::<D, $ty, 1>(m, a, r0, lo, hi, y),
                    ($ty, 2) => $kind::<D, $ty, 2>(m, a, r0, lo, hi, y),
                    ($ty, 3) => $kind::<D, $ty, 3>(m, a, r0, lo, hi, y),
                )*
                (3, 4) => rows32::<D, 3, 4>(m, a, r0, lo, hi, y),
                (7, 4) => rows32::<D, 7, 4>(m, a, r0, lo, hi, y),
                _ => unreachable!("{} with {tt} tokens", m.ty),
            }
        };
    }
    debug_assert!(m.ty != GgmlType::F32);
    go!(2 => rows32, 3 => rows32, 6 => rows32, 7 => rows32, 8 => rows32,
        10 => rows_k, 11 => rows_k, 12 => rows_k, 13 => rows_k, 14 => rows_k)
}

/// Rows `lo..hi` of `y` for tokens `r0..r0 + tt` (`tt` in `1..=3`, or 4 for Q4_1 and Q5_1)
/// with AVX2.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C; `m` and `a` describe one call's weight and activations; `y` is
/// valid for `t · n` writes and no other task writes rows `lo..hi`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_avx2(m: &Mat, a: &Acts, r0: usize, tt: usize, lo: usize, hi: usize, y: *mut f32) {
    rows::<Avx2>(m, a, r0, tt, lo, hi, y)
}

/// [`rows_avx2`] with AVX-512 VNNI (256-bit EVEX forms).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL/VNNI, AVX2, FMA, F16C; otherwise as [`rows_avx2`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn rows_vnni(m: &Mat, a: &Acts, r0: usize, tt: usize, lo: usize, hi: usize, y: *mut f32) {
    rows::<Vnni>(m, a, r0, tt, lo, hi, y)
}

// ---------------------------------------------------------------------------------------------
// Prefill: packed panels of eight rows.
//
// The row kernels above reduce each block's lanes horizontally and unpack every weight block
// once per few tokens. For prefill each panel of eight output rows is instead unpacked once
// per call into a small buffer laid out for the multiply: step `s` of a block (its values
// `4s..4s + 4`) of the eight rows is one vector whose i32 lane `r` holds row `r`'s four bytes.
// A token's four activations broadcast to every lane, so `maddubs` (+ `madd`) leaves in lane
// `r` a partial dot product of row `r`: no horizontal sums, the unpacking is shared by every
// token of the call, and a tile of tokens reuses each loaded weight vector.
//
// Products of small unsigned values (every type but Q8_0) are summed in 16-bit lanes over
// several steps before one `madd` widens them (with the sub-block scale for the k-quants), so
// most steps cost one `maddubs` and one 16-bit add per token.
// ---------------------------------------------------------------------------------------------

/// Rows of a packed panel (the eight i32 lanes of a vector).
pub(super) const PANEL_ROWS: usize = 8;

/// Whether prefill of `ty` runs through packed panels. Q4_1 and Q5_1 keep the row kernels,
/// which sum in ggml-cpu's order (each block's eight lane sums scaled, the `m_w · s_x` terms
/// apart): their two sums nearly cancel, so a panel's order (exact block sums) moves results
/// enough to flip a top-1 route of the Q5_1 fixture model against llama.cpp.
pub(super) fn has_panel(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1)
}

/// Tokens per tile of the panel kernel: the accumulators of four tokens (16-bit partial sums,
/// the 32-bit sum of a super-block, the f32 output) and the operands fit the 16 registers.
const TILE_T: usize = 4;

/// How a type's values meet the panel kernel.
#[derive(Clone, Copy)]
struct Kind {
    /// Values per super-block (the span of one f32 scale `d` per row): 32 or 256.
    sb: usize,
    /// Values per integer sub-block scale (32 or 16); `sb` when the type has none.
    g: usize,
    /// Steps (4 values) whose 16-bit products are summed before widening: the largest count
    /// that cannot overflow an i16 lane (`n · 2 · max|w| · 127 ≤ 32767`).
    acc16: usize,
    /// Signed values (sign moved onto the activation); otherwise unsigned.
    signed: bool,
    /// Integer sub-block scales (k-quants).
    int_scale: bool,
    /// `Σ m · bsum` term with per-16 integer mins (k-quant mins, or the offset of Q3_K / Q6_K
    /// as `o · sc`), times `dmin` (Q3_K / Q6_K: `d`).
    int_mins: bool,
    /// `m_w · s_x` term (Q4_1, Q5_1).
    float_mins: bool,
    /// The integer mins apply per 32 values (Q4_K, Q5_K): four pairs against Q8_K's sums of
    /// each 32, not eight against its sums of each 16.
    mins32: bool,
}

impl Kind {
    const fn k32(acc16: usize, signed: bool, float_mins: bool) -> Kind {
        Kind {
            sb: 32,
            g: 32,
            acc16,
            signed,
            int_scale: false,
            int_mins: false,
            float_mins,
            mins32: false,
        }
    }
    const fn kq(g: usize, acc16: usize) -> Kind {
        Kind {
            sb: QK_K,
            g,
            acc16,
            signed: false,
            int_scale: true,
            int_mins: true,
            float_mins: false,
            mins32: g == 32,
        }
    }
    const fn of(ty: u32) -> Kind {
        let (k32, kq) = (Kind::k32, Kind::kq);
        match ty {
            // Q8_0: |w| ≤ 128, one step per widening.
            8 => k32(1, true, false),
            // Q4_0 |w| ≤ 8, Q5_0 |w| ≤ 16 (8 · 2 · 16 · 127 = 32512), Q4_1 ≤ 15: eight steps.
            2 | 6 => k32(8, true, false),
            3 => k32(8, false, true),
            // Q5_1 ≤ 31: four steps.
            7 => k32(4, false, true),
            // Q2_K ≤ 3, Q3_K ≤ 7 (offset 4): sub-blocks of 16 (four steps) at once.
            10 | 11 => kq(16, 4),
            // Q4_K ≤ 15: sub-blocks of 32 at once; Q5_K ≤ 31: half of one.
            12 => kq(32, 8),
            13 => kq(32, 4),
            // Q6_K ≤ 63 (offset 32): two steps.
            _ => kq(16, 2),
        }
    }
    /// Steps (vectors of values) per super-block.
    const fn steps(self) -> usize {
        self.sb / 4
    }
    /// Integer scale vectors per super-block.
    const fn scales(self) -> usize {
        if self.int_scale {
            self.sb / self.g
        } else {
            0
        }
    }
    /// Min pair vectors per super-block.
    const fn min_pairs(self) -> usize {
        match (self.int_mins, self.mins32) {
            (false, _) => 0,
            (true, true) => 4,
            (true, false) => 8,
        }
    }
    /// Vectors of values per super-block: signed types store `|w|` after each `w` (`vpabsb`
    /// runs on the multiply pipes of Zen 3, a load does not).
    const fn vals(self) -> usize {
        self.steps() * (1 + self.signed as usize)
    }
    /// Vector offset of `d` (then `dmin` / `m`, then the min pairs).
    const fn at_d(self) -> usize {
        self.vals() + self.scales()
    }
    /// Vectors per super-block of a packed panel.
    const fn stride(self) -> usize {
        self.at_d() + 1 + (self.int_mins || self.float_mins) as usize + self.min_pairs()
    }
}

/// One 32-byte vector of a packed panel.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(super) struct V32(pub(super) [u8; 32]);

/// Vectors a packed panel of a `k`-wide weight of `ty` takes.
pub(super) fn panel_len(ty: GgmlType, k: usize) -> usize {
    let kd = Kind::of(ty.id());
    k / kd.sb * kd.stride()
}

/// Vectors of the buffer the panel kernels take for a `k`-wide weight of `ty`: two panels,
/// interleaved for the 512-bit tile (plus one vector to align them to 64 bytes).
pub(super) fn panel_buf_len(ty: GgmlType, k: usize) -> usize {
    2 * panel_len(ty, k) + 1
}

/// `v[r]`'s i32 lane `j` to lane `r` of vector `j` (an 8 × 8 transpose of 32-bit lanes).
#[inline(always)]
unsafe fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[i & !1], v[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // t[2p] holds rows 2p, 2p + 1 at lanes 0, 1 | 4, 5; t[2p + 1] at lanes 2, 3 | 6, 7.
    let u: [__m256i; 8] = std::array::from_fn(|i| {
        let (half, j) = (i / 4, i % 4);
        let (a, b) = (t[4 * half + j / 2], t[4 * half + 2 + j / 2]);
        if j % 2 == 0 {
            _mm256_unpacklo_epi64(a, b)
        } else {
            _mm256_unpackhi_epi64(a, b)
        }
    });
    // u[4h + j] holds rows 4h..4h + 4 of lane j (low half) and lane j + 4 (high half).
    std::array::from_fn(|j| {
        let (a, b) = (u[j % 4], u[4 + j % 4]);
        if j < 4 {
            _mm256_permute2x128_si256::<0x20>(a, b)
        } else {
            _mm256_permute2x128_si256::<0x31>(a, b)
        }
    })
}

/// The super-block of a k-quant row at `bp` unpacked for [`pack_panel`], with its mins as
/// the panel stores them.
#[inline(always)]
unsafe fn unpack_row<const TY: u32>(bp: *const u8) -> KUnpacked {
    let mut kb = unpack_k::<TY>(bp);
    // Q3_K and Q6_K: the offset of every value, removed as `o · sc` mins with `d`.
    kb.mins = match TY {
        11 => _mm256_slli_epi16::<2>(kb.sc),
        14 => _mm256_slli_epi16::<5>(kb.sc),
        // The eight per-32 mins as 16-bit lanes: i32 lanes 0..4 are pairs.
        12 | 13 => {
            let (_, mn) = scales_k4(&words3(bp.add(4)));
            _mm256_castsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64)))
        }
        _ => kb.mins,
    };
    if matches!(TY, 11 | 14) {
        kb.dmin = kb.d;
    }
    kb
}

/// Packs rows `o0..o0 + rows` (`rows ≤ 8`; the rest of the panel is zero) of a `TY` weight
/// into `out` in the layout [`panel_tile`] reads, vector `i` at `out + i · spacing` (1: one
/// panel of `panel_len` vectors; 2: every other vector, interleaved with a second panel).
#[inline(always)]
unsafe fn pack_panel<const TY: u32>(
    m: &Mat,
    o0: usize,
    rows: usize,
    nsb: usize,
    out: *mut V32,
    spacing: usize,
) {
    let kd = Kind::of(TY);
    let ts = m.ty.type_size();
    let zero = _mm256_setzero_si256();
    let per_sb = kd.sb / m.ty.block_size();
    for s in 0..nsb {
        let base = out.add(s * kd.stride() * spacing);
        let st = |i: usize, v: __m256i| _mm256_store_si256(base.add(i * spacing).cast(), v);
        let mut d = [0f32; 8];
        let mut dmin = [0f32; 8];
        if kd.sb == 32 {
            let mut v = [zero; 8];
            for r in 0..rows {
                let bp = m.w.add((o0 + r) * m.row_bytes + s * per_sb * ts);
                v[r] = unpack32::<TY>(bp);
                d[r] = f16_at(bp);
                if kd.float_mins {
                    dmin[r] = f16_at(bp.add(2));
                }
            }
            for (j, q) in transpose8(v).into_iter().enumerate() {
                if kd.signed {
                    st(2 * j, q);
                    st(2 * j + 1, _mm256_abs_epi8(q));
                } else {
                    st(j, q);
                }
            }
        } else {
            // Each row built in place (zeroing the 2 KiB of `u` and then filling it cost a
            // `memset` per super-block: 1.7% of a Q4_K_M prefill). A loop, not a closure: a
            // closure does not take this function's target features, so the intrinsics
            // inlined into it would be calls (a quarter of a Q4_K_M prefill).
            let mut ks = [const { MaybeUninit::<KUnpacked>::uninit() }; 8];
            for (r, slot) in ks.iter_mut().enumerate() {
                slot.write(if r < rows {
                    unpack_row::<TY>(m.w.add((o0 + r) * m.row_bytes + s * ts))
                } else {
                    KUnpacked {
                        u: [zero; 8],
                        sc: zero,
                        mins: zero,
                        d: 0.0,
                        dmin: 0.0,
                    }
                });
            }
            // SAFETY: the loop wrote all eight.
            let ks: [KUnpacked; 8] = std::mem::transmute(ks);
            let scs: [__m256i; 8] = std::array::from_fn(|r| ks[r].sc);
            let mins: [__m256i; 8] = std::array::from_fn(|r| ks[r].mins);
            for r in 0..8 {
                d[r] = ks[r].d;
                dmin[r] = ks[r].dmin;
            }
            for c in 0..8 {
                let t = transpose8(std::array::from_fn(|r| ks[r].u[c]));
                for (j, q) in t.into_iter().enumerate() {
                    st(8 * c + j, q);
                }
            }
            // The sixteen 16-bit lanes of `sc` hold one value per 16 values, so (per-32 scales
            // being repeated) i32 lane `g` is sub-block `g`'s scale pair, and i32 lane `p` of
            // `mins` is min pair `p`: one transpose lays out eight rows of each.
            for (p, q) in transpose8(mins).into_iter().take(kd.min_pairs()).enumerate() {
                st(kd.at_d() + 2 + p, q);
            }
            if kd.g == 32 {
                for (g, q) in transpose8(scs).into_iter().enumerate() {
                    st(kd.vals() + g, q);
                }
            } else {
                // Per-16 scales: each lane doubled, lanes 0..4 | 8..12 then 4..8 | 12..16.
                let (mut lo, mut hi) = (scs, scs);
                for ((l, h), v) in lo.iter_mut().zip(&mut hi).zip(scs) {
                    (*l, *h) = (_mm256_unpacklo_epi16(v, v), _mm256_unpackhi_epi16(v, v));
                }
                let (lo, hi) = (transpose8(lo), transpose8(hi));
                for j in 0..8 {
                    let g = if j < 4 { j } else { j + 4 };
                    st(kd.vals() + g, lo[j]);
                    st(kd.vals() + g + 4, hi[j]);
                }
            }
        }
        _mm256_store_ps(base.add(kd.at_d() * spacing).cast(), _mm256_loadu_ps(d.as_ptr()));
        if kd.int_mins || kd.float_mins {
            _mm256_store_ps(
                base.add((kd.at_d() + 1) * spacing).cast(),
                _mm256_loadu_ps(dmin.as_ptr()),
            );
        }
    }
}

/// The vectors of a panel tile at one width: [`Narrow`] (256 bits, the eight rows of one
/// packed panel, with either [`Dot`]) or [`Wide`] (512 bits, sixteen rows: two packed panels
/// interleaved vector by vector). Every operation of the tile is lane-wise, so one body
/// ([`panel_tile`]) serves both.
trait Tile {
    /// Sixteen-bit / 32-bit integer lanes.
    type I: Copy;
    /// f32 lanes, one per row.
    type F: Copy;
    /// What [`Tile::sign`] takes of a weight vector.
    type Neg: Copy;
    /// Bytes per vector.
    const BYTES: usize;
    unsafe fn load(p: *const u8) -> Self::I;
    unsafe fn zero() -> Self::I;
    unsafe fn splat(x: i32) -> Self::I;
    unsafe fn ones16() -> Self::I;
    unsafe fn neg(w: Self::I) -> Self::Neg;
    /// `x` with the sign of `w` moved onto it (any value where `w = 0`: `|w|` is 0 there).
    unsafe fn sign(x: Self::I, w: Self::Neg) -> Self::I;
    unsafe fn maddubs(u: Self::I, x: Self::I) -> Self::I;
    unsafe fn add16(a: Self::I, b: Self::I) -> Self::I;
    /// As [`Dot::dot4`].
    unsafe fn dot4(acc: Self::I, u: Self::I, x: Self::I) -> Self::I;
    /// As [`Dot::wsum`].
    unsafe fn wsum(acc: Self::I, p: Self::I, w: Self::I) -> Self::I;
    unsafe fn fzero() -> Self::F;
    unsafe fn loadf(p: *const f32) -> Self::F;
    unsafe fn splatf(x: f32) -> Self::F;
    unsafe fn cvt(i: Self::I) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// `a · b + c`.
    unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// `c − a · b`.
    unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// The first `rows` lanes of `v` to `p`.
    unsafe fn store(p: *mut f32, v: Self::F, rows: usize);
}

/// 256-bit tiles with the products of `D`.
struct Narrow<D>(std::marker::PhantomData<D>);

impl<D: Dot> Tile for Narrow<D> {
    type I = __m256i;
    type F = __m256;
    type Neg = __m256i;
    const BYTES: usize = 32;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_load_si256(p.cast())
    }
    #[inline(always)]
    unsafe fn zero() -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn splat(x: i32) -> __m256i {
        _mm256_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn ones16() -> __m256i {
        _mm256_set1_epi16(1)
    }
    #[inline(always)]
    unsafe fn neg(w: __m256i) -> __m256i {
        w
    }
    #[inline(always)]
    unsafe fn sign(x: __m256i, w: __m256i) -> __m256i {
        _mm256_sign_epi8(x, w)
    }
    #[inline(always)]
    unsafe fn maddubs(u: __m256i, x: __m256i) -> __m256i {
        _mm256_maddubs_epi16(u, x)
    }
    #[inline(always)]
    unsafe fn add16(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi16(a, b)
    }
    #[inline(always)]
    unsafe fn dot4(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
        D::dot4(acc, u, x)
    }
    #[inline(always)]
    unsafe fn wsum(acc: __m256i, p: __m256i, w: __m256i) -> __m256i {
        D::wsum(acc, p, w)
    }
    #[inline(always)]
    unsafe fn fzero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn loadf(p: *const f32) -> __m256 {
        _mm256_load_ps(p)
    }
    #[inline(always)]
    unsafe fn splatf(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn cvt(i: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(i)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256, rows: usize) {
        if rows == PANEL_ROWS {
            _mm256_storeu_ps(p, v);
        } else {
            let mut lanes = [0f32; PANEL_ROWS];
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), p, rows);
        }
    }
}

/// 512-bit tiles with AVX-512 VNNI. AVX-512 has no `vpsignb`: the sign of `w` moves onto the
/// activation as a masked `0 − x` where `w < 0` (the mask taken once per step).
struct Wide;

impl Tile for Wide {
    type I = __m512i;
    type F = __m512;
    type Neg = __mmask64;
    const BYTES: usize = 64;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512i {
        _mm512_load_si512(p.cast())
    }
    #[inline(always)]
    unsafe fn zero() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline(always)]
    unsafe fn splat(x: i32) -> __m512i {
        _mm512_set1_epi32(x)
    }
    #[inline(always)]
    unsafe fn ones16() -> __m512i {
        _mm512_set1_epi16(1)
    }
    #[inline(always)]
    unsafe fn neg(w: __m512i) -> __mmask64 {
        _mm512_movepi8_mask(w)
    }
    #[inline(always)]
    unsafe fn sign(x: __m512i, neg: __mmask64) -> __m512i {
        _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x)
    }
    #[inline(always)]
    unsafe fn maddubs(u: __m512i, x: __m512i) -> __m512i {
        _mm512_maddubs_epi16(u, x)
    }
    #[inline(always)]
    unsafe fn add16(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi16(a, b)
    }
    #[inline(always)]
    unsafe fn dot4(acc: __m512i, u: __m512i, x: __m512i) -> __m512i {
        _mm512_dpbusd_epi32(acc, u, x)
    }
    #[inline(always)]
    unsafe fn wsum(acc: __m512i, p: __m512i, w: __m512i) -> __m512i {
        _mm512_dpwssd_epi32(acc, p, w)
    }
    #[inline(always)]
    unsafe fn fzero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn loadf(p: *const f32) -> __m512 {
        _mm512_load_ps(p)
    }
    #[inline(always)]
    unsafe fn splatf(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn cvt(i: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(i)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fnmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512, rows: usize) {
        _mm512_mask_storeu_ps(p, ((1u32 << rows) - 1) as __mmask16, v);
    }
}

/// Tokens `r0..r0 + T` of a packed panel (`nsb` super-blocks from `p`, [`Kind::stride`]
/// vectors of `L` each): `y[r][o0 + j]` for the panel's first `rows` rows `j`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn panel_tile<L: Tile, const TY: u32, const T: usize>(
    p: *const u8,
    nsb: usize,
    a: &Acts,
    r0: usize,
    y: *mut f32,
    n: usize,
    o0: usize,
    rows: usize,
) {
    let kd = Kind::of(TY);
    let xs: [*const u8; T] = std::array::from_fn(|i| a.q.as_ptr().add((r0 + i) * a.k).cast());
    // Q8_0's products go straight to 32 bits (`dot4`); the others sum in 16 bits first.
    let direct = kd.acc16 == 1 && !kd.int_scale;
    let mut acc = [L::fzero(); T];
    for s in 0..nsb {
        let base = p.add(s * kd.stride() * L::BYTES);
        let vec = |i: usize| L::load(base.add(i * L::BYTES));
        let mut isum = [L::zero(); T];
        let gsteps = kd.g / 4;
        for g in 0..kd.steps() / gsteps {
            let scale = if kd.int_scale {
                vec(kd.vals() + g)
            } else {
                L::ones16()
            };
            for f in 0..gsteps / kd.acc16 {
                let mut s16 = [L::zero(); T];
                for e in 0..kd.acc16 {
                    let step = g * gsteps + f * kd.acc16 + e;
                    let (u, neg) = if kd.signed {
                        (vec(2 * step + 1), L::neg(vec(2 * step)))
                    } else {
                        let u = vec(step);
                        (u, L::neg(u))
                    };
                    for i in 0..T {
                        let x4 = xs[i].add(s * kd.sb + 4 * step).cast::<i32>().read_unaligned();
                        let x = L::splat(x4);
                        let x = if kd.signed { L::sign(x, neg) } else { x };
                        if direct {
                            isum[i] = L::dot4(isum[i], u, x);
                        } else {
                            let pr = L::maddubs(u, x);
                            s16[i] = if e == 0 { pr } else { L::add16(s16[i], pr) };
                        }
                    }
                }
                if !direct {
                    for i in 0..T {
                        isum[i] = L::wsum(isum[i], s16[i], scale);
                    }
                }
            }
        }
        let d = L::loadf(base.add(kd.at_d() * L::BYTES).cast());
        for i in 0..T {
            let dx = L::splatf(*a.d.as_ptr().add((r0 + i) * a.nb + s));
            acc[i] = L::fmadd(L::cvt(isum[i]), L::mul(d, dx), acc[i]);
        }
        if kd.int_mins {
            let dmin = L::loadf(base.add((kd.at_d() + 1) * L::BYTES).cast());
            for i in 0..T {
                let bs = if kd.mins32 {
                    a.bsums32.as_ptr().add((r0 + i) * a.k / 32 + 8 * s)
                } else {
                    a.bsums.as_ptr().add((r0 + i) * a.k / 16 + 16 * s)
                };
                let mut msum = L::zero();
                for q in 0..kd.min_pairs() {
                    let pair = L::splat(bs.add(2 * q).cast::<i32>().read_unaligned());
                    msum = L::wsum(msum, vec(kd.at_d() + 2 + q), pair);
                }
                let dx = L::splatf(*a.d.as_ptr().add((r0 + i) * a.nb + s));
                acc[i] = L::fnmadd(L::cvt(msum), L::mul(dmin, dx), acc[i]);
            }
        }
        if kd.float_mins {
            let mw = L::loadf(base.add((kd.at_d() + 1) * L::BYTES).cast());
            for i in 0..T {
                let sx = L::splatf(*a.s.as_ptr().add((r0 + i) * a.nb + s));
                acc[i] = L::fmadd(mw, sx, acc[i]);
            }
        }
    }
    for i in 0..T {
        L::store(y.add((r0 + i) * n + o0), acc[i], rows);
    }
}

/// Rows `lo..hi` of every token (`t`) through packed panels of eight rows; `buf` holds at
/// least [`panel_len`] vectors.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn panels<D: Dot, const TY: u32>(
    m: &Mat,
    a: &Acts,
    t: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
    buf: *mut V32,
) {
    let nsb = a.k / Kind::of(TY).sb;
    let mut o0 = lo;
    while o0 < hi {
        let rows = (hi - o0).min(PANEL_ROWS);
        pack_panel::<TY>(m, o0, rows, nsb, buf, 1);
        let mut r0 = 0;
        while r0 + TILE_T <= t {
            panel_tile::<Narrow<D>, TY, TILE_T>(buf.cast(), nsb, a, r0, y, m.n, o0, rows);
            r0 += TILE_T;
        }
        match t - r0 {
            0 => {}
            1 => panel_tile::<Narrow<D>, TY, 1>(buf.cast(), nsb, a, r0, y, m.n, o0, rows),
            2 => panel_tile::<Narrow<D>, TY, 2>(buf.cast(), nsb, a, r0, y, m.n, o0, rows),
            _ => panel_tile::<Narrow<D>, TY, 3>(buf.cast(), nsb, a, r0, y, m.n, o0, rows),
        }
        o0 += rows;
    }
}

/// Rows of a wide panel: two packed panels side by side, vector for vector, so that one
/// 512-bit vector holds the same step of sixteen rows (lanes 0..8 the first panel's rows).
const WIDE_ROWS: usize = 2 * PANEL_ROWS;

/// [`panels`] with VNNI: sixteen rows at a time through 512-bit [`panel_tile`]s,
/// the last `< 16` rows through the eight-row panels. `buf` holds [`panel_buf_len`] vectors.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn panels_wide<const TY: u32>(
    m: &Mat,
    a: &Acts,
    t: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
    buf: *mut V32,
) {
    let nsb = a.k / Kind::of(TY).sb;
    // Two panels written into alternate vectors: vector `j` of the wide panel is vector `j`
    // of the first eight rows, then of the next eight.
    let wide = buf.add(buf.align_offset(64));
    let mut o0 = lo;
    while o0 + WIDE_ROWS <= hi {
        pack_panel::<TY>(m, o0, PANEL_ROWS, nsb, wide, 2);
        pack_panel::<TY>(m, o0 + PANEL_ROWS, PANEL_ROWS, nsb, wide.add(1), 2);
        let wide = wide.cast::<u8>();
        let mut r0 = 0;
        while r0 + TILE_T <= t {
            panel_tile::<Wide, TY, TILE_T>(wide, nsb, a, r0, y, m.n, o0, WIDE_ROWS);
            r0 += TILE_T;
        }
        match t - r0 {
            0 => {}
            1 => panel_tile::<Wide, TY, 1>(wide, nsb, a, r0, y, m.n, o0, WIDE_ROWS),
            2 => panel_tile::<Wide, TY, 2>(wide, nsb, a, r0, y, m.n, o0, WIDE_ROWS),
            _ => panel_tile::<Wide, TY, 3>(wide, nsb, a, r0, y, m.n, o0, WIDE_ROWS),
        }
        o0 += WIDE_ROWS;
    }
    if o0 < hi {
        panels::<Vnni, TY>(m, a, t, o0, hi, y, buf);
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn panels_any<D: Dot>(m: &Mat, a: &Acts, t: usize, lo: usize, hi: usize, y: *mut f32, buf: *mut V32) {
    macro_rules! go {
        ($($ty:literal),*) => {
            match m.ty.id() {
                $($ty => panels::<D, $ty>(m, a, t, lo, hi, y, buf),)*
                _ => unreachable!("{}", m.ty),
            }
        };
    }
    // Not Q4_1 (3) or Q5_1 (7): see [`has_panel`].
    go!(2, 6, 8, 10, 11, 12, 13, 14)
}

/// Rows `lo..hi` of `y` for all `t` tokens through packed panels, with AVX2.
///
/// # Safety
/// As [`rows_avx2`]; `buf` is valid for [`panel_len`] vectors of writes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn panels_avx2(
    m: &Mat,
    a: &Acts,
    t: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
    buf: *mut V32,
) {
    panels_any::<Avx2>(m, a, t, lo, hi, y, buf)
}

/// [`panels_avx2`] with AVX-512 VNNI (256-bit EVEX forms).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL/VNNI, AVX2, FMA, F16C; otherwise as [`panels_avx2`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn panels_vnni(
    m: &Mat,
    a: &Acts,
    t: usize,
    lo: usize,
    hi: usize,
    y: *mut f32,
    buf: *mut V32,
) {
    macro_rules! go {
        ($($ty:literal),*) => {
            match m.ty.id() {
                $($ty => panels_wide::<$ty>(m, a, t, lo, hi, y, buf),)*
                _ => unreachable!("{}", m.ty),
            }
        };
    }
    // As [`panels_any`].
    go!(2, 6, 8, 10, 11, 12, 13, 14)
}
