//! The vision tower (`Llama4VisionModel`) and the projector (`Llama4MultiModalProjector`).

use llama4_core::kernels::{gelu_inplace, layer_norm_inplace, linear, softmax_inplace};
use llama4_core::{Linear, Scope, Weight};
use ndarray::{s, Array1, Array2, Array3, ArrayView2, ArrayView3, ArrayView4, Axis};
use rayon::prelude::*;

use crate::{Error, Result, VisionConfig, LAYER_NORM_EPS};

/// Where the tower's tensors come from, by their Hugging Face names under `vision_model.`
/// (`model.layers.3.self_attn.q_proj.weight`): a safetensors [`Scope`], or a llama.cpp
/// projector GGUF that renames them (see [`crate::mmproj`]). One loader serves both, so the
/// two load the same tower.
pub(crate) trait TowerSource {
    /// Matrix `name` of `[out, in]`.
    fn weight(&self, name: &str, shape: [usize; 2]) -> Result<Weight>;
    /// Tensor `name` of `shape` as f32 values, row-major.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

impl TowerSource for Scope<'_> {
    fn weight(&self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        Ok(Scope::weight(self, name, shape)?)
    }

    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.array(name, shape)?.into_iter().collect())
    }
}

fn vector(src: &dyn TowerSource, name: &str, len: usize) -> Result<Array1<f32>> {
    Ok(Array1::from_vec(src.values(name, &[len])?))
}

/// `name.weight` (`[out, inp]`) and `name.bias` (`[out]`).
fn load_linear(src: &dyn TowerSource, name: &str, out: usize, inp: usize) -> Result<Linear> {
    let weight = src.weight(&format!("{name}.weight"), [out, inp])?;
    Ok(Linear::new(
        weight,
        Some(vector(src, &format!("{name}.bias"), out)?),
    )?)
}

struct LayerNorm {
    weight: Array1<f32>,
    bias: Array1<f32>,
}

impl LayerNorm {
    fn load(src: &dyn TowerSource, name: &str, width: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: vector(src, &format!("{name}.weight"), width)?,
            bias: vector(src, &format!("{name}.bias"), width)?,
        })
    }

    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        let mut y = x.to_owned();
        layer_norm_inplace(y.view_mut(), self.weight.view(), self.bias.view(), LAYER_NORM_EPS)?;
        Ok(y)
    }
}

struct EncoderLayer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    /// Layer `j`'s tensors, `model.layers.{j}.…`.
    fn load(src: &dyn TowerSource, j: usize, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let n = |s: &str| format!("model.layers.{j}.{s}");
        Ok(EncoderLayer {
            input_layernorm: LayerNorm::load(src, &n("input_layernorm"), d)?,
            post_attention_layernorm: LayerNorm::load(src, &n("post_attention_layernorm"), d)?,
            q_proj: load_linear(src, &n("self_attn.q_proj"), d, d)?,
            k_proj: load_linear(src, &n("self_attn.k_proj"), d, d)?,
            v_proj: load_linear(src, &n("self_attn.v_proj"), d, d)?,
            o_proj: load_linear(src, &n("self_attn.o_proj"), d, d)?,
            fc1: load_linear(src, &n("mlp.fc1"), cfg.intermediate_size, d)?,
            fc2: load_linear(src, &n("mlp.fc2"), d, cfg.intermediate_size)?,
        })
    }

    /// # Shapes
    /// `x: [tiles·T, D]` (tile-major), updated in place; `rope: [T, d/2]` pairs `(cos, sin)`.
    fn forward(&self, x: &mut Array2<f32>, tiles: usize, heads: usize, rope: &Rope) -> Result<()> {
        let h = self.input_layernorm.forward(x.view())?;
        let mut q = self.q_proj.forward(h.view())?;
        let mut k = self.k_proj.forward(h.view())?;
        let v = self.v_proj.forward(h.view())?;
        let tokens = x.nrows() / tiles;
        rope.apply(&mut q, tokens, heads);
        rope.apply(&mut k, tokens, heads);
        let ctx = attention(q.view(), k.view(), v.view(), tiles, heads)?;
        *x += &self.o_proj.forward(ctx.view())?;

        let h = self.post_attention_layernorm.forward(x.view())?;
        let mut m = self.fc1.forward(h.view())?;
        gelu_slice(&mut m);
        *x += &self.fc2.forward(m.view())?;
        Ok(())
    }
}

fn gelu_slice(x: &mut Array2<f32>) {
    match x.as_slice_mut() {
        Some(s) => gelu_inplace(s),
        None => x.rows_mut().into_iter().for_each(|mut r| {
            let mut v = r.to_vec();
            gelu_inplace(&mut v);
            r.assign(&Array1::from_vec(v));
        }),
    }
}

/// Bidirectional attention within each tile, per head, scale `d^-0.5`.
///
/// # Shapes
/// `q, k, v: [tiles·T, heads·d]` → `[tiles·T, heads·d]`.
fn attention(
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    v: ArrayView2<f32>,
    tiles: usize,
    heads: usize,
) -> Result<Array2<f32>> {
    let (rows, width) = q.dim();
    let t = rows / tiles;
    let d = width / heads;
    let scale = (d as f32).powf(-0.5);
    // Each (tile, head) is independent: compute them in parallel, then scatter.
    let outs: Vec<Array2<f32>> = (0..tiles * heads)
        .into_par_iter()
        .map(|job| {
            let (tile, head) = (job / heads, job % heads);
            let rs = tile * t..(tile + 1) * t;
            let cs = head * d..(head + 1) * d;
            let qh = q.slice(s![rs.clone(), cs.clone()]);
            let kh = k.slice(s![rs.clone(), cs.clone()]);
            let vh = v.slice(s![rs, cs]);
            let mut scores = qh.dot(&kh.t());
            scores.mapv_inplace(|s| s * scale);
            softmax_inplace(scores.view_mut());
            scores.dot(&vh)
        })
        .collect();
    let mut out = Array2::<f32>::zeros((rows, width));
    for (job, o) in outs.into_iter().enumerate() {
        let (tile, head) = (job / heads, job % heads);
        out.slice_mut(s![tile * t..(tile + 1) * t, head * d..(head + 1) * d])
            .assign(&o);
    }
    Ok(out)
}

/// 2D rotary tables: patch `n` (grid `g`) has `x = n % g`, `y = n / g`; complex pair `j < d/4`
/// turns by `(x+1)·f_j`, pair `d/4 + j` by `(y+1)·f_j`, `f_j = theta^(−4j/d)`; the class token
/// (last) does not turn.
struct Rope {
    /// `[T, d/2]`
    cos: Array2<f32>,
    sin: Array2<f32>,
}

impl Rope {
    fn new(cfg: &VisionConfig) -> Self {
        let g = cfg.grid();
        let d = cfg.head_dim();
        let freq_dim = d / 2;
        let quarter = d / 4;
        // As the reference: f32 `theta ** (2j / freq_dim)`, then `1 / that`, then `(pos+1) · f`.
        let theta = cfg.rope_theta as f32;
        let freqs: Vec<f32> = (0..quarter)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / freq_dim as f32))
            .collect();
        let t = g * g + 1;
        let mut cos = Array2::<f32>::ones((t, freq_dim));
        let mut sin = Array2::<f32>::zeros((t, freq_dim));
        for n in 0..g * g {
            let (x, y) = ((n % g + 1) as f32, (n / g + 1) as f32);
            for (j, &f) in freqs.iter().enumerate() {
                for (pair, pos) in [(j, x), (quarter + j, y)] {
                    let angle = pos * f;
                    cos[[n, pair]] = angle.cos();
                    sin[[n, pair]] = angle.sin();
                }
            }
        }
        Rope { cos, sin }
    }

    /// Rotates interleaved pairs `(x[2p], x[2p+1])` of every head in place.
    ///
    /// # Shapes
    /// `x: [tiles·T, heads·d]`.
    fn apply(&self, x: &mut Array2<f32>, tokens: usize, heads: usize) {
        let pairs = self.cos.ncols();
        for (row_index, mut row) in x.axis_iter_mut(Axis(0)).enumerate() {
            let n = row_index % tokens;
            let (c, s) = (self.cos.row(n), self.sin.row(n));
            for h in 0..heads {
                for p in 0..pairs {
                    let i = h * 2 * pairs + 2 * p;
                    let (a, b) = (row[i], row[i + 1]);
                    row[i] = a * c[p] - b * s[p];
                    row[i + 1] = a * s[p] + b * c[p];
                }
            }
        }
    }
}

/// Llama 4's vision tower: patch embedding, class token (last), positions, LayerNorm, encoder
/// layers with 2D RoPE, LayerNorm, pixel shuffle and the adapter MLP.
pub struct VisionModel {
    cfg: VisionConfig,
    patch_embedding: Weight,
    class_embedding: Array1<f32>,
    positional_embedding: Array2<f32>,
    layernorm_pre: LayerNorm,
    layernorm_post: LayerNorm,
    layers: Vec<EncoderLayer>,
    adapter_fc1: Weight,
    adapter_fc2: Weight,
    rope: Rope,
}

impl VisionModel {
    /// Loads the tower from a scope (normally `ckpt.scope("vision_model")`).
    pub fn load(scope: Scope, cfg: &VisionConfig) -> Result<Self> {
        Self::load_from(&scope, cfg)
    }

    pub(crate) fn load_from(src: &dyn TowerSource, cfg: &VisionConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let tokens = cfg.grid() * cfg.grid() + 1;
        let positional =
            Array2::from_shape_vec((tokens, d), src.values("positional_embedding_vlm", &[tokens, d])?)
                .map_err(|e| Error::shape("VisionModel::load", e.to_string()))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|j| EncoderLayer::load(src, j, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionModel {
            cfg: cfg.clone(),
            patch_embedding: src.weight("patch_embedding.linear.weight", [d, 3 * p * p])?,
            class_embedding: vector(src, "class_embedding", d)?,
            positional_embedding: positional,
            layernorm_pre: LayerNorm::load(src, "layernorm_pre", d)?,
            layernorm_post: LayerNorm::load(src, "layernorm_post", d)?,
            layers,
            adapter_fc1: src.weight(
                "vision_adapter.mlp.fc1.weight",
                [cfg.projector_input_dim, cfg.intermediate_size],
            )?,
            adapter_fc2: src.weight(
                "vision_adapter.mlp.fc2.weight",
                [cfg.projector_output_dim, cfg.projector_output_dim],
            )?,
            rope: Rope::new(cfg),
        })
    }

    /// The config this tower was loaded with.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Output tokens per tile (144 for Llama 4).
    pub fn tokens_per_tile(&self) -> usize {
        self.cfg.tokens_per_tile()
    }

    /// Encodes tiles into adapter outputs, one row per `<|patch|>` token.
    ///
    /// # Shapes
    /// `tiles: [N, 3, S, S]` (S = `image_size`) → `[N, tokens_per_tile, projector_output_dim]`.
    pub fn forward(&self, tiles: ArrayView4<f32>) -> Result<Array3<f32>> {
        let cfg = &self.cfg;
        let (n, c, h, w) = tiles.dim();
        if c != 3 || h != cfg.image_size || w != cfg.image_size {
            return Err(Error::shape(
                "VisionModel::forward",
                format!(
                    "tiles {:?}, need [N, 3, {s}, {s}]",
                    tiles.dim(),
                    s = cfg.image_size
                ),
            ));
        }
        let (g, p, d) = (cfg.grid(), cfg.patch_size, cfg.hidden_size);
        let t = g * g + 1;
        if n == 0 {
            return Ok(Array3::zeros((
                0,
                cfg.tokens_per_tile(),
                cfg.projector_output_dim,
            )));
        }

        // Unfold: patch (py, px) row-major, features channel-first `c·p² + ky·p + kx`.
        let mut patches = Array2::<f32>::zeros((n * g * g, 3 * p * p));
        for tile in 0..n {
            for py in 0..g {
                for px in 0..g {
                    let mut row = patches.row_mut(tile * g * g + py * g + px);
                    for ch in 0..3 {
                        for ky in 0..p {
                            let src = tiles.slice(s![tile, ch, py * p + ky, px * p..(px + 1) * p]);
                            row.slice_mut(s![ch * p * p + ky * p..ch * p * p + (ky + 1) * p])
                                .assign(&src);
                        }
                    }
                }
            }
        }
        let embedded = linear(patches.view(), &self.patch_embedding)?;

        // Class token last in each tile, then positions.
        let mut x = Array2::<f32>::zeros((n * t, d));
        for tile in 0..n {
            let mut block = x.slice_mut(s![tile * t..(tile + 1) * t, ..]);
            block
                .slice_mut(s![..t - 1, ..])
                .assign(&embedded.slice(s![tile * g * g..(tile + 1) * g * g, ..]));
            block.row_mut(t - 1).assign(&self.class_embedding);
            block += &self.positional_embedding;
        }
        let mut x = self.layernorm_pre.forward(x.view())?;

        for layer in &self.layers {
            layer.forward(&mut x, n, cfg.num_attention_heads, &self.rope)?;
        }
        let x = self.layernorm_post.forward(x.view())?;

        // Drop the class token, pixel-shuffle each tile, adapter MLP over all tiles at once.
        let k = cfg.shuffle_factor();
        let side = g / k;
        let per_tile = side * side;
        let mut shuffled = Array2::<f32>::zeros((n * per_tile, d * k * k));
        for tile in 0..n {
            let patches = x.slice(s![tile * t..tile * t + g * g, ..]);
            let mut out = shuffled.slice_mut(s![tile * per_tile..(tile + 1) * per_tile, ..]);
            pixel_shuffle_into(patches, g, k, &mut out);
        }
        let mut a = linear(shuffled.view(), &self.adapter_fc1)?;
        gelu_slice(&mut a);
        let mut a = linear(a.view(), &self.adapter_fc2)?;
        gelu_slice(&mut a);
        a.into_shape_with_order((n, per_tile, cfg.projector_output_dim))
            .map_err(|e| Error::shape("VisionModel::forward", e.to_string()))
    }
}

/// Pixel shuffle of one tile: output token `(r, c)` of the `g/k` grid has feature
/// `(dr·k + dc)·D + ch = x[k·r + dr][k·c + dc][ch]`.
///
/// # Shapes
/// `x: [g², D]`, `out: [(g/k)², k²·D]`.
fn pixel_shuffle_into(x: ArrayView2<f32>, g: usize, k: usize, out: &mut ndarray::ArrayViewMut2<f32>) {
    let d = x.ncols();
    let side = g / k;
    for r in 0..side {
        for c in 0..side {
            let mut row = out.row_mut(r * side + c);
            for dr in 0..k {
                for dc in 0..k {
                    let src = x.row((k * r + dr) * g + k * c + dc);
                    let off = (dr * k + dc) * d;
                    row.slice_mut(s![off..off + d]).assign(&src);
                }
            }
        }
    }
}

/// `Llama4MultiModalProjector`: one bias-free linear from the vision output width to the text
/// hidden size.
pub struct Projector {
    linear_1: Weight,
}

impl Projector {
    /// Loads `linear_1.weight [text_hidden, vision_output_dim]` from a scope (normally
    /// `ckpt.scope("multi_modal_projector")`).
    pub fn load(scope: Scope, cfg: &VisionConfig, text_hidden_size: usize) -> Result<Self> {
        Self::load_from(&scope, cfg, text_hidden_size)
    }

    /// From `linear_1.weight` of `src` (names under `multi_modal_projector.`).
    pub(crate) fn load_from(
        src: &dyn TowerSource,
        cfg: &VisionConfig,
        text_hidden_size: usize,
    ) -> Result<Self> {
        Ok(Projector {
            linear_1: src.weight("linear_1.weight", [text_hidden_size, cfg.vision_output_dim])?,
        })
    }

    /// Text hidden size produced.
    pub fn output_dim(&self) -> usize {
        self.linear_1.out_features()
    }

    /// # Shapes
    /// `x: [M, vision_output_dim]` → `[M, text_hidden]`.
    pub fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        Ok(linear(x, &self.linear_1)?)
    }

    /// [`forward`](Self::forward) on the vision tower's output, tiles flattened in order.
    ///
    /// # Shapes
    /// `x: [N, t, vision_output_dim]` → `[N·t, text_hidden]`.
    pub fn forward_tiles(&self, x: ArrayView3<f32>) -> Result<Array2<f32>> {
        let (n, t, w) = x.dim();
        let flat = x
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((n * t, w))
            .map_err(|e| Error::shape("Projector::forward_tiles", e.to_string()))?;
        self.forward(flat.view())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_shuffle_matches_the_formula_for_k2_and_k3() {
        for (g, k) in [(4, 2), (6, 3), (6, 2)] {
            let d = 3;
            let x = Array2::from_shape_fn((g * g, d), |(n, ch)| (n * 10 + ch) as f32);
            let side = g / k;
            let mut out = Array2::<f32>::zeros((side * side, k * k * d));
            pixel_shuffle_into(x.view(), g, k, &mut out.view_mut());
            for r in 0..side {
                for c in 0..side {
                    for dr in 0..k {
                        for dc in 0..k {
                            for ch in 0..d {
                                let want = (((k * r + dr) * g + k * c + dc) * 10 + ch) as f32;
                                assert_eq!(out[[r * side + c, (dr * k + dc) * d + ch]], want);
                            }
                        }
                    }
                }
            }
        }
    }
}
