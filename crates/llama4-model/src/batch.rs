//! One forward pass over the new tokens of several sessions: decode steps and prefill pieces
//! mixed, each sequence with its own cache and positions, every weight read once.

use std::borrow::Borrow;

use ndarray::{s, ArrayView2};

use crate::layer::{Seq, Workspace};
use crate::session::Session;
use crate::{Error, Result, TextModel};

/// One session's share of a batched pass ([`forward_batch`]).
#[derive(Debug)]
pub struct BatchEntry<'a, M: Borrow<TextModel>> {
    /// The sequence; on success its tokens and cache are extended by `tokens`.
    pub session: &'a mut Session<M>,
    /// Its new tokens: one for a decode step, a piece of the prompt for a prefill.
    pub tokens: &'a [u32],
    /// Input embeddings of `tokens` (image features already scattered in), `[T, H]`; the
    /// token embeddings are looked up when `None`.
    pub embeddings: Option<ArrayView2<'a, f32>>,
}

/// Runs the new tokens of every entry through `model` in one pass and returns the logits of
/// each entry's last token, `[n, V]` in the order of `entries` (borrowed from `ws`).
///
/// Projections, norms, the shared expert and `lm_head` run once over all rows; the MoE groups
/// rows by expert, so each chosen expert's weights are read once per pass; attention runs per
/// sequence against its own cache. The result equals running each session alone.
///
/// # Errors
/// Every entry is checked before anything runs: an entry that is empty, past its session's
/// context limit, holds ids outside the vocabulary, has embeddings of the wrong shape, or whose
/// session holds another model fails the whole call with [`Error::BatchEntry`] naming it, and
/// no session changes. An error while running (a kernel, a custom component) rewinds every
/// session to where it was.
pub fn forward_batch<'w, M: Borrow<TextModel>>(
    model: &TextModel,
    entries: &mut [BatchEntry<'_, M>],
    ws: &'w mut Workspace,
) -> Result<ArrayView2<'w, f32>> {
    if entries.is_empty() {
        return Err(Error::Empty("forward_batch"));
    }
    for (i, e) in entries.iter().enumerate() {
        check_entry(model, e).map_err(|source| Error::BatchEntry {
            entry: i,
            source: Box::new(source),
        })?;
    }
    let h = model.config().hidden_size();
    let total: usize = entries.iter().map(|e| e.tokens.len()).sum();
    // The stacked hidden states leave the workspace while the layers borrow the rest of it.
    let mut hidden = std::mem::take(&mut ws.hidden);
    llama4_core::scratch::reshape_reusing(&mut hidden, (total, h));
    let mut row = 0;
    for e in entries.iter() {
        let rows = s![row..row + e.tokens.len(), ..];
        match &e.embeddings {
            Some(x) => hidden.slice_mut(rows).assign(x),
            None => model.embed_into(e.tokens, hidden.slice_mut(rows))?,
        }
        row += e.tokens.len();
    }
    let before: Vec<usize> = entries.iter().map(|e| e.session.len()).collect();
    let mut seqs: Vec<Seq<'_>> = entries
        .iter_mut()
        .map(|e| Seq {
            len: e.tokens.len(),
            cache: e.session.cache_mut(),
        })
        .collect();
    let result = model.forward_seqs(hidden.view_mut(), &mut seqs, ws);
    drop(seqs);
    if let Err(e) = result {
        ws.hidden = hidden;
        for (entry, &len) in entries.iter_mut().zip(&before) {
            entry.session.rewind_cache(len);
        }
        return Err(e);
    }
    for e in entries.iter_mut() {
        e.session.record(e.tokens);
    }
    // Only the last row of each sequence goes through lm_head.
    let mut last = std::mem::take(&mut ws.last);
    llama4_core::scratch::reshape_reusing(&mut last, (entries.len(), h));
    let mut end = 0;
    for (i, e) in entries.iter().enumerate() {
        end += e.tokens.len();
        last.row_mut(i).assign(&hidden.row(end - 1));
    }
    ws.hidden = hidden;
    let computed = model.logits_into(last.view(), ws).map(|_| ());
    ws.last = last;
    computed?;
    Ok(ws.logits())
}

/// The checks [`forward_batch`] makes on one entry before running anything.
fn check_entry<M: Borrow<TextModel>>(model: &TextModel, e: &BatchEntry<'_, M>) -> Result<()> {
    if !std::ptr::eq(e.session.model(), model) {
        return Err(Error::Config {
            field: "session",
            reason: "the session holds another model than the batch runs".into(),
        });
    }
    let t = e.tokens.len();
    if t == 0 {
        return Err(Error::Empty("forward_batch"));
    }
    let total = e.session.len().saturating_add(t);
    if total > e.session.max_len() {
        return Err(Error::ContextOverflow {
            tokens: total,
            limit: e.session.max_len(),
        });
    }
    let vocab = model.config().vocab_size;
    if let Some(&id) = e.tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::TokenOutOfRange { id, vocab });
    }
    if let Some(x) = &e.embeddings {
        if x.dim() != (t, model.config().hidden_size()) {
            return Err(llama4_core::Error::shape(
                "forward_batch",
                format!("{t} tokens, embeddings {:?}", x.dim()),
            )
            .into());
        }
    }
    Ok(())
}
