//! One linear layer with an optional bias, for every component that needs one (attention
//! projections, the router, the vision tower).

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2};

use crate::kernels::{linear_into, linear_shared_into};
use crate::{Error, Result, Scope, Weight};

/// `y = x Wᵀ (+ b)`: a weight in its stored form (any dtype, quantised or not) and an optional
/// f32 bias.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Array1<f32>>,
}

impl Linear {
    /// A layer from its parts; the bias, if any, has one entry per output.
    pub fn new(weight: Weight, bias: Option<Array1<f32>>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.len() != weight.out_features() {
                return Err(Error::shape(
                    "Linear::new",
                    format!("bias of {} for {} outputs", b.len(), weight.out_features()),
                ));
            }
        }
        Ok(Linear { weight, bias })
    }

    /// Loads `{name}.weight` (`[out, in]`) from `scope`, and `{name}.bias` (`[out]`) when the
    /// checkpoint has one.
    pub fn load(scope: &Scope, name: &str, [out_f, in_f]: [usize; 2]) -> Result<Self> {
        let bias_name = format!("{name}.bias");
        let bias = if scope.contains(&bias_name) {
            Some(scope.vector(&bias_name, out_f)?)
        } else {
            None
        };
        Self::new(scope.weight(&format!("{name}.weight"), [out_f, in_f])?, bias)
    }

    /// [`Linear::load`] when the bias must be there: its absence is an error naming it.
    pub fn load_with_bias(scope: &Scope, name: &str, [out_f, in_f]: [usize; 2]) -> Result<Self> {
        let weight = scope.weight(&format!("{name}.weight"), [out_f, in_f])?;
        let bias = scope.vector(&format!("{name}.bias"), out_f)?;
        Self::new(weight, Some(bias))
    }

    /// The weight.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Array1<f32>> {
        self.bias.as_ref()
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.in_features()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.out_features()
    }

    /// # Shapes
    /// `x: [T, in]` → `[T, out]`.
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let mut y = Array2::zeros((x.nrows(), self.out_features()));
        self.forward_into(x, y.view_mut())?;
        Ok(y)
    }

    /// [`Linear::forward`] into `y` (overwritten).
    ///
    /// # Shapes
    /// `x: [T, in]`, `y: [T, out]`.
    pub fn forward_into(&self, x: ArrayView2<f32>, mut y: ArrayViewMut2<f32>) -> Result<()> {
        linear_into(x, &self.weight, y.view_mut())?;
        if let Some(b) = &self.bias {
            y += b;
        }
        Ok(())
    }

    /// `ys[j] = x W_jᵀ (+ b_j)` for several layers on one input, with the bits of
    /// [`Linear::forward_into`] per layer: quantised ggml weights that take the same
    /// activations quantise `x` once (see [`crate::kernels::linear_shared_into`]).
    ///
    /// # Shapes
    /// `x: [T, in]`, `ys[j]: [T, out_j]`.
    pub fn forward_shared_into<const N: usize>(
        x: ArrayView2<f32>,
        layers: [&Linear; N],
        mut ys: [ArrayViewMut2<f32>; N],
    ) -> Result<()> {
        linear_shared_into(x, &layers.map(|l| &l.weight), &mut ys)?;
        for (l, y) in layers.iter().zip(ys.iter_mut()) {
            if let Some(b) = &l.bias {
                *y += b;
            }
        }
        Ok(())
    }
}
