//! The Llama 4 text decoder: weights loaded from a checkpoint, the forward pass over a cache.

use std::path::Path;

use irope_attn::{Attention, PosEncoding, SelfAttention};
use kv_cache::{CacheSpec, KvCache};
use llama4_core::kernels::{linear, linear_into, rms_norm_inplace};
use llama4_core::scratch::reshape_reusing;
use llama4_core::{Checkpoint, DType, KvDtype, LayerKind, QuantPolicy, Scope, SharedProgress, Weight};
use moe_router::{Mlp, Moe, MoeConfig, Router};
use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis};

use crate::config::{ModelConfig, TextConfig};
use crate::layer::{AttentionLayer, DecoderLayer, FeedForwardLayer, Seq, Workspace};
use crate::{Error, Result};

/// A loaded Llama 4 text model. Weights stay in their stored dtype, memory-mapped.
pub struct TextModel {
    config: TextConfig,
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    norm: Array1<f32>,
    lm_head: Weight,
    // The safetensors checkpoint the weights came from, if any; kept because its quantisation
    // state and pages are reported through it. Weights hold their memory map themselves.
    checkpoint: Option<Checkpoint>,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("layers", &self.layers.len())
            .field("hidden_size", &self.config.hidden_size())
            .finish()
    }
}

impl TextModel {
    /// Loads the text model of the checkpoint in `dir` (config.json plus safetensors).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load_with_quantization(dir, None)
    }

    /// [`TextModel::load`] with load-time quantisation of the weights `policy` selects (see
    /// [`Checkpoint::set_quantization`]). Weights the checkpoint stores quantised are used as
    /// stored, with or without a policy, and never requantised.
    pub fn load_with_quantization(dir: impl AsRef<Path>, policy: Option<QuantPolicy>) -> Result<Self> {
        let options = LoadOptions {
            quantization: policy,
            progress: None,
        };
        Self::load_with_options(dir, &options)
    }

    /// [`TextModel::load_with_quantization`] with each MoE layer's feed-forward built by
    /// `build` from its checkpoint scope: a layer holding only some experts, or experts served
    /// by other processes, is loaded without reading the bytes of the others.
    pub fn load_with_moe(
        dir: impl AsRef<Path>,
        policy: Option<QuantPolicy>,
        build: &mut MoeBuilder<'_>,
    ) -> Result<Self> {
        let options = LoadOptions {
            quantization: policy,
            progress: None,
        };
        Self::load_with_options_and_moe(dir, &options, build)
    }

    /// [`TextModel::load_with_quantization`] with `options.progress` told of every tensor
    /// loaded (and quantised), in stored bytes of the checkpoint's files; see
    /// [`llama4_core::progress`].
    ///
    /// A checkpoint that fits in half of memory and is not quantised at load is copied into
    /// memory backed by 2 MiB pages before its tensors are loaded (see
    /// [`Checkpoint::copy_to_huge_pages`]), or else its mapped pages are prefaulted after
    /// loading (see [`Checkpoint::populate_resident_pages`]); the `_moe` loaders leave the
    /// files mapped as they are, as their builder may hold only some experts.
    pub fn load_with_options(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let model = Self::load_checkpoint(dir.as_ref(), options, &mut load_moe, true)?;
        if let Some(ckpt) = model.checkpoint.as_ref().filter(|c| !c.in_huge_pages()) {
            ckpt.populate_resident_pages();
        }
        Ok(model)
    }

    /// [`TextModel::load_with_options`] with each MoE layer's feed-forward built by `build`
    /// (see [`TextModel::load_with_moe`]).
    pub fn load_with_options_and_moe(
        dir: impl AsRef<Path>,
        options: &LoadOptions,
        build: &mut MoeBuilder<'_>,
    ) -> Result<Self> {
        Self::load_checkpoint(dir.as_ref(), options, build, false)
    }

    /// The loaders' body; with `whole`, every weight is this process's to read, so the files
    /// may be copied into huge pages.
    fn load_checkpoint(
        dir: &Path,
        options: &LoadOptions,
        build: &mut MoeBuilder<'_>,
        whole: bool,
    ) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let mut ckpt = Checkpoint::open(dir)?
            .with_quantization(options.quantization)
            .with_progress(options.progress.clone());
        if whole {
            ckpt.copy_to_huge_pages();
        }
        let model = Self::from_checkpoint_with_moe(ckpt, &config, build)?;
        if let Some(ckpt) = &model.checkpoint {
            ckpt.finish_progress();
        }
        if let Some(ckpt) = model.checkpoint.as_ref().filter(|c| c.quantization().is_some()) {
            // Quantising read every selected float weight once; without this their pages would
            // stay resident beside the quantised copies (2-4x the quantised bytes on bench-mid).
            ckpt.release_resident_pages();
        }
        Ok(model)
    }

    /// The safetensors checkpoint the weights come from (its [`Checkpoint::weight_bytes`] and
    /// [`Checkpoint::quantized_weights`] say what loading produced); `None` for a model built
    /// otherwise ([`TextModel::load_gguf`], [`TextModel::from_parts`]).
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_ref()
    }

    /// A model from its parts, checked against `config`: `embed_tokens` and `lm_head` of shape
    /// `[V, H]`, one layer per entry of `config.layers`, `norm` of `[H]`. Weights keep their
    /// own storage alive (a memory map is shared by reference count).
    ///
    /// # Shapes
    /// `embed_tokens: [V, H]`, `norm: [H]`, `lm_head: [V, H]`.
    pub fn from_parts(
        config: TextConfig,
        embed_tokens: Weight,
        layers: Vec<DecoderLayer>,
        norm: Array1<f32>,
        lm_head: Weight,
    ) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size());
        let checks = [
            (
                "embed_tokens",
                (embed_tokens.out_features(), embed_tokens.in_features()),
                (v, h),
            ),
            ("lm_head", (lm_head.out_features(), lm_head.in_features()), (v, h)),
            ("norm", (norm.len(), h), (h, h)),
            ("layers", (layers.len(), 0), (config.layers.len(), 0)),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(llama4_core::Error::shape(
                    "TextModel::from_parts",
                    format!("{what}: {got:?}, config says {want:?}"),
                )
                .into());
            }
        }
        Ok(TextModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            checkpoint: None,
        })
    }

    /// Builds the model from an opened checkpoint and its resolved config.
    pub fn from_checkpoint(ckpt: Checkpoint, config: &ModelConfig) -> Result<Self> {
        Self::from_checkpoint_with_moe(ckpt, config, &mut load_moe)
    }

    /// [`TextModel::from_checkpoint`] with each MoE layer's feed-forward built by `build` (see
    /// [`TextModel::load_with_moe`]).
    pub fn from_checkpoint_with_moe(
        ckpt: Checkpoint,
        config: &ModelConfig,
        build: &mut MoeBuilder<'_>,
    ) -> Result<Self> {
        let cfg = config.text.clone();
        let (h, v) = (cfg.hidden_size(), cfg.vocab_size);
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
            .map(|i| load_layer(&model.scope(&format!("layers.{i}")), &cfg, i, build))
            .collect::<Result<Vec<_>>>()?;
        Ok(TextModel {
            config: cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            checkpoint: Some(ckpt),
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

    /// The cache layout this model's layers need: what each layer's attention says it keeps
    /// ([`SelfAttention::cache_kind`]), so a swapped attention's choice is what caches hold.
    pub fn cache_kinds(&self) -> Vec<LayerKind> {
        self.layers.iter().map(|l| l.self_attn.cache_kind()).collect()
    }

    /// An empty cache for this model with keys and values stored in `dtype`.
    pub fn new_cache(&self, dtype: impl Into<KvDtype>) -> Result<KvCache> {
        let spec = CacheSpec::new(
            self.config.attention.num_key_value_heads,
            self.config.attention.head_dim,
            dtype,
        );
        Ok(KvCache::new(&self.cache_kinds(), spec)?)
    }

    /// Embeddings of `tokens`.
    ///
    /// # Shapes
    /// `[T]` → `[T, H]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Array2<f32>> {
        let mut out = Array2::zeros((tokens.len(), self.config.hidden_size()));
        self.embed_into(tokens, out.view_mut())?;
        Ok(out)
    }

    /// [`TextModel::embed`] into `out` (overwritten).
    ///
    /// # Shapes
    /// `tokens: [T]`, `out: [T, H]`.
    pub fn embed_into(&self, tokens: &[u32], mut out: ArrayViewMut2<f32>) -> Result<()> {
        let (h, v) = (self.config.hidden_size(), self.config.vocab_size);
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
        hidden: ArrayViewMut2<f32>,
        cache: &mut KvCache,
        ws: &mut Workspace,
    ) -> Result<()> {
        let len = hidden.nrows();
        self.forward_seqs(hidden, &mut [Seq { len, cache }], ws)
    }

    /// The decoder over the rows of several sequences at once, stacked in `hidden` in the
    /// order of `seqs`, each appending to its own cache: every layer runs
    /// [`DecoderLayer::forward`] once over all rows. `hidden` goes in as the embeddings and
    /// comes out final-normed.
    ///
    /// # Shapes
    /// `hidden: [Σ len, H]`.
    ///
    /// # Errors
    /// [`Error::Empty`] for no rows or a sequence of none; shape errors; the layers' errors.
    /// Caches may have been appended to on error: callers rewind them
    /// ([`crate::Session`] does).
    pub fn forward_seqs(
        &self,
        mut hidden: ArrayViewMut2<f32>,
        seqs: &mut [Seq<'_>],
        ws: &mut Workspace,
    ) -> Result<()> {
        let (t, h) = hidden.dim();
        if t == 0 || seqs.iter().any(|s| s.len == 0) {
            return Err(Error::Empty("forward"));
        }
        if h != self.config.hidden_size() {
            return Err(llama4_core::Error::shape(
                "TextModel::forward",
                format!(
                    "hidden {:?}, hidden_size {}",
                    hidden.dim(),
                    self.config.hidden_size()
                ),
            )
            .into());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(i, hidden.view_mut(), seqs, ws)?;
        }
        rms_norm_inplace(hidden, Some(self.norm.view()), self.config.rms_norm_eps())?;
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

    /// Logits for every position of `tokens` in one pass with no cache kept: the decoder's
    /// body over a throwaway f32 cache. A reference path for tests; generation goes through
    /// [`crate::Session`].
    ///
    /// # Shapes
    /// `[T]` → `[T, V]`.
    pub fn forward_uncached(&self, tokens: &[u32]) -> Result<Array2<f32>> {
        if tokens.is_empty() {
            return Err(Error::Empty("forward_uncached"));
        }
        let mut cache = self.new_cache(DType::F32)?;
        let hidden = self.forward_hidden(self.embed(tokens)?, &mut cache)?;
        self.logits(hidden.view())
    }
}

/// How to load a safetensors checkpoint: the load-time quantisation and a progress observer.
/// The default loads as stored, silently.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Load-time quantisation of the weights it selects (see
    /// [`TextModel::load_with_quantization`]).
    pub quantization: Option<QuantPolicy>,
    /// Told of every tensor loaded, in stored bytes; the library draws nothing itself.
    pub progress: Option<SharedProgress>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("quantization", &self.quantization)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// Builds the feed-forward of MoE layer `layer` from its scope (`…layers.{layer}.feed_forward`)
/// and sizes: the hook of [`TextModel::load_with_moe`].
pub type MoeBuilder<'a> = dyn FnMut(usize, &Scope<'_>, &MoeConfig) -> Result<FeedForwardLayer> + 'a;

/// The MoE layer as the checkpoint holds it: every expert, the router and the shared expert.
pub(crate) fn load_moe(_layer: usize, scope: &Scope<'_>, config: &MoeConfig) -> Result<FeedForwardLayer> {
    Ok(FeedForwardLayer::Moe(Box::new(Moe::load(scope, config)?)))
}

fn load_layer(scope: &Scope, cfg: &TextConfig, i: usize, build: &mut MoeBuilder<'_>) -> Result<DecoderLayer> {
    let h = cfg.hidden_size();
    let spec = cfg.layers[i];
    let encoding = if spec.rope {
        PosEncoding::Rope
    } else {
        PosEncoding::NoPe
    };
    let self_attn = Attention::load(&scope.scope("self_attn"), &cfg.layer_attention(i), encoding)?;
    let ff = scope.scope("feed_forward");
    let feed_forward = if spec.moe {
        let moe_cfg = MoeConfig::llama4(
            h,
            cfg.intermediate_size,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
        );
        build(i, &ff, &moe_cfg)?
    } else {
        FeedForwardLayer::Dense(Mlp::load(&ff, h, cfg.intermediate_size_mlp)?)
    };
    Ok(DecoderLayer {
        input_layernorm: scope.vector("input_layernorm.weight", h)?,
        post_attention_layernorm: scope.vector("post_attention_layernorm.weight", h)?,
        self_attn: AttentionLayer::Llama4(Box::new(self_attn)),
        feed_forward,
        rms_norm_eps: cfg.rms_norm_eps(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::s;

    #[test]
    fn embed_into_a_strided_view_equals_embed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/scout");
        let model = TextModel::load(dir).unwrap();
        let tokens = [3, 0, 511, 7];
        let want = model.embed(&tokens).unwrap();
        let mut wide = Array2::from_elem((tokens.len(), 2 * model.config().hidden_size()), f32::NAN);
        model.embed_into(&tokens, wide.slice_mut(s![.., ..;2])).unwrap();
        assert_eq!(wide.slice(s![.., ..;2]), want);
        assert!(want.iter().all(|v| v.is_finite()));
    }
}
