//! Rotary position embedding with interleaved pairs, frequencies as transformers computes them.

use std::f32::consts::PI;

use ndarray::ArrayViewMut3;

use crate::{RopeConfig, RopeScaling};
use llama4_core::{Error, Result};

/// RoPE for one head dimension: the inverse frequencies, and rotation of q/k rows at given
/// absolute positions. Angles are computed for the positions at hand: there is no table sized
/// to `max_position_embeddings` (10M for Scout).
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `head_dim` (even) with `cfg`.
    ///
    /// Arithmetic follows transformers in f32 (`1 / theta^(2j/D)`, then the llama3 bands), so
    /// the rotation matches the reference to the last bit of the frequencies.
    pub fn new(head_dim: usize, cfg: &RopeConfig) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::shape(
                "Rope::new",
                format!("head_dim {head_dim} must be even"),
            ));
        }
        let base = cfg.theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|j| {
                let e = (2 * j) as f32 / head_dim as f32;
                // powf in f64 then rounded: the correctly rounded f32 power, which is what
                // torch's f32 pow returns for these arguments.
                1.0f32 / ((base as f64).powf(e as f64) as f32)
            })
            .collect();
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        } = cfg.scaling
        {
            // In f32, as the reference computes the bands.
            let (factor, low, high, orig) = (factor as f32, low as f32, high as f32, orig as f32);
            let low_wavelen = orig / low;
            let high_wavelen = orig / high;
            for f in &mut inv_freq {
                let wavelen = 2.0 * PI / *f;
                if wavelen < high_wavelen {
                    // High frequencies are kept.
                } else if wavelen > low_wavelen {
                    *f /= factor;
                } else {
                    // Only in the middle band: with low = high (Scout-Instruct) this band is a
                    // single point and the formula would divide by zero.
                    let s = (orig / wavelen - low) / (high - low);
                    *f = (1.0 - s) * *f / factor + s * *f;
                }
            }
        }
        Ok(Rope { inv_freq })
    }

    /// The same frequencies each divided by its factor, `f_j / factors[j]`: llama.cpp's
    /// frequency factors (`rope_freqs.weight` in a GGUF file, the llama3 scaling its converter
    /// precomputes), applied on top of plain RoPE ([`RopeScaling::Default`]).
    ///
    /// # Shapes
    /// `factors: [D/2]`.
    pub fn with_freq_factors(mut self, factors: &[f32]) -> Result<Self> {
        if factors.len() != self.inv_freq.len() {
            return Err(Error::shape(
                "Rope::with_freq_factors",
                format!(
                    "{} factors for {} frequencies",
                    factors.len(),
                    self.inv_freq.len()
                ),
            ));
        }
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(Error::shape(
                "Rope::with_freq_factors",
                format!("factor {bad} is not a positive finite number"),
            ));
        }
        for (f, d) in self.inv_freq.iter_mut().zip(factors) {
            *f /= d;
        }
        Ok(self)
    }

    /// The inverse frequencies `f_j`, `j < D/2`.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Head dimension D.
    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `(cos, sin)` of pair `j` at `pos`: the angle is `pos · f_j` rounded to f32 (as the
    /// reference computes it), its cosine and sine correctly rounded.
    pub fn cos_sin(&self, pos: usize, j: usize) -> (f32, f32) {
        let angle = (pos as f32 * self.inv_freq[j]) as f64;
        (angle.cos() as f32, angle.sin() as f32)
    }

    /// Rotates every head of every row in place: pair `(x[2j], x[2j+1])` of row `t` is
    /// multiplied, as a complex number, by `exp(i · positions[t] · f_j)`.
    ///
    /// # Shapes
    /// `x: [T, heads, D]`, `positions: [T]`.
    pub fn apply(&self, mut x: ArrayViewMut3<f32>, positions: &[usize]) -> Result<()> {
        let (t, _, d) = x.dim();
        if d != self.head_dim() || positions.len() != t {
            return Err(Error::shape(
                "Rope::apply",
                format!(
                    "x {:?}, {} positions, head_dim {}",
                    x.dim(),
                    positions.len(),
                    self.head_dim()
                ),
            ));
        }
        // Angles for a block of pairs at a time, on the stack: this runs for q and k of every
        // RoPE layer at every decode step.
        const PAIRS: usize = 32;
        let mut cs = [(0f32, 0f32); PAIRS];
        for (mut row, &pos) in x.outer_iter_mut().zip(positions) {
            for j0 in (0..d / 2).step_by(PAIRS) {
                let n = PAIRS.min(d / 2 - j0);
                for (j, c) in cs[..n].iter_mut().enumerate() {
                    *c = self.cos_sin(pos, j0 + j);
                }
                for mut head in row.outer_iter_mut() {
                    for (j, &(c, s)) in (j0..).zip(&cs[..n]) {
                        let (a, b) = (head[2 * j], head[2 * j + 1]);
                        head[2 * j] = a * c - b * s;
                        head[2 * j + 1] = a * s + b * c;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The NoPE temperature of the query at `pos`:
/// `ln(1 + floor((pos + 1) / floor_scale)) · attn_scale + 1`, in f32 as the reference.
pub fn temperature(pos: usize, floor_scale: f32, attn_scale: f32) -> f32 {
    let steps = ((pos as f32 + 1.0) / floor_scale).floor();
    ((steps as f64).ln_1p() as f32) * attn_scale + 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3(low: f64, high: f64) -> RopeConfig {
        RopeConfig {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 16.0,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: 8192.0,
            },
        }
    }

    #[test]
    fn low_equal_high_is_finite_and_two_banded() {
        let rope = Rope::new(128, &llama3(1.0, 1.0)).unwrap();
        let plain = Rope::new(
            128,
            &RopeConfig {
                theta: 500_000.0,
                scaling: RopeScaling::Default,
            },
        )
        .unwrap();
        for (&f, &f0) in rope.inv_freq().iter().zip(plain.inv_freq()) {
            assert!(f.is_finite());
            let wavelen = 2.0 * PI / f0;
            let want = if wavelen < 8192.0 { f0 } else { f0 / 16.0 };
            assert_eq!(f, want);
        }
    }

    #[test]
    fn temperature_steps() {
        // Equals 1 until pos + 1 reaches floor_scale.
        assert_eq!(temperature(0, 8192.0, 0.1), 1.0);
        assert_eq!(temperature(8190, 8192.0, 0.1), 1.0);
        let t = temperature(8191, 8192.0, 0.1);
        assert!((t - (1.0 + 0.1 * 2f32.ln())).abs() < 1e-6);
        // floor((p+1)/4): positions 3..=6 share one step.
        assert_eq!(temperature(3, 4.0, 0.1), temperature(6, 4.0, 0.1));
        assert!(temperature(7, 4.0, 0.1) > temperature(6, 4.0, 0.1));
    }
}
