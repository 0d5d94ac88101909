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
    /// Reads `tokenizer.json` (a regular file of at most
    /// [`MAX_JSON_BYTES`](llama4_core::input::MAX_JSON_BYTES)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes =
            llama4_core::input::read_capped(path, llama4_core::input::Cap::JSON).map_err(Error::input)?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| tok_err(path, e))?;
        Ok(Tokenizer { inner })
    }

    /// Wraps a tokenizer built in code (the one of a GGUF file: [`crate::GgufTokenizer`]).
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// Reads `dir/tokenizer.json` if the checkpoint has one (a FIFO, device, directory or
    /// unfollowable link in its place is an error, not an absent tokenizer).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join("tokenizer.json");
        match llama4_core::input::probe(&path).map_err(Error::input)? {
            llama4_core::input::Probe::Absent => Ok(None),
            _ => Self::from_file(path).map(Some),
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

/// Turns generated ids into text piece by piece, never emitting half a character nor the text
/// of a stop id.
///
/// Each new id decodes a short window: the ids since the last emitted text plus the one before
/// them (so that a token's leading space or a byte continued across tokens decodes as it does
/// in context), compared with the same window without the new ids. Work per id is bounded by
/// the window, not by the output so far, and ids before the window are dropped.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    /// The window: ids from `prefix` on (earlier ones are emitted and dropped).
    ids: Vec<u32>,
    /// `ids[..read]` are emitted; `ids[..prefix]` is the context kept before them (0 or 1 id).
    read: usize,
    /// Ids that end generation: never decoded.
    stop_ids: Vec<u32>,
}

impl StreamDecoder {
    /// An empty decoder that emits every id's text.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty decoder that emits nothing for `stop_ids` (a chat turn's `<|eot|>`, EOS).
    pub fn with_stop_ids(stop_ids: &[u32]) -> Self {
        StreamDecoder {
            stop_ids: stop_ids.to_vec(),
            ..Self::default()
        }
    }

    /// Adds `id`; returns the text it completes (empty while a character is partial, and for
    /// a stop id).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        if self.stop_ids.contains(&id) {
            return Ok(String::new());
        }
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[..self.read])?;
        let text = tokenizer.decode(&self.ids)?;
        // A partial UTF-8 sequence decodes to U+FFFD at the end: wait for the rest.
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = match text.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_string(),
            // Decoding is not always prefix-stable (clean-up rules); emit the difference in length.
            None => text.chars().skip(before.chars().count()).collect(),
        };
        // Keep the last emitted id as context for the next one; drop the rest.
        self.ids.drain(..self.ids.len() - 1);
        self.read = 1;
        Ok(new)
    }
}

/// The Llama 4 chat format for one user turn, ending where the assistant's answer begins: what
/// [`crate::ChatTemplate`] renders with the Llama 4 template for one user message. For system
/// prompts, several turns, tools or a checkpoint's own template, use [`crate::ChatTemplate`].
pub fn chat_prompt(user: &str) -> String {
    format!(
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n{user}<|eot|>\
         <|header_start|>assistant<|header_end|>\n\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_level() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat/llama4");
        Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
    }

    #[test]
    fn streamed_text_equals_the_whole_decode_with_a_bounded_window() {
        let tok = byte_level();
        // Multi-byte characters split across byte-level tokens, spaces, punctuation.
        let text = "Grüße, 世界! naïve café — 🦙 llamas × 3\n\tend";
        let ids = tok.encode_with(text, false).unwrap();
        assert!(ids.len() > text.chars().count() / 2, "{} ids", ids.len());
        let mut stream = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&stream.push(&tok, id).unwrap());
            assert!(stream.ids.len() <= 8, "window grew to {}", stream.ids.len());
            assert!(!out.contains('\u{FFFD}'), "half a character emitted: {out:?}");
        }
        assert_eq!(out, tok.decode(&ids).unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn stop_ids_are_never_emitted() {
        let tok = byte_level();
        let eot = tok.token_id("<|eot|>").unwrap();
        let mut ids = tok.encode_with("done", false).unwrap();
        ids.push(eot);
        let mut stream = StreamDecoder::with_stop_ids(&[eot]);
        let out: String = ids.iter().map(|&id| stream.push(&tok, id).unwrap()).collect();
        assert_eq!(out, "done");
        // Without the stop id, its text is part of the stream.
        let mut plain = StreamDecoder::new();
        let all: String = ids.iter().map(|&id| plain.push(&tok, id).unwrap()).collect();
        assert_eq!(all, "done<|eot|>");
    }
}
