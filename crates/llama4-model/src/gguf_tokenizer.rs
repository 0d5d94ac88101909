//! The tokenizer of a GGUF file, rebuilt from its `tokenizer.ggml.*` metadata as the Hugging Face
//! fast tokenizer of the same model (so the rest of the crate uses it as it uses
//! `tokenizer.json`).
//!
//! # What is read
//! - `tokenizer.ggml.model` = `gpt2` (byte-level BPE) and `tokenizer.ggml.pre` = `llama4`: the
//!   pre-tokenizer is the split regex of Llama 4's `tokenizer.json` (the o200k pattern, each
//!   match isolated) followed by the byte-level map; decoding is byte-level.
//! - `tokenizer.ggml.tokens` (id order), `tokenizer.ggml.token_type` (1 normal, 2 unknown,
//!   3 control, 4 user-defined, 5 unused, 6 byte), `tokenizer.ggml.merges` (`"left right"`, in
//!   priority order). Control tokens become special added tokens and user-defined ones added
//!   tokens, both matched in the text before pre-tokenisation; unused ones (llama.cpp's
//!   `[PAD…]` fillers up to the config's vocabulary size) are left out, as the Hugging Face
//!   tokenizer has no such tokens.
//! - As in Llama 4's `tokenizer.json`, a pre-token that is itself in the vocabulary is one token
//!   without applying merges (`ignore_merges`); llama.cpp's own `llama4` tokenizer does not do
//!   this, which can split rare words differently from Hugging Face.
//! - `tokenizer.ggml.bos_token_id`, `eos_token_id`, `add_bos_token`, `add_eos_token`: the
//!   post-processor adds BOS (and EOS) as Llama 4's template processing does.
//! - `tokenizer.chat_template`, kept for the chat renderer.

use std::path::Path;

use llama4_core::gguf::{Array, GgufFile, Value};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as PostSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::{Error, Result, Tokenizer};

/// The split regex of Llama 4's `tokenizer.json` (the o200k pattern).
pub const LLAMA4_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// GGUF token types (`llama_token_type` of llama.cpp).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const UNUSED: i64 = 5;

/// A GGUF file's tokenizer and the special-token facts stored beside it.
#[derive(Debug)]
pub struct GgufTokenizer {
    /// The tokenizer, equal to the Hugging Face one of the same model.
    pub tokenizer: Tokenizer,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The string at `key`.
fn string<'a>(f: &'a GgufFile, key: &str) -> Result<&'a str> {
    f.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(f.path(), format!("no string `{key}`")))
}

/// A token id at `key`, if present; an error if present and not an id of the vocabulary.
fn token_id(f: &GgufFile, key: &str, n: usize) -> Result<Option<u32>> {
    let Some(v) = f.get(key) else { return Ok(None) };
    match v.as_u64() {
        Some(id) if (id as usize) < n => Ok(Some(id as u32)),
        _ => Err(bad(
            f.path(),
            format!("`{key}` = {v:?} is not a token id below {n}"),
        )),
    }
}

impl GgufTokenizer {
    /// Why the tokenizer `f`'s metadata names cannot be built here, if it cannot: a tokenizer
    /// model other than `gpt2` (byte-level BPE) or a pre-tokenizer other than `llama4` (the
    /// split rules differ, so ids would silently differ from the model's own tokenizer).
    /// `None` when both are supported or the keys are absent (then [`Self::from_gguf`] names
    /// what is missing).
    pub fn unsupported(f: &GgufFile) -> Option<String> {
        let get = |key| f.get(key).and_then(Value::as_str);
        match (get("tokenizer.ggml.model"), get("tokenizer.ggml.pre")) {
            (Some(m), _) if m != "gpt2" => {
                Some(format!("tokenizer model `{m}` is not supported (only gpt2 BPE)"))
            }
            (_, Some(p)) if p != "llama4" => {
                Some(format!("pre-tokenizer `{p}` is not supported (only llama4)"))
            }
            _ => None,
        }
    }

    /// Builds the tokenizer of `f` (see the module doc). Errors name what is missing or
    /// malformed; a tokenizer model or pre-tokenizer other than `gpt2` / `llama4` is refused
    /// (see [`Self::unsupported`]).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let path = f.path();
        if let Some(reason) = Self::unsupported(f) {
            return Err(bad(path, reason));
        }
        string(f, "tokenizer.ggml.model")?;
        string(f, "tokenizer.ggml.pre")?;
        let tokens = f
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .and_then(Array::as_strings)
            .ok_or_else(|| bad(path, "no string array `tokenizer.ggml.tokens`"))?;
        let n = tokens.len();
        let types = match f.get("tokenizer.ggml.token_type") {
            None => vec![1; n],
            Some(v) => v
                .as_array()
                .and_then(Array::to_i64s)
                .ok_or_else(|| bad(path, "`tokenizer.ggml.token_type` is not an integer array"))?,
        };
        if types.len() != n {
            return Err(bad(path, format!("{} token types for {n} tokens", types.len())));
        }
        let merges = f
            .get("tokenizer.ggml.merges")
            .and_then(Value::as_array)
            .and_then(Array::as_strings)
            .ok_or_else(|| bad(path, "no string array `tokenizer.ggml.merges`"))?;
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(path, format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;

        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if ty == UNUSED {
                continue;
            }
            if vocab.insert(t.clone(), id as u32).is_some() {
                return Err(bad(path, format!("token `{t}` appears twice")));
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(true)
            .build()
            .map_err(|e| bad(path, format!("BPE: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        let split = Split::new(
            SplitPattern::Regex(LLAMA4_PATTERN.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| bad(path, format!("split regex: {e}")))?;
        tok.with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        tok.with_decoder(Some(ByteLevel::default()));

        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == CONTROL || ty == USER_DEFINED)
            .map(|(t, &ty)| AddedToken::from(t.clone(), ty == CONTROL).normalized(false))
            .collect();
        tok.add_special_tokens(added)
            .map_err(|e| bad(path, format!("added tokens: {e}")))?;

        let bos_id = token_id(f, "tokenizer.ggml.bos_token_id", n)?;
        let eos_id = token_id(f, "tokenizer.ggml.eos_token_id", n)?;
        let flag = |key: &str| f.get(key).and_then(Value::as_bool).unwrap_or(false);
        let (add_bos, add_eos) = (
            flag("tokenizer.ggml.add_bos_token"),
            flag("tokenizer.ggml.add_eos_token"),
        );
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut special = Vec::new();
        if add_bos {
            let id = bos_id.ok_or_else(|| bad(path, "add_bos_token without bos_token_id"))?;
            let bos = tokens[id as usize].clone();
            single.push(bos.clone());
            pair.extend([
                format!("{bos}:0"),
                "$A:0".into(),
                format!("{bos}:1"),
                "$B:1".into(),
            ]);
            special.push((bos, id));
        } else {
            pair.extend(["$A:0".to_string(), "$B:1".into()]);
        }
        single.push("$A".into());
        if add_eos {
            let id = eos_id.ok_or_else(|| bad(path, "add_eos_token without eos_token_id"))?;
            let eos = tokens[id as usize].clone();
            single.push(eos.clone());
            pair.push(format!("{eos}:1"));
            special.push((eos, id));
        }
        let template = TemplateProcessing::builder()
            .try_single(single.join(" "))
            .and_then(|b| b.try_pair(pair.join(" ")))
            .map_err(|e| bad(path, format!("template: {e}")))?
            .special_tokens(special)
            .build()
            .map_err(|e| bad(path, format!("template: {e}")))?;
        tok.with_post_processor(Some(PostSequence::new(vec![
            tokenizers::processors::byte_level::ByteLevel::new(true, false, true).into(),
            template.into(),
        ])));

        Ok(GgufTokenizer {
            tokenizer: Tokenizer::from_tokenizers(tok),
            bos_id,
            eos_id,
            chat_template: f
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}
