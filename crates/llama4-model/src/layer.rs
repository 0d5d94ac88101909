//! One decoder layer and the one body every path runs it with: one sequence or many, cached or
//! not (the uncached path is this body over a throwaway cache).

use irope_attn::{Attention, AttentionScratch, AttnShape, Projected, SelfAttention};
use kv_cache::KvCache;
use llama4_core::kernels::rms_norm_inplace;
use llama4_core::scratch::reshape_reusing;
use llama4_core::{KvView, LayerKind};
use moe_router::{FeedForward, Mlp, Moe};
use ndarray::{s, Array1, Array2, ArrayView2, ArrayView3, ArrayViewMut2};

use crate::{Error, Result};

/// The attention of one decoder layer: Llama 4's, or any other [`SelfAttention`].
#[derive(Debug)]
pub enum AttentionLayer {
    /// Llama 4's attention (RoPE or NoPE), as loaded from the checkpoint.
    Llama4(Box<Attention>),
    /// Anything else a researcher plugs in.
    Custom(Box<dyn SelfAttention>),
}

impl AttentionLayer {
    fn inner(&self) -> &dyn SelfAttention {
        match self {
            AttentionLayer::Llama4(a) => a.as_ref(),
            AttentionLayer::Custom(a) => a.as_ref(),
        }
    }
}

impl SelfAttention for AttentionLayer {
    fn shape(&self) -> AttnShape {
        self.inner().shape()
    }

    fn cache_kind(&self) -> LayerKind {
        self.inner().cache_kind()
    }

    fn project_into(
        &self,
        x: ArrayView2<f32>,
        positions: &[usize],
        out: &mut Projected,
    ) -> llama4_core::Result<()> {
        self.inner().project_into(x, positions, out)
    }

    fn attend_into(
        &self,
        q: ArrayView3<f32>,
        positions: &[usize],
        k: &KvView,
        v: &KvView,
        heads: ArrayViewMut2<f32>,
        scratch: &mut AttentionScratch,
    ) -> llama4_core::Result<()> {
        self.inner().attend_into(q, positions, k, v, heads, scratch)
    }

    fn output_into(&self, heads: ArrayView2<f32>, out: ArrayViewMut2<f32>) -> llama4_core::Result<()> {
        self.inner().output_into(heads, out)
    }
}

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
    fn inner(&self) -> &dyn FeedForward {
        match self {
            FeedForwardLayer::Dense(m) => m,
            FeedForwardLayer::Moe(m) => m.as_ref(),
            FeedForwardLayer::Custom(f) => f.as_ref(),
        }
    }
}

impl FeedForward for FeedForwardLayer {
    fn forward(&self, x: ArrayView2<f32>) -> moe_router::Result<Array2<f32>> {
        self.inner().forward(x)
    }

    fn forward_into(
        &self,
        x: ArrayView2<f32>,
        out: ArrayViewMut2<f32>,
        scratch: &mut moe_router::Scratch,
    ) -> moe_router::Result<()> {
        self.inner().forward_into(x, out, scratch)
    }
}

/// One sequence's part of a forward pass: its next `len` rows of the stacked hidden states and
/// its cache. Its tokens sit at the positions that follow what the cache holds.
#[derive(Debug)]
pub struct Seq<'c> {
    /// Rows (tokens) of this sequence in the pass.
    pub len: usize,
    /// The sequence's cache, appended to by every layer.
    pub cache: &'c mut KvCache,
}

/// The buffers a forward pass works in: activations, q/k/v, the heads' outputs, the attention
/// kernel's and the feed-forwards' scratch, logits. Once it has held `T` rows, passes of up to
/// `T` rows allocate nothing. A [`crate::Session`] owns one; a batched pass takes one from its
/// caller.
#[derive(Debug, Default)]
pub struct Workspace {
    /// Absolute position of each row of the current pass, `[T]`.
    pub(crate) positions: Vec<usize>,
    /// Normed input of the current sub-layer, `[T, H]`.
    pub(crate) normed: Array2<f32>,
    /// Output of the current sub-layer, `[T, H]`.
    pub(crate) out: Array2<f32>,
    pub(crate) projected: Projected,
    /// The attention heads' outputs, `[T, Hq·D]`.
    pub(crate) heads: Array2<f32>,
    pub(crate) attention: AttentionScratch,
    pub(crate) feed_forward: moe_router::Scratch,
    /// Embeddings, then hidden states, of a batched pass, `[T, H]`.
    pub(crate) hidden: Array2<f32>,
    /// The last row of each sequence of a batched pass, `[n, H]`.
    pub(crate) last: Array2<f32>,
    /// `[T', V]` from [`crate::TextModel::logits_into`].
    pub(crate) logits: Array2<f32>,
}

impl Workspace {
    /// An empty workspace (buffers grow on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// The logits of the last [`crate::TextModel::logits_into`] call, `[T', V]`.
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
    /// `self_attn`. Its [`SelfAttention::cache_kind`] is what the layer's cache keeps: a cache
    /// made before a swap that changes it is refused ([`Error::CacheKind`]).
    pub self_attn: AttentionLayer,
    /// `feed_forward`.
    pub feed_forward: FeedForwardLayer,
    /// `rms_norm_eps` of both norms.
    pub rms_norm_eps: f32,
}

impl DecoderLayer {
    /// The layer over the rows of one or more sequences, stacked in `hidden` in the order of
    /// `seqs`: norm, attention (each sequence against its own cache, layer `index` of it),
    /// residual, norm, feed-forward, residual. Everything but attention runs once over all
    /// rows, so a batch reads each weight once (the MoE groups rows by expert).
    ///
    /// # Shapes
    /// `hidden: [Σ len, H]`, updated in place.
    ///
    /// # Errors
    /// Shape errors; [`Error::CacheKind`] when a cache keeps another [`LayerKind`] than the
    /// attention needs; errors of the parts. Caches may have been appended to: the caller
    /// rewinds them ([`KvCache::truncate`]).
    pub fn forward(
        &self,
        index: usize,
        mut hidden: ArrayViewMut2<f32>,
        seqs: &mut [Seq<'_>],
        ws: &mut Workspace,
    ) -> Result<()> {
        let (t, h) = hidden.dim();
        let shape = self.self_attn.shape();
        if seqs.iter().map(|s| s.len).sum::<usize>() != t || h != shape.hidden_size {
            return Err(llama4_core::Error::shape(
                "DecoderLayer::forward",
                format!("hidden {:?} for sequences of {:?} rows", hidden.dim(), lens(seqs)),
            )
            .into());
        }
        let kind = self.self_attn.cache_kind();
        ws.positions.clear();
        for seq in seqs.iter() {
            let cached = seq.cache.layer(index)?;
            if cached.kind() != kind {
                return Err(Error::CacheKind {
                    layer: index,
                    cache: cached.kind(),
                    attention: kind,
                });
            }
            let start = cached.next_pos();
            ws.positions.extend(start..start + seq.len);
        }
        reshape_reusing(&mut ws.normed, (t, h));
        reshape_reusing(&mut ws.out, (t, h));
        reshape_reusing(&mut ws.heads, (t, shape.q_width()));

        ws.normed.assign(&hidden);
        rms_norm_inplace(
            ws.normed.view_mut(),
            Some(self.input_layernorm.view()),
            self.rms_norm_eps,
        )?;
        self.self_attn
            .project_into(ws.normed.view(), &ws.positions, &mut ws.projected)?;
        self.attend(index, seqs, ws)?;
        self.self_attn.output_into(ws.heads.view(), ws.out.view_mut())?;
        hidden += &ws.out;

        ws.normed.assign(&hidden);
        rms_norm_inplace(
            ws.normed.view_mut(),
            Some(self.post_attention_layernorm.view()),
            self.rms_norm_eps,
        )?;
        self.feed_forward
            .forward_into(ws.normed.view(), ws.out.view_mut(), &mut ws.feed_forward)?;
        hidden += &ws.out;
        Ok(())
    }

    /// Appends each sequence's keys and values to its cache and attends over it, into the
    /// heads' rows of that sequence. A chunked layer appends and attends one chunk at a time:
    /// its cache only holds the chunk the current queries are in.
    fn attend(&self, index: usize, seqs: &mut [Seq<'_>], ws: &mut Workspace) -> Result<()> {
        let p = &ws.projected;
        let mut row = 0;
        for seq in seqs.iter_mut() {
            for seg in seq.cache.segments(index, seq.len)? {
                let rows = row + seg.start..row + seg.end;
                let sl = s![rows.clone(), .., ..];
                seq.cache.append(index, p.k.slice(sl), p.v.slice(sl))?;
                let view = seq.cache.view(index)?;
                self.self_attn.attend_into(
                    p.q.slice(sl),
                    &ws.positions[rows.clone()],
                    &view.k,
                    &view.v,
                    ws.heads.slice_mut(s![rows, ..]),
                    &mut ws.attention,
                )?;
            }
            row += seq.len;
        }
        Ok(())
    }
}

fn lens(seqs: &[Seq<'_>]) -> Vec<usize> {
    seqs.iter().map(|s| s.len).collect()
}
