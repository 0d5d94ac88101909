//! Llama 4 from a GGUF file as llama.cpp writes it (arch `llama4`): the hyperparameters and
//! layer pattern of [`GgufLlama4`], the tensors of [`GgufLlama4::tensors`] read in place from
//! the mapped file (quantised blocks stay quantised), RoPE with the file's `rope_freqs` factors.

use std::collections::BTreeMap;
use std::path::Path;

use irope_attn::{Attention, AttnConfig, PosEncoding, RopeConfig, RopeScaling};
use llama4_core::gguf::{GgufFile, Value};
use llama4_core::{Linear, SharedProgress};
use moe_router::{Experts, Llama4Router, Mlp, Moe, WeightPlacement};
use ndarray::Array1;

use crate::config::{LayerSpec, TextConfig};
use crate::gguf_names::{GgufLlama4, CHUNK, TEMP_FLOOR, TEMP_SCALE};
use crate::layer::{AttentionLayer, DecoderLayer, FeedForwardLayer};
use crate::model::TextModel;
use crate::{ChatTemplate, Error, GgufTokenizer, Result, LLAMA4_CHAT_TEMPLATE};

/// The resolved config llama.cpp runs `g` with, in this crate's terms. Token ids come from
/// the tokenizer metadata of `f` when present.
pub fn gguf_text_config(f: &GgufFile, g: &GgufLlama4) -> Result<TextConfig> {
    let id = |k: &str| f.get(k).and_then(Value::as_u64).map(|v| v as u32);
    let layers = (0..g.n_layer)
        .map(|il| LayerSpec {
            rope: g.uses_rope(il),
            chunk: g.is_chunked(il).then_some(CHUNK),
            moe: g.is_moe(il),
        })
        .collect();
    let context = f
        .get("llama4.context_length")
        .and_then(Value::as_u64)
        .map_or(CHUNK, |c| c as usize);
    Ok(TextConfig {
        vocab_size: g.n_vocab,
        intermediate_size: g.n_ff_exp,
        intermediate_size_mlp: g.n_ff,
        num_local_experts: g.n_expert,
        num_experts_per_tok: g.n_expert_used,
        attention: AttnConfig {
            hidden_size: g.n_embd,
            num_attention_heads: g.n_head,
            num_key_value_heads: g.n_head_kv,
            head_dim: g.head_dim,
            rms_norm_eps: g.rms_eps,
            use_qk_norm: g.qk_norm,
            attention_chunk_size: g.chunked.then_some(CHUNK),
            // llama.cpp tunes the temperature of NoPE layers whenever there are any; with
            // `sliding_window = 0` there are none (see `gguf_names`).
            attn_temperature_tuning: g.chunked,
            floor_scale: TEMP_FLOOR,
            attn_scale: TEMP_SCALE,
            attention_bias: false,
            // The llama3 scaling arrives as per-frequency factors (`rope_freqs.weight`),
            // applied on top of plain RoPE by `load_gguf`.
            rope: RopeConfig {
                theta: g.rope_base as f64,
                scaling: RopeScaling::Default,
            },
        },
        tie_word_embeddings: f.header().tensor("output.weight").is_none(),
        max_position_embeddings: context,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: id("tokenizer.ggml.padding_token_id"),
        layers,
    })
}

impl TextModel {
    /// Loads the Llama 4 text model of the GGUF file at `path`. Weights are read in place
    /// from the memory map in their stored ggml type; a tensor of a type without kernels
    /// (the IQ family, ...) is [`llama4_core::Error::UnsupportedDtype`] naming it, a missing or
    /// misshapen tensor names it too.
    pub fn load_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let mut f = GgufFile::open(path.as_ref())?;
        // As `TextModel::load_with_options`: huge pages when the file fits, else prefaulted.
        let copied = f.copy_to_huge_pages();
        let model = Self::from_gguf(&f)?;
        if !copied {
            f.populate_resident_pages();
        }
        Ok(model)
    }

    /// [`TextModel::load_gguf`] from an opened file (the weights share its map, which outlives
    /// `f` as long as the model does).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let g = GgufLlama4::from_gguf(f)?;
        let cfg = gguf_text_config(f, &g)?;
        check(&cfg)?;
        let (h, v) = (cfg.hidden_size(), cfg.vocab_size);
        let embed_tokens = f.weight("token_embd.weight", [v, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            f.weight("output.weight", [v, h])?
        };
        let norm = Array1::from_vec(f.to_f32("output_norm.weight", &[h])?);
        let freq_factors = match f.header().tensor("rope_freqs.weight") {
            Some(_) => Some(f.to_f32("rope_freqs.weight", &[cfg.attention.head_dim / 2])?),
            None => None,
        };
        let layers = (0..g.n_layer)
            .map(|il| load_layer(f, &g, &cfg, il, freq_factors.as_deref()))
            .collect::<Result<Vec<_>>>()?;
        TextModel::from_parts(cfg, embed_tokens, layers, norm, lm_head)
    }
}

fn load_layer(
    f: &GgufFile,
    g: &GgufLlama4,
    cfg: &TextConfig,
    il: usize,
    freq_factors: Option<&[f32]>,
) -> Result<DecoderLayer> {
    let (h, d) = (g.n_embd, g.head_dim);
    let name = |s: &str| format!("blk.{il}.{s}.weight");
    let linear =
        |s: &str, shape: [usize; 2]| -> Result<Linear> { Ok(Linear::new(f.weight(&name(s), shape)?, None)?) };
    let (q, kv) = (g.n_head * d, g.n_head_kv * d);
    let encoding = if cfg.layers[il].rope {
        PosEncoding::Rope
    } else {
        PosEncoding::NoPe
    };
    let mut attn = Attention::new(
        linear("attn_q", [q, h])?,
        linear("attn_k", [kv, h])?,
        linear("attn_v", [kv, h])?,
        linear("attn_output", [h, q])?,
        &cfg.layer_attention(il),
        encoding,
    )?;
    if let Some(factors) = freq_factors {
        attn = attn.with_rope_freq_factors(factors)?;
    }
    let feed_forward = if g.is_moe(il) {
        let (e, i) = (g.n_expert, g.n_ff_exp);
        let router = Llama4Router::new(f.weight(&name("ffn_gate_inp"), [e, h])?, g.n_expert_used)?;
        let experts = Experts::new_split(
            f.batched(&name("ffn_gate_exps"), [e, i, h])?,
            f.batched(&name("ffn_up_exps"), [e, i, h])?,
            f.batched(&name("ffn_down_exps"), [e, h, i])?,
        )?;
        let shared = Mlp::new(
            f.weight(&name("ffn_gate_shexp"), [i, h])?,
            f.weight(&name("ffn_up_shexp"), [i, h])?,
            f.weight(&name("ffn_down_shexp"), [h, i])?,
        )?;
        let moe = Moe::new(
            Box::new(router),
            experts,
            Some(shared),
            WeightPlacement::ExpertInput,
        )?;
        FeedForwardLayer::Moe(Box::new(moe))
    } else {
        FeedForwardLayer::Dense(Mlp::new(
            f.weight(&name("ffn_gate"), [g.n_ff, h])?,
            f.weight(&name("ffn_up"), [g.n_ff, h])?,
            f.weight(&name("ffn_down"), [h, g.n_ff])?,
        )?)
    };
    let vector = |s: &str| -> Result<Array1<f32>> { Ok(Array1::from_vec(f.to_f32(&name(s), &[h])?)) };
    Ok(DecoderLayer {
        input_layernorm: vector("attn_norm")?,
        post_attention_layernorm: vector("ffn_norm")?,
        self_attn: AttentionLayer::Llama4(Box::new(attn)),
        feed_forward,
        rms_norm_eps: cfg.rms_norm_eps(),
    })
}

/// Refuses a config llama.cpp would refuse or that this crate cannot run.
pub(crate) fn check(cfg: &TextConfig) -> Result<()> {
    if cfg.attention.head_dim == 0 || !cfg.attention.head_dim.is_multiple_of(2) {
        return Err(Error::Config {
            field: "llama4.attention.key_length",
            reason: format!("{} is not a positive even head width", cfg.attention.head_dim),
        });
    }
    Ok(())
}

/// A GGUF file loaded for generation: the text model, the tokenizer and chat template from the
/// file's `tokenizer.*` metadata (when it has them), and the ids that end generation.
#[derive(Debug)]
pub struct GgufModel {
    /// The text model, weights read in place from the file's map.
    pub model: TextModel,
    /// The tokenizer of `tokenizer.ggml.*`, or `None` when the file has no `tokenizer.ggml.model`
    /// or names one that is not supported (see `tokenizer_unsupported`).
    pub tokenizer: Option<GgufTokenizer>,
    /// Why the file's tokenizer was not built ([`GgufTokenizer::unsupported`]): the model still
    /// runs on token ids. Callers that need text report this.
    pub tokenizer_unsupported: Option<String>,
    /// Ids that end generation: `tokenizer.ggml.eos_token_id`, `tokenizer.ggml.eot_token_id`
    /// and `tokenizer.ggml.eom_token_id`, and the tokens llama.cpp also treats as end of
    /// generation by their text (`<|eot|>`, `<|eom|>`, `<|end_of_text|>`, `<|eot_id|>`).
    pub stop_ids: Vec<u32>,
    /// Bytes of tensor data the file holds (every tensor, as stored).
    pub weight_bytes: u64,
}

/// Token texts that end generation whatever the metadata says (llama.cpp's `llama_vocab`
/// adds these to its end-of-generation set by text).
const STOP_TEXTS: [&str; 4] = ["<|eot|>", "<|eom|>", "<|end_of_text|>", "<|eot_id|>"];

impl GgufModel {
    /// Opens `path` and loads its model and tokenizer (see [`TextModel::from_gguf`] and
    /// [`GgufTokenizer::from_gguf`]). A tokenizer of a kind not supported is left out (the
    /// model runs on ids; `tokenizer_unsupported` says why); malformed tokenizer metadata is an
    /// error.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with_progress(path, None)
    }

    /// [`GgufModel::load`] with `progress` told of every tensor loaded, in stored bytes of the
    /// file (see [`llama4_core::progress`]); its last report has `done == total`.
    pub fn load_with_progress(path: impl AsRef<Path>, progress: Option<SharedProgress>) -> Result<Self> {
        let mut f = GgufFile::open(path.as_ref())?.with_progress(progress);
        let copied = f.copy_to_huge_pages();
        let model = TextModel::from_gguf(&f)?;
        f.finish_progress();
        if !copied {
            f.populate_resident_pages();
        }
        let tokenizer_unsupported = GgufTokenizer::unsupported(&f);
        let tokenizer = match f.get("tokenizer.ggml.model") {
            Some(_) if tokenizer_unsupported.is_none() => Some(GgufTokenizer::from_gguf(&f)?),
            _ => None,
        };
        let mut stop_ids = model.config().eos_token_ids.clone();
        let id = |k: &str| f.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let vocab = model.config().vocab_size as u32;
        let mut more: Vec<u32> = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .into_iter()
            .filter_map(id)
            .collect();
        if let Some(t) = &tokenizer {
            more.extend(STOP_TEXTS.iter().filter_map(|s| t.tokenizer.token_id(s)));
        }
        for i in more {
            if i < vocab && !stop_ids.contains(&i) {
                stop_ids.push(i);
            }
        }
        let weight_bytes = f.header().tensors.iter().map(|t| t.nbytes).sum();
        Ok(GgufModel {
            model,
            tokenizer,
            tokenizer_unsupported,
            stop_ids,
            weight_bytes,
        })
    }

    /// The chat template: the file's `tokenizer.chat_template`, else [`LLAMA4_CHAT_TEMPLATE`],
    /// with `bos_token` the text of the file's BOS token.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let mut special = BTreeMap::new();
        let tok = self.tokenizer.as_ref();
        if let Some(t) = tok {
            if let Some(bos) = t.bos_id.and_then(|id| t.tokenizer.decode(&[id]).ok()) {
                special.insert("bos_token".to_string(), bos);
            }
        }
        let text = tok
            .and_then(|t| t.chat_template.as_deref())
            .unwrap_or(LLAMA4_CHAT_TEMPLATE);
        ChatTemplate::new(text, special)
    }
}

/// Whether `path` names a GGUF file (a file whose name ends in `.gguf`, any case) rather than
/// a checkpoint directory.
pub fn is_gguf_path(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    path.is_file() && path.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
}
