//! The vision tower's config (`vision_config` in config.json) and the image processor's settings.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// Largest patch grid side (`image_size / patch_size`) accepted (24 in Llama 4): each tile
/// attends over `grid² + 1` tokens, `(grid² + 1)²` scores per head.
pub const MAX_GRID: usize = 64;

/// Largest tile side in pixels accepted from a processor config (336 in Llama 4).
pub const MAX_TILE_SIZE: usize = 4096;

/// Most tiles per image accepted from a processor config (`max_patches`, 16 in Llama 4): the
/// canvases considered grow with it before any image is seen.
pub const MAX_PATCHES: usize = 256;

/// Most pixels of the largest canvas (`max_patches · tile_size²`) accepted from a processor
/// config: the tiles of one image are `3 · 4` bytes per pixel (Llama 4: 1.8M pixels).
pub const MAX_CANVAS_PIXELS: usize = 1 << 25;

/// Refuses `value` above `limit`, naming both.
fn bounded(field: &'static str, value: usize, limit: usize, limit_name: &'static str) -> Result<()> {
    if value > limit {
        return Err(Error::ConfigLimit {
            field,
            value: value as u64,
            limit: limit as u64,
            limit_name,
        });
    }
    Ok(())
}

/// LayerNorm epsilon of every vision LayerNorm. transformers builds them as `nn.LayerNorm(hidden)`,
/// so the config's `norm_eps` has no effect there; this crate follows the reference.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// An int or an `[h, w]` pair (transformers accepts both for `image_size` and `patch_size`).
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrPair {
    Int(usize),
    Pair([usize; 2]),
}

impl IntOrPair {
    fn square(&self, name: &str) -> Result<usize> {
        match *self {
            IntOrPair::Int(v) => Ok(v),
            IntOrPair::Pair([h, w]) if h == w => Ok(h),
            IntOrPair::Pair([h, w]) => Err(Error::Config(format!("{name} [{h}, {w}] is not square"))),
        }
    }
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
}

/// Mirror of `Llama4VisionConfig`; absent fields take transformers' defaults.
#[derive(Deserialize)]
struct RawVisionConfig {
    #[serde(default = "d_hidden")]
    hidden_size: usize,
    #[serde(default = "d_act")]
    hidden_act: String,
    #[serde(default = "d_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    num_attention_heads: usize,
    #[serde(default = "d_channels")]
    num_channels: usize,
    #[serde(default = "d_intermediate")]
    intermediate_size: usize,
    #[serde(default = "d_vision_output")]
    vision_output_dim: usize,
    #[serde(default = "d_image_size")]
    image_size: IntOrPair,
    #[serde(default = "d_patch_size")]
    patch_size: IntOrPair,
    #[serde(default = "d_eps")]
    norm_eps: f64,
    #[serde(default = "d_ratio")]
    pixel_shuffle_ratio: f64,
    #[serde(default = "d_projector")]
    projector_input_dim: usize,
    #[serde(default = "d_projector")]
    projector_output_dim: usize,
    /// transformers 4.x spelling.
    rope_theta: Option<f64>,
    /// transformers 5.x spelling.
    rope_parameters: Option<RopeParameters>,
}

fn d_hidden() -> usize {
    768
}
fn d_act() -> String {
    "gelu".into()
}
fn d_layers() -> usize {
    34
}
fn d_heads() -> usize {
    16
}
fn d_channels() -> usize {
    3
}
fn d_intermediate() -> usize {
    5632
}
fn d_vision_output() -> usize {
    7680
}
fn d_image_size() -> IntOrPair {
    IntOrPair::Int(448)
}
fn d_patch_size() -> IntOrPair {
    IntOrPair::Int(14)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_ratio() -> f64 {
    0.5
}
fn d_projector() -> usize {
    4096
}

/// The resolved, validated vision config.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Width `Dv` of the encoder (1408 in Scout and Maverick).
    pub hidden_size: usize,
    /// Encoder layers (34).
    pub num_hidden_layers: usize,
    /// Attention heads (16).
    pub num_attention_heads: usize,
    /// Encoder MLP width; also the adapter's input width, so it equals `hidden_size / ratio²`.
    pub intermediate_size: usize,
    /// Tile side in pixels (336).
    pub image_size: usize,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// `norm_eps` as written; unused, see [`LAYER_NORM_EPS`].
    pub norm_eps: f64,
    /// Pixel-shuffle ratio (0.5: 2×2 patches become one token).
    pub pixel_shuffle_ratio: f64,
    /// Adapter `fc1` output width.
    pub projector_input_dim: usize,
    /// Adapter output width.
    pub projector_output_dim: usize,
    /// Projector input width (equals `projector_output_dim`).
    pub vision_output_dim: usize,
    /// 2D RoPE base (10000).
    pub rope_theta: f64,
}

impl VisionConfig {
    /// Parses and validates a `vision_config` JSON object.
    pub fn from_json(value: &Value) -> Result<Self> {
        let raw: RawVisionConfig = serde_json::from_value(value.clone())
            .map_err(|e| Error::Config(format!("vision_config: {e}")))?;
        let rope_theta = raw
            .rope_parameters
            .and_then(|p| p.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10000.0);
        let cfg = VisionConfig {
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            image_size: raw.image_size.square("image_size")?,
            patch_size: raw.patch_size.square("patch_size")?,
            norm_eps: raw.norm_eps,
            pixel_shuffle_ratio: raw.pixel_shuffle_ratio,
            projector_input_dim: raw.projector_input_dim,
            projector_output_dim: raw.projector_output_dim,
            vision_output_dim: raw.vision_output_dim,
            rope_theta,
        };
        if raw.hidden_act != "gelu" {
            return Err(Error::Config(format!(
                "vision hidden_act {:?} (only exact GELU is implemented)",
                raw.hidden_act
            )));
        }
        if raw.num_channels != 3 {
            return Err(Error::Config(format!(
                "num_channels {} (RGB only)",
                raw.num_channels
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the relations between sizes that the reference's tensor shapes imply.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.patch_size == 0 {
            return fail("hidden_size, num_attention_heads and patch_size must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return fail(format!(
                "hidden_size {} not divisible by {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(4) {
            return fail(format!(
                "head dim {} not a multiple of 4 (2D RoPE)",
                self.head_dim()
            ));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return fail(format!(
                "image_size {} not a positive multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        bounded("image_size / patch_size", self.grid(), MAX_GRID, "MAX_GRID")?;
        // Widths the weights are checked against: they must not wrap. With the grid bounded,
        // `grid² + 1` cannot overflow; the others depend on unbounded fields.
        let overflow = |what: &str| Error::Config(format!("{what} overflows"));
        self.patch_size
            .checked_mul(self.patch_size)
            .and_then(|pp| pp.checked_mul(3))
            .ok_or_else(|| overflow("3 · patch_size²"))?;
        let k = (1.0 / self.pixel_shuffle_ratio).round();
        if !(self.pixel_shuffle_ratio > 0.0 && k >= 1.0 && (k * self.pixel_shuffle_ratio - 1.0).abs() < 1e-9)
        {
            return fail(format!(
                "pixel_shuffle_ratio {} is not 1/k for an integer k",
                self.pixel_shuffle_ratio
            ));
        }
        if !self.grid().is_multiple_of(self.shuffle_factor()) {
            return fail(format!(
                "patch grid {} not divisible by the pixel-shuffle factor {}",
                self.grid(),
                self.shuffle_factor()
            ));
        }
        let shuffled = self
            .hidden_size
            .checked_mul(self.shuffle_factor())
            .and_then(|x| x.checked_mul(self.shuffle_factor()))
            .ok_or_else(|| overflow("hidden_size / pixel_shuffle_ratio²"))?;
        if self.intermediate_size != shuffled {
            return fail(format!(
                "intermediate_size {} must equal hidden_size / ratio² = {shuffled} (the adapter's input)",
                self.intermediate_size
            ));
        }
        if self.projector_input_dim != self.projector_output_dim {
            return fail(format!(
                "projector_input_dim {} must equal projector_output_dim {} (adapter fc2 is square)",
                self.projector_input_dim, self.projector_output_dim
            ));
        }
        if self.vision_output_dim != self.projector_output_dim {
            return fail(format!(
                "vision_output_dim {} must equal projector_output_dim {}",
                self.vision_output_dim, self.projector_output_dim
            ));
        }
        Ok(())
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per tile side (24 at 336/14).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// `k = 1 / pixel_shuffle_ratio`: `k×k` patches become one token.
    pub fn shuffle_factor(&self) -> usize {
        (1.0 / self.pixel_shuffle_ratio).round() as usize
    }

    /// Tokens a tile contributes to the prompt (144 at 336/14, ratio 0.5).
    pub fn tokens_per_tile(&self) -> usize {
        let side = self.grid() / self.shuffle_factor();
        side * side
    }
}

/// `image_token_index` when a multimodal config.json omits it (transformers' default: the id
/// of `<|patch|>` in the Llama 4 vocabulary).
pub const DEFAULT_IMAGE_TOKEN_INDEX: u32 = 200_092;

/// The multimodal part of a `model_type: "llama4"` config.json, parsed once: the model crate
/// holds this beside its text config, and the vision tower is built from it.
#[derive(Clone, Debug, PartialEq)]
pub struct MultimodalConfig {
    /// `vision_config`, resolved.
    pub vision: VisionConfig,
    /// `text_config.hidden_size`: the projector's output width.
    pub text_hidden_size: usize,
    /// `image_token_index`: the id of `<|patch|>`, the text position each projected image
    /// token replaces.
    pub image_token_index: u32,
}

impl MultimodalConfig {
    /// Reads a multimodal (`model_type: "llama4"`) config.json.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        Self::from_json(&value)
    }

    /// Parses a multimodal config object (the whole config.json).
    pub fn from_json(value: &Value) -> Result<Self> {
        let vision = value
            .get("vision_config")
            .ok_or_else(|| Error::Config("no vision_config (a text-only checkpoint?)".into()))?;
        let text_hidden_size = value
            .get("text_config")
            .and_then(|t| t.get("hidden_size"))
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::Config("text_config.hidden_size missing or not an integer".into()))?;
        let image_token_index = match value.get("image_token_index") {
            None | Some(Value::Null) => DEFAULT_IMAGE_TOKEN_INDEX,
            Some(v) => v
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| Error::Config(format!("image_token_index {v} is not a token id")))?,
        };
        Ok(MultimodalConfig {
            vision: VisionConfig::from_json(vision)?,
            text_hidden_size: usize::try_from(text_hidden_size).map_err(|_| {
                Error::Config(format!("text_config.hidden_size {text_hidden_size} too large"))
            })?,
            image_token_index,
        })
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let bytes = llama4_core::input::read_capped(path, llama4_core::input::Cap::JSON).map_err(Error::input)?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[derive(Deserialize)]
struct Size {
    height: usize,
    width: usize,
}

/// Mirror of the `Llama4ImageProcessor` settings a config file may hold.
#[derive(Deserialize)]
struct RawProcessorConfig {
    size: Option<Size>,
    max_patches: Option<usize>,
    resize_to_max_canvas: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    rescale_factor: Option<f64>,
    resample: Option<i64>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    do_convert_rgb: Option<bool>,
}

/// The image processor's settings (`Llama4ImageProcessor`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessorConfig {
    /// Tile side in pixels (`size.height == size.width`, 336).
    pub tile_size: usize,
    /// At most this many tiles (16), the global tile not counted.
    pub max_patches: usize,
    /// Upscale as far as the largest canvas allows (false: never beyond `max(side, tile)`).
    pub resize_to_max_canvas: bool,
    /// Per-channel mean subtracted after rescaling.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub image_std: [f32; 3],
    /// Factor from `0..=255` to `0..=1` (1/255).
    pub rescale_factor: f64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            tile_size: 336,
            max_patches: 16,
            resize_to_max_canvas: false,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            rescale_factor: 1.0 / 255.0,
        }
    }
}

impl ProcessorConfig {
    /// Settings from a directory: `processor_config.json` when it holds an `image_processor`
    /// object, else `preprocessor_config.json`. Absent keys take the defaults.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        // Absent files are skipped; a FIFO, device or directory in their place is an error.
        let there = |p: &Path| -> Result<bool> {
            let probe = llama4_core::input::probe(p).map_err(Error::input)?;
            Ok(!matches!(probe, llama4_core::input::Probe::Absent))
        };
        let processor = dir.join("processor_config.json");
        if there(&processor)? {
            let value = read_json(&processor)?;
            if let Some(inner) = value.get("image_processor") {
                return Self::from_json(inner).map_err(|e| in_file(&processor, e));
            }
        }
        let preprocessor = dir.join("preprocessor_config.json");
        if there(&preprocessor)? {
            let value = read_json(&preprocessor)?;
            return Self::from_json(&value).map_err(|e| in_file(&preprocessor, e));
        }
        Err(Error::NoProcessorConfig {
            dir: dir.to_path_buf(),
        })
    }

    /// Parses an image-processor settings object; absent keys take the defaults.
    pub fn from_json(value: &Value) -> Result<Self> {
        let raw: RawProcessorConfig = serde_json::from_value(value.clone())
            .map_err(|e| Error::Config(format!("image processor: {e}")))?;
        let mut cfg = ProcessorConfig::default();
        if let Some(size) = raw.size {
            if size.height != size.width {
                return Err(Error::Config(format!(
                    "size {}×{} is not square",
                    size.height, size.width
                )));
            }
            cfg.tile_size = size.height;
        }
        if let Some(m) = raw.max_patches {
            cfg.max_patches = m;
        }
        if let Some(r) = raw.resize_to_max_canvas {
            cfg.resize_to_max_canvas = r;
        }
        let triple = |v: Vec<f32>, name: &str| -> Result<[f32; 3]> {
            match v.as_slice() {
                [x] => Ok([*x; 3]),
                [a, b, c] => Ok([*a, *b, *c]),
                _ => Err(Error::Config(format!(
                    "{name} needs 1 or 3 values, got {}",
                    v.len()
                ))),
            }
        };
        if let Some(m) = raw.image_mean {
            cfg.image_mean = triple(m, "image_mean")?;
        }
        if let Some(s) = raw.image_std {
            cfg.image_std = triple(s, "image_std")?;
        }
        if let Some(r) = raw.rescale_factor {
            cfg.rescale_factor = r;
        }
        // 2 is PIL's BILINEAR; the only resampling this crate implements.
        if let Some(r) = raw.resample {
            if r != 2 {
                return Err(Error::Config(format!(
                    "resample {r} (only 2, bilinear, is supported)"
                )));
            }
        }
        for (flag, name) in [
            (raw.do_resize, "do_resize"),
            (raw.do_rescale, "do_rescale"),
            (raw.do_normalize, "do_normalize"),
            (raw.do_convert_rgb, "do_convert_rgb"),
        ] {
            if flag == Some(false) {
                return Err(Error::Config(format!("{name}: false is not supported")));
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the settings are usable.
    pub fn validate(&self) -> Result<()> {
        if self.tile_size == 0 || self.max_patches == 0 {
            return Err(Error::Config("tile size and max_patches must be positive".into()));
        }
        bounded("size", self.tile_size, MAX_TILE_SIZE, "MAX_TILE_SIZE")?;
        bounded("max_patches", self.max_patches, MAX_PATCHES, "MAX_PATCHES")?;
        // Both bounded: the product fits.
        let canvas = self.max_patches * self.tile_size * self.tile_size;
        bounded(
            "max_patches · size²",
            canvas,
            MAX_CANVAS_PIXELS,
            "MAX_CANVAS_PIXELS",
        )?;
        if !(self.rescale_factor > 0.0 && (self.rescale_factor as f32).is_finite()) {
            return Err(Error::Config(format!(
                "rescale_factor {} must be positive and finite",
                self.rescale_factor
            )));
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::Config(format!(
                "image_mean {:?} has a non-finite value",
                self.image_mean
            )));
        }
        if self.image_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(Error::Config(format!(
                "image_std {:?} has a zero or non-finite value",
                self.image_std
            )));
        }
        Ok(())
    }
}

fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Config(m) => Error::Config(format!("{}: {m}", PathBuf::from(path).display())),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scout() -> Value {
        json!({
            "hidden_size": 1408, "num_hidden_layers": 34, "num_attention_heads": 16,
            "intermediate_size": 5632, "image_size": 336, "patch_size": 14,
            "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096, "projector_output_dim": 4096,
            "vision_output_dim": 4096, "rope_theta": 10000, "norm_eps": 1e-5
        })
    }

    #[test]
    fn scout_vision_config_parses_in_both_rope_spellings() {
        let a = VisionConfig::from_json(&scout()).unwrap();
        assert_eq!(a.tokens_per_tile(), 144);
        assert_eq!(a.head_dim(), 88);
        assert_eq!(a.grid(), 24);
        let mut v = scout();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500.0});
        let b = VisionConfig::from_json(&v).unwrap();
        assert_eq!(b.rope_theta, 500.0);
    }

    #[test]
    fn inconsistent_sizes_are_rejected() {
        for (key, val) in [
            ("intermediate_size", json!(1000)),
            ("pixel_shuffle_ratio", json!(0.3)),
            ("num_attention_heads", json!(15)),
            ("vision_output_dim", json!(7680)),
            ("patch_size", json!(15)),
            ("image_size", json!([336, 448])),
        ] {
            let mut v = scout();
            v[key] = val;
            assert!(
                matches!(VisionConfig::from_json(&v), Err(Error::Config(_))),
                "{key} accepted"
            );
        }
    }

    fn limit_of(r: Result<impl std::fmt::Debug>) -> &'static str {
        match r {
            Err(Error::ConfigLimit { limit_name, .. }) => limit_name,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sizes_that_would_drive_work_are_bounded_and_products_checked() {
        let with = |key: &str, val: Value| {
            let mut v = scout();
            v[key] = val;
            v
        };
        let grid = json!({"image_size": 4_294_967_296u64, "patch_size": 1});
        let mut v = scout();
        v.as_object_mut()
            .unwrap()
            .extend(grid.as_object().unwrap().clone());
        assert_eq!(limit_of(VisionConfig::from_json(&v)), "MAX_GRID");
        // 3 · patch² wraps for a patch of 2^32 (grid 1).
        let mut v = with("patch_size", json!(4_294_967_296u64));
        v["image_size"] = json!(4_294_967_296u64);
        let err = VisionConfig::from_json(&v).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        // hidden · k² wraps.
        let err = VisionConfig::from_json(&with("hidden_size", json!(1u64 << 62))).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        for bad in [json!(-1), json!(1.8446744073709552e19), json!(0.5)] {
            assert!(VisionConfig::from_json(&with("hidden_size", bad)).is_err());
        }

        for (cfg, limit) in [
            (json!({"max_patches": 100_000}), "MAX_PATCHES"),
            (
                json!({"max_patches": 9_223_372_036_854_775_824u64}),
                "MAX_PATCHES",
            ),
            (
                json!({"size": {"height": 1_400_000, "width": 1_400_000}}),
                "MAX_TILE_SIZE",
            ),
            (
                json!({"max_patches": 256, "size": {"height": 4096, "width": 4096}}),
                "MAX_CANVAS_PIXELS",
            ),
        ] {
            assert_eq!(limit_of(ProcessorConfig::from_json(&cfg)), limit, "{cfg}");
        }
        for bad in [json!({"max_patches": -1}), json!({"rescale_factor": 1e300})] {
            assert!(
                matches!(ProcessorConfig::from_json(&bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn processor_settings_default_and_reject_unsupported() {
        let c = ProcessorConfig::from_json(&json!({})).unwrap();
        assert_eq!(c, ProcessorConfig::default());
        assert_eq!((c.tile_size, c.max_patches), (336, 16));
        for bad in [
            json!({"size": {"height": 336, "width": 224}}),
            json!({"resample": 3}),
            json!({"do_normalize": false}),
            json!({"image_std": [0.5, 0.0, 0.5]}),
            json!({"max_patches": 0}),
        ] {
            assert!(
                matches!(ProcessorConfig::from_json(&bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }
}
