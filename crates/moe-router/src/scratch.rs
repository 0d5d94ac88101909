//! Buffers reused across feed-forward calls, so that a decode step allocates nothing.

use llama4_core::scratch::prefix;
use ndarray::{ArrayView2, ArrayViewMut2};

use crate::experts::{shape_err, ExpertScratch};
use crate::{Error, ExpertGroups, Result, Routing};

/// Reusable buffers for feed-forward calls (router logits, routing, groups, expert and MLP
/// intermediates): pass the same one to every call; calls with no more tokens than an
/// earlier one allocate nothing.
///
/// One per sequence (or per thread): calls borrow it mutably. Buffers only grow; drop the
/// value to release them. Sizes are taken per call, so one `Scratch` can serve layers of
/// different widths.
///
/// A feed-forward written outside this crate keeps its own buffers here too, so that it can be
/// as allocation-free as [`crate::Moe`]: [`Scratch::routing`] and [`Scratch::logits`] are what
/// a router fills ([`crate::Router::route_into`], [`Routing::refill`]), and
/// [`Scratch::extra`] is free for any other intermediates (grow them with
/// [`llama4_core::scratch::prefix`]). Nothing in this crate touches `extra`.
#[derive(Debug, Default)]
pub struct Scratch {
    /// A contiguous copy of a strided input `[T, H]` (unused for standard-layout inputs).
    pub(crate) input: Vec<f32>,
    /// The router's buffer (logits and temporaries).
    pub logits: Vec<f32>,
    /// The routing of the last call.
    pub routing: Routing,
    /// Buffers for components written outside this crate.
    pub extra: Vec<Vec<f32>>,
    pub(crate) groups: ExpertGroups,
    /// The output `[T, H]` when the caller's `out` is strided.
    pub(crate) output: Vec<f32>,
    pub(crate) work: Buffers,
}

/// Intermediates of running the shared expert and the routed experts.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    /// MLP `gate_proj` outputs `[T, I]`, then `silu(gate) · up`.
    pub(crate) gate: Vec<f32>,
    /// MLP `up_proj` outputs `[T, I]`.
    pub(crate) up: Vec<f32>,
    /// One expert's gathered (and possibly scaled) input rows `[n, H]`.
    pub(crate) gathered: Vec<f32>,
    pub(crate) experts: ExpertScratch,
}

/// `x` itself when it is in standard layout, else a contiguous copy in `buf`.
pub(crate) fn standard<'a>(x: ArrayView2<'a, f32>, buf: &'a mut Vec<f32>) -> Result<ArrayView2<'a, f32>> {
    if x.is_standard_layout() {
        return Ok(x);
    }
    let dim = x.dim();
    let dst = prefix(buf, x.len());
    dst.iter_mut().zip(x.iter()).for_each(|(d, &s)| *d = s);
    ArrayView2::from_shape(dim, &*dst).map_err(shape_err)
}

/// Checks that `out` is `[t, h]`.
pub(crate) fn check_output(out: (usize, usize), t: usize, h: usize) -> Result<()> {
    let checks = [("output rows (T)", t, out.0), ("output width (H)", h, out.1)];
    for (what, expected, got) in checks {
        if expected != got {
            return Err(Error::Mismatch { what, expected, got });
        }
    }
    Ok(())
}

/// Runs `f` on `out` as one row-major slice: `out`'s own memory when it is in standard layout,
/// else `buf`, copied into `out` afterwards.
pub(crate) fn with_standard_output(
    mut out: ArrayViewMut2<f32>,
    buf: &mut Vec<f32>,
    f: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<()> {
    if let Some(s) = out.as_slice_mut() {
        return f(s);
    }
    let dim = out.dim();
    let tmp = prefix(buf, out.len());
    f(tmp)?;
    out.assign(&ArrayView2::from_shape(dim, &*tmp).map_err(shape_err)?);
    Ok(())
}
