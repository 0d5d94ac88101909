//! The vector vocabulary the kernel bodies are written in, implemented once per instruction set.
//!
//! Every kernel body is generic over [`Simd`] and marked `#[inline(always)]`; thin
//! `#[target_feature]` entry points instantiate it, so the intrinsics below inline into code
//! compiled for the right ISA. The [`Portable`] implementation uses fixed-size arrays that the
//! compiler auto-vectorises for the baseline target; it is also the non-x86 path.

#![allow(clippy::missing_safety_doc)]

use half::{bf16, f16};

/// Lanes of the widest vector any implementation uses (stack buffers are sized for it).
pub(crate) const MAX_LANES: usize = 16;

/// A vector of `LANES` f32 with the operations the kernels need.
///
/// All methods are `unsafe`: the caller guarantees the CPU supports the implementation's ISA
/// (checked once by dispatch) and that pointers are valid for `LANES` elements.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// f32 lanes per vector.
    const LANES: usize;
    /// Token rows of the GEMM microkernel (its tile is `MR × 2·LANES`, sized to the register file).
    const MR: usize;
    /// The register type.
    type V: Copy;

    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `LANES` bf16 widened exactly (a 16-bit shift).
    unsafe fn load_bf16(p: *const bf16) -> Self::V;
    /// `LANES` f16 widened exactly.
    unsafe fn load_f16(p: *const f16) -> Self::V;
    /// `LANES` int8 widened exactly.
    unsafe fn load_i8(p: *const i8) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b + c` with one rounding.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> f32;
    unsafe fn hmax(v: Self::V) -> f32;
    /// Round to nearest (ties to even).
    unsafe fn round(v: Self::V) -> Self::V;
    /// `2^n` for integral `n` in `[-126, 127]`.
    unsafe fn pow2(n: Self::V) -> Self::V;
    /// Lane-wise `if a < b { x } else { y }` (false for NaN).
    unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    unsafe fn abs(v: Self::V) -> Self::V;
    /// Transposes the `LANES × LANES` block held in `rows[..LANES]` in place.
    unsafe fn transpose(rows: &mut [Self::V; MAX_LANES]);
    /// Whether `a > b` in any lane (false for NaN). By default through [`Simd::hmax`]; an ISA
    /// may use a compare and a lane mask.
    #[inline(always)]
    unsafe fn any_gt(a: Self::V, b: Self::V) -> bool {
        Self::hmax(Self::select_lt(b, a, Self::splat(1.0), Self::splat(0.0))) > 0.0
    }
    /// The vector whose lane `j` is the sum of the lanes of `rows[j]` (`j < LANES`): `LANES`
    /// horizontal sums at once. By default a transpose and `LANES − 1` adds; an ISA may use a
    /// cheaper shuffle-add tree (the order of the additions may differ).
    #[inline(always)]
    unsafe fn sum_each(rows: &[Self::V; MAX_LANES]) -> Self::V {
        let mut t = *rows;
        Self::transpose(&mut t);
        let mut sum = t[0];
        for a in &t[1..Self::LANES] {
            sum = Self::add(sum, *a);
        }
        sum
    }
    /// The integer dot products of query `q` with each of `n <= LANES` int8 keys of `d`
    /// elements at `k` (key `j` at `k + j·d`; `d` divides 32), one key per lane as f32 (exact:
    /// at most 32 · 127² in magnitude), lanes from `n` on 0. By default scalar; an ISA may
    /// multiply 32 bytes at a time.
    #[inline(always)]
    unsafe fn dots_i8(q: &QueryI8, k: *const i8, n: usize, d: usize) -> Self::V {
        dots_i8_scalar::<Self>(q, k, n, d)
    }
}

/// [`Simd::dots_i8`] one key and one element at a time: the scalar twin.
///
/// # Safety
/// As [`Simd::dots_i8`].
#[inline(always)]
pub(crate) unsafe fn dots_i8_scalar<S: Simd>(q: &QueryI8, k: *const i8, n: usize, d: usize) -> S::V {
    let mut out = [0f32; MAX_LANES];
    for (j, o) in out.iter_mut().enumerate().take(n) {
        let key = std::slice::from_raw_parts(k.add(j * d), d);
        *o = key
            .iter()
            .zip(&q.val)
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum::<i32>() as f32;
    }
    S::load(out.as_ptr())
}

/// A query row quantised for integer dot products with int8 keys of a head dim that divides
/// 32: `q ≈ scale · v`, `v` in `-127..=127` (as [`crate::quantize_q8`] rounds), repeated to fill
/// 32 bytes. Kept twice, as `|v|` and as `v`: x86's byte multiply wants one operand unsigned,
/// and `|v_i| · (sign(v_i) · k_i) = v_i · k_i`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(32))]
pub(crate) struct QueryI8 {
    /// `|v|`, repeated.
    pub(crate) abs: [u8; 32],
    /// `v`, repeated.
    pub(crate) val: [i8; 32],
    /// The scale of `v`.
    pub(crate) scale: f32,
}

impl QueryI8 {
    /// `x` (`[d]`, `d` dividing 32) quantised.
    pub(crate) fn new(x: &[f32]) -> Self {
        let d = x.len();
        debug_assert!(d > 0 && 32 % d == 0);
        let mut q = QueryI8::default();
        q.scale = crate::quantize_q8(x, &mut q.val[..d]);
        for i in d..32 {
            q.val[i] = q.val[i - d];
        }
        for (a, &v) in q.abs.iter_mut().zip(&q.val) {
            *a = v.unsigned_abs();
        }
        q
    }
}

/// Hints the cache line holding `p` into L1. Never faults, so `p` may point anywhere.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64; a prefetch does not access memory architecturally.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A stored weight element that widens exactly to f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// `S::LANES` elements from `p`, widened.
    unsafe fn load<S: Simd>(p: *const Self) -> S::V;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        S::load(p)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        S::load_bf16(p)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        S::load_f16(p)
    }
}

impl Elem for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const Self) -> S::V {
        S::load_i8(p)
    }
}

/// The first `n < LANES` elements at `p`, the other lanes set to `fill`.
#[inline(always)]
pub(crate) unsafe fn load_partial<S: Simd>(p: *const f32, n: usize, fill: f32) -> S::V {
    let mut buf = [fill; MAX_LANES];
    std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
    S::load(buf.as_ptr())
}

/// Stores the first `n < LANES` lanes of `v` at `p`.
#[inline(always)]
pub(crate) unsafe fn store_partial<S: Simd>(p: *mut f32, n: usize, v: S::V) {
    let mut buf = [0f32; MAX_LANES];
    S::store(buf.as_mut_ptr(), v);
    std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
}

/// `e^x`, Cephes-style: `x = n·ln2 + r`, a degree-7 polynomial for `e^r`, `2^n` through the
/// exponent bits. About 1 ulp over the normal range; inputs below −87.33 give 0 (so `-inf`
/// gives 0, as softmax needs), inputs above 88 saturate at `e^88`.
#[inline(always)]
pub(crate) unsafe fn exp<S: Simd>(x: S::V) -> S::V {
    let lo = S::splat(-87.33);
    let xc = S::min(S::max(x, lo), S::splat(88.0));
    let n = S::round(S::mul(xc, S::splat(std::f32::consts::LOG2_E)));
    // ln 2 split in a part exact in f32 products and the remainder.
    let r = S::fma(n, S::splat(-0.693_359_4), xc);
    let r = S::fma(n, S::splat(2.121_944_4e-4), r);
    let mut p = S::splat(1.987_569_1e-4);
    p = S::fma(p, r, S::splat(1.398_199_9e-3));
    p = S::fma(p, r, S::splat(8.333_452e-3));
    p = S::fma(p, r, S::splat(4.166_579_6e-2));
    p = S::fma(p, r, S::splat(1.666_666_5e-1));
    p = S::fma(p, r, S::splat(0.5));
    let y = S::add(S::fma(p, S::mul(r, r), r), S::splat(1.0));
    let y = S::mul(y, S::pow2(n));
    S::select_lt(x, lo, S::splat(0.0), y)
}

/// `x · sigmoid(x) = x / (1 + e^{-x})`.
#[inline(always)]
pub(crate) unsafe fn silu<S: Simd>(x: S::V) -> S::V {
    let e = exp::<S>(S::sub(S::splat(0.0), x));
    S::div(x, S::add(S::splat(1.0), e))
}

/// `erf(z)` to about 1.5e-7 absolute: a Taylor series for `|z| < 0.5` (truncation < 2e-8),
/// Abramowitz & Stegun 7.1.26 above it.
#[inline(always)]
pub(crate) unsafe fn erf<S: Simd>(z: S::V) -> S::V {
    let a = S::abs(z);
    // Taylor: 2/√π · z · (1 − z²/3 + z⁴/10 − z⁶/42 + z⁸/216 − z¹⁰/1320).
    let z2 = S::mul(z, z);
    let mut q = S::splat(-1.0 / 1320.0);
    q = S::fma(q, z2, S::splat(1.0 / 216.0));
    q = S::fma(q, z2, S::splat(-1.0 / 42.0));
    q = S::fma(q, z2, S::splat(1.0 / 10.0));
    q = S::fma(q, z2, S::splat(-1.0 / 3.0));
    q = S::fma(q, z2, S::splat(1.0));
    let small = S::mul(S::mul(q, z), S::splat(std::f32::consts::FRAC_2_SQRT_PI));
    // A&S 7.1.26 on |z|, sign restored below.
    let t = S::div(S::splat(1.0), S::fma(S::splat(0.327_591_1), a, S::splat(1.0)));
    let mut p = S::splat(1.061_405_4);
    p = S::fma(p, t, S::splat(-1.453_152));
    p = S::fma(p, t, S::splat(1.421_413_8));
    p = S::fma(p, t, S::splat(-0.284_496_74));
    p = S::fma(p, t, S::splat(0.254_829_6));
    p = S::mul(p, t);
    let e = exp::<S>(S::sub(S::splat(0.0), z2));
    let big = S::sub(S::splat(1.0), S::mul(p, e));
    let big = S::select_lt(z, S::splat(0.0), S::sub(S::splat(0.0), big), big);
    S::select_lt(a, S::splat(0.5), small, big)
}

/// Exact-form GELU `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub(crate) unsafe fn gelu<S: Simd>(x: S::V) -> S::V {
    let e = erf::<S>(S::mul(x, S::splat(std::f32::consts::FRAC_1_SQRT_2)));
    S::mul(S::mul(S::splat(0.5), x), S::add(S::splat(1.0), e))
}

/// The baseline: arrays of 8 f32, plain loops the compiler vectorises for the default target.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

const PL: usize = 8;

#[inline(always)]
fn map2(a: [f32; PL], b: [f32; PL], f: impl Fn(f32, f32) -> f32) -> [f32; PL] {
    std::array::from_fn(|i| f(a[i], b[i]))
}

impl Simd for Portable {
    const LANES: usize = PL;
    const MR: usize = 4;
    type V = [f32; PL];

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; PL]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const [f32; PL])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut [f32; PL], v)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> Self::V {
        let v = std::ptr::read_unaligned(p as *const [bf16; PL]);
        v.map(Elem::to_f32)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self::V {
        let v = std::ptr::read_unaligned(p as *const [f16; PL]);
        v.map(f16::to_f32)
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> Self::V {
        let v = std::ptr::read_unaligned(p as *const [i8; PL]);
        v.map(f32::from)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |a, b| a + b)
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |a, b| a - b)
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |a, b| a * b)
    }
    #[inline(always)]
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |a, b| a / b)
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |a, b| if a > b { a } else { b })
    }
    #[inline(always)]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        map2(a, b, |a, b| if a < b { a } else { b })
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // Without a guaranteed FMA unit a separate multiply and add is faster than the libm
        // fallback of `mul_add`; the result differs by at most one rounding.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn hsum(v: Self::V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn hmax(v: Self::V) -> f32 {
        v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
    #[inline(always)]
    unsafe fn round(v: Self::V) -> Self::V {
        v.map(f32::round_ties_even)
    }
    #[inline(always)]
    unsafe fn pow2(n: Self::V) -> Self::V {
        n.map(|n| f32::from_bits(((n as i32 + 127) as u32) << 23))
    }
    #[inline(always)]
    unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] < b[i] { x[i] } else { y[i] })
    }
    #[inline(always)]
    unsafe fn abs(v: Self::V) -> Self::V {
        v.map(f32::abs)
    }
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // a swap across two indices reads clearest indexed
    unsafe fn transpose(rows: &mut [Self::V; MAX_LANES]) {
        for i in 0..PL {
            for j in i + 1..PL {
                let t = rows[i][j];
                rows[i][j] = rows[j][i];
                rows[j][i] = t;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QueryI8, Simd, MAX_LANES};
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// AVX2 + FMA + F16C, 8 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    impl Simd for Avx2 {
        const LANES: usize = 8;
        // 6 × 2 accumulators + 2 weight vectors + 1 broadcast = 15 of 16 registers.
        const MR: usize = 6;
        type V = __m256;

        #[inline(always)]
        unsafe fn splat(x: f32) -> Self::V {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self::V {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self::V) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const bf16) -> Self::V {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self::V {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self::V {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
        }
        #[inline(always)]
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
            _mm256_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
            _mm256_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn hsum(v: Self::V) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn hmax(v: Self::V) -> f32 {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn round(v: Self::V) -> Self::V {
            _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
        }
        #[inline(always)]
        unsafe fn pow2(n: Self::V) -> Self::V {
            let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
        }
        #[inline(always)]
        unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
            _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_LT_OQ>(a, b))
        }
        #[inline(always)]
        unsafe fn abs(v: Self::V) -> Self::V {
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
        }
        #[inline(always)]
        unsafe fn transpose(r: &mut [Self::V; MAX_LANES]) {
            // 32-bit then 64-bit interleaves inside 128-bit halves, then swap halves.
            let mut u = [_mm256_setzero_ps(); 8];
            for g in 0..2 {
                let b = 4 * g;
                let t0 = _mm256_unpacklo_ps(r[b], r[b + 1]);
                let t1 = _mm256_unpackhi_ps(r[b], r[b + 1]);
                let t2 = _mm256_unpacklo_ps(r[b + 2], r[b + 3]);
                let t3 = _mm256_unpackhi_ps(r[b + 2], r[b + 3]);
                u[b] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
                u[b + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
                u[b + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
                u[b + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
            }
            for c in 0..4 {
                r[c] = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
                r[4 + c] = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
            }
        }
        #[inline(always)]
        unsafe fn any_gt(a: Self::V, b: Self::V) -> bool {
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a, b)) != 0
        }
        #[inline(always)]
        unsafe fn sum_each(r: &[Self::V; MAX_LANES]) -> Self::V {
            // Pairs of rows interleaved and added (lanes: a0+a2, b0+b2, a1+a3, b1+b3 per
            // 128-bit half), then pairs of pairs, then the two halves: 14 shuffles and 7 adds
            // where a full transpose takes 24 shuffles before its adds.
            let pair =
                |a: __m256, b: __m256| _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let quad = |a: __m256, b: __m256| {
                let (a, b) = (_mm256_castps_pd(a), _mm256_castps_pd(b));
                _mm256_add_ps(
                    _mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                    _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)),
                )
            };
            let lo = quad(pair(r[0], r[1]), pair(r[2], r[3]));
            let hi = quad(pair(r[4], r[5]), pair(r[6], r[7]));
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(lo, hi),
                _mm256_permute2f128_ps::<0x31>(lo, hi),
            )
        }
        #[inline(always)]
        unsafe fn dots_i8(q: &QueryI8, k: *const i8, n: usize, d: usize) -> Self::V {
            if n != 8 || !matches!(d, 8 | 16 | 32) {
                // A block's tail (or a dim whose keys do not tile 32 bytes).
                return super::dots_i8_scalar::<Self>(q, k, n, d);
            }
            // The block's 8·d bytes are contiguous and `q` repeats every d bytes: 32 bytes at
            // a time, products of byte pairs (at most 2 · 127², no saturation), then sums of
            // four. Each i32 holds four elements of one key.
            let abs = _mm256_load_si256(q.abs.as_ptr().cast());
            let val = _mm256_load_si256(q.val.as_ptr().cast());
            let ones = _mm256_set1_epi16(1);
            let w = |m: usize| {
                let kk = _mm256_loadu_si256(k.add(32 * m).cast());
                _mm256_madd_epi16(_mm256_maddubs_epi16(abs, _mm256_sign_epi8(kk, val)), ones)
            };
            // Pairwise sums within 128-bit halves until one i32 per key remains; the lanes
            // come out permuted and are put back in key order.
            let sums = match d {
                8 => {
                    // [k0 k1 k4 k5 | k2 k3 k6 k7]
                    let h = _mm256_hadd_epi32(w(0), w(1));
                    _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7))
                }
                16 => {
                    // [k0 k2 k4 k6 | k1 k3 k5 k7]
                    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(w(0), w(1)), _mm256_hadd_epi32(w(2), w(3)));
                    _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
                }
                _ => {
                    // Keys 0-3 as [first halves | second halves], then 4-7.
                    let a = _mm256_hadd_epi32(_mm256_hadd_epi32(w(0), w(1)), _mm256_hadd_epi32(w(2), w(3)));
                    let b = _mm256_hadd_epi32(_mm256_hadd_epi32(w(4), w(5)), _mm256_hadd_epi32(w(6), w(7)));
                    _mm256_add_epi32(
                        _mm256_permute2x128_si256::<0x20>(a, b),
                        _mm256_permute2x128_si256::<0x31>(a, b),
                    )
                }
            };
            _mm256_cvtepi32_ps(sums)
        }
    }

    /// AVX-512F (with BW/DQ/VL), 16 lanes.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512;

    impl Simd for Avx512 {
        const LANES: usize = 16;
        // 12 × 2 accumulators + 2 weight vectors + broadcasts fit the 32 registers.
        const MR: usize = 12;
        type V = __m512;

        #[inline(always)]
        unsafe fn splat(x: f32) -> Self::V {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self::V {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self::V) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const bf16) -> Self::V {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self::V {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self::V {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
        }
        #[inline(always)]
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
            _mm512_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
            _mm512_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn hsum(v: Self::V) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        unsafe fn hmax(v: Self::V) -> f32 {
            _mm512_reduce_max_ps(v)
        }
        #[inline(always)]
        unsafe fn round(v: Self::V) -> Self::V {
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
        }
        #[inline(always)]
        unsafe fn pow2(n: Self::V) -> Self::V {
            let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
        }
        #[inline(always)]
        unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b), y, x)
        }
        #[inline(always)]
        unsafe fn abs(v: Self::V) -> Self::V {
            _mm512_abs_ps(v)
        }
        #[inline(always)]
        unsafe fn transpose(r: &mut [Self::V; MAX_LANES]) {
            // Stage 1–2: 4×4 transposes inside each 128-bit lane of every group of 4 rows;
            // afterwards lane L of u[4g + c] holds column 4L + c of rows 4g..4g + 4.
            let mut u = [_mm512_setzero_ps(); 16];
            for g in 0..4 {
                let b = 4 * g;
                let t0 = _mm512_unpacklo_ps(r[b], r[b + 1]);
                let t1 = _mm512_unpackhi_ps(r[b], r[b + 1]);
                let t2 = _mm512_unpacklo_ps(r[b + 2], r[b + 3]);
                let t3 = _mm512_unpackhi_ps(r[b + 2], r[b + 3]);
                u[b] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
                u[b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
                u[b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
                u[b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
            }
            // Stage 3–4: gather lane L of u[c], u[4+c], u[8+c], u[12+c] into output row 4L + c.
            for c in 0..4 {
                let wa = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
                let wb = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
                let xa = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
                let xb = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
                r[c] = _mm512_shuffle_f32x4::<0x88>(wa, xa);
                r[4 + c] = _mm512_shuffle_f32x4::<0xDD>(wa, xa);
                r[8 + c] = _mm512_shuffle_f32x4::<0x88>(wb, xb);
                r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(wb, xb);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// AVX2's byte-multiply dots against the scalar twin, at every head dim the decode kernel
    /// takes and every block fill, with the extremes `±127` reachable on both sides.
    fn check(d: usize, n: usize, q: &[f32], k: &[i8]) {
        let qi = QueryI8::new(&q[..d]);
        let mut want = [0f32; MAX_LANES];
        let mut got = [0f32; MAX_LANES];
        // SAFETY: the portable vocabulary needs no CPU feature; `k` holds 8 keys of `d`.
        unsafe { Portable::store(want.as_mut_ptr(), Portable::dots_i8(&qi, k.as_ptr(), n, d)) };
        // The scalar twin's meaning: lane j is v · k_j exactly.
        for (j, &w) in want.iter().enumerate().take(n) {
            let exact: i32 = (0..d).map(|i| qi.val[i] as i32 * k[j * d + i] as i32).sum();
            assert_eq!(w, exact as f32, "d {d} n {n} lane {j}");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(qi: &QueryI8, k: *const i8, n: usize, d: usize, out: *mut f32) {
                Avx2::store(out, Avx2::dots_i8(qi, k, n, d))
            }
            // SAFETY: AVX2 and FMA were detected just above.
            unsafe { avx2(&qi, k.as_ptr(), n, d, got.as_mut_ptr()) };
            assert_eq!(&got[..8], &want[..8], "d {d} n {n}");
        }
    }

    proptest! {
        #[test]
        fn avx2_int8_dots_equal_the_scalar_twin(
            d in prop::sample::select(vec![8usize, 16, 24, 32]),
            n in 1usize..=8,
            q in prop::collection::vec(-2.0f32..2.0, 32),
            k in prop::collection::vec(-127i8..=127, 256),
        ) {
            check(d, n, &q, &k);
        }
    }

    #[test]
    fn int8_dots_hold_the_largest_products() {
        // |v| = 127 against keys of ±127: each byte pair sums to ±32258, within i16.
        for d in [8, 16, 24, 32] {
            let q: Vec<f32> = (0..d).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
            let k: Vec<i8> = (0..8 * d).map(|i| if i % 5 == 0 { -127 } else { 127 }).collect();
            check(d, 8, &q, &k);
        }
    }
}
