//! The attention layer of a Llama 4 text decoder layer: projections, RoPE or NoPE treatment of
//! the queries and keys, the kernel, and the output projection.

use llama4_core::kernels::{linear_into, rms_norm_inplace};
use llama4_core::scratch::{prefix, reshape_reusing};
use llama4_core::{Error, KvData, KvView, Result, Scope, Weight};
use ndarray::{s, Array1, Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

use crate::kernel::{attention_into, AttentionScratch};
use crate::rope::temperature;
use crate::{AttnConfig, AttnContext, LayerKind, MaskKind, Rope};

/// A linear map with an optional bias.
#[derive(Clone, Debug)]
struct Linear {
    weight: Weight,
    bias: Option<Array1<f32>>,
}

impl Linear {
    fn load(scope: &Scope, name: &str, [out_f, in_f]: [usize; 2], want_bias: bool) -> Result<Self> {
        let weight = scope.weight(&format!("{name}.weight"), [out_f, in_f])?;
        let bias_name = format!("{name}.bias");
        let bias = if want_bias || scope.contains(&bias_name) {
            Some(scope.vector(&bias_name, out_f)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// # Shapes
    /// `x: [T, in]`, `y: [T, out]` (overwritten).
    fn forward_into(&self, x: ArrayView2<f32>, mut y: ArrayViewMut2<f32>) -> Result<()> {
        linear_into(x, &self.weight, y.view_mut())?;
        if let Some(b) = &self.bias {
            y += b;
        }
        Ok(())
    }
}

/// `a` viewed as `[T, heads · D]` (it is standard layout: see [`reshape_reusing`]).
fn flat_rows(a: &mut Array3<f32>) -> Result<ArrayViewMut2<'_, f32>> {
    let (t, n, d) = a.dim();
    a.view_mut()
        .into_shape_with_order((t, n * d))
        .map_err(|e| Error::shape("Attention::project", e.to_string()))
}

/// Queries, keys and values of a batch of tokens, ready for the cache and the kernel: RoPE
/// and QK norm applied (RoPE layers), temperature applied to `q` (NoPE layers).
///
/// [`Attention::project_into`] refills one in place; the default value is empty.
#[derive(Clone, Debug, Default)]
pub struct Projected {
    /// `[T, Hq, D]`.
    pub q: Array3<f32>,
    /// `[T, Hkv, D]`.
    pub k: Array3<f32>,
    /// `[T, Hkv, D]`.
    pub v: Array3<f32>,
}

/// One Llama 4 text attention layer (`model.layers.{i}.self_attn`).
///
/// A step is two calls around the caller's cache: [`Attention::project`] gives q, k, v; the
/// caller appends k and v to its cache; [`Attention::attend`] runs attention over the cache's
/// views and the output projection. [`Attention::forward`] does both for a whole sequence
/// without a cache.
#[derive(Clone, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    kind: LayerKind,
    cfg: AttnConfig,
    rope: Option<Rope>,
    mask: MaskKind,
}

impl Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` (`.weight`, and `.bias` when
    /// `cfg.attention_bias` or when the checkpoint has one) from `scope`
    /// (`model.layers.{i}.self_attn`).
    pub fn load(scope: &Scope, cfg: &AttnConfig, kind: LayerKind) -> Result<Self> {
        cfg.validate()?;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q_width = cfg.num_attention_heads * d;
        let kv_width = cfg.num_key_value_heads * d;
        let bias = cfg.attention_bias;
        let q_proj = Linear::load(scope, "q_proj", [q_width, h], bias)?;
        let k_proj = Linear::load(scope, "k_proj", [kv_width, h], bias)?;
        let v_proj = Linear::load(scope, "v_proj", [kv_width, h], bias)?;
        let o_proj = Linear::load(scope, "o_proj", [h, q_width], bias)?;
        let (rope, mask) = match kind {
            LayerKind::Rope => (
                Some(Rope::new(d, &cfg.rope)?),
                MaskKind::from_chunk_size(cfg.attention_chunk_size),
            ),
            LayerKind::NoPe => (None, MaskKind::Causal),
        };
        Ok(Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            kind,
            cfg: cfg.clone(),
            rope,
            mask,
        })
    }

    /// RoPE or NoPE.
    pub fn kind(&self) -> LayerKind {
        self.kind
    }

    /// The layer's mask (chunked for RoPE layers with a chunk size, else causal).
    pub fn mask(&self) -> MaskKind {
        self.mask
    }

    /// The configuration the layer was built with.
    pub fn config(&self) -> &AttnConfig {
        &self.cfg
    }

    /// The RoPE frequencies (RoPE layers only).
    pub fn rope(&self) -> Option<&Rope> {
        self.rope.as_ref()
    }

    /// Projects `x` and prepares q and k for the given absolute positions.
    ///
    /// # Shapes
    /// `x: [T, H]` (already normed), `positions: [T]` → q `[T, Hq, D]`, k, v `[T, Hkv, D]`.
    pub fn project(&self, x: ArrayView2<f32>, positions: &[usize]) -> Result<Projected> {
        let mut p = Projected::default();
        self.project_into(x, positions, &mut p)?;
        Ok(p)
    }

    /// [`Attention::project`] into `out`, whose arrays are reshaped in place: once they have
    /// held `T` tokens, calls with up to `T` tokens allocate nothing.
    ///
    /// # Shapes
    /// As [`Attention::project`].
    pub fn project_into(&self, x: ArrayView2<f32>, positions: &[usize], out: &mut Projected) -> Result<()> {
        let c = &self.cfg;
        let t = x.nrows();
        if positions.len() != t || x.ncols() != c.hidden_size {
            return Err(Error::shape(
                "Attention::project",
                format!(
                    "x {:?}, {} positions, hidden {}",
                    x.dim(),
                    positions.len(),
                    c.hidden_size
                ),
            ));
        }
        let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let Projected { q, k, v } = out;
        reshape_reusing(q, (t, hq, d));
        reshape_reusing(k, (t, hkv, d));
        reshape_reusing(v, (t, hkv, d));
        self.q_proj.forward_into(x, flat_rows(q)?)?;
        self.k_proj.forward_into(x, flat_rows(k)?)?;
        self.v_proj.forward_into(x, flat_rows(v)?)?;
        match self.kind {
            LayerKind::Rope => {
                if let Some(rope) = &self.rope {
                    rope.apply(q.view_mut(), positions)?;
                    rope.apply(k.view_mut(), positions)?;
                }
                if c.use_qk_norm {
                    // Per head, no weight, eps = rms_norm_eps, after RoPE.
                    for a in [q, k] {
                        let n = a.len() / d;
                        let rows = a
                            .view_mut()
                            .into_shape_with_order((n, d))
                            .map_err(|e| Error::shape("Attention::project", e.to_string()))?;
                        rms_norm_inplace(rows, None, c.rms_norm_eps)?;
                    }
                }
            }
            LayerKind::NoPe => {
                if c.attn_temperature_tuning {
                    for (mut row, &p) in q.outer_iter_mut().zip(positions) {
                        row *= temperature(p, c.floor_scale, c.attn_scale);
                    }
                }
            }
        }
        Ok(())
    }

    /// Attention of `q` over cached keys and values, then the output projection.
    ///
    /// The views hold the keys and values of this layer including the current tokens; their
    /// slot 0 is at absolute position `first_pos`. The layer's mask decides which slots each
    /// query sees.
    ///
    /// # Shapes
    /// `q: [T, Hq, D]`, `positions: [T]`, `k, v: [Hkv, len, D]` views → `[T, H]`.
    pub fn attend(
        &self,
        q: ArrayView3<f32>,
        positions: &[usize],
        k: &KvView,
        v: &KvView,
    ) -> Result<Array2<f32>> {
        let mut out = Array2::zeros((q.dim().0, self.cfg.hidden_size));
        self.attend_into(
            q,
            positions,
            k,
            v,
            out.view_mut(),
            &mut AttentionScratch::default(),
        )?;
        Ok(out)
    }

    /// [`Attention::attend`] writing into `out` (overwritten), with the kernel's and the head
    /// outputs' buffers in `scratch`: once warmed up to `T` tokens, calls allocate nothing.
    ///
    /// # Shapes
    /// `q: [T, Hq, D]`, `positions: [T]`, `k, v: [Hkv, len, D]` views, `out: [T, H]`.
    pub fn attend_into(
        &self,
        q: ArrayView3<f32>,
        positions: &[usize],
        k: &KvView,
        v: &KvView,
        out: ArrayViewMut2<f32>,
        scratch: &mut AttentionScratch,
    ) -> Result<()> {
        let c = &self.cfg;
        let (t, hq, d) = q.dim();
        if hq != c.num_attention_heads || d != c.head_dim || k.heads != c.num_key_value_heads {
            return Err(Error::shape(
                "Attention::attend",
                format!("q {:?}, {} kv heads, config {:?}", q.dim(), k.heads, c),
            ));
        }
        let ctx = AttnContext {
            positions,
            mask: self.mask,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        // The heads' outputs live in the scratch between the kernel and `o_proj`; they are moved
        // out for the kernel call, which borrows the rest of the scratch.
        // The kernel overwrites them: grown, never cleared.
        let mut heads = std::mem::take(&mut scratch.heads);
        let result = self.attend_heads(q, k, v, &ctx, prefix(&mut heads, t * hq * d), out, scratch);
        scratch.heads = heads;
        result
    }

    /// The kernel into `heads` (`[T, Hq, D]`), then `o_proj` into `out`.
    #[allow(clippy::too_many_arguments)]
    fn attend_heads(
        &self,
        q: ArrayView3<f32>,
        k: &KvView,
        v: &KvView,
        ctx: &AttnContext,
        heads: &mut [f32],
        out: ArrayViewMut2<f32>,
        scratch: &mut AttentionScratch,
    ) -> Result<()> {
        let (t, hq, d) = q.dim();
        let shape_err = |e: ndarray::ShapeError| Error::shape("Attention::attend", e.to_string());
        let view = ArrayViewMut3::from_shape((t, hq, d), &mut *heads).map_err(shape_err)?;
        attention_into(q, k, v, ctx, view, scratch)?;
        let flat = ArrayView2::from_shape((t, hq * d), &*heads).map_err(shape_err)?;
        self.o_proj.forward_into(flat, out)
    }

    /// The whole layer over a sequence at positions `start_pos..start_pos + T` with no cache:
    /// the keys are those of `x` only. Chunked layers run each chunk's queries against that
    /// chunk's keys only, as a chunked cache would hold them.
    ///
    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    pub fn forward(&self, x: ArrayView2<f32>, start_pos: usize) -> Result<Array2<f32>> {
        let t = x.nrows();
        let positions: Vec<usize> = (start_pos..start_pos + t).collect();
        let p = self.project(x, &positions)?;
        // The cache layout `[Hkv, T, D]`.
        let k = p.k.permuted_axes([1, 0, 2]).as_standard_layout().into_owned();
        let v = p.v.permuted_axes([1, 0, 2]).as_standard_layout().into_owned();
        let (hkv, _, d) = k.dim();
        let (kd, vd) = (
            k.as_slice().expect("standard layout"),
            v.as_slice().expect("standard layout"),
        );
        // Slots s0..s1 of the `[Hkv, T, D]` arrays as views: each head's rows from s0 on.
        let views = |s0: usize, s1: usize| {
            let view = KvView {
                data: KvData::F32(&kd[s0 * d..]),
                heads: hkv,
                len: s1 - s0,
                head_dim: d,
                head_stride: t * d,
                first_pos: start_pos + s0,
            };
            let values = KvView {
                data: KvData::F32(&vd[s0 * d..]),
                ..view
            };
            (view, values)
        };
        let segments: Vec<(usize, usize)> = match self.mask {
            MaskKind::Causal => vec![(0, t)],
            MaskKind::Chunked(c) => {
                let mut v = Vec::new();
                let mut s0 = 0;
                while s0 < t {
                    let chunk_end = ((start_pos + s0) / c + 1) * c - start_pos;
                    let s1 = chunk_end.min(t);
                    v.push((s0, s1));
                    s0 = s1;
                }
                v
            }
        };
        let mut out = Array2::zeros((t, self.cfg.hidden_size));
        for (s0, s1) in segments {
            // A chunk's queries see only that chunk's keys: hand the kernel just those.
            let (kv, vv) = views(s0, s1);
            let o = self.attend(p.q.slice(s![s0..s1, .., ..]), &positions[s0..s1], &kv, &vv)?;
            out.slice_mut(s![s0..s1, ..]).assign(&o);
        }
        Ok(out)
    }
}
