//! A generation session: the model plus the cache of one sequence.

use std::borrow::Borrow;

use kv_cache::{KvCache, MemoryBytes, PagePool};
use llama4_core::scratch::reshape_reusing;
use llama4_core::KvDtype;
use ndarray::{s, Array1, Array2, ArrayViewMut2};

use crate::layer::Workspace;
use crate::{Error, Result, TextModel};

/// A prefill of more tokens than this does not keep its buffers in the session: decoding needs
/// a few rows, and a long prompt's `[T, H]` buffers would stay allocated for nothing.
const KEEP_BUFFERS_UP_TO: usize = 64;

/// Which positions' logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (all that generation needs: `lm_head` runs once).
    Last,
    /// Every position of the call.
    All,
}

/// One sequence being processed: owns its key/value cache and the buffers its forward passes
/// work in; holds the model as `M`, a `&TextModel` or an `Arc<TextModel>` (a server keeps
/// sessions beside a shared model: `Session<Arc<TextModel>>` is `Send`).
///
/// `prefill` runs a batch of prompt tokens, `step` one generated token; both continue from
/// where the sequence is. [`Session::step_logits`] is the decode step that allocates nothing
/// once warmed up (the cache still grows, a page at a time, as the context does; see
/// [`Session::reserve`]).
pub struct Session<M: Borrow<TextModel>> {
    model: M,
    cache: KvCache,
    tokens: Vec<u32>,
    max_len: usize,
    ws: Workspace,
    /// Embeddings of the current tokens, then their hidden states, `[T, H]`.
    hidden: Array2<f32>,
}

impl<M: Borrow<TextModel>> std::fmt::Debug for Session<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tokens", &self.tokens.len())
            .field("max_len", &self.max_len)
            .field("cache", &self.cache.memory_bytes())
            .finish_non_exhaustive()
    }
}

impl<M: Borrow<TextModel>> Session<M> {
    /// A new empty session whose cache stores keys and values in `dtype`. The context limit is
    /// the config's `max_position_embeddings`.
    pub fn new(model: M, dtype: impl Into<KvDtype>) -> Result<Self> {
        let text = model.borrow();
        let (cache, max_len) = (text.new_cache(dtype)?, text.config().max_position_embeddings);
        Ok(Session {
            model,
            cache,
            tokens: Vec::new(),
            max_len,
            ws: Workspace::new(),
            hidden: Array2::zeros((0, 0)),
        })
    }

    /// Pre-sizes the cache and the token list for `n_tokens` positions in total, so that
    /// reaching them grows neither.
    ///
    /// # Errors
    /// When the cache cannot be sized (see [`KvCache::reserve`]; memory the system refuses is
    /// [`kv_cache::KvError::Alloc`], not an abort), [`Error::OutOfMemory`] for the token list.
    pub fn reserve(&mut self, n_tokens: usize) -> Result<()> {
        self.cache.reserve(n_tokens)?;
        let more = n_tokens.saturating_sub(self.tokens.len());
        self.tokens.try_reserve(more).map_err(|_| Error::OutOfMemory {
            what: "the session's token list",
            bytes: (more as u64).saturating_mul(4),
        })?;
        Ok(())
    }

    /// Pages of `page_len` positions for this session's cache (0: the automatic length; see
    /// [`kv_cache::CacheSpec::page_len`]). Short pages cost speed, not results: tests use them
    /// to cross page boundaries in short sequences.
    ///
    /// # Errors
    /// [`kv_cache::KvError::InvalidSpec`] once the session holds tokens.
    pub fn with_page_len(mut self, page_len: usize) -> Result<Self> {
        let spec = self.cache.spec().with_page_len(page_len);
        self.cache = self.fresh_cache("page length", spec, self.cache.pool().cloned())?;
        Ok(self)
    }

    /// Counts this session's cache pages against `pool`'s byte budget, shared with every other
    /// cache of the pool (an engine's sessions): an append beyond it is
    /// [`kv_cache::KvError::Budget`].
    ///
    /// # Errors
    /// [`kv_cache::KvError::InvalidSpec`] once the session holds tokens.
    pub fn with_pool(mut self, pool: PagePool) -> Result<Self> {
        self.cache = self.fresh_cache("page pool", self.cache.spec(), Some(pool))?;
        Ok(self)
    }

    /// An empty cache for this session's layers, in place of the current one, which must be
    /// empty (`what` names the setting, for the error).
    fn fresh_cache(&self, what: &str, spec: kv_cache::CacheSpec, pool: Option<PagePool>) -> Result<KvCache> {
        if !self.cache.is_empty() {
            return Err(kv_cache::KvError::InvalidSpec(format!(
                "the {what} is set before the first token (the session holds {})",
                self.cache.len()
            ))
            .into());
        }
        let kinds: Vec<_> = self.cache.kinds().collect();
        Ok(match pool {
            Some(pool) => KvCache::with_pool(&kinds, spec, pool)?,
            None => KvCache::new(&kinds, spec)?,
        })
    }

    /// Frees the cache pages beyond the positions held (see [`KvCache::shrink_to_fit`]).
    pub fn shrink_to_fit(&mut self) {
        self.cache.shrink_to_fit();
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
    pub fn model(&self) -> &TextModel {
        self.model.borrow()
    }

    /// What holds the model (the `&TextModel` or `Arc<TextModel>` given to [`Session::new`]).
    pub fn model_handle(&self) -> &M {
        &self.model
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
        let mut hidden = std::mem::take(&mut self.hidden);
        reshape_reusing(
            &mut hidden,
            (tokens.len(), self.model.borrow().config().hidden_size()),
        );
        let embedded = self.model.borrow().embed_into(tokens, hidden.view_mut());
        let result = embedded
            .and_then(|()| self.run(tokens, hidden.view_mut()))
            .and_then(|()| self.logits(&hidden, which));
        self.hidden = hidden;
        self.release_large_buffers(tokens.len());
        result
    }

    /// Like [`Session::prefill`] with the input embeddings given (image features already in
    /// place); `tokens` are recorded as the sequence's ids.
    ///
    /// # Shapes
    /// `tokens: [T]`, `embeddings: [T, H]`.
    ///
    /// # Errors
    /// As [`Session::prefill`] (ids outside the vocabulary included), and a shape error when
    /// `embeddings` is not `[T, H]`.
    pub fn prefill_embeddings(
        &mut self,
        tokens: &[u32],
        mut embeddings: Array2<f32>,
        which: Logits,
    ) -> Result<Array2<f32>> {
        if embeddings.dim() != (tokens.len(), self.model.borrow().config().hidden_size()) {
            return Err(llama4_core::Error::shape(
                "Session::prefill_embeddings",
                format!("{} tokens, embeddings {:?}", tokens.len(), embeddings.dim()),
            )
            .into());
        }
        // The ids are recorded as the sequence: they must be ids the model has.
        let vocab = self.model.borrow().config().vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, vocab });
        }
        let result = self
            .run(tokens, embeddings.view_mut())
            .and_then(|()| self.logits(&embeddings, which));
        self.release_large_buffers(tokens.len());
        result
    }

    /// Runs one token and returns its logits.
    ///
    /// # Shapes
    /// → `[V]`.
    pub fn step(&mut self, token: u32) -> Result<Array1<f32>> {
        Ok(Array1::from(self.step_logits(token)?.to_vec()))
    }

    /// [`Session::step`] with the logits borrowed from the session's buffers: once the session
    /// has decoded a token, a step allocates nothing (the cache grows by steps as the context
    /// does, unless [`Session::reserve`]d; the token list grows like a `Vec`).
    ///
    /// # Shapes
    /// → `[V]`.
    ///
    /// # Errors
    /// As [`Session::prefill`]; the session is unchanged.
    pub fn step_logits(&mut self, token: u32) -> Result<&[f32]> {
        let mut hidden = std::mem::take(&mut self.hidden);
        reshape_reusing(&mut hidden, (1, self.model.borrow().config().hidden_size()));
        let embedded = self.model.borrow().embed_into(&[token], hidden.view_mut());
        let result = embedded
            .and_then(|()| self.run(&[token], hidden.view_mut()))
            .and_then(|()| {
                self.model
                    .borrow()
                    .logits_into(hidden.view(), &mut self.ws)
                    .map(|_| ())
            });
        self.hidden = hidden;
        result?;
        self.ws.logits().to_slice().ok_or(Error::Empty("logits"))
    }

    /// The cache, for a batched pass ([`crate::forward_batch`]), which records the tokens
    /// with [`Session::record`] once every layer has run.
    pub(crate) fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// Records `tokens` as processed (their keys and values are in the cache).
    pub(crate) fn record(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// After a failed pass: rewinds the cache to the `len` positions recorded, or, when a
    /// chunked layer has moved past keys it no longer holds, starts over rather than keep a
    /// cache that disagrees with the tokens.
    pub(crate) fn rewind_cache(&mut self, len: usize) {
        if self.cache.truncate(len).is_err() {
            self.reset();
        }
    }

    /// The decoder over `hidden` (the embeddings of `tokens`, final-normed on return), with
    /// the checks that keep the session consistent: on error nothing is recorded.
    fn run(&mut self, tokens: &[u32], hidden: ArrayViewMut2<f32>) -> Result<()> {
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
        let before = self.tokens.len();
        if let Err(e) = self
            .model
            .borrow()
            .forward_hidden_in(hidden, &mut self.cache, &mut self.ws)
        {
            // Some layers may have appended already.
            self.rewind_cache(before);
            return Err(e);
        }
        self.record(tokens);
        Ok(())
    }

    /// Logits of the final-normed `hidden` rows `which` asks for.
    fn logits(&mut self, hidden: &Array2<f32>, which: Logits) -> Result<Array2<f32>> {
        match which {
            Logits::Last => Ok(self
                .model
                .borrow()
                .logits_into(hidden.slice(s![hidden.nrows() - 1.., ..]), &mut self.ws)?
                .to_owned()),
            Logits::All => self.model.borrow().logits(hidden.view()),
        }
    }

    /// Drops the buffers a pass of `t` tokens grew when they are much larger than decoding
    /// needs (see [`KEEP_BUFFERS_UP_TO`]).
    fn release_large_buffers(&mut self, t: usize) {
        if t > KEEP_BUFFERS_UP_TO {
            self.ws = Workspace::new();
            self.hidden = Array2::zeros((0, 0));
        }
    }

    /// Makes this session hold the first `len` tokens of `other`, a session of the same model,
    /// by sharing `other`'s cache pages rather than running those tokens again: a prefix that
    /// several sequences have in common (a system prompt, the earlier turns of a conversation)
    /// is computed and stored once. A page is copied only when one of the two writes to it.
    ///
    /// `len` is lowered to what `other`'s cache can restart from ([`KvCache::truncatable`]: a
    /// chunked layer holds only its current chunk). Returns the tokens now held; what this
    /// session held before is dropped.
    ///
    /// # Errors
    /// [`kv_cache::KvError::InvalidSpec`] when `other` runs another model or stores its cache
    /// in another format; nothing changes then.
    pub fn share_prefix<N: Borrow<TextModel>>(&mut self, other: &Session<N>, len: usize) -> Result<usize> {
        if !std::ptr::eq(self.model(), other.model()) || self.cache.spec() != other.cache.spec() {
            return Err(kv_cache::KvError::InvalidSpec(
                "a prefix is shared between sessions of one model and cache format".into(),
            )
            .into());
        }
        let len = other.cache.truncatable(len.min(other.tokens.len()));
        let mut cache = other.cache.clone();
        cache.truncate(len)?;
        self.cache = cache;
        self.tokens.clear();
        self.tokens.extend_from_slice(&other.tokens[..len]);
        Ok(len)
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
