//! A generation session: the model plus the cache of one sequence.

use kv_cache::{KvCache, MemoryBytes};
use llama4_core::DType;
use ndarray::{s, Array1, Array2};

use crate::{Error, Result, TextModel};

/// Which positions' logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (all that generation needs: `lm_head` runs once).
    Last,
    /// Every position of the call.
    All,
}

/// One sequence being processed: owns its key/value cache, borrows the model.
///
/// `prefill` runs a batch of prompt tokens, `step` one generated token; both continue from
/// where the sequence is.
pub struct Session<'m> {
    model: &'m TextModel,
    cache: KvCache,
    tokens: Vec<u32>,
    max_len: usize,
}

impl<'m> Session<'m> {
    /// A new empty session whose cache stores keys and values in `dtype`. The context limit is
    /// the config's `max_position_embeddings`.
    pub fn new(model: &'m TextModel, dtype: DType) -> Result<Self> {
        Ok(Session {
            model,
            cache: model.new_cache(dtype)?,
            tokens: Vec::new(),
            max_len: model.config().max_position_embeddings,
        })
    }

    /// Lowers (or raises) the context limit this session enforces.
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// The context limit.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The model.
    pub fn model(&self) -> &'m TextModel {
        self.model
    }

    /// Tokens processed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Cache memory by layer kind.
    pub fn cache_memory(&self) -> MemoryBytes {
        self.cache.memory_bytes()
    }

    /// The cache.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Runs `tokens` at the next positions and returns their logits.
    ///
    /// # Shapes
    /// `[T]` → `[1, V]` ([`Logits::Last`]) or `[T, V]` ([`Logits::All`]).
    ///
    /// # Errors
    /// [`Error::Empty`] for no tokens, [`Error::ContextOverflow`] past the context limit,
    /// [`Error::TokenOutOfRange`] for ids outside the vocabulary; the session is unchanged.
    pub fn prefill(&mut self, tokens: &[u32], which: Logits) -> Result<Array2<f32>> {
        let hidden = self.model.embed(tokens)?;
        self.prefill_embeddings(tokens, hidden, which)
    }

    /// Like [`Session::prefill`] with the input embeddings given (image features already in
    /// place); `tokens` are recorded as the sequence's ids.
    ///
    /// # Shapes
    /// `tokens: [T]`, `embeddings: [T, H]`.
    pub fn prefill_embeddings(
        &mut self,
        tokens: &[u32],
        embeddings: Array2<f32>,
        which: Logits,
    ) -> Result<Array2<f32>> {
        if tokens.is_empty() {
            return Err(Error::Empty("prefill"));
        }
        let total = self.tokens.len() + tokens.len();
        if total > self.max_len {
            return Err(Error::ContextOverflow {
                tokens: total,
                limit: self.max_len,
            });
        }
        if embeddings.dim() != (tokens.len(), self.model.config().hidden_size) {
            return Err(llama4_core::Error::shape(
                "Session::prefill_embeddings",
                format!("{} tokens, embeddings {:?}", tokens.len(), embeddings.dim()),
            )
            .into());
        }
        let before = self.tokens.len();
        let hidden = match self.model.forward_hidden(embeddings, &mut self.cache) {
            Ok(h) => h,
            Err(e) => {
                // Some layers may have appended already: rewind them, or, when a chunked layer
                // has moved past keys it no longer holds, start over rather than keep a cache
                // that disagrees with `tokens`.
                if self.cache.truncate(before).is_err() {
                    self.reset();
                }
                return Err(e);
            }
        };
        self.tokens.extend_from_slice(tokens);
        let rows = match which {
            Logits::Last => hidden.slice(s![hidden.nrows() - 1.., ..]),
            Logits::All => hidden.view(),
        };
        self.model.logits(rows)
    }

    /// Runs one token and returns its logits.
    ///
    /// # Shapes
    /// → `[V]`.
    pub fn step(&mut self, token: u32) -> Result<Array1<f32>> {
        let logits = self.prefill(&[token], Logits::Last)?;
        Ok(logits.row(0).to_owned())
    }

    /// Forgets everything after the first `len` positions (to regenerate from there).
    ///
    /// # Errors
    /// When a chunked layer no longer holds the keys that position needs (the cache crate
    /// says which); then [`Session::reset`] and prefill again.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len)?;
        self.tokens.truncate(len);
        Ok(())
    }

    /// Empties the session.
    pub fn reset(&mut self) {
        self.cache.reset();
        self.tokens.clear();
    }
}
