//! The attention layer of a Llama 4 text decoder layer: projections, RoPE or NoPE treatment of
//! the queries and keys, the kernel, and the output projection.

use llama4_core::kernels::attention::{attention_into, AttentionScratch, AttnContext};
use llama4_core::kernels::rms_norm_inplace;
use llama4_core::scratch::reshape_reusing;
use llama4_core::{Error, KvView, LayerKind, Linear, Result, Scope};
use ndarray::{Array3, ArrayView2, ArrayView3, ArrayViewMut2};

use crate::rope::temperature;
use crate::{AttnConfig, AttnShape, PosEncoding, Projected, Rope, SelfAttention};

/// `a` viewed as `[T, heads · D]` (it is standard layout: see [`reshape_reusing`]).
fn flat_rows(a: &mut Array3<f32>) -> Result<ArrayViewMut2<'_, f32>> {
    let (t, n, d) = a.dim();
    a.view_mut()
        .into_shape_with_order((t, n * d))
        .map_err(|e| Error::shape("Attention::project", e.to_string()))
}

/// One Llama 4 text attention layer (`model.layers.{i}.self_attn`): the [`SelfAttention`] the
/// decoder holds for each layer unless a caller swaps it.
///
/// RoPE layers rotate q and k (interleaved pairs), optionally RMS-normalise them per head, and
/// attend within their chunk; NoPE layers scale q by the position's temperature and attend over
/// the whole context.
#[derive(Clone, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    encoding: PosEncoding,
    cfg: AttnConfig,
    rope: Option<Rope>,
    cache_kind: LayerKind,
}

impl Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` (`.weight`, and `.bias` when
    /// `cfg.attention_bias` or when the checkpoint has one) from `scope`
    /// (`model.layers.{i}.self_attn`).
    pub fn load(scope: &Scope, cfg: &AttnConfig, encoding: PosEncoding) -> Result<Self> {
        cfg.validate()?;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q_width = cfg.num_attention_heads * d;
        let kv_width = cfg.num_key_value_heads * d;
        let load = |name: &str, shape: [usize; 2]| {
            if cfg.attention_bias {
                Linear::load_with_bias(scope, name, shape)
            } else {
                Linear::load(scope, name, shape)
            }
        };
        let q_proj = load("q_proj", [q_width, h])?;
        let k_proj = load("k_proj", [kv_width, h])?;
        let v_proj = load("v_proj", [kv_width, h])?;
        let o_proj = load("o_proj", [h, q_width])?;
        Self::new(q_proj, k_proj, v_proj, o_proj, cfg, encoding)
    }

    /// A layer from its projections (`[Hq·D, H]`, `[Hkv·D, H]` twice, `[H, Hq·D]`).
    pub fn new(
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
        o_proj: Linear,
        cfg: &AttnConfig,
        encoding: PosEncoding,
    ) -> Result<Self> {
        cfg.validate()?;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_width, kv_width) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        for (name, l, out_f, in_f) in [
            ("q_proj", &q_proj, q_width, h),
            ("k_proj", &k_proj, kv_width, h),
            ("v_proj", &v_proj, kv_width, h),
            ("o_proj", &o_proj, h, q_width),
        ] {
            if (l.out_features(), l.in_features()) != (out_f, in_f) {
                return Err(Error::shape(
                    "Attention::new",
                    format!(
                        "{name} is [{}, {}], the config needs [{out_f}, {in_f}]",
                        l.out_features(),
                        l.in_features()
                    ),
                ));
            }
        }
        let (rope, cache_kind) = match encoding {
            PosEncoding::Rope => (Some(Rope::new(d, &cfg.rope)?), cfg.chunk_kind()?),
            PosEncoding::NoPe => (None, LayerKind::Global),
        };
        Ok(Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            encoding,
            cfg: cfg.clone(),
            rope,
            cache_kind,
        })
    }

    /// The same layer attending over `kind` instead (a RoPE layer made global, or given another
    /// chunk size). The cache of a decoder holding it follows.
    pub fn with_cache_kind(mut self, kind: LayerKind) -> Self {
        self.cache_kind = kind;
        self.cfg.attention_chunk_size = kind.chunk();
        self
    }

    /// The same layer with its RoPE frequencies divided by `factors` (see
    /// [`Rope::with_freq_factors`]); a NoPE layer is returned unchanged.
    ///
    /// # Shapes
    /// `factors: [D/2]`.
    pub fn with_rope_freq_factors(mut self, factors: &[f32]) -> Result<Self> {
        if let Some(rope) = self.rope.take() {
            self.rope = Some(rope.with_freq_factors(factors)?);
        }
        Ok(self)
    }

    /// RoPE or NoPE.
    pub fn encoding(&self) -> PosEncoding {
        self.encoding
    }

    /// The configuration the layer was built with.
    pub fn config(&self) -> &AttnConfig {
        &self.cfg
    }

    /// The RoPE frequencies (RoPE layers only).
    pub fn rope(&self) -> Option<&Rope> {
        self.rope.as_ref()
    }

    /// `q_proj`, `k_proj`, `v_proj`, `o_proj`.
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// [`SelfAttention::project_into`] into a new [`Projected`].
    ///
    /// # Shapes
    /// `x: [T, H]` (already normed), `positions: [T]` → q `[T, Hq, D]`, k, v `[T, Hkv, D]`.
    pub fn project(&self, x: ArrayView2<f32>, positions: &[usize]) -> Result<Projected> {
        let mut p = Projected::default();
        self.project_into(x, positions, &mut p)?;
        Ok(p)
    }

    /// RoPE + QK norm (RoPE layers) or the temperature (NoPE layers) on fresh projections.
    fn position_queries_and_keys(
        &self,
        q: &mut Array3<f32>,
        k: &mut Array3<f32>,
        positions: &[usize],
    ) -> Result<()> {
        let c = &self.cfg;
        match self.encoding {
            PosEncoding::Rope => {
                if let Some(rope) = &self.rope {
                    rope.apply(q.view_mut(), positions)?;
                    rope.apply(k.view_mut(), positions)?;
                }
                if c.use_qk_norm {
                    // Per head, no weight, eps = rms_norm_eps, after RoPE.
                    for a in [q, k] {
                        let n = a.len() / c.head_dim;
                        let rows = a
                            .view_mut()
                            .into_shape_with_order((n, c.head_dim))
                            .map_err(|e| Error::shape("Attention::project", e.to_string()))?;
                        rms_norm_inplace(rows, None, c.rms_norm_eps)?;
                    }
                }
            }
            PosEncoding::NoPe => {
                if c.attn_temperature_tuning {
                    for (mut row, &p) in q.outer_iter_mut().zip(positions) {
                        row *= temperature(p, c.floor_scale, c.attn_scale);
                    }
                }
            }
        }
        Ok(())
    }
}

impl SelfAttention for Attention {
    fn shape(&self) -> AttnShape {
        let c = &self.cfg;
        AttnShape {
            hidden_size: c.hidden_size,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        }
    }

    fn cache_kind(&self) -> LayerKind {
        self.cache_kind
    }

    fn project_into(&self, x: ArrayView2<f32>, positions: &[usize], out: &mut Projected) -> Result<()> {
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
        // One call for the three: quantised weights quantise `x` once.
        Linear::forward_shared_into(
            x,
            [&self.q_proj, &self.k_proj, &self.v_proj],
            [flat_rows(q)?, flat_rows(k)?, flat_rows(v)?],
        )?;
        self.position_queries_and_keys(q, k, positions)
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
            mask: &self.cache_kind,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let out = heads
            .into_shape_with_order((t, hq, d))
            .map_err(|e| Error::shape("Attention::attend", e.to_string()))?;
        attention_into(q, k, v, &ctx, out, scratch)
    }

    fn output_into(&self, heads: ArrayView2<f32>, out: ArrayViewMut2<f32>) -> Result<()> {
        self.o_proj.forward_into(heads, out)
    }
}
