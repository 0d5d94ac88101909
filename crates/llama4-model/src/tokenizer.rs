//! `tokenizer.json` through the `tokenizers` crate, streamed decoding, and the Llama 4 chat format.

use std::path::Path;

use crate::{Error, Result};

/// A Hugging Face fast tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        Ok(Tokenizer { inner })
    }

    /// Wraps a tokenizer built in code (the one of a GGUF file: [`crate::GgufTokenizer`]).
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// Reads `dir/tokenizer.json` if the checkpoint has one.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join("tokenizer.json");
        if path.is_file() {
            Self::from_file(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Ids of `text` as transformers' `tokenizer(text)` gives them: special tokens written in
    /// the text are recognised, and the post-processor's additions (a BOS) are applied.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Ids of `text`; `add_special_tokens: false` skips the post-processor (what chat templates
    /// use, since the template writes `<|begin_of_text|>` itself).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err(Path::new("tokenizer.json"), e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err(Path::new("tokenizer.json"), e))
    }

    /// The id of a token string (`"<|eot|>"`), if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns generated ids into text piece by piece, never emitting half a character: each new
/// id re-decodes a short window and emits what was added.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Text already emitted for `ids[..]`.
    emitted: String,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id`; returns the text it completes (may be empty while a character is partial).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        // A partial UTF-8 sequence decodes to U+FFFD at the end: wait for the rest.
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = match text.strip_prefix(&self.emitted) {
            Some(rest) => rest.to_string(),
            // Decoding is not always prefix-stable (clean-up rules); emit the difference in length.
            None => text.chars().skip(self.emitted.chars().count()).collect(),
        };
        self.emitted = text;
        Ok(new)
    }
}

/// The Llama 4 chat format for one user turn, ending where the assistant's answer begins.
pub fn chat_prompt(user: &str) -> String {
    format!(
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n{user}<|eot|>\
         <|header_start|>assistant<|header_end|>\n\n"
    )
}
