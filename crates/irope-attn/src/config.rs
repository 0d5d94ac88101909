//! The configuration fields attention needs, resolved (the model crate builds this from
//! config.json; nothing here parses JSON).

use llama4_core::{Error, LayerKind, Result};

/// How RoPE frequencies are scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `f_j = theta^(-2j/D)` (`rope_type: "default"` or no `rope_scaling`).
    Default,
    /// Llama 3.1 frequency scaling (`rope_type: "llama3"`).
    Llama3 {
        /// Divisor of the low frequencies (`factor`).
        factor: f64,
        /// `low_freq_factor`: wavelengths above `original / low` are divided by `factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`: wavelengths below `original / high` are kept.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`: the context length of pre-training.
        original_max_position_embeddings: f64,
    },
}

/// RoPE parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// `rope_theta`, the base of the frequencies.
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// How a Llama 4 text attention layer treats positions: the "i" of iRoPE is these two kinds,
/// interleaved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PosEncoding {
    /// Rotary positions and optional QK norm; attends within its chunk
    /// (`attention_chunk_size`), or causally when that is null.
    Rope,
    /// No positional encoding, optional temperature tuning; attends causally over the whole
    /// context.
    NoPe,
}

/// What an attention layer needs from the text config.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnConfig {
    /// `hidden_size` (H).
    pub hidden_size: usize,
    /// `num_attention_heads` (Hq).
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (Hkv); divides Hq.
    pub num_key_value_heads: usize,
    /// `head_dim` (D), even.
    pub head_dim: usize,
    /// `rms_norm_eps`, also the eps of the weightless QK norm.
    pub rms_norm_eps: f32,
    /// `use_qk_norm`: RMS-normalise q and k per head after RoPE (RoPE layers only).
    pub use_qk_norm: bool,
    /// `attention_chunk_size` of the RoPE layers; `None` means plain causal.
    pub attention_chunk_size: Option<usize>,
    /// `attn_temperature_tuning` (any non-zero integer in the published configs means on).
    pub attn_temperature_tuning: bool,
    /// `floor_scale` of the temperature (8192 in the released models).
    pub floor_scale: f32,
    /// `attn_scale` of the temperature (0.1 in the released models).
    pub attn_scale: f32,
    /// `attention_bias`: the projections have biases. Loading also accepts biases present in
    /// the checkpoint when this is false.
    pub attention_bias: bool,
    /// RoPE parameters.
    pub rope: RopeConfig,
}

impl AttnConfig {
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// What a RoPE layer with this config attends over: its chunk, or everything when
    /// `attention_chunk_size` is null.
    pub fn chunk_kind(&self) -> Result<LayerKind> {
        LayerKind::from_chunk_size(self.attention_chunk_size)
            .ok_or_else(|| Error::shape("AttnConfig", "attention_chunk_size 0"))
    }

    /// Checks the invariants the layer relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::shape("AttnConfig", detail));
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad(format!("zero size in {self:?}"));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} kv heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even and positive", self.head_dim));
        }
        // The projections' widths must not wrap (a wrapped width could match a weight's shape).
        if self.num_attention_heads.checked_mul(self.head_dim).is_none() {
            return bad(format!(
                "{} heads · head_dim {} overflows",
                self.num_attention_heads, self.head_dim
            ));
        }
        if self.attention_chunk_size == Some(0) {
            return bad("attention_chunk_size 0".into());
        }
        if self.attn_temperature_tuning && (self.floor_scale.is_nan() || self.floor_scale <= 0.0) {
            return bad(format!("floor_scale {} must be positive", self.floor_scale));
        }
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = self.rope.scaling
        {
            let ordered = factor > 0.0
                && low_freq_factor > 0.0
                && high_freq_factor >= low_freq_factor
                && original_max_position_embeddings > 0.0;
            if !ordered {
                return bad(format!("llama3 rope scaling {:?}", self.rope.scaling));
            }
        }
        Ok(())
    }
}
