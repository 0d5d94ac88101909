//! The seam a decoder layer holds its attention through: [`SelfAttention`].

use std::fmt::Debug;

use llama4_core::kernels::attention::AttentionScratch;
use llama4_core::{Error, KvData, KvView, LayerKind, Result};
use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2};

/// Head counts and widths of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Width of the residual stream `H`.
    pub hidden_size: usize,
    /// Query heads `Hq`.
    pub num_heads: usize,
    /// Key/value heads `Hkv` (dividing `Hq`).
    pub num_kv_heads: usize,
    /// Dimension `D` of one head.
    pub head_dim: usize,
}

impl AttnShape {
    /// `Hq · D`: the width of the heads' outputs, before the output projection.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// Queries, keys and values of a batch of tokens, ready for the cache and the kernel (for
/// Llama 4: RoPE and QK norm applied on RoPE layers, temperature on NoPE layers).
///
/// [`SelfAttention::project_into`] refills one in place; the default value is empty.
#[derive(Clone, Debug, Default)]
pub struct Projected {
    /// `[T, Hq, D]`.
    pub q: Array3<f32>,
    /// `[T, Hkv, D]`.
    pub k: Array3<f32>,
    /// `[T, Hkv, D]`.
    pub v: Array3<f32>,
}

/// A decoder layer's self-attention, in the three steps the decoder drives around its cache:
///
/// 1. [`SelfAttention::project_into`]: q, k, v of the new tokens (all rows of a batch at once);
/// 2. the caller appends k and v to the layer's cache, which keeps what
///    [`SelfAttention::cache_kind`] says, and for each sequence calls
///    [`SelfAttention::attend_into`] over the cache's keys and values;
/// 3. [`SelfAttention::output_into`]: the heads' outputs back to the residual width (all rows
///    at once, so a batch reads the output weights once).
///
/// Whatever [`SelfAttention::cache_kind`] returns is what every path runs with: the cached
/// decoder splits prefills at its chunk boundaries and sizes the cache from it, and
/// [`SelfAttention::forward_uncached`] does the same without a cache. Errors of an
/// implementation outside this workspace go through [`Error::component`].
pub trait SelfAttention: Send + Sync + Debug {
    /// Head counts and widths.
    fn shape(&self) -> AttnShape;

    /// Which keys the layer's queries see, hence what its cache keeps: [`LayerKind::Global`]
    /// keeps everything (use it for any window the cache cannot bound, e.g. a sliding window
    /// whose mask the layer applies in [`SelfAttention::attend_into`]).
    fn cache_kind(&self) -> LayerKind;

    /// Projects the normed hidden states `x` of tokens at absolute `positions` into `out`
    /// (reshaped in place: once it has held `T` tokens, calls with up to `T` allocate nothing).
    ///
    /// # Shapes
    /// `x: [T, H]`, `positions: [T]` → q `[T, Hq, D]`, k, v `[T, Hkv, D]`.
    fn project_into(&self, x: ArrayView2<f32>, positions: &[usize], out: &mut Projected) -> Result<()>;

    /// Attention of the queries `q` (at `positions`) over one sequence's cached keys and values,
    /// the current tokens' included; slot 0 of the views is at absolute position
    /// `k.first_pos`. Writes the heads' outputs (overwritten).
    ///
    /// # Shapes
    /// `q: [T, Hq, D]`, `positions: [T]`, `k, v: [Hkv, len, D]` views, `heads: [T, Hq·D]`.
    fn attend_into(
        &self,
        q: ArrayView3<f32>,
        positions: &[usize],
        k: &KvView,
        v: &KvView,
        heads: ArrayViewMut2<f32>,
        scratch: &mut AttentionScratch,
    ) -> Result<()>;

    /// The output projection (overwrites `out`).
    ///
    /// # Shapes
    /// `heads: [T, Hq·D]`, `out: [T, H]`.
    fn output_into(&self, heads: ArrayView2<f32>, out: ArrayViewMut2<f32>) -> Result<()>;

    /// [`SelfAttention::attend_into`] then [`SelfAttention::output_into`], allocating both
    /// results: one sequence's step, for callers that do not keep buffers.
    ///
    /// # Shapes
    /// `q: [T, Hq, D]`, `positions: [T]`, `k, v: [Hkv, len, D]` views → `[T, H]`.
    fn attend(&self, q: ArrayView3<f32>, positions: &[usize], k: &KvView, v: &KvView) -> Result<Array2<f32>> {
        let shape = self.shape();
        let t = q.dim().0;
        let mut heads = Array2::zeros((t, shape.q_width()));
        self.attend_into(
            q,
            positions,
            k,
            v,
            heads.view_mut(),
            &mut AttentionScratch::default(),
        )?;
        let mut out = Array2::zeros((t, shape.hidden_size));
        self.output_into(heads.view(), out.view_mut())?;
        Ok(out)
    }

    /// The whole layer over a sequence at positions `start_pos..start_pos + T` with no cache:
    /// the keys are those of `x` only, appended and attended piece by piece as a cache of
    /// [`SelfAttention::cache_kind`] would hold them. A reference path for one layer; the
    /// decoder's uncached path is its cached body over a throwaway cache.
    ///
    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    fn forward_uncached(&self, x: ArrayView2<f32>, start_pos: usize) -> Result<Array2<f32>> {
        let shape = self.shape();
        let t = x.nrows();
        let positions: Vec<usize> = (start_pos..start_pos + t).collect();
        let mut p = Projected::default();
        self.project_into(x, &positions, &mut p)?;
        // The cache layout `[Hkv, T, D]`.
        let k =
            p.k.view()
                .permuted_axes([1, 0, 2])
                .as_standard_layout()
                .into_owned();
        let v =
            p.v.view()
                .permuted_axes([1, 0, 2])
                .as_standard_layout()
                .into_owned();
        let d = shape.head_dim;
        let (Some(kd), Some(vd)) = (k.as_slice(), v.as_slice()) else {
            return Err(Error::shape("forward_uncached", "keys not in standard layout"));
        };
        let kind = self.cache_kind();
        let mut heads = Array2::zeros((t, shape.q_width()));
        let mut scratch = AttentionScratch::default();
        for seg in kind.segments(start_pos, t) {
            // What a cache of this kind holds once the segment is appended: the chunk of the
            // segment up to its end, for a chunked layer; everything so far, for a global one.
            let first = kind.first_visible(start_pos + seg.end - 1).max(start_pos) - start_pos;
            let k_view = KvView::contiguous(
                KvData::F32(&kd[first * d..]),
                shape.num_kv_heads,
                seg.end - first,
                d,
                t * d,
                start_pos + first,
            );
            let v_view = KvView::contiguous(
                KvData::F32(&vd[first * d..]),
                k_view.heads,
                k_view.len,
                d,
                t * d,
                k_view.first_pos,
            );
            self.attend_into(
                p.q.slice(s![seg.clone(), .., ..]),
                &positions[seg.clone()],
                &k_view,
                &v_view,
                heads.slice_mut(s![seg, ..]),
                &mut scratch,
            )?;
        }
        let mut out = Array2::zeros((t, shape.hidden_size));
        self.output_into(heads.view(), out.view_mut())?;
        Ok(out)
    }
}
