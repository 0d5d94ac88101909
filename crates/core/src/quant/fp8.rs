//! The float8 e4m3fn encoding of Meta's FP8 checkpoints: exact values of the codes, and
//! rounding f32 to a code.

use super::round_half_even;

/// The largest finite float8 e4m3fn value.
pub const FP8_MAX: f32 = 448.0;

/// The value of float8 e4m3fn code `c` (bias 7, no infinities; `0x7f` and `0xff` are NaN), exactly.
pub const fn fp8_e4m3_value(c: u8) -> f32 {
    let sign = ((c as u32) & 0x80) << 24;
    let e = ((c >> 3) & 0x0f) as u32;
    let m = (c & 0x07) as u32;
    let mag = if e == 0x0f && m == 0x07 {
        // The bits PyTorch's conversion produces, so tables compare bit for bit.
        0x7ff0_0000
    } else if e == 0 {
        if m == 0 {
            0
        } else {
            // Subnormal m · 2^-9: normalise around the leading bit p of m.
            let p = 31 - m.leading_zeros();
            ((p + 127 - 9) << 23) | ((m - (1 << p)) << (23 - p))
        }
    } else {
        // (1 + m/8) · 2^(e - 7): rebias the exponent, widen the mantissa.
        ((e + 120) << 23) | (m << 20)
    };
    f32::from_bits(sign | mag)
}

/// [`fp8_e4m3_value`] of every code.
pub static FP8_E4M3_TABLE: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = fp8_e4m3_value(c as u8);
        c += 1;
    }
    t
};

/// The float8 e4m3fn code nearest to `v` (ties to even), saturating: magnitudes above 448,
/// infinities included, give ±448, as PyTorch's `.to(torch.float8_e4m3fn)`; NaN gives NaN
/// (`0x7f`, with `v`'s sign).
pub fn fp8_e4m3_from_f32(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    if a.is_nan() {
        return sign | 0x7f;
    }
    if a >= FP8_MAX {
        return sign | 0x7e;
    }
    // 2^-6 is the smallest normal: below it the step is 2^-9, and code m is m · 2^-9 (m = 8 is
    // the smallest normal, so rounding up into it needs no special case).
    let code = if a < 0.015_625 {
        round_half_even(a * 512.0) as u32
    } else {
        // Exponent e in -6..=8; the mantissa in [1, 2) and its 3-bit rounding m in 0..=8 (8
        // carries into e), every step exact in f32.
        let bits = a.to_bits();
        let e = (bits >> 23) as i32 - 127;
        let mant = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
        let m = round_half_even((mant - 1.0) * 8.0) as u32;
        (((e + 7) as u32) << 3) + m
    };
    // `a < 448` keeps the code at or below 0x7e (448 itself).
    sign | code as u8
}
