//! Antialiased bilinear resize of 8-bit images, bit-exact with torch's native uint8 path
//! (`_upsample_bilinear2d_aa` on CPUs with AVX2/AVX-512, which torchvision uses for uint8 input).
//!
//! Separable: a horizontal pass then a vertical one, each skipped when that side keeps its size.
//! Per output pixel `i` of a pass with `scale = in / out`: the triangle filter is stretched to
//! `support = max(scale, 1)`, centred at `scale·(i + 0.5)`; weights are normalised to sum 1 in f64,
//! then quantised to i16 fixed point with the most precision bits that keep the largest weight
//! under 2¹⁵; output = `clamp((2^(p−1) + Σ w·x) >> p, 0, 255)`.

use ndarray::{Array3, ArrayView3};

/// One pass's taps: for each output index, the first input index and its integer weights.
struct Taps {
    starts: Vec<usize>,
    /// `weights[i * width..][..width]`, zero-padded.
    weights: Vec<i32>,
    width: usize,
    precision: u32,
}

fn taps(input: usize, output: usize) -> Taps {
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let inv_scale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let width = support.ceil() as usize * 2 + 1;
    let mut starts = Vec::with_capacity(output);
    let mut float = vec![0f64; output * width];
    let mut max_weight = 0f64;
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        // `as i64` truncates toward zero, as the C++ `static_cast<int64_t>` does.
        let lo = ((center - support + 0.5) as i64).max(0);
        let hi = ((center + support + 0.5) as i64).min(input as i64);
        let count = (hi - lo).clamp(0, width as i64) as usize;
        let row = &mut float[i * width..(i + 1) * width];
        let mut total = 0f64;
        for (j, w) in row.iter_mut().take(count).enumerate() {
            let x = ((j as i64 + lo) as f64 - center + 0.5) * inv_scale;
            let x = x.abs();
            *w = if x < 1.0 { 1.0 - x } else { 0.0 };
            total += *w;
        }
        if total != 0.0 {
            for w in row.iter_mut().take(count) {
                *w /= total;
                max_weight = max_weight.max(*w);
            }
        }
        starts.push(lo as usize);
    }
    let mut precision = 0u32;
    while precision < 22 {
        if (0.5 + max_weight * f64::from(1u32 << (precision + 1))) as i64 >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let weights = float
        .iter()
        .map(|&w| {
            let v = w * f64::from(1u32 << precision);
            if v < 0.0 {
                (-0.5 + v) as i32
            } else {
                (0.5 + v) as i32
            }
        })
        .collect();
    Taps {
        starts,
        weights,
        width,
        precision,
    }
}

/// Resamples `src` along its last axis (`along_rows == false`) or its middle axis.
fn pass(src: ArrayView3<u8>, out_len: usize, along_last: bool) -> Array3<u8> {
    let (c, h, w) = src.dim();
    let in_len = if along_last { w } else { h };
    let t = taps(in_len, out_len);
    let shape = if along_last {
        (c, h, out_len)
    } else {
        (c, out_len, w)
    };
    let mut dst = Array3::<u8>::zeros(shape);
    let round = 1i32 << (t.precision.max(1) - 1);
    let tap = |i: usize| {
        let start = t.starts[i];
        let ws = &t.weights[i * t.width..(i + 1) * t.width];
        let n = ws.len().min(in_len.saturating_sub(start));
        (start, &ws[..n])
    };
    for ch in 0..c {
        for y in 0..shape.1 {
            for x in 0..shape.2 {
                let (start, ws) = tap(if along_last { x } else { y });
                let mut acc = round;
                for (k, &wk) in ws.iter().enumerate() {
                    let v = if along_last {
                        src[[ch, y, start + k]]
                    } else {
                        src[[ch, start + k, x]]
                    };
                    acc += i32::from(v) * wk;
                }
                dst[[ch, y, x]] = (acc >> t.precision).clamp(0, 255) as u8;
            }
        }
    }
    dst
}

/// Resizes a channel-first 8-bit image to `height × width` with antialiased bilinear filtering,
/// bit-exact with `torchvision.transforms.v2.functional.resize(uint8, antialias=True)` on CPUs
/// where torch resizes uint8 natively (x86 with AVX2 or AVX-512, aarch64).
///
/// # Shapes
/// `src: [C, H, W]` → `[C, height, width]`; the same size returns a copy.
pub fn resize_bilinear_aa(src: ArrayView3<u8>, height: usize, width: usize) -> Array3<u8> {
    let (_, h, w) = src.dim();
    let mut out = src.to_owned();
    if width != w {
        out = pass(out.view(), width, true);
    }
    if height != h {
        out = pass(out.view(), height, false);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(10, 3), (3, 10), (336, 336), (1, 7), (500, 224), (7, 1)] {
            let t = taps(input, output);
            for i in 0..output {
                let s: i32 = t.weights[i * t.width..(i + 1) * t.width].iter().sum();
                let one = 1i32 << t.precision;
                // Rounding each weight moves the sum by at most half a unit per tap.
                assert!(
                    (s - one).abs() <= t.width as i32,
                    "{input}->{output} row {i}: {s} vs {one}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = Array3::<u8>::from_elem((3, 17, 29), 200);
        for (h, w) in [(5, 9), (40, 70), (17, 3), (1, 1)] {
            let out = resize_bilinear_aa(src.view(), h, w);
            assert!(out.iter().all(|&v| v == 200), "{h}×{w}");
        }
    }
}
