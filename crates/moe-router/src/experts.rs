//! The routed experts, stored as Llama 4's fused tensors.

use std::ops::Range;

use llama4_core::{kernels, BatchedWeight, Scope};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::{Error, Result};

/// `E` SwiGLU experts in the fused checkpoint tensors `gate_up_proj [E, H, 2I]` and
/// `down_proj [E, I, H]`, both applied as `x · W` ([`llama4_core::Layout::InOut`]). Expert `e` computes
/// `(silu(x G_e) · x U_e) D_e` where `G_e` is columns `0..I` of `gate_up_proj[e]` and `U_e`
/// columns `I..2I`.
///
/// Tensors are kept as stored (memory-mapped when loaded): an expert's bytes are touched only
/// when it runs.
#[derive(Clone, Debug)]
pub struct Experts {
    /// The fused `[gate | up]` tensor, or only the gate when `up_proj` is separate.
    gate_up_proj: BatchedWeight,
    /// The up tensor when stored apart from the gate (GGUF's `ffn_up_exps`).
    up_proj: Option<BatchedWeight>,
    down_proj: BatchedWeight,
}

/// Reusable buffers for running experts over groups of up to `capacity` rows.
#[derive(Debug, Default)]
pub(crate) struct ExpertScratch {
    gate_up: Vec<f32>,
    out: Vec<f32>,
}

impl Experts {
    /// Experts from the fused tensors: `gate_up_proj` maps `H → 2I`, `down_proj` `I → H`, with
    /// the same batch `E` (any stored layout, though checkpoints hold [`llama4_core::Layout::InOut`]).
    pub fn new(gate_up_proj: BatchedWeight, down_proj: BatchedWeight) -> Result<Self> {
        let two_i = gate_up_proj.out_features();
        if !two_i.is_multiple_of(2) {
            return Err(Error::Mismatch {
                what: "gate_up_proj output width modulo 2",
                expected: 0,
                got: 1,
            });
        }
        let checks = [
            ("down_proj experts", gate_up_proj.batch(), down_proj.batch()),
            ("down_proj input width (I)", two_i / 2, down_proj.in_features()),
            (
                "down_proj output width (H)",
                gate_up_proj.in_features(),
                down_proj.out_features(),
            ),
        ];
        for (what, expected, got) in checks {
            if expected != got {
                return Err(Error::Mismatch { what, expected, got });
            }
        }
        Ok(Experts {
            gate_up_proj,
            up_proj: None,
            down_proj,
        })
    }

    /// Experts from separate gate, up and down tensors (GGUF's `ffn_{gate,up,down}_exps`):
    /// `gate_proj` and `up_proj` map `H → I`, `down_proj` `I → H`, with the same batch `E`.
    pub fn new_split(
        gate_proj: BatchedWeight,
        up_proj: BatchedWeight,
        down_proj: BatchedWeight,
    ) -> Result<Self> {
        let checks = [
            ("up_proj experts", gate_proj.batch(), up_proj.batch()),
            ("down_proj experts", gate_proj.batch(), down_proj.batch()),
            (
                "up_proj input width (H)",
                gate_proj.in_features(),
                up_proj.in_features(),
            ),
            (
                "up_proj output width (I)",
                gate_proj.out_features(),
                up_proj.out_features(),
            ),
            (
                "down_proj input width (I)",
                gate_proj.out_features(),
                down_proj.in_features(),
            ),
            (
                "down_proj output width (H)",
                gate_proj.in_features(),
                down_proj.out_features(),
            ),
        ];
        for (what, expected, got) in checks {
            if expected != got {
                return Err(Error::Mismatch { what, expected, got });
            }
        }
        Ok(Experts {
            gate_up_proj: gate_proj,
            up_proj: Some(up_proj),
            down_proj,
        })
    }

    /// Loads `gate_up_proj [E, H, 2I]` and `down_proj [E, I, H]` from `scope`
    /// (`model.layers.{i}.feed_forward.experts`), checking shapes.
    pub fn load(
        scope: &Scope,
        num_experts: usize,
        hidden_size: usize,
        intermediate_size: usize,
    ) -> Result<Self> {
        Self::load_range(scope, num_experts, hidden_size, intermediate_size, 0..num_experts)
    }

    /// Loads experts `range` of the `num_experts` the tensors hold, as a bank of
    /// `range.len()`: the others' bytes are never read, and a load-time quantisation handles
    /// `range` alone (see [`Scope::batched_in_out_range`]).
    ///
    /// # Errors
    /// As [`Experts::load`]; a shape error when `range` does not lie in `0..num_experts`.
    pub fn load_range(
        scope: &Scope,
        num_experts: usize,
        hidden_size: usize,
        intermediate_size: usize,
        range: Range<usize>,
    ) -> Result<Self> {
        let (e, h, i) = (num_experts, hidden_size, intermediate_size);
        let two_i = i.checked_mul(2).ok_or(Error::Mismatch {
            what: "intermediate size (2·I overflows)",
            expected: usize::MAX / 2,
            got: i,
        })?;
        Self::new(
            scope.batched_in_out_range("gate_up_proj", [e, h, two_i], range.clone())?,
            scope.batched_in_out_range("down_proj", [e, i, h], range)?,
        )
    }

    /// Experts `range` of this bank as a bank of their own, sharing storage.
    ///
    /// # Errors
    /// A shape error when `range` does not lie in `0..E`.
    pub fn narrow(&self, range: Range<usize>) -> Result<Self> {
        Ok(Experts {
            gate_up_proj: self.gate_up_proj.narrow(range.clone())?,
            up_proj: self
                .up_proj
                .as_ref()
                .map(|u| u.narrow(range.clone()))
                .transpose()?,
            down_proj: self.down_proj.narrow(range)?,
        })
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.gate_up_proj.batch()
    }

    /// Hidden size `H`.
    pub fn hidden_size(&self) -> usize {
        self.gate_up_proj.in_features()
    }

    /// Intermediate size `I` of one expert.
    pub fn intermediate_size(&self) -> usize {
        self.down_proj.in_features()
    }

    /// The fused gate/up tensor (`[E, 2I, H]`-shaped), or the gate alone (`I` wide) when the
    /// experts were built with [`Experts::new_split`].
    pub fn gate_up_proj(&self) -> &BatchedWeight {
        &self.gate_up_proj
    }

    /// The separate up tensor of [`Experts::new_split`] experts.
    pub fn up_proj(&self) -> Option<&BatchedWeight> {
        self.up_proj.as_ref()
    }

    /// The down tensor.
    pub fn down_proj(&self) -> &BatchedWeight {
        &self.down_proj
    }

    /// Bytes of stored weights one expert holds (what running it once reads).
    pub fn expert_bytes(&self) -> usize {
        let per = |w: &BatchedWeight| w.nbytes_per_matrix();
        per(&self.gate_up_proj) + self.up_proj.as_ref().map_or(0, per) + per(&self.down_proj)
    }

    /// Runs expert `expert` over every row of `x`.
    ///
    /// # Shapes
    /// `x: [n, H]` → `[n, H]`.
    pub fn forward_expert(&self, expert: usize, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        self.check_expert(expert)?;
        let mut scratch = ExpertScratch::default();
        let n = x.nrows();
        let x = x.as_standard_layout();
        let flat = x.as_slice().unwrap_or(&[]);
        let y = self.run(expert, flat, n, &mut scratch)?;
        Array2::from_shape_vec((n, self.hidden_size()), y.to_vec()).map_err(shape_err)
    }

    fn check_expert(&self, expert: usize) -> Result<()> {
        if expert >= self.num_experts() {
            return Err(Error::NoSuchExpert {
                expert,
                num_experts: self.num_experts(),
            });
        }
        Ok(())
    }

    /// Runs `expert` over `n` contiguous rows `x` (`n·H`), returning `n·H` outputs that live
    /// in `scratch` until its next use. `expert` must be in range.
    pub(crate) fn run<'s>(
        &self,
        expert: usize,
        x: &[f32],
        n: usize,
        scratch: &'s mut ExpertScratch,
    ) -> Result<&'s [f32]> {
        let (h, i) = (self.hidden_size(), self.intermediate_size());
        if x.len() != n * h {
            return Err(Error::Mismatch {
                what: "expert input length (rows · H)",
                expected: n * h,
                got: x.len(),
            });
        }
        scratch.gate_up.resize(n * 2 * i, 0.0);
        scratch.out.resize(n * h, 0.0);
        let gate_up = &mut scratch.gate_up[..n * 2 * i];
        let xv = ArrayView2::from_shape((n, h), x).map_err(shape_err)?;
        if let Some(up_proj) = &self.up_proj {
            // Gate rows in the first n·I values, up rows in the next n·I.
            let (gate, up) = gate_up.split_at_mut(n * i);
            let g = ArrayViewMut2::from_shape((n, i), &mut *gate).map_err(shape_err)?;
            let u = ArrayViewMut2::from_shape((n, i), &mut *up).map_err(shape_err)?;
            // One call for both: quantised weights quantise `x` once.
            kernels::linear_shared_into(
                xv,
                &[self.gate_up_proj.matrix(expert), up_proj.matrix(expert)],
                &mut [g, u],
            )?;
            kernels::silu_mul_inplace(gate, up)?;
        } else {
            self.gate_up_fused(expert, xv, n, i, gate_up)?;
        }
        let act = ArrayView2::from_shape((n, i), &gate_up[..n * i]).map_err(shape_err)?;
        let out = &mut scratch.out[..n * h];
        kernels::linear_into(
            act,
            self.down_proj.matrix(expert),
            ArrayViewMut2::from_shape((n, h), &mut *out).map_err(shape_err)?,
        )?;
        Ok(out)
    }

    /// `silu(x G) · x U` of the fused tensor into the first `n·I` values of `gate_up` (`n·2I`).
    fn gate_up_fused(
        &self,
        expert: usize,
        xv: ArrayView2<f32>,
        n: usize,
        i: usize,
        gate_up: &mut [f32],
    ) -> Result<()> {
        kernels::linear_into(
            xv,
            self.gate_up_proj.matrix(expert),
            ArrayViewMut2::from_shape((n, 2 * i), &mut *gate_up).map_err(shape_err)?,
        )?;
        // Row r holds [gate | up]; silu(gate)·up is written over the gate half and then packed
        // to the front (row r moves to r·I ≤ r·2I, so a forward copy never overwrites unread data).
        for r in 0..n {
            let row = &mut gate_up[r * 2 * i..(r + 1) * 2 * i];
            let (gate, up) = row.split_at_mut(i);
            kernels::silu_mul_inplace(gate, up)?;
            gate_up.copy_within(r * 2 * i..r * 2 * i + i, r * i);
        }
        Ok(())
    }
}

/// Views over this crate's buffers are sized from checked lengths; a failure would be a bug,
/// reported as an error rather than a panic.
pub(crate) fn shape_err(e: ndarray::ShapeError) -> Error {
    Error::Core(llama4_core::Error::shape("moe-router buffer view", e.to_string()))
}
