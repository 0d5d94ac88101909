//! `config.json` of Llama 4 checkpoints: a serde mirror that accepts every spelling found in the
//! wild, then one validated, fully resolved [`TextConfig`] with the derived layer sets.

use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

pub use irope_attn::{AttnConfig, RopeConfig, RopeScaling};
pub use vision_encoder::MultimodalConfig;

use crate::{Error, Result};

/// Most decoder layers a config may declare (published Llama 4 checkpoints have 48). The
/// layer count sizes per-layer tables before any weight can confirm it, so it is bounded.
pub const MAX_LAYERS: usize = 1024;
/// Most query heads a config may declare (40 published).
pub const MAX_HEADS: usize = 1024;
/// Largest `head_dim` a config may declare (128 published): RoPE tables are sized by it.
pub const MAX_HEAD_DIM: usize = 4096;
/// Most experts per MoE layer a config may declare (128 in Maverick).
pub const MAX_EXPERTS: usize = 4096;

/// Refuses `value` of `field` above `limit` (named `limit_name` in the error).
fn bounded(field: &'static str, value: usize, limit: usize, limit_name: &'static str) -> Result<usize> {
    if value > limit {
        return Err(Error::ConfigLimit {
            field,
            value,
            limit,
            limit_name,
        });
    }
    Ok(value)
}

/// `a · b` for a size derived from config fields `what`, or [`Error::ConfigOverflow`].
fn checked_product(what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::ConfigOverflow { what })
}

/// What one decoder layer is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    /// RoPE layer (rotary positions, chunked attention, QK norm) or NoPE layer (no positions,
    /// global attention, temperature tuning).
    pub rope: bool,
    /// Attention restricted to the current chunk of this size (`None`: causal over everything).
    pub chunk: Option<usize>,
    /// Mixture-of-experts feed-forward (else the dense MLP of width `intermediate_size_mlp`).
    pub moe: bool,
}

/// The resolved text-model config: every default applied, every derived set computed, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Width `I` of each expert and of the shared expert.
    pub intermediate_size: usize,
    /// Width of the dense MLP of non-MoE layers.
    pub intermediate_size_mlp: usize,
    /// Experts per MoE layer.
    pub num_local_experts: usize,
    /// Experts chosen per token.
    pub num_experts_per_tok: usize,
    /// The attention settings shared by every layer, among them the hidden size and the RMSNorm
    /// epsilon of the whole decoder ([`TextConfig::hidden_size`], [`TextConfig::rms_norm_eps`]).
    /// `attention.attention_chunk_size` is the checkpoint's chunk of RoPE layers; each layer's
    /// own is in [`LayerSpec::chunk`] ([`TextConfig::layer_attention`]).
    pub attention: AttnConfig,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest context the model was configured for.
    pub max_position_embeddings: usize,
    /// Beginning-of-text id, if any.
    pub bos_token_id: Option<u32>,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Padding id, if any.
    pub pad_token_id: Option<u32>,
    /// One entry per decoder layer.
    pub layers: Vec<LayerSpec>,
}

/// The `quantization_config` of a checkpoint stored quantised by another tool.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantizationConfig {
    /// `"quant_method": "fbgemm_fp8"`, Meta's FP8 checkpoints: converted weights are float8
    /// e4m3fn with one scale per output (see [`llama4_core::quant`]). They are found by dtype,
    /// so the fields below are informational. Activations stay f32 here, where fbgemm on a GPU
    /// rounds them to fp8: results match the float model on the dequantised weights.
    FbgemmFp8 {
        /// `activation_scale_ub`: fbgemm's bound on activation scales (unused: activations stay
        /// f32).
        activation_scale_ub: Option<f64>,
        /// `modules_to_not_convert`: modules the checkpoint keeps in bf16.
        modules_to_not_convert: Vec<String>,
    },
}

impl QuantizationConfig {
    /// Parses a `quantization_config` object; `null` is `None`. A method this crate cannot
    /// read is an error, so such a checkpoint never loads with wrong numbers.
    fn parse(value: &Value) -> Result<Option<Self>> {
        const FIELD: &str = "quantization_config";
        if value.is_null() {
            return Ok(None);
        }
        let obj = value.as_object().ok_or_else(|| bad(FIELD, "not an object"))?;
        let method = obj
            .get("quant_method")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(FIELD, "no string `quant_method`"))?;
        if method != "fbgemm_fp8" {
            return Err(bad(
                FIELD,
                format!("quant_method `{method}` is not supported (fbgemm_fp8 is)"),
            ));
        }
        let activation_scale_ub = match obj.get("activation_scale_ub") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| bad(FIELD, "`activation_scale_ub` is not a number"))?,
            ),
        };
        let modules_to_not_convert = match obj.get("modules_to_not_convert") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(list)) => list
                .iter()
                .map(|m| {
                    m.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(FIELD, "`modules_to_not_convert` holds a non-string"))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad(FIELD, "`modules_to_not_convert` is not a list")),
        };
        Ok(Some(QuantizationConfig::FbgemmFp8 {
            activation_scale_ub,
            modules_to_not_convert,
        }))
    }
}

/// A checkpoint's whole config: the text model, and for multimodal checkpoints the vision
/// side (parsed by `vision-encoder`, the one parser of that part of config.json).
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The text decoder.
    pub text: TextConfig,
    /// Weight-name prefix of the text model: `""` or `"language_model."`.
    pub text_prefix: &'static str,
    /// The vision tower's config and the image-token id, in multimodal checkpoints.
    pub multimodal: Option<MultimodalConfig>,
    /// How the checkpoint was quantised, when config.json says (`quantization_config`, at the
    /// top level; transformers writes it there for multimodal checkpoints too).
    pub quantization: Option<QuantizationConfig>,
}

/// An integer-or-list field (`eos_token_id`).
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum IntOrList {
    One(i64),
    Many(Vec<i64>),
}

/// A bool-or-integer field (`attn_temperature_tuning` is `true` in 5.x, `4` in published files).
#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(untagged)]
enum BoolOrInt {
    Bool(bool),
    Int(i64),
    Float(f64),
}

impl BoolOrInt {
    fn on(self) -> bool {
        match self {
            BoolOrInt::Bool(b) => b,
            BoolOrInt::Int(i) => i != 0,
            BoolOrInt::Float(f) => f != 0.0,
        }
    }
}

/// Both RoPE spellings: 4.x `rope_scaling` and 5.x `rope_parameters`.
#[derive(Deserialize, Clone, Debug, Default)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    type_alias: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

/// Distinguishes an absent field (outer `None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

/// The text config as written; every field optional so that defaults are applied in one place.
#[derive(Deserialize, Clone, Debug, Default)]
struct RawText {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    intermediate_size_mlp: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_layers: Option<Vec<i64>>,
    interleave_moe_layer_step: Option<usize>,
    use_qk_norm: Option<bool>,
    no_rope_layers: Option<Vec<i64>>,
    no_rope_layer_interval: Option<usize>,
    #[serde(default, deserialize_with = "present")]
    attention_chunk_size: Option<Option<usize>>,
    layer_types: Option<Vec<String>>,
    attn_temperature_tuning: Option<BoolOrInt>,
    floor_scale: Option<f64>,
    attn_scale: Option<f64>,
    attention_bias: Option<bool>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<i64>,
    eos_token_id: Option<IntOrList>,
    pad_token_id: Option<i64>,
}

fn bad(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Config {
        field,
        reason: reason.into(),
    }
}

fn token_id(field: &'static str, v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| bad(field, format!("{v} is not a token id")))
}

impl ModelConfig {
    /// Reads and resolves `config.json` in `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("config.json");
        // A FIFO, device or oversized file is refused, not read.
        let text =
            llama4_core::input::read_capped(&path, llama4_core::input::Cap::JSON).map_err(Error::input)?;
        Self::from_json_bytes(&text).map_err(|e| match e {
            Error::ConfigJson { reason, .. } => Error::ConfigJson { path, reason },
            e => e,
        })
    }

    /// Resolves a config from JSON text (text-only `llama4_text` or multimodal `llama4`).
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let json_err = |e: serde_json::Error| Error::ConfigJson {
            path: "config.json".into(),
            reason: e.to_string(),
        };
        let value: Value = serde_json::from_slice(bytes).map_err(json_err)?;
        let Value::Object(top) = &value else {
            return Err(Error::ConfigJson {
                path: "config.json".into(),
                reason: "not a JSON object".into(),
            });
        };
        let model_type = top
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama4_text");
        // Top level, or (should a tool nest it) inside the text config.
        let quant = top
            .get("quantization_config")
            .or_else(|| top.get("text_config")?.get("quantization_config"));
        let quantization = match quant {
            Some(v) => QuantizationConfig::parse(v)?,
            None => None,
        };
        match model_type {
            "llama4" => {
                let text_value = top
                    .get("text_config")
                    .cloned()
                    .ok_or_else(|| bad("text_config", "missing in a multimodal (llama4) config"))?;
                let mut raw: RawText = serde_json::from_value(text_value).map_err(json_err)?;
                // Multimodal configs may carry tying at the top level only.
                if raw.tie_word_embeddings.is_none() {
                    raw.tie_word_embeddings = top.get("tie_word_embeddings").and_then(Value::as_bool);
                }
                // A vision side, when described, must be well formed even if only the text
                // model is loaded; without `vision_config` the checkpoint can only run as text.
                let multimodal = match top.get("vision_config") {
                    Some(_) => Some(MultimodalConfig::from_json(&value)?),
                    None => None,
                };
                Ok(ModelConfig {
                    text: resolve(raw)?,
                    text_prefix: "language_model.",
                    multimodal,
                    quantization,
                })
            }
            "llama4_text" => {
                let raw: RawText = serde_json::from_value(value.clone()).map_err(json_err)?;
                Ok(ModelConfig {
                    text: resolve(raw)?,
                    text_prefix: "",
                    multimodal: None,
                    quantization,
                })
            }
            other => Err(bad(
                "model_type",
                format!("`{other}` is not a Llama 4 model type"),
            )),
        }
    }
}

impl TextConfig {
    /// Resolves a text config from JSON text of a `llama4_text` config (or the `text_config`
    /// object of a multimodal one).
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let raw: RawText = serde_json::from_slice(bytes).map_err(|e| Error::ConfigJson {
            path: "config.json".into(),
            reason: e.to_string(),
        })?;
        resolve(raw)
    }

    /// Hidden size `H` of the decoder.
    pub fn hidden_size(&self) -> usize {
        self.attention.hidden_size
    }

    /// RMSNorm epsilon of every norm of the decoder (also the QK-norm epsilon).
    pub fn rms_norm_eps(&self) -> f32 {
        self.attention.rms_norm_eps
    }

    /// The attention settings of layer `i`: [`TextConfig::attention`] with the layer's own
    /// chunk (`layer_types` may make a RoPE layer attend causally).
    ///
    /// # Panics
    /// If `i` is not a layer (`i >= layers.len()`).
    pub fn layer_attention(&self, i: usize) -> AttnConfig {
        AttnConfig {
            attention_chunk_size: self.layers[i].chunk,
            ..self.attention.clone()
        }
    }

    /// The layers that use RoPE (the rest are NoPE layers).
    pub fn rope_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.rope)
            .map(|(i, _)| i)
    }

    /// Every tensor of the text decoder with its shape, in the checkpoint's names (without a
    /// multimodal checkpoint's `language_model.` prefix): what a checkpoint of this config
    /// holds, for writing one and for estimating memory.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, v, d) = (self.hidden_size(), self.vocab_size, self.attention.head_dim);
        let (q, kv) = (
            self.attention.num_attention_heads * d,
            self.attention.num_key_value_heads * d,
        );
        let (e, i, mlp) = (
            self.num_local_experts,
            self.intermediate_size,
            self.intermediate_size_mlp,
        );
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        for (l, spec) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let mut add = |n: &str, s: Vec<usize>| out.push((format!("{p}.{n}"), s));
            add("input_layernorm.weight", vec![h]);
            add("post_attention_layernorm.weight", vec![h]);
            for (proj, rows, cols) in [("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q)] {
                add(&format!("self_attn.{proj}_proj.weight"), vec![rows, cols]);
                if self.attention.attention_bias {
                    add(&format!("self_attn.{proj}_proj.bias"), vec![rows]);
                }
            }
            if spec.moe {
                add("feed_forward.router.weight", vec![e, h]);
                add("feed_forward.experts.gate_up_proj", vec![e, h, 2 * i]);
                add("feed_forward.experts.down_proj", vec![e, i, h]);
                add("feed_forward.shared_expert.gate_proj.weight", vec![i, h]);
                add("feed_forward.shared_expert.up_proj.weight", vec![i, h]);
                add("feed_forward.shared_expert.down_proj.weight", vec![h, i]);
            } else {
                add("feed_forward.gate_proj.weight", vec![mlp, h]);
                add("feed_forward.up_proj.weight", vec![mlp, h]);
                add("feed_forward.down_proj.weight", vec![h, mlp]);
            }
        }
        out
    }

    /// The layers whose feed-forward is a mixture of experts.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.moe)
            .map(|(i, _)| i)
    }

    /// Llama 4 Scout (17B active, 16 experts) text shape: every layer MoE, QK norm, llama3
    /// RoPE scaling with factor 16 and low = high = 1, 10M context.
    pub fn scout() -> Self {
        let rope = RawRope {
            rope_type: Some("llama3".into()),
            rope_theta: Some(500000.0),
            factor: Some(16.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(1.0),
            original_max_position_embeddings: Some(8192.0),
            ..RawRope::default()
        };
        preset(16, 1, true, rope, 10_485_760)
    }

    /// Llama 4 Maverick (17B active, 128 experts) text shape: MoE every second layer with a
    /// dense MLP between, no QK norm, unscaled RoPE, 1M context.
    pub fn maverick() -> Self {
        let rope = RawRope {
            rope_theta: Some(500000.0),
            ..RawRope::default()
        };
        preset(128, 2, false, rope, 1_048_576)
    }
}

/// The published text shape (hidden 5120, 48 layers, 40/8 heads of 128, expert width 8192,
/// dense width 16384, vocab 202048, chunk 8192) with the fields where Scout and Maverick differ.
fn preset(experts: usize, moe_step: usize, qk_norm: bool, rope: RawRope, context: usize) -> TextConfig {
    let raw = RawText {
        num_local_experts: Some(experts),
        interleave_moe_layer_step: Some(moe_step),
        use_qk_norm: Some(qk_norm),
        max_position_embeddings: Some(context),
        eos_token_id: Some(IntOrList::Many(vec![200001, 200007, 200008])),
        bos_token_id: Some(200000),
        pad_token_id: Some(200018),
        rope_parameters: Some(rope),
        ..RawText::default()
    };
    resolve(raw).expect("presets are valid")
}

fn resolve_rope(raw: &RawText) -> Result<RopeConfig> {
    // 5.x `rope_parameters` wins; 4.x writes `rope_theta` beside `rope_scaling` (possibly null).
    let params = raw
        .rope_parameters
        .clone()
        .or_else(|| raw.rope_scaling.clone())
        .unwrap_or_default();
    let theta = params.rope_theta.or(raw.rope_theta).unwrap_or(500000.0);
    // The frequencies are computed in f32: theta must stay finite there.
    if !(theta > 1.0 && (theta as f32).is_finite()) {
        return Err(bad(
            "rope_theta",
            format!("{theta} must be a number above 1, finite in f32"),
        ));
    }
    let kind = params
        .rope_type
        .or(params.type_alias)
        .unwrap_or_else(|| "default".into());
    let scaling = match kind.as_str() {
        "default" => RopeScaling::Default,
        "llama3" => {
            let need = |v: Option<f64>, field: &'static str| {
                v.filter(|&x| x as f32 > 0.0 && (x as f32).is_finite())
                    .ok_or_else(|| bad(field, "llama3 RoPE scaling needs a positive value, finite in f32"))
            };
            let low = need(params.low_freq_factor, "low_freq_factor")?;
            let high = need(params.high_freq_factor, "high_freq_factor")?;
            if low > high {
                return Err(bad(
                    "low_freq_factor",
                    format!("{low} exceeds high_freq_factor {high}"),
                ));
            }
            RopeScaling::Llama3 {
                factor: need(params.factor, "factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: need(
                    params.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )?,
            }
        }
        other => {
            return Err(bad(
                "rope_type",
                format!("`{other}` is not supported (default, llama3)"),
            ))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

fn resolve(raw: RawText) -> Result<TextConfig> {
    let hidden_size = raw.hidden_size.unwrap_or(5120);
    let num_attention_heads = raw.num_attention_heads.unwrap_or(40);
    let num_hidden_layers = raw.num_hidden_layers.unwrap_or(48);
    let positive = |v: usize, field: &'static str| {
        if v == 0 {
            Err(bad(field, "must be positive"))
        } else {
            Ok(v)
        }
    };
    positive(hidden_size, "hidden_size")?;
    positive(num_attention_heads, "num_attention_heads")?;
    positive(num_hidden_layers, "num_hidden_layers")?;
    bounded("num_hidden_layers", num_hidden_layers, MAX_LAYERS, "MAX_LAYERS")?;
    bounded("num_attention_heads", num_attention_heads, MAX_HEADS, "MAX_HEADS")?;
    // transformers' default is 8 kv heads (the published shape).
    let num_key_value_heads = positive(raw.num_key_value_heads.unwrap_or(8), "num_key_value_heads")?;
    if !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(bad(
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
        ));
    }
    // An absent head_dim is hidden / heads (transformers would take its class default of 128,
    // which contradicts any checkpoint whose q_proj is not 128 wide per head).
    let head_dim = match raw.head_dim {
        Some(d) => d,
        None if hidden_size.is_multiple_of(num_attention_heads) => hidden_size / num_attention_heads,
        None => {
            return Err(bad(
                "head_dim",
                format!(
                    "absent, and hidden_size {hidden_size} is not a multiple of {num_attention_heads} heads"
                ),
            ))
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(bad(
            "head_dim",
            format!("{head_dim} must be positive and even (RoPE pairs)"),
        ));
    }
    bounded("head_dim", head_dim, MAX_HEAD_DIM, "MAX_HEAD_DIM")?;
    // The projections' widths; with the bounds above they fit, checked all the same.
    checked_product("num_attention_heads · head_dim", num_attention_heads, head_dim)?;
    checked_product("num_key_value_heads · head_dim", num_key_value_heads, head_dim)?;
    let vocab_size = positive(raw.vocab_size.unwrap_or(202048), "vocab_size")?;
    let intermediate_size = positive(raw.intermediate_size.unwrap_or(8192), "intermediate_size")?;
    let intermediate_size_mlp = positive(
        raw.intermediate_size_mlp.unwrap_or(16384),
        "intermediate_size_mlp",
    )?;
    let num_local_experts = positive(raw.num_local_experts.unwrap_or(16), "num_local_experts")?;
    bounded("num_local_experts", num_local_experts, MAX_EXPERTS, "MAX_EXPERTS")?;
    checked_product("2 · intermediate_size", 2, intermediate_size)?;
    let num_experts_per_tok = positive(raw.num_experts_per_tok.unwrap_or(1), "num_experts_per_tok")?;
    if num_experts_per_tok > num_local_experts {
        return Err(bad(
            "num_experts_per_tok",
            format!("{num_experts_per_tok} exceeds num_local_experts {num_local_experts}"),
        ));
    }
    if let Some(act) = &raw.hidden_act {
        if act != "silu" {
            return Err(bad("hidden_act", format!("`{act}` is not supported (silu)")));
        }
    }
    let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-5);
    // Checked as the f32 the kernels use: 1e-50 is positive in f64 and 0 in f32.
    if !(rms_norm_eps.is_finite() && rms_norm_eps as f32 > 0.0 && (rms_norm_eps as f32).is_finite()) {
        return Err(bad(
            "rms_norm_eps",
            format!("{rms_norm_eps} must be positive and finite in f32"),
        ));
    }

    // Layer sets. An absent OR EMPTY no_rope_layers means "every interval-th layer is NoPE".
    let rope: Vec<bool> = match raw.no_rope_layers.as_deref() {
        Some(list) if !list.is_empty() => {
            if list.len() < num_hidden_layers {
                return Err(bad(
                    "no_rope_layers",
                    format!("{} entries for {num_hidden_layers} layers", list.len()),
                ));
            }
            list[..num_hidden_layers]
                .iter()
                .map(|&v| match v {
                    0 => Ok(false),
                    1 => Ok(true),
                    v => Err(bad("no_rope_layers", format!("entries are 0 or 1, found {v}"))),
                })
                .collect::<Result<_>>()?
        }
        _ => {
            let interval = positive(raw.no_rope_layer_interval.unwrap_or(4), "no_rope_layer_interval")?;
            (0..num_hidden_layers).map(|i| (i + 1) % interval != 0).collect()
        }
    };
    // One flag per layer (a `contains` per layer over a list would be quadratic).
    let mut moe = vec![false; num_hidden_layers];
    let moe_layers: Vec<usize> = match &raw.moe_layers {
        Some(list) => list
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .filter(|&i| i < num_hidden_layers)
                    .ok_or_else(|| {
                        bad(
                            "moe_layers",
                            format!("layer {i} is not in 0..{num_hidden_layers}"),
                        )
                    })
            })
            .collect::<Result<_>>()?,
        None => {
            let step = positive(
                raw.interleave_moe_layer_step.unwrap_or(1),
                "interleave_moe_layer_step",
            )?;
            (step - 1..num_hidden_layers).step_by(step).collect()
        }
    };
    for i in moe_layers {
        moe[i] = true;
    }
    // Absent means the default 8192; an explicit null means plain causal attention.
    let attention_chunk_size = match raw.attention_chunk_size {
        None => Some(8192),
        Some(c) => c,
    };
    if attention_chunk_size == Some(0) {
        return Err(bad("attention_chunk_size", "must be positive or null"));
    }
    // The mask follows `layer_types` when given (transformers does), else the RoPE layers are chunked.
    let chunked: Vec<bool> = match &raw.layer_types {
        Some(types) => {
            if types.len() != num_hidden_layers {
                return Err(bad(
                    "layer_types",
                    format!("{} entries for {num_hidden_layers} layers", types.len()),
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "chunked_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(bad("layer_types", format!("unknown layer type `{other}`"))),
                })
                .collect::<Result<_>>()?
        }
        None => rope.clone(),
    };
    let layers = (0..num_hidden_layers)
        .map(|i| LayerSpec {
            rope: rope[i],
            chunk: if chunked[i] { attention_chunk_size } else { None },
            moe: moe[i],
        })
        .collect();

    let floor_scale = raw.floor_scale.unwrap_or(8192.0);
    if !(floor_scale.is_finite() && floor_scale as f32 > 0.0 && (floor_scale as f32).is_finite()) {
        return Err(bad(
            "floor_scale",
            format!("{floor_scale} must be positive and finite in f32"),
        ));
    }
    let attn_scale = raw.attn_scale.unwrap_or(0.1);
    if !(attn_scale as f32).is_finite() {
        return Err(bad("attn_scale", "must be finite in f32"));
    }
    let rope = resolve_rope(&raw)?;
    let eos_token_ids = match raw.eos_token_id {
        None => vec![],
        Some(IntOrList::One(v)) => vec![token_id("eos_token_id", v)?],
        Some(IntOrList::Many(vs)) => vs
            .into_iter()
            .map(|v| token_id("eos_token_id", v))
            .collect::<Result<_>>()?,
    };
    Ok(TextConfig {
        vocab_size,
        intermediate_size,
        intermediate_size_mlp,
        num_local_experts,
        num_experts_per_tok,
        attention: AttnConfig {
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            use_qk_norm: raw.use_qk_norm.unwrap_or(true),
            attention_chunk_size,
            attn_temperature_tuning: raw.attn_temperature_tuning.is_none_or(BoolOrInt::on),
            floor_scale: floor_scale as f32,
            attn_scale: attn_scale as f32,
            attention_bias: raw.attention_bias.unwrap_or(false),
            rope,
        },
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(131072),
        bos_token_id: raw
            .bos_token_id
            .map(|v| token_id("bos_token_id", v))
            .transpose()?,
        eos_token_ids,
        pad_token_id: raw
            .pad_token_id
            .map(|v| token_id("pad_token_id", v))
            .transpose()?,
        layers,
    })
}

/// The ids that end generation for the checkpoint in `dir`: `eos_token_id` of config.json
/// together with that of `generation_config.json` when present (each an int or a list).
pub fn stop_ids(dir: impl AsRef<Path>, text: &TextConfig) -> Result<Vec<u32>> {
    let mut ids = text.eos_token_ids.clone();
    let path = dir.as_ref().join("generation_config.json");
    // Optional, but a FIFO or device in its place is an error, not "absent".
    if let Some(bytes) = llama4_core::input::read_optional_json(&path).map_err(Error::input)? {
        #[derive(Deserialize)]
        struct Generation {
            eos_token_id: Option<IntOrList>,
        }
        let g: Generation = serde_json::from_slice(&bytes).map_err(|e| Error::ConfigJson {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let more = match g.eos_token_id {
            None => vec![],
            Some(IntOrList::One(v)) => vec![v],
            Some(IntOrList::Many(vs)) => vs,
        };
        for v in more {
            let id = token_id("eos_token_id", v)?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}
