//! The Llama 4 text decoder: weights loaded from a checkpoint, the forward pass over a cache.

use std::path::Path;

use irope_attn::{Attention, AttentionScratch, AttnConfig, LayerKind as AttnKind, Projected};
use kv_cache::{CacheSpec, KvCache, LayerKind as CacheKind};
use llama4_core::kernels::{linear, linear_into, rms_norm_inplace};
use llama4_core::scratch::reshape_reusing;
use llama4_core::{Checkpoint, DType, QuantPolicy, Scope, Weight};
use moe_router::{FeedForward, Mlp, Moe, MoeConfig, Router};
use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut2, Axis};

use crate::config::{ModelConfig, RopeScaling, TextConfig};
use crate::{Error, Result};

/// The feed-forward block of one decoder layer.
#[derive(Debug)]
pub enum FeedForwardLayer {
    /// Dense SwiGLU MLP of width `intermediate_size_mlp` (non-MoE layers).
    Dense(Mlp),
    /// Mixture of experts plus the shared expert.
    Moe(Box<Moe>),
    /// Anything else a researcher plugs in.
    Custom(Box<dyn FeedForward>),
}

impl FeedForwardLayer {
    /// Runs the block.
    ///
    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        Ok(match self {
            FeedForwardLayer::Dense(m) => m.forward(x)?,
            FeedForwardLayer::Moe(m) => m.forward(x)?,
            FeedForwardLayer::Custom(f) => f.forward(x)?,
        })
    }

    /// [`FeedForwardLayer::forward`] into `out` (overwritten), reusing `scratch`: the dense MLP
    /// and the MoE allocate nothing once warmed up; a custom block may.
    ///
    /// # Shapes
    /// `x: [T, H]`, `out: [T, H]`.
    pub fn forward_into(
        &self,
        x: ArrayView2<f32>,
        out: ArrayViewMut2<f32>,
        scratch: &mut moe_router::Scratch,
    ) -> Result<()> {
        match self {
            FeedForwardLayer::Dense(m) => m.forward_into(x, out, scratch)?,
            FeedForwardLayer::Moe(m) => m.forward_into(x, out, scratch)?,
            FeedForwardLayer::Custom(f) => f.forward_into(x, out, scratch)?,
        }
        Ok(())
    }
}

/// The buffers a forward pass works in: activations, q/k/v, the attention kernel's and the
/// feed-forwards' scratch, the last logits. One per sequence ([`crate::Session`] owns one);
/// once it has held `T` tokens, passes of up to `T` tokens allocate nothing.
#[derive(Debug, Default)]
pub struct Workspace {
    positions: Vec<usize>,
    /// Normed input of the current sub-layer, `[T, H]`.
    normed: Array2<f32>,
    /// Output of the current sub-layer, `[T, H]`.
    out: Array2<f32>,
    projected: Projected,
    attention: AttentionScratch,
    feed_forward: moe_router::Scratch,
    /// `[T', V]` from [`TextModel::logits_into`].
    logits: Array2<f32>,
}

impl Workspace {
    /// An empty workspace (buffers grow on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// The logits of the last [`TextModel::logits_into`] call, `[T', V]`.
    pub fn logits(&self) -> ArrayView2<'_, f32> {
        self.logits.view()
    }
}

/// One decoder layer: pre-norm attention and pre-norm feed-forward, each with a residual.
#[derive(Debug)]
pub struct DecoderLayer {
    /// `input_layernorm.weight [H]`.
    pub input_layernorm: Array1<f32>,
    /// `post_attention_layernorm.weight [H]`.
    pub post_attention_layernorm: Array1<f32>,
    /// `self_attn`.
    pub self_attn: Attention,
    /// `feed_forward`.
    pub feed_forward: FeedForwardLayer,
}

/// A loaded Llama 4 text model. Weights stay in their stored dtype, memory-mapped.
pub struct TextModel {
    config: TextConfig,
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    norm: Array1<f32>,
    lm_head: Weight,
    // Kept alive because every weight view borrows its memory map.
    _checkpoint: Checkpoint,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("layers", &self.layers.len())
            .field("hidden_size", &self.config.hidden_size)
            .finish()
    }
}

/// The attention settings of layer `i`.
pub(crate) fn attn_config(cfg: &TextConfig, i: usize) -> AttnConfig {
    let rope_scaling = match cfg.rope.scaling {
        RopeScaling::None => irope_attn::RopeScaling::Default,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => irope_attn::RopeScaling::Llama3 {
            factor: factor as f32,
            low_freq_factor: low_freq_factor as f32,
            high_freq_factor: high_freq_factor as f32,
            original_max_position_embeddings: original_max_position_embeddings as usize,
        },
    };
    AttnConfig {
        hidden_size: cfg.hidden_size,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        rms_norm_eps: cfg.rms_norm_eps,
        use_qk_norm: cfg.use_qk_norm,
        // Per layer: `layer_types` may make a RoPE layer attend causally.
        attention_chunk_size: cfg.layers[i].chunk,
        attn_temperature_tuning: cfg.attn_temperature_tuning,
        floor_scale: cfg.floor_scale,
        attn_scale: cfg.attn_scale,
        attention_bias: cfg.attention_bias,
        rope: irope_attn::RopeConfig {
            theta: cfg.rope.theta,
            scaling: rope_scaling,
        },
    }
}

impl TextModel {
    /// Loads the text model of the checkpoint in `dir` (config.json plus safetensors).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(ckpt, &config)
    }

    /// [`TextModel::load`] with load-time quantisation of the weights `policy` selects (see
    /// [`Checkpoint::set_quantization`]). Weights the checkpoint stores quantised are used as
    /// stored, with or without a policy, and never requantised.
    pub fn load_with_quantization(dir: impl AsRef<Path>, policy: Option<QuantPolicy>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?.with_quantization(policy);
        let model = Self::from_checkpoint(ckpt, &config)?;
        if model._checkpoint.quantization().is_some() {
            // Quantising read every selected float weight once; without this their pages would
            // stay resident beside the quantised copies (2-4x the quantised bytes on bench-mid).
            model._checkpoint.release_resident_pages();
        }
        Ok(model)
    }

    /// The checkpoint the weights come from (its [`Checkpoint::weight_bytes`] and
    /// [`Checkpoint::quantized_weights`] say what loading produced).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self._checkpoint
    }

    /// Builds the model from an opened checkpoint and its resolved config.
    pub fn from_checkpoint(ckpt: Checkpoint, config: &ModelConfig) -> Result<Self> {
        let cfg = config.text.clone();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let root = ckpt.scope(config.text_prefix.trim_end_matches('.'));
        let model = root.scope("model");
        let embed_tokens = model.weight("embed_tokens.weight", [v, h])?;
        let norm = model.vector("norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings && !root.contains("lm_head.weight") {
            embed_tokens.clone()
        } else {
            root.weight("lm_head.weight", [v, h])?
        };
        let layers = (0..cfg.layers.len())
            .map(|i| load_layer(&model.scope(&format!("layers.{i}")), &cfg, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(TextModel {
            config: cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            _checkpoint: ckpt,
        })
    }

    /// The resolved config.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Mutable access to the decoder layers, to replace a feed-forward block.
    pub fn layers_mut(&mut self) -> &mut [DecoderLayer] {
        &mut self.layers
    }

    /// Replaces the router of every MoE layer with the one `make(layer_index, moe)` returns.
    pub fn replace_routers(
        &mut self,
        mut make: impl FnMut(usize, &Moe) -> Result<Box<dyn Router>>,
    ) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if let FeedForwardLayer::Moe(moe) = &mut layer.feed_forward {
                let router = make(i, moe)?;
                moe.set_router(router)?;
            }
        }
        Ok(())
    }

    /// The cache layout this model's layers need.
    pub fn cache_kinds(&self) -> Vec<CacheKind> {
        self.config
            .layers
            .iter()
            .map(|l| match l.chunk {
                Some(chunk) => CacheKind::Chunked { chunk },
                None => CacheKind::Global,
            })
            .collect()
    }

    /// An empty cache for this model with keys and values stored in `dtype`.
    pub fn new_cache(&self, dtype: DType) -> Result<KvCache> {
        let spec = CacheSpec::new(self.config.num_key_value_heads, self.config.head_dim, dtype);
        Ok(KvCache::new(&self.cache_kinds(), spec)?)
    }

    /// Embeddings of `tokens`.
    ///
    /// # Shapes
    /// `[T]` → `[T, H]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Array2<f32>> {
        let mut out = Array2::zeros((tokens.len(), self.config.hidden_size));
        self.embed_into(tokens, out.view_mut())?;
        Ok(out)
    }

    /// [`TextModel::embed`] into `out` (overwritten).
    ///
    /// # Shapes
    /// `tokens: [T]`, `out: [T, H]`.
    pub fn embed_into(&self, tokens: &[u32], mut out: ArrayViewMut2<f32>) -> Result<()> {
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        if out.dim() != (tokens.len(), h) {
            return Err(llama4_core::Error::shape(
                "TextModel::embed",
                format!("{} tokens, out {:?}, hidden {h}", tokens.len(), out.dim()),
            )
            .into());
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= v) {
            return Err(Error::TokenOutOfRange { id, vocab: v });
        }
        let data = self.embed_tokens.data();
        for (mut row, &id) in out.axis_iter_mut(Axis(0)).zip(tokens) {
            match row.as_slice_mut() {
                Some(r) => data.widen_into(id as usize * h, r),
                // A strided row: element by element (no buffer to widen into).
                None => (id as usize * h..)
                    .zip(row.iter_mut())
                    .for_each(|(i, x)| data.widen_into(i, std::slice::from_mut(x))),
            }
        }
        Ok(())
    }

    /// Runs the decoder over `hidden` (embeddings of tokens at positions `cache.len() ..`),
    /// appending to `cache`, and returns the final-normed hidden states.
    ///
    /// # Shapes
    /// `hidden: [T, H]` → `[T, H]`.
    pub fn forward_hidden(&self, mut hidden: Array2<f32>, cache: &mut KvCache) -> Result<Array2<f32>> {
        self.forward_hidden_in(hidden.view_mut(), cache, &mut Workspace::new())?;
        Ok(hidden)
    }

    /// [`TextModel::forward_hidden`] in place, working in `ws`: `hidden` goes in as the
    /// embeddings and comes out final-normed. Once `ws` has held `T` tokens (and the cache has
    /// room), a pass of up to `T` tokens allocates nothing.
    ///
    /// # Shapes
    /// `hidden: [T, H]`.
    pub fn forward_hidden_in(
        &self,
        mut hidden: ArrayViewMut2<f32>,
        cache: &mut KvCache,
        ws: &mut Workspace,
    ) -> Result<()> {
        let (t, h) = hidden.dim();
        if t == 0 {
            return Err(Error::Empty("forward"));
        }
        if h != self.config.hidden_size {
            return Err(llama4_core::Error::shape(
                "TextModel::forward_hidden",
                format!(
                    "hidden {:?}, hidden_size {}",
                    hidden.dim(),
                    self.config.hidden_size
                ),
            )
            .into());
        }
        let start = cache.len();
        ws.positions.clear();
        ws.positions.extend(start..start + t);
        reshape_reusing(&mut ws.normed, (t, h));
        reshape_reusing(&mut ws.out, (t, h));
        let eps = self.config.rms_norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            ws.normed.assign(&hidden);
            rms_norm_inplace(ws.normed.view_mut(), Some(layer.input_layernorm.view()), eps)?;
            layer
                .self_attn
                .project_into(ws.normed.view(), &ws.positions, &mut ws.projected)?;
            let p = &ws.projected;
            // Chunked layers append and attend one chunk at a time: their cache only holds the
            // chunk the current queries are in.
            for seg in cache.segments(i, t)? {
                let sl = s![seg.clone(), .., ..];
                cache.append(i, p.k.slice(sl), p.v.slice(sl))?;
                let view = cache.view(i)?;
                layer.self_attn.attend_into(
                    p.q.slice(sl),
                    &ws.positions[seg.clone()],
                    &view.k,
                    &view.v,
                    ws.out.slice_mut(s![seg, ..]),
                    &mut ws.attention,
                )?;
            }
            hidden += &ws.out;
            ws.normed.assign(&hidden);
            rms_norm_inplace(
                ws.normed.view_mut(),
                Some(layer.post_attention_layernorm.view()),
                eps,
            )?;
            layer
                .feed_forward
                .forward_into(ws.normed.view(), ws.out.view_mut(), &mut ws.feed_forward)?;
            hidden += &ws.out;
        }
        rms_norm_inplace(hidden, Some(self.norm.view()), eps)?;
        Ok(())
    }

    /// `lm_head` over normed hidden states.
    ///
    /// # Shapes
    /// `[T, H]` → `[T, V]`.
    pub fn logits(&self, hidden: ArrayView2<f32>) -> Result<Array2<f32>> {
        Ok(linear(hidden, &self.lm_head)?)
    }

    /// [`TextModel::logits`] into `ws`'s logits buffer ([`Workspace::logits`]), which is
    /// returned; it allocates nothing once the buffer has held as many rows.
    ///
    /// # Shapes
    /// `[T, H]` → `[T, V]`.
    pub fn logits_into<'w>(
        &self,
        hidden: ArrayView2<f32>,
        ws: &'w mut Workspace,
    ) -> Result<ArrayView2<'w, f32>> {
        reshape_reusing(&mut ws.logits, (hidden.nrows(), self.config.vocab_size));
        linear_into(hidden, &self.lm_head, ws.logits.view_mut())?;
        Ok(ws.logits.view())
    }

    /// Logits for every position of `tokens` in one pass with no cache kept: each attention
    /// layer sees only these tokens (each chunked layer one chunk at a time). A reference path
    /// for tests; generation goes through [`crate::Session`].
    ///
    /// # Shapes
    /// `[T]` → `[T, V]`.
    pub fn forward_uncached(&self, tokens: &[u32]) -> Result<Array2<f32>> {
        if tokens.is_empty() {
            return Err(Error::Empty("forward_uncached"));
        }
        let mut hidden = self.embed(tokens)?;
        let eps = self.config.rms_norm_eps;
        for layer in &self.layers {
            let mut x = hidden.clone();
            rms_norm_inplace(x.view_mut(), Some(layer.input_layernorm.view()), eps)?;
            hidden += &layer.self_attn.forward(x.view(), 0)?;
            let mut x = hidden.clone();
            rms_norm_inplace(x.view_mut(), Some(layer.post_attention_layernorm.view()), eps)?;
            hidden += &layer.feed_forward.forward(x.view())?;
        }
        rms_norm_inplace(hidden.view_mut(), Some(self.norm.view()), eps)?;
        self.logits(hidden.view())
    }
}

fn load_layer(scope: &Scope, cfg: &TextConfig, i: usize) -> Result<DecoderLayer> {
    let h = cfg.hidden_size;
    let spec = cfg.layers[i];
    let kind = if spec.rope { AttnKind::Rope } else { AttnKind::NoPe };
    let self_attn = Attention::load(&scope.scope("self_attn"), &attn_config(cfg, i), kind)?;
    let ff = scope.scope("feed_forward");
    let feed_forward = if spec.moe {
        let moe_cfg = MoeConfig::llama4(
            h,
            cfg.intermediate_size,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
        );
        FeedForwardLayer::Moe(Box::new(Moe::load(&ff, &moe_cfg)?))
    } else {
        FeedForwardLayer::Dense(Mlp::load(&ff, h, cfg.intermediate_size_mlp)?)
    };
    Ok(DecoderLayer {
        input_layernorm: scope.vector("input_layernorm.weight", h)?,
        post_attention_layernorm: scope.vector("post_attention_layernorm.weight", h)?,
        self_attn,
        feed_forward,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embed_into_a_strided_view_equals_embed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/scout");
        let model = TextModel::load(dir).unwrap();
        let tokens = [3, 0, 511, 7];
        let want = model.embed(&tokens).unwrap();
        let mut wide = Array2::from_elem((tokens.len(), 2 * model.config().hidden_size), f32::NAN);
        model.embed_into(&tokens, wide.slice_mut(s![.., ..;2])).unwrap();
        assert_eq!(wide.slice(s![.., ..;2]), want);
        assert!(want.iter().all(|v| v.is_finite()));
    }
}
