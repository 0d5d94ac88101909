//! Llama 4's vision tower and projector from a multimodal projector GGUF, as llama.cpp's
//! `convert_hf_to_gguf.py --mmproj` writes it (`general.architecture = clip`,
//! `clip.projector_type = llama4`): the Hugging Face tensors renamed, values unchanged.
//!
//! # Names
//! | Hugging Face (`vision_model.` / `multi_modal_projector.`) | GGUF |
//! |---|---|
//! | `patch_embedding.linear.weight` `[D, 3·p²]` | `v.patch_embd.weight` |
//! | `class_embedding` `[D]` | `v.class_embd` |
//! | `positional_embedding_vlm` `[g²+1, D]` | `v.position_embd.weight` |
//! | `layernorm_pre.*`, `layernorm_post.*` | `v.pre_ln.*`, `v.post_ln.*` |
//! | `model.layers.N.input_layernorm.*` | `v.blk.N.ln1.*` |
//! | `model.layers.N.post_attention_layernorm.*` | `v.blk.N.ln2.*` (or `v.blk.N.attn_post_norm.*`) |
//! | `model.layers.N.self_attn.{q,k,v,o}_proj.*` | `v.blk.N.attn_{q,k,v,out}.*` |
//! | `model.layers.N.mlp.fc1.*`, `mlp.fc2.*` | `v.blk.N.ffn_up.*`, `v.blk.N.ffn_down.*` |
//! | `vision_adapter.mlp.fc1.weight`, `fc2.weight` | `mm.model.mlp.1.weight`, `mm.model.mlp.2.weight` |
//! | `linear_1.weight` (projector) | `mm.model.fc.weight` |
//!
//! Converters of late 2026 write the post-attention LayerNorm as `attn_post_norm` (its
//! Hugging Face name also matches a Gemma 4 entry of the converter's name map, which wins);
//! earlier ones wrote `ln2`. Both are the same tensor with weight and bias; `ln2` is read
//! when present.
//!
//! # Hyperparameters
//! From the `clip.vision.*` keys: `embedding_length` (D), `block_count`,
//! `attention.head_count`, `feed_forward_length` (the encoder MLP width), `image_size`,
//! `patch_size`, `attention.layer_norm_epsilon`, `projector.scale_factor` (`1 /
//! pixel_shuffle_ratio`), `image_mean`, `image_std`; `clip.use_gelu` must be true. The adapter
//! and projector widths come from the shapes of `mm.model.mlp.1`, `mm.model.mlp.2` and
//! `mm.model.fc` (the converter stores none of them), the 2D RoPE base is 10000 (llama.cpp
//! fixes it for this projector type). The image processor takes the tile size, mean and std
//! from the file and the rest (at most 16 tiles, no upscaling to the largest canvas, rescale
//! 1/255) from Llama 4's processor defaults, which the file does not record.

use std::path::Path;

use llama4_core::gguf::{GgufFile, Value};
use llama4_core::{SharedProgress, Weight};

use crate::model::TowerSource;
use crate::{Error, ProcessorConfig, Projector, Result, VisionConfig, VisionModel};

/// The projector type this crate runs (`clip.projector_type`).
pub const LLAMA4_PROJECTOR: &str = "llama4";

/// Llama 4's 2D RoPE base in the vision tower, fixed by llama.cpp for this projector type.
const ROPE_THETA: f64 = 10000.0;

/// A loaded projector file: the tower, the projector, the configs read from the file.
pub struct Mmproj {
    /// The vision tower.
    pub vision: VisionModel,
    /// The projector to the text hidden size.
    pub projector: Projector,
    /// The image processor's settings (see the module doc for what comes from the file).
    pub processor: ProcessorConfig,
}

impl std::fmt::Debug for Mmproj {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mmproj")
            .field("vision", self.vision.config())
            .field("text_hidden_size", &self.projector.output_dim())
            .field("processor", &self.processor)
            .finish()
    }
}

impl Mmproj {
    /// Opens and loads the projector GGUF at `path`.
    ///
    /// # Errors
    /// [`Error::Mmproj`] when the file is not a Llama 4 vision projector (architecture, projector
    /// type, a missing or mistyped `clip.*` key, no vision encoder, an activation other than
    /// GELU); the core errors naming the tensor for a missing or misshapen tensor, or one of a
    /// type without kernels.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with_progress(path, None)
    }

    /// [`Mmproj::load`] with `progress` told of every tensor loaded (see
    /// [`llama4_core::progress`]).
    pub fn load_with_progress(path: impl AsRef<Path>, progress: Option<SharedProgress>) -> Result<Self> {
        let f = GgufFile::open(path.as_ref())?.with_progress(progress);
        let m = Self::from_gguf(&f)?;
        f.finish_progress();
        Ok(m)
    }

    /// Loads from an opened file (weights share its map).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let (vision_cfg, text_hidden) = mmproj_config(f)?;
        let src = GgufTower(f);
        let vision = VisionModel::load_from(&src, &vision_cfg)?;
        let projector = Projector::load_from(&GgufProjector(f), &vision_cfg, text_hidden)?;
        let mean_std = |key: &str| -> Result<[f32; 3]> {
            let values = f
                .get(key)
                .and_then(Value::as_array)
                .and_then(|a| a.to_f32s())
                .ok_or_else(|| bad(f, format!("`{key}` is missing or not an array of numbers")))?;
            <[f32; 3]>::try_from(values.as_slice())
                .map_err(|_| bad(f, format!("`{key}` has {} values, not 3", values.len())))
        };
        let processor = ProcessorConfig {
            tile_size: vision_cfg.image_size,
            image_mean: mean_std("clip.vision.image_mean")?,
            image_std: mean_std("clip.vision.image_std")?,
            ..ProcessorConfig::default()
        };
        processor.validate()?;
        Ok(Mmproj {
            vision,
            projector,
            processor,
        })
    }
}

fn bad(f: &GgufFile, reason: String) -> Error {
    Error::Mmproj {
        path: f.path().to_path_buf(),
        reason,
    }
}

/// The tower's config and the text hidden size, from the file's keys and projector shapes.
pub fn mmproj_config(f: &GgufFile) -> Result<(VisionConfig, usize)> {
    let string = |key: &str| f.get(key).and_then(Value::as_str);
    match string("general.architecture") {
        Some("clip") => {}
        other => {
            return Err(bad(
                f,
                format!("`general.architecture` is {other:?}, not \"clip\": not a projector file"),
            ))
        }
    }
    let projector = string("clip.projector_type").or_else(|| string("clip.vision.projector_type"));
    if projector != Some(LLAMA4_PROJECTOR) {
        return Err(bad(
            f,
            format!("`clip.projector_type` is {projector:?}; only \"{LLAMA4_PROJECTOR}\" is supported"),
        ));
    }
    if f.get("clip.has_vision_encoder").and_then(Value::as_bool) != Some(true) {
        return Err(bad(f, "`clip.has_vision_encoder` is not true".into()));
    }
    if f.get("clip.use_gelu").and_then(Value::as_bool) != Some(true) {
        return Err(bad(
            f,
            "`clip.use_gelu` is not true (Llama 4's tower uses exact GELU)".into(),
        ));
    }
    let int = |key: &str| -> Result<usize> {
        f.get(key)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(f, format!("`{key}` is missing or not a non-negative integer")))
    };
    let eps = f
        .get("clip.vision.attention.layer_norm_epsilon")
        .and_then(Value::as_f32)
        .ok_or_else(|| bad(f, "`clip.vision.attention.layer_norm_epsilon` is missing".into()))?;
    let scale = int("clip.vision.projector.scale_factor")?;
    if scale == 0 {
        return Err(bad(f, "`clip.vision.projector.scale_factor` is 0".into()));
    }
    // Widths the converter does not store: read from the projector's matrices (`ne[0]` is the
    // input width, `ne[1]` the output).
    let dims = |name: &str| -> Result<(usize, usize)> {
        let shape = f.info(name)?.shape();
        match shape[..] {
            [out, inp] => Ok((out, inp)),
            _ => Err(bad(f, format!("`{name}` has shape {shape:?}, not a matrix"))),
        }
    };
    let (adapter_in, _) = dims("mm.model.mlp.1.weight")?;
    let (adapter_out, _) = dims("mm.model.mlp.2.weight")?;
    let (text_hidden, vision_out) = dims("mm.model.fc.weight")?;
    let cfg = VisionConfig {
        hidden_size: int("clip.vision.embedding_length")?,
        num_hidden_layers: int("clip.vision.block_count")?,
        num_attention_heads: int("clip.vision.attention.head_count")?,
        intermediate_size: int("clip.vision.feed_forward_length")?,
        image_size: int("clip.vision.image_size")?,
        patch_size: int("clip.vision.patch_size")?,
        norm_eps: eps as f64,
        pixel_shuffle_ratio: 1.0 / scale as f64,
        projector_input_dim: adapter_in,
        projector_output_dim: adapter_out,
        vision_output_dim: vision_out,
        rope_theta: ROPE_THETA,
    };
    cfg.validate()?;
    Ok((cfg, text_hidden))
}

/// The tower's tensors under their GGUF names.
struct GgufTower<'a>(&'a GgufFile);

/// The projector's (`linear_1.weight` → `mm.model.fc.weight`).
struct GgufProjector<'a>(&'a GgufFile);

impl GgufTower<'_> {
    /// The GGUF name of Hugging Face name `hf` (under `vision_model.`).
    fn name(&self, hf: &str) -> String {
        if let Some(rest) = hf.strip_prefix("model.layers.") {
            if let Some((layer, part)) = rest.split_once('.') {
                let (module, suffix) = part.rsplit_once('.').unwrap_or((part, ""));
                let short = match module {
                    "input_layernorm" => "ln1",
                    "post_attention_layernorm" => {
                        let ln2 = format!("v.blk.{layer}.ln2.{suffix}");
                        if self.0.header().tensor(&ln2).is_some() {
                            return ln2;
                        }
                        "attn_post_norm"
                    }
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_out",
                    "mlp.fc1" => "ffn_up",
                    "mlp.fc2" => "ffn_down",
                    other => other,
                };
                return format!("v.blk.{layer}.{short}.{suffix}");
            }
        }
        match hf {
            "patch_embedding.linear.weight" => "v.patch_embd.weight".into(),
            "class_embedding" => "v.class_embd".into(),
            "positional_embedding_vlm" => "v.position_embd.weight".into(),
            "vision_adapter.mlp.fc1.weight" => "mm.model.mlp.1.weight".into(),
            "vision_adapter.mlp.fc2.weight" => "mm.model.mlp.2.weight".into(),
            _ => match hf.split_once('.') {
                Some(("layernorm_pre", s)) => format!("v.pre_ln.{s}"),
                Some(("layernorm_post", s)) => format!("v.post_ln.{s}"),
                _ => hf.to_string(),
            },
        }
    }
}

impl TowerSource for GgufTower<'_> {
    fn weight(&self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        Ok(self.0.weight(&self.name(name), shape)?)
    }

    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.0.to_f32(&self.name(name), shape)?)
    }
}

impl TowerSource for GgufProjector<'_> {
    fn weight(&self, name: &str, shape: [usize; 2]) -> Result<Weight> {
        let gguf = match name {
            "linear_1.weight" => "mm.model.fc.weight",
            other => other,
        };
        Ok(self.0.weight(gguf, shape)?)
    }

    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.0.to_f32(name, shape)?)
    }
}
