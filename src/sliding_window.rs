//! A sliding-window attention built outside the model crate from public parts only: what a
//! researcher writes to try another attention in one layer of a Llama 4.

use std::num::NonZeroUsize;

use irope_attn::{attention_into, AttentionScratch, AttnContext, AttnShape, Projected, SelfAttention};
use llama4_core::{AttentionMask, Error, KvView, LayerKind, Result};
use ndarray::{ArrayView2, ArrayView3, ArrayViewMut2};

/// The last `window` keys, up to the query itself (Mistral's sliding window), instead of Llama 4's
/// chunks or the whole context.
#[derive(Clone, Copy, Debug)]
struct Window(NonZeroUsize);

impl AttentionMask for Window {
    fn first_visible(&self, query_pos: usize) -> usize {
        query_pos.saturating_sub(self.0.get() - 1)
    }
}

/// Any attention layer's projections and position treatment (RoPE, QK norm, temperature)
/// with a sliding window of `window` keys. Its cache keeps everything
/// ([`LayerKind::Global`]): the window is applied by the mask, not by what the cache holds.
#[derive(Debug)]
pub struct SlidingWindow<A> {
    inner: A,
    window: Window,
}

impl<A: SelfAttention> SlidingWindow<A> {
    /// `inner` attending over its last `window` keys.
    pub fn new(inner: A, window: NonZeroUsize) -> Self {
        SlidingWindow {
            inner,
            window: Window(window),
        }
    }
}

impl<A: SelfAttention> SelfAttention for SlidingWindow<A> {
    fn shape(&self) -> AttnShape {
        self.inner.shape()
    }

    fn cache_kind(&self) -> LayerKind {
        LayerKind::Global
    }

    fn project_into(&self, x: ArrayView2<f32>, positions: &[usize], out: &mut Projected) -> Result<()> {
        self.inner.project_into(x, positions, out)
    }

    fn attend_into(
        &self,
        q: ArrayView3<f32>,
        positions: &[usize],
        k: &KvView,
        v: &KvView,
        heads: ArrayViewMut2<f32>,
        scratch: &mut AttentionScratch,
    ) -> Result<()> {
        let (t, hq, d) = q.dim();
        let ctx = AttnContext {
            positions,
            mask: &self.window,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let heads = heads
            .into_shape_with_order((t, hq, d))
            .map_err(|e| Error::component("sliding-window attention", e))?;
        attention_into(q, k, v, &ctx, heads, scratch)
    }

    fn output_into(&self, heads: ArrayView2<f32>, out: ArrayViewMut2<f32>) -> Result<()> {
        self.inner.output_into(heads, out)
    }
}
