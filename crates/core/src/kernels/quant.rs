//! `y = x · Wᵀ` for quantised `[out, in]` weights (see [`crate::quant`] for the arithmetic).
//!
//! Each token's activations are quantised to int8 per group once per call; output rows are then
//! split across tasks, each row a sum over groups of an integer dot product times two scales.

use std::cell::Cell;

use rayon::prelude::*;

use super::linear::SyncPtr;
use super::Isa;
use crate::quant::{quantize_activations, QuantData, QuantFormat};

/// Below this many multiply-adds a call runs on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 17;

thread_local! {
    /// Quantised activations of the current call (reused: no allocation per token).
    static ACT: Cell<(Vec<i8>, Vec<f32>)> = const { Cell::new((Vec::new(), Vec::new())) };
}

/// Quantised activations of all tokens of a call.
struct Acts<'a> {
    /// `[t, k]` int8.
    q: &'a [i8],
    /// `[t, k / group]` scales.
    s: &'a [f32],
}

/// `y[t, n] = x[t, k] · Wᵀ` for quantised `w` (`[n, k]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    _isa: Isa,
    tasks: Option<usize>,
    x: &[f32],
    t: usize,
    k: usize,
    n: usize,
    w: &QuantData,
    y: &mut [f32],
) {
    let g = w.group();
    let groups = k / g;
    let (mut qx, mut sx) = ACT.with(Cell::take);
    qx.resize(t * k, 0);
    sx.resize(t * groups, 0.0);
    for r in 0..t {
        quantize_activations(
            &x[r * k..(r + 1) * k],
            g,
            &mut qx[r * k..(r + 1) * k],
            &mut sx[r * groups..(r + 1) * groups],
        );
    }
    let acts = Acts { q: &qx, s: &sx };
    let tasks = tasks.unwrap_or_else(|| {
        if t * k * n < MIN_PARALLEL_WORK {
            1
        } else {
            rayon::current_num_threads()
        }
    });
    let per = n.div_ceil(tasks.max(1)).max(1);
    let count = n.div_ceil(per);
    let yp = SyncPtr(y.as_mut_ptr());
    let run = |i: usize| {
        let (lo, hi) = (i * per, ((i + 1) * per).min(n));
        // SAFETY: tasks write disjoint output columns `lo..hi` of the `t × n` output.
        unsafe { rows_portable(&acts, t, k, n, w, lo, hi, yp.get()) };
    };
    if count <= 1 {
        run(0);
    } else {
        (0..count).into_par_iter().for_each(run);
    }
    ACT.with(|c| c.set((qx, sx)));
}

/// Output columns `lo..hi` of every token, scalar integer dots.
///
/// # Safety
/// `y` is valid for `t · n` writes; no other task writes columns `lo..hi`.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_portable(
    acts: &Acts,
    t: usize,
    k: usize,
    n: usize,
    w: &QuantData,
    lo: usize,
    hi: usize,
    y: *mut f32,
) {
    let g = w.group();
    let groups = k / g;
    let values = w.values();
    let scales = w.scales();
    for o in lo..hi {
        for r in 0..t {
            let qx = &acts.q[r * k..(r + 1) * k];
            let sx = &acts.s[r * groups..(r + 1) * groups];
            let mut acc = 0f32;
            for gi in 0..groups {
                let xs = &qx[gi * g..(gi + 1) * g];
                let start = o * k + gi * g;
                let isum: i32 = match w.format() {
                    QuantFormat::Q8 => values[start..start + g]
                        .iter()
                        .zip(xs)
                        .map(|(&b, &a)| b as i8 as i32 * a as i32)
                        .sum(),
                    QuantFormat::Q4 => values[start / 2..(start + g) / 2]
                        .iter()
                        .zip(xs.chunks_exact(2))
                        .map(|(&b, a)| {
                            ((b & 0x0f) as i32 - 8) * a[0] as i32 + ((b >> 4) as i32 - 8) * a[1] as i32
                        })
                        .sum(),
                };
                acc += scales.get(o * groups + gi) * sx[gi] * isum as f32;
            }
            *y.add(r * n + o) = acc;
        }
    }
}
