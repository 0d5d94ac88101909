//! Llama 4 as llama.cpp writes and runs it in GGUF (arch `llama4`): tensor names and shapes,
//! metadata keys, and the hyperparameters llama.cpp fixes in code. Not wired into loading yet;
//! [`GgufLlama4`] reads the metadata and lists the tensors a file must hold, and the tests check
//! both against files made by llama.cpp's own converter and quantiser.
//!
//! Sources: the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist (ggml 0.25.3). Paths
//! below are relative to its `vendor/llama.cpp`.
//!
//! # Tensors (`src/models/llama4.cpp`, `llama_model_llama4::load_arch_tensors`)
//! ggml lists dimensions contiguous first (`ne`); shapes here are outermost first, so a ggml
//! `{n_embd, n_vocab}` is our `[n_vocab, n_embd]`, i.e. `[out, in]` for a matrix.
//!
//! | GGUF name | ggml `ne` | ours | Hugging Face |
//! |---|---|---|---|
//! | `token_embd.weight` | `{n_embd, n_vocab}` | `[V, H]` | `model.embed_tokens.weight` |
//! | `output_norm.weight` | `{n_embd}` | `[H]` | `model.norm.weight` |
//! | `output.weight` (optional: absent means tied to `token_embd`) | `{n_embd, n_vocab}` | `[V, H]` | `lm_head.weight` |
//! | `rope_freqs.weight` (optional, shared by all layers) | `{n_rot/2}` | `[D/2]` | llama3 RoPE factors, computed by the converter |
//! | `blk.N.attn_norm.weight` | `{n_embd}` | `[H]` | `input_layernorm.weight` |
//! | `blk.N.attn_q.weight` | `{n_embd, n_head·D}` | `[Hq·D, H]` | `self_attn.q_proj.weight` (rows not permuted) |
//! | `blk.N.attn_k.weight` / `attn_v.weight` | `{n_embd, n_head_kv·D}` | `[Hkv·D, H]` | `k_proj` / `v_proj` (not permuted) |
//! | `blk.N.attn_output.weight` | `{n_head·D, n_embd}` | `[H, Hq·D]` | `o_proj.weight` |
//! | `blk.N.ffn_norm.weight` | `{n_embd}` | `[H]` | `post_attention_layernorm.weight` |
//! | `blk.N.ffn_gate_inp.weight` (MoE) | `{n_embd, n_expert}` | `[E, H]` | `feed_forward.router.weight` (never quantised: `src/llama-quant.cpp` skips `ffn_gate_inp.weight`) |
//! | `blk.N.ffn_gate_exps.weight` / `ffn_up_exps.weight` (MoE) | `{n_embd, n_ff_exp, n_expert}` | `[E, I, H]` | `experts.gate_up_proj` `[E, H, 2I]`: gate = first `I` columns, up = last `I`, each transposed |
//! | `blk.N.ffn_down_exps.weight` (MoE) | `{n_ff_exp, n_embd, n_expert}` | `[E, H, I]` | `experts.down_proj` `[E, I, H]` transposed |
//! | `blk.N.ffn_{gate,up}_shexp.weight` (MoE) | `{n_embd, n_ff_exp}` | `[I, H]` | `shared_expert.{gate,up}_proj.weight` |
//! | `blk.N.ffn_down_shexp.weight` (MoE) | `{n_ff_exp, n_embd}` | `[H, I]` | `shared_expert.down_proj.weight` |
//! | `blk.N.ffn_{gate,up}.weight` (dense) | `{n_embd, n_ff}` | `[F, H]` | `feed_forward.{gate,up}_proj.weight` |
//! | `blk.N.ffn_down.weight` (dense) | `{n_ff, n_embd}` | `[H, F]` | `feed_forward.down_proj.weight` |
//!
//! A fused `blk.N.attn_qkv.weight` `{n_embd, (n_head + 2·n_head_kv)·D}` is also accepted by
//! llama.cpp in place of q/k/v (`llama_model_base::create_tensor_qkv`, `src/llama-model.cpp`);
//! its converter never writes one for Llama 4. Every expert tensor is `[out, in]` per expert,
//! so a [`BatchedWeight`](llama4_core::BatchedWeight) of `[E, out, in]` reads it in place
//! (`GgufFile::batched`); Hugging Face's `[E, in, out]` fused `gate_up_proj` has no GGUF form.
//!
//! # RoPE and q/k rows
//! The converter does not permute q/k rows for Llama 4 (`conversion/llama.py`:
//! `Llama4Model.undo_permute = False`, whereas Llama 2/3 permute), and llama.cpp applies its
//! "normal" RoPE to Llama 4, rotating pairs of consecutive head values (`src/llama-model.cpp`,
//! `llama_model_rope_type`: `LLM_ARCH_LLAMA4` under "pairs of consecutive head values"): the
//! interleaved pairs of Hugging Face's complex RoPE. The llama3 frequency scaling is not in the
//! metadata: the converter writes its per-frequency factors as `rope_freqs.weight`
//! (`LlamaModel.generate_extra_tensors`), used by every layer as frequency factors
//! (`llama_model::get_rope_factors`).
//!
//! # Metadata (`llama4.*`, written by `conversion/llama.py` `Llama4Model.set_gguf_parameters`)
//! `block_count`, `context_length`, `embedding_length` (H), `feed_forward_length` (the dense
//! MLP's `intermediate_size_mlp`), `expert_feed_forward_length` (the experts' and shared expert's
//! `intermediate_size`), `attention.head_count`, `attention.head_count_kv`,
//! `attention.key_length` / `value_length` (D), `rope.dimension_count`, `rope.freq_base`,
//! `attention.layer_norm_rms_epsilon`, `expert_count`, `expert_used_count`,
//! `interleave_moe_layer_step`, `vocab_size`; `attention.sliding_window` only when every layer
//! is full attention (then 0). Optional keys llama.cpp reads: `attention.sliding_window_pattern`,
//! `rope.freq_base_swa`.
//!
//! # Fixed in llama.cpp's code, not read from the file
//! From `llama_model_llama4::load_arch_hparams` (`src/models/llama4.cpp`) unless noted:
//! - Chunked attention, chunk 8192 (`n_swa = 8192`, `LLAMA_SWA_TYPE_CHUNKED`), whatever the
//!   checkpoint's `attention_chunk_size`; unless `sliding_window` = 0 is stored (then no
//!   chunking and RoPE on every layer). A key at position `p0` is hidden from a query at `p1`
//!   when `p0 < ⌊p1 / 8192⌋ · 8192` (`llama_hparams::is_masked_swa`, `src/llama-hparams.h`).
//! - Chunked layers: `il % 4 < 3` (`load_swa_pattern(ml, 4)` → `llama_hparams::set_swa_pattern`,
//!   `src/llama-hparams.cpp`), unless `sliding_window_pattern` is stored. Their RoPE base is
//!   `rope.freq_base` unless `rope.freq_base_swa` is stored.
//! - NoPE layers: `(il + 1) % n_no_rope_layer_step == 0` with `n_no_rope_layer_step = 4`
//!   (default in `src/llama-hparams.h`, never read for this arch), in the graph builder
//!   `llama_model_llama4::graph`.
//! - `sliding_window` = 0 (the converter writes it when every `layer_types` entry is
//!   `full_attention`, the MobileLLM layout): `n_no_rope_layer_step = n_layer`, meant as "RoPE
//!   everywhere" but leaving the last layer NoPE, so its queries are multiplied by the
//!   temperature input, whose constants are then unset: `llm_graph_input_attn_temp::set_input`
//!   fails `GGML_ASSERT(f_attn_temp_scale != 0.0f)` and llama.cpp aborts on the first batch
//!   (checked with llama-cpp-python 0.3.36 on `tiny-F32.gguf` with the key added). There is no
//!   llama.cpp behaviour to match there; [`GgufLlama4`] follows the stated intent (RoPE on every
//!   layer, no temperature, no chunking).
//! - `expert_count` = 0 is refused (`load_arch_tensors`: "cannot have zero experts");
//!   `expert_feed_forward_length` may be a per-layer array (`get_key_or_arr`).
//! - Attention temperature, on NoPE layers only (the graph multiplies Q by it where it skips
//!   RoPE): `ln(⌊(pos + 1) / 8192⌋ + 1) · 0.1 + 1` (`n_attn_temp_floor_scale = 8192`,
//!   `f_attn_temp_scale = 0.1`, `f_attn_temp_offset = 1.0`; formula in
//!   `llm_graph_input_attn_temp::set_input`, `src/llama-graph.cpp`), whatever the checkpoint's
//!   `floor_scale` / `attn_scale`.
//! - QK norm (weightless RMSNorm with `layer_norm_rms_epsilon`, after RoPE, on RoPE layers only)
//!   when `expert_count` ≠ 128 (`use_kq_norm = type != LLM_TYPE_17B_128E`): on for Scout (16
//!   experts) and any other count, off for Maverick (128), whatever `use_qk_norm` said.
//! - MoE layers: `(il + 1) % interleave_moe_layer_step == 0` (`load_arch_tensors`).
//! - Attention scale `1/√D` (`f_attention_scale` is never set for Llama 4).
//! - Router: top-k over the raw router logits, the chosen logits through a sigmoid, and the
//!   weight multiplies the expert's *input* (`weight_before_ffn` for `LLM_ARCH_LLAMA4` in
//!   `llm_graph_context::build_moe_ffn`, `src/llama-graph.cpp`); not normalised; the shared
//!   expert (width `expert_feed_forward_length`) is added.
//!
//! For the published checkpoints these constants equal their configs (Scout and Maverick:
//! chunk 8192, floor 8192, scale 0.1, NoPE every 4th layer, QK norm iff 16 experts), so
//! llama.cpp and transformers agree; a checkpoint with other values is run with llama.cpp's.
//!
//! # Other differences from transformers to mind
//! - Tokenizer: llama.cpp maps `tokenizer.ggml.pre = llama4` to its GPT-4o pre-tokenizer
//!   (`src/llama-vocab.cpp`) and does not skip merges for whole-word tokens, which Llama 4's
//!   `tokenizer.json` does; [`crate::GgufTokenizer`] follows `tokenizer.json`.
//! - llama.cpp's default KV cache is f16 (`type_k` / `type_v`); the fixtures' logits were
//!   recorded with an f32 cache and no flash attention, so only the weights' arithmetic differs.
//! - Activations take each weight type's dot type before a matrix product (see
//!   [`llama4_core::ggml`]); the token embedding is a row look-up, dequantised exactly.

use llama4_core::gguf::{GgufFile, Value};

use crate::{Error, Result};

/// Chunk size llama.cpp uses for Llama 4's chunked layers.
pub const CHUNK: usize = 8192;
/// Every 4th layer is NoPE (global, no RoPE, temperature-tuned); the others are chunked.
pub const NOPE_STEP: usize = 4;
/// Temperature tuning: `ln(⌊(pos + OFFSET) / FLOOR⌋ + 1) · SCALE + 1`.
pub const TEMP_FLOOR: f32 = 8192.0;
/// See [`TEMP_FLOOR`].
pub const TEMP_SCALE: f32 = 0.1;
/// See [`TEMP_FLOOR`].
pub const TEMP_OFFSET: f32 = 1.0;

/// The hyperparameters of a Llama 4 GGUF, as llama.cpp resolves them.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufLlama4 {
    /// Layers.
    pub n_layer: usize,
    /// Hidden width H.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Head width D.
    pub head_dim: usize,
    /// Dense MLP width (`feed_forward_length`).
    pub n_ff: usize,
    /// Expert and shared-expert width (`expert_feed_forward_length`).
    pub n_ff_exp: usize,
    /// Routed experts.
    pub n_expert: usize,
    /// Experts per token.
    pub n_expert_used: usize,
    /// MoE every this many layers.
    pub moe_step: usize,
    /// Vocabulary (rows of `token_embd`).
    pub n_vocab: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base.
    pub rope_base: f32,
    /// False when the file stores `sliding_window = 0`: no chunking, RoPE everywhere.
    pub chunked: bool,
    /// QK norm on RoPE layers (`expert_count != 128`).
    pub qk_norm: bool,
}

fn key<'a>(f: &'a GgufFile, k: &str) -> Result<&'a Value> {
    f.get(&format!("llama4.{k}")).ok_or_else(|| Error::Config {
        field: "gguf metadata",
        reason: format!("`llama4.{k}` is missing"),
    })
}

fn uint(f: &GgufFile, k: &str) -> Result<usize> {
    let v = key(f, k)?;
    v.as_u64().map(|x| x as usize).ok_or_else(|| Error::Config {
        field: "gguf metadata",
        reason: format!("`llama4.{k}` = {v:?} is not an unsigned integer"),
    })
}

/// An unsigned key that llama.cpp also accepts as one value per layer (`get_key_or_arr`): a
/// per-layer array must hold `n_layer` equal values, as a single width is all this model has.
fn uint_or_layers(f: &GgufFile, k: &str, n_layer: usize) -> Result<usize> {
    let v = key(f, k)?;
    let Some(a) = v.as_array() else {
        return uint(f, k);
    };
    let bad = |why: &str| Error::Config {
        field: "gguf metadata",
        reason: format!(
            "`llama4.{k}` is an array of {} {}: {why}",
            a.len(),
            a.element_type_name()
        ),
    };
    let vals = a.to_i64s().ok_or_else(|| bad("not integers"))?;
    if vals.len() != n_layer {
        return Err(bad(&format!("expected one per layer ({n_layer})")));
    }
    match vals.split_first() {
        Some((&first, rest)) if first > 0 && rest.iter().all(|&x| x == first) => Ok(first as usize),
        _ => Err(bad("per-layer widths differ or are not positive (not supported)")),
    }
}

fn float(f: &GgufFile, k: &str) -> Result<f32> {
    let v = key(f, k)?;
    v.as_f32().ok_or_else(|| Error::Config {
        field: "gguf metadata",
        reason: format!("`llama4.{k}` = {v:?} is not a float"),
    })
}

impl GgufLlama4 {
    /// Reads the `llama4.*` metadata of `f` (`general.architecture` must be `llama4`).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.get("general.architecture").and_then(Value::as_str);
        if arch != Some("llama4") {
            return Err(Error::Config {
                field: "general.architecture",
                reason: format!("{arch:?} is not llama4"),
            });
        }
        let n_vocab = f.info("token_embd.weight")?.shape().first().copied().unwrap_or(0);
        let n_expert = uint(f, "expert_count")?;
        if n_expert == 0 {
            // As llama.cpp (`load_arch_tensors`): Llama 4 without experts is refused.
            return Err(Error::Config {
                field: "gguf metadata",
                reason: "`llama4.expert_count` = 0: a llama4 model must have experts".into(),
            });
        }
        let n_layer = uint(f, "block_count")?;
        let chunked = f
            .get("llama4.attention.sliding_window")
            .and_then(Value::as_u64)
            .is_none_or(|w| w != 0);
        Ok(GgufLlama4 {
            n_layer,
            n_embd: uint(f, "embedding_length")?,
            n_head: uint(f, "attention.head_count")?,
            n_head_kv: uint(f, "attention.head_count_kv")?,
            head_dim: uint(f, "attention.key_length")?,
            n_ff: uint(f, "feed_forward_length")?,
            n_ff_exp: uint_or_layers(f, "expert_feed_forward_length", n_layer)?,
            n_expert,
            n_expert_used: uint(f, "expert_used_count")?,
            moe_step: uint(f, "interleave_moe_layer_step")?,
            n_vocab,
            rms_eps: float(f, "attention.layer_norm_rms_epsilon")?,
            rope_base: float(f, "rope.freq_base")?,
            chunked,
            qk_norm: n_expert != 128,
        })
    }

    /// Layer `il` is MoE.
    pub fn is_moe(&self, il: usize) -> bool {
        self.moe_step > 0 && (il + 1).is_multiple_of(self.moe_step)
    }

    /// Layer `il` applies RoPE (else it is NoPE and temperature-tuned).
    pub fn uses_rope(&self, il: usize) -> bool {
        !self.chunked || !(il + 1).is_multiple_of(NOPE_STEP)
    }

    /// Layer `il` attends within chunks of [`CHUNK`].
    pub fn is_chunked(&self, il: usize) -> bool {
        self.chunked && il % NOPE_STEP < NOPE_STEP - 1
    }

    /// Every tensor a file must hold, with its shape outermost first; `output.weight` and
    /// `rope_freqs.weight` may also be present (see the module doc).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, d) = (self.n_embd, self.head_dim);
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![self.n_vocab, h]),
            ("output_norm.weight".to_string(), vec![h]),
        ];
        for il in 0..self.n_layer {
            let b = |s: &str| format!("blk.{il}.{s}.weight");
            t.push((b("attn_norm"), vec![h]));
            t.push((b("attn_q"), vec![self.n_head * d, h]));
            t.push((b("attn_k"), vec![self.n_head_kv * d, h]));
            t.push((b("attn_v"), vec![self.n_head_kv * d, h]));
            t.push((b("attn_output"), vec![h, self.n_head * d]));
            t.push((b("ffn_norm"), vec![h]));
            if self.is_moe(il) {
                let (e, i) = (self.n_expert, self.n_ff_exp);
                t.push((b("ffn_gate_inp"), vec![e, h]));
                t.push((b("ffn_gate_exps"), vec![e, i, h]));
                t.push((b("ffn_up_exps"), vec![e, i, h]));
                t.push((b("ffn_down_exps"), vec![e, h, i]));
                t.push((b("ffn_gate_shexp"), vec![i, h]));
                t.push((b("ffn_up_shexp"), vec![i, h]));
                t.push((b("ffn_down_shexp"), vec![h, i]));
            } else {
                t.push((b("ffn_gate"), vec![self.n_ff, h]));
                t.push((b("ffn_up"), vec![self.n_ff, h]));
                t.push((b("ffn_down"), vec![h, self.n_ff]));
            }
        }
        t
    }
}

/// The attention temperature llama.cpp applies to the queries of a NoPE layer at `pos`.
pub fn attn_temperature(pos: usize) -> f32 {
    ((((pos as f32 + TEMP_OFFSET) / TEMP_FLOOR).floor() + 1.0).ln()) * TEMP_SCALE + 1.0
}
