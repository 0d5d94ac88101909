//! The feed-forward trait and the dense SwiGLU MLP (Llama 4's shared expert and the dense
//! feed-forward of its non-MoE layers).

use std::fmt::Debug;

use llama4_core::scratch::prefix;
use llama4_core::{kernels, Scope, Weight};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::experts::shape_err;
use crate::scratch::{check_output, standard, with_standard_output, Buffers};
use crate::{Error, Result, Scratch};

/// A decoder layer's feed-forward block: [`Mlp`], [`crate::Moe`], or a researcher's own.
pub trait FeedForward: Send + Sync + Debug {
    /// Applies the block to every token.
    ///
    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>>;

    /// Like `forward`, writing into `out` (`[T, H]`, overwritten), reusing `scratch`.
    /// The provided implementation calls `forward` (and so allocates).
    ///
    /// [`Mlp`] and [`crate::Moe`] allocate nothing once `scratch` has served as many tokens.
    /// A wrong `out` shape is an [`Error::Mismatch`].
    ///
    /// # Shapes
    /// `x: [T, H]`, `out: [T, H]`.
    fn forward_into(
        &self,
        x: ArrayView2<f32>,
        mut out: ArrayViewMut2<f32>,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let _ = scratch;
        let y = self.forward(x)?;
        check_output(out.dim(), y.nrows(), y.ncols())?;
        out.assign(&y);
        Ok(())
    }
}

/// SwiGLU MLP: `down_proj(silu(gate_proj x) · up_proj x)`.
#[derive(Clone, Debug)]
pub struct Mlp {
    gate_proj: Weight,
    up_proj: Weight,
    down_proj: Weight,
}

impl Mlp {
    /// An MLP from its three weights: `gate_proj`, `up_proj` map `H → I`, `down_proj` `I → H`
    /// (any stored layout).
    pub fn new(gate_proj: Weight, up_proj: Weight, down_proj: Weight) -> Result<Self> {
        let (h, i) = (gate_proj.in_features(), gate_proj.out_features());
        let checks = [
            ("up_proj input width", h, up_proj.in_features()),
            ("up_proj output width", i, up_proj.out_features()),
            ("down_proj input width", i, down_proj.in_features()),
            ("down_proj output width", h, down_proj.out_features()),
        ];
        for (what, expected, got) in checks {
            if expected != got {
                return Err(Error::Mismatch { what, expected, got });
            }
        }
        Ok(Mlp {
            gate_proj,
            up_proj,
            down_proj,
        })
    }

    /// Loads `{gate,up}_proj.weight [I, H]` and `down_proj.weight [H, I]` from `scope`
    /// (`…feed_forward.shared_expert`, or `…feed_forward` of a dense layer).
    pub fn load(scope: &Scope, hidden_size: usize, intermediate_size: usize) -> Result<Self> {
        let (h, i) = (hidden_size, intermediate_size);
        Self::new(
            scope.weight("gate_proj.weight", [i, h])?,
            scope.weight("up_proj.weight", [i, h])?,
            scope.weight("down_proj.weight", [h, i])?,
        )
    }

    /// Hidden size `H`.
    pub fn hidden_size(&self) -> usize {
        self.gate_proj.in_features()
    }

    /// Intermediate size `I`.
    pub fn intermediate_size(&self) -> usize {
        self.gate_proj.out_features()
    }

    /// `gate_proj`.
    pub fn gate_proj(&self) -> &Weight {
        &self.gate_proj
    }

    /// `up_proj`.
    pub fn up_proj(&self) -> &Weight {
        &self.up_proj
    }

    /// `down_proj`.
    pub fn down_proj(&self) -> &Weight {
        &self.down_proj
    }

    /// Bytes of stored weights one forward call reads.
    pub fn weight_bytes(&self) -> usize {
        self.gate_proj.nbytes() + self.up_proj.nbytes() + self.down_proj.nbytes()
    }

    /// [`FeedForward::forward`] into the row-major `out` (`T·H`, overwritten), with the
    /// intermediates in `work`. The same kernel calls as `forward`, so the same bits.
    pub(crate) fn forward_slice(
        &self,
        x: ArrayView2<f32>,
        out: &mut [f32],
        work: &mut Buffers,
    ) -> Result<()> {
        let (t, i, h) = (x.nrows(), self.intermediate_size(), self.hidden_size());
        let gate = prefix(&mut work.gate, t * i);
        let up = prefix(&mut work.up, t * i);
        let gate_out = ArrayViewMut2::from_shape((t, i), &mut *gate).map_err(shape_err)?;
        let up_out = ArrayViewMut2::from_shape((t, i), &mut *up).map_err(shape_err)?;
        // One call for both: quantised weights quantise `x` once.
        kernels::linear_shared_into(x, &[&self.gate_proj, &self.up_proj], &mut [gate_out, up_out])?;
        kernels::silu_mul_inplace(gate, up)?;
        let act = ArrayView2::from_shape((t, i), &*gate).map_err(shape_err)?;
        let out = ArrayViewMut2::from_shape((t, h), out).map_err(shape_err)?;
        Ok(kernels::linear_into(act, &self.down_proj, out)?)
    }
}

impl FeedForward for Mlp {
    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let mut gate = kernels::linear(x, &self.gate_proj)?;
        let up = kernels::linear(x, &self.up_proj)?;
        // Both are freshly allocated, hence contiguous.
        let (Some(g), Some(u)) = (gate.as_slice_mut(), up.as_slice()) else {
            unreachable!("kernels::linear returns standard-layout arrays")
        };
        kernels::silu_mul_inplace(g, u)?;
        Ok(kernels::linear(gate.view(), &self.down_proj)?)
    }

    fn forward_into(&self, x: ArrayView2<f32>, out: ArrayViewMut2<f32>, scratch: &mut Scratch) -> Result<()> {
        check_output(out.dim(), x.nrows(), self.hidden_size())?;
        let x = standard(x, &mut scratch.input)?;
        let work = &mut scratch.work;
        with_standard_output(out, &mut scratch.output, |out| self.forward_slice(x, out, work))
    }
}
