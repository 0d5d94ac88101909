//! The engine: one thread that owns the model and the slots (a session, i.e. a key/value cache,
//! each) and runs the step loop. Requests come in through a bounded queue and join between steps;
//! each sends its events (text pieces, the end) back on its own channel, and a request whose
//! channel is closed (the client went away) gives up its slot at the next step.
//!
//! A step schedules one piece per active sequence: the next token of every decoding sequence,
//! and prompt pieces of prefilling sequences up to `prefill_chunk` tokens in all, so that a long
//! prompt does not stall the streams already running (with none running, up to
//! [`IDLE_PREFILL_FACTOR`] times as many). All pieces of a step run in one batched
//! pass ([`llama4_model::forward_batch`]): projections, the shared expert and `lm_head` once
//! over every row, each chosen expert's weights read once, attention per sequence. A piece the
//! pass refuses fails its own request only; the others run again without it.
//!
//! A finished request leaves its tokens in its slot's cache; a new prompt that begins with them
//! goes to that slot and only its new tokens are prefilled (a chat's next turn). When another
//! slot, running or not, holds a longer prefix of the prompt (a system prompt many clients
//! send), the new slot takes that slot's cache pages, shared until either writes to one
//! ([`Session::share_prefix`]), and prefills only the rest.

use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama4_core::KvDtype;
use llama4_model::kv_cache::PagePool;
use llama4_model::{
    forward_batch, BatchEntry, MultimodalModel, Sampler, SamplingConfig, Session, StreamDecoder, TextModel,
    Tokenizer, Workspace,
};
use ndarray::{s, Array2};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use vision_encoder::image::DynamicImage;

use crate::metrics::Metrics;
use crate::stop::StopStrings;
use crate::{Error, Result};

/// A loaded checkpoint: text-only, or with a vision tower.
// One value per server, behind an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum LoadedModel {
    /// `Llama4ForCausalLM` (or a multimodal checkpoint's text decoder alone).
    Text(Arc<TextModel>),
    /// `Llama4ForConditionalGeneration`: images in the prompt.
    Multimodal(MultimodalModel),
}

impl LoadedModel {
    /// The text decoder.
    pub fn text(&self) -> &TextModel {
        self.shared_text()
    }

    /// The text decoder as the handle the slots' sessions hold.
    pub fn shared_text(&self) -> &Arc<TextModel> {
        match self {
            LoadedModel::Text(m) => m,
            LoadedModel::Multimodal(m) => m.shared_text(),
        }
    }

    /// The multimodal model, if the checkpoint has a vision tower.
    pub fn multimodal(&self) -> Option<&MultimodalModel> {
        match self {
            LoadedModel::Text(_) => None,
            LoadedModel::Multimodal(m) => Some(m),
        }
    }
}

/// How one request generates.
#[derive(Clone, Debug)]
pub struct GenParams {
    /// Tokens to generate at most (at least 1).
    pub max_tokens: usize,
    /// Temperature, top-k, top-p, seed.
    pub sampling: SamplingConfig,
    /// Text that ends generation (not included in the output).
    pub stop: Vec<String>,
    /// Keep generating through the model's stop ids.
    pub ignore_eos: bool,
}

/// A generation request as the engine sees it: ids, images, parameters.
#[derive(Debug)]
pub struct Request {
    /// Prompt ids; each `<|image|>` takes the next image.
    pub prompt: Vec<u32>,
    /// Decoded images, in prompt order (multimodal checkpoints only).
    pub images: Vec<DynamicImage>,
    /// Sampling and stopping.
    pub params: GenParams,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// The OpenAI name (`stop`, `length`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Why the engine could not serve a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as sent (e.g. its prompt with images expanded exceeds the
    /// context, or an image count does not match the placeholders).
    #[error("{0}")]
    Rejected(String),
    /// Something failed while running the model.
    #[error("{0}")]
    Internal(String),
}

/// What a request's channel carries, in order: `Started`, any number of `Text`, then `Done`;
/// or `Failed` alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The request holds a slot.
    Started {
        /// Prompt tokens (images expanded).
        prompt_tokens: usize,
        /// Of these, tokens found in the slot's cache and not prefilled again.
        reused_tokens: usize,
    },
    /// A piece of generated text.
    Text(String),
    /// Generation ended.
    Done {
        /// Why.
        reason: FinishReason,
        /// Tokens generated (a final stop id included).
        completion_tokens: usize,
    },
    /// The request failed; nothing follows.
    Failed(EngineError),
}

/// Why a request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("the server is busy: the request queue is full")]
    QueueFull,
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// While no sequence decodes (a burst of requests has just arrived), a step prefills this many
/// times [`EngineConfig::prefill_chunk`] tokens: a longer step then holds back no stream, and a
/// burst's prompts are prefilled in fewer, larger steps, after which every stream decodes from
/// the same step on instead of the first ones decoding through the later ones' prefill. On
/// bench-mid, 8 concurrent 128-id prompts (1 024 tokens) at a chunk of 512: two prefill steps
/// become one. The factor bounds the activations of one step.
pub const IDLE_PREFILL_FACTOR: usize = 4;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences run at once (slots).
    pub parallel: usize,
    /// Context limit of each sequence, in tokens.
    pub ctx_size: usize,
    /// Requests that may wait for a slot; more are refused.
    pub queue_size: usize,
    /// Prompt tokens prefilled per step, over all prefilling sequences, while some sequence
    /// decodes; [`IDLE_PREFILL_FACTOR`] times as many while none does.
    pub prefill_chunk: usize,
    /// When a request reaches an idle engine, how long the engine waits for more before its
    /// first step (it stops waiting once every slot is taken). Clients that send several
    /// requests at once spread them over a few milliseconds; gathered, their prompts share
    /// the first steps and their streams start decoding together, instead of the first one
    /// decoding through the others' prefill.
    pub batch_window: Duration,
    /// Storage of the key/value caches.
    pub kv_dtype: KvDtype,
    /// Bytes every slot's key/value cache may hold together (`None`: as much as memory
    /// allows). A request is admitted when its whole sequence (prompt and `max_tokens`) fits
    /// beside what the running requests may grow to; otherwise it waits, and caches that idle
    /// slots keep for reuse are dropped first.
    pub kv_budget: Option<u64>,
}

struct Queued {
    request: Request,
    events: UnboundedSender<Event>,
    /// It has waited for room in the cache budget (counted once).
    waited: bool,
}

/// Handle to the engine thread; dropping it stops the thread once the running requests end.
pub struct Engine {
    queue: Option<SyncSender<Queued>>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the engine thread with `config.parallel` slots. `tokenizer` turns generated ids
    /// into text; without one, the text is the ids, each followed by a space.
    ///
    /// # Errors
    /// When a slot's session cannot be created, or the thread cannot be spawned.
    pub fn start(
        model: Arc<LoadedModel>,
        tokenizer: Option<Arc<Tokenizer>>,
        stop_ids: Vec<u32>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let (queue, rx) = mpsc::sync_channel(config.queue_size.max(1));
        let (ready_tx, ready_rx) = mpsc::channel();
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("llama4-engine".into())
            .stack_size(8 << 20)
            .spawn(move || {
                let scheduler = Scheduler::new(model, tokenizer, stop_ids, config, m);
                match scheduler {
                    Ok(mut s) => {
                        let _ = ready_tx.send(Ok(()));
                        s.run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::Start(format!("engine thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| Error::Start("the engine thread ended while starting".into()))??;
        Ok(Engine {
            queue: Some(queue),
            thread: Some(thread),
            metrics,
        })
    }

    /// Queues `request`; its events arrive on the returned channel. Dropping the receiver
    /// cancels the request.
    ///
    /// # Errors
    /// [`SubmitError::QueueFull`] when `queue_size` requests already wait.
    pub fn submit(&self, request: Request) -> std::result::Result<UnboundedReceiver<Event>, SubmitError> {
        let (events, rx) = unbounded_channel();
        let queue = self.queue.as_ref().ok_or(SubmitError::Stopped)?;
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        match queue.try_send(Queued {
            request,
            events,
            waited: false,
        }) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What admitting a request came to, when it was not refused.
enum Admission {
    /// It holds a slot.
    Admitted,
    /// Its sequence does not fit in the cache budget beside the running ones: it waits.
    Wait,
}

/// A request holding a slot.
struct Job {
    events: UnboundedSender<Event>,
    params: GenParams,
    sampler: Sampler,
    prompt: Vec<u32>,
    /// Input embeddings of the whole prompt when it has images, `[T, H]`.
    embeddings: Option<Array2<f32>>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The token to run next once decoding.
    next: u32,
    generated: usize,
    decoder: StreamDecoder,
    stop: StopStrings,
    /// Admission order: earlier prompts prefill first.
    seq: u64,
    /// Cache bytes the whole sequence may take (its share of the budget), 0 without one.
    reserved: u64,
}

impl Job {
    fn decoding(&self) -> bool {
        self.prefilled == self.prompt.len()
    }
}

struct Slot {
    session: Session<Arc<TextModel>>,
    job: Option<Job>,
    /// The cache holds image tokens: its ids do not say what it holds.
    has_images: bool,
    last_used: u64,
}

/// What one slot runs in a step.
#[derive(Clone, Debug)]
enum Piece {
    Decode,
    Prefill(Range<usize>),
}

/// The session of one slot, made once when the engine starts and kept (with its cache) across
/// the requests the slot serves. This is the one place slot caches are made: caches drawn from
/// a shared page pool plug in here.
fn new_slot_session(
    text: &Arc<TextModel>,
    config: &EngineConfig,
    pool: Option<&PagePool>,
) -> Result<Session<Arc<TextModel>>> {
    let session = Session::new(text.clone(), config.kv_dtype)?.with_max_len(config.ctx_size);
    Ok(match pool {
        Some(pool) => session.with_pool(pool.clone())?,
        None => session,
    })
}

/// Runs the pieces `plan` gives the slots `rows` (ascending) in one batched pass; on success
/// row `r` of `ws.logits()` holds the last-token logits of slot `rows[r]`. This is the one
/// place the model runs.
///
/// # Errors
/// As [`forward_batch`]: a refused piece is [`llama4_model::Error::BatchEntry`] (its index is
/// into `rows`) and nothing ran; after a failure while running every session is as before.
fn forward(
    text: &TextModel,
    slots: &mut [Slot],
    plan: &[Option<Piece>],
    rows: &[usize],
    ws: &mut Workspace,
) -> llama4_model::Result<()> {
    let mut entries = Vec::with_capacity(rows.len());
    let mut wanted = rows.iter().copied().peekable();
    for (i, slot) in slots.iter_mut().enumerate() {
        if wanted.peek() != Some(&i) {
            continue;
        }
        wanted.next();
        let (Some(piece), Some(job)) = (&plan[i], &slot.job) else {
            continue;
        };
        let (tokens, embeddings) = match piece {
            Piece::Decode => (std::slice::from_ref(&job.next), None),
            Piece::Prefill(r) => (
                &job.prompt[r.clone()],
                job.embeddings.as_ref().map(|e| e.slice(s![r.clone(), ..])),
            ),
        };
        entries.push(BatchEntry {
            session: &mut slot.session,
            tokens,
            embeddings,
        });
    }
    forward_batch(text, &mut entries, ws).map(|_| ())
}

/// The message a request gets when its piece fails: what the client sent (a context or
/// vocabulary bound) or something on our side.
fn piece_error(e: &llama4_model::Error) -> EngineError {
    match e {
        llama4_model::Error::ContextOverflow { .. } | llama4_model::Error::TokenOutOfRange { .. } => {
            EngineError::Rejected(e.to_string())
        }
        _ => EngineError::Internal(e.to_string()),
    }
}

struct Scheduler {
    model: Arc<LoadedModel>,
    text: Arc<TextModel>,
    tokenizer: Option<Arc<Tokenizer>>,
    stop_ids: Vec<u32>,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    slots: Vec<Slot>,
    /// The batched pass's buffers (activations, scratch, logits), reused across steps.
    ws: Workspace,
    admitted: u64,
    /// The byte budget of every slot's cache, when the engine has one.
    pool: Option<PagePool>,
    /// A request taken from the queue that waits for room in the budget; admitted first.
    waiting: Option<Queued>,
}

impl Scheduler {
    fn new(
        model: Arc<LoadedModel>,
        tokenizer: Option<Arc<Tokenizer>>,
        stop_ids: Vec<u32>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let text = model.shared_text().clone();
        let pool = config.kv_budget.map(PagePool::new);
        let slots = (0..config.parallel.max(1))
            .map(|_| {
                Ok(Slot {
                    session: new_slot_session(&text, &config, pool.as_ref())?,
                    job: None,
                    has_images: false,
                    last_used: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Scheduler {
            model,
            text,
            tokenizer,
            stop_ids,
            config,
            metrics,
            slots,
            ws: Workspace::new(),
            admitted: 0,
            pool,
            waiting: None,
        })
    }

    fn run(&mut self, rx: Receiver<Queued>) {
        loop {
            if !self.slots.iter().any(|s| s.job.is_some()) {
                // Idle: admit what waits (with nothing running, it fits), or wait for work;
                // the queue closing ends the thread.
                let next = match self.waiting.take() {
                    Some(q) => q,
                    None => match rx.recv() {
                        Ok(q) => q,
                        Err(_) => return,
                    },
                };
                self.waiting = self.admit(next);
                self.gather_burst(&rx);
            }
            while self.waiting.is_none() && self.slots.iter().any(|s| s.job.is_none()) {
                match rx.try_recv() {
                    Ok(q) => self.waiting = self.admit(q),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.drop_cancelled();
            self.step();
            if let Some(q) = self.waiting.take() {
                // Requests may have finished: try again (in order; the queue waits behind it).
                self.waiting = self.admit(q);
            }
            self.metrics
                .active
                .set(self.slots.iter().filter(|s| s.job.is_some()).count() as f64);
            let cache_bytes = match &self.pool {
                Some(pool) => pool.used(),
                None => self.slots.iter().map(|s| s.session.cache_memory().total()).sum(),
            };
            self.metrics.kv_cache_bytes.set(cache_bytes as f64);
        }
    }

    /// Admits what arrives within [`EngineConfig::batch_window`] of now, while slots are free.
    fn gather_burst(&mut self, rx: &Receiver<Queued>) {
        let deadline = Instant::now() + self.config.batch_window;
        while self.waiting.is_none() && self.slots.iter().any(|s| s.job.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match rx.recv_timeout(left) {
                Ok(q) => self.waiting = self.admit(q),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Gives `q` a slot: the free slot whose cache shares the longest prefix with the prompt.
    /// Returns `q` when it must wait for room in the cache budget (nothing changed then).
    fn admit(&mut self, mut q: Queued) -> Option<Queued> {
        if q.events.is_closed() {
            self.metrics.queue_depth.fetch_sub(1, Relaxed);
            self.metrics.cancelled.fetch_add(1, Relaxed);
            return None;
        }
        let outcome = self.try_admit(&q.request, &q.events);
        if matches!(outcome, Ok(Admission::Wait)) {
            if !q.waited {
                q.waited = true;
                self.metrics.budget_waits.fetch_add(1, Relaxed);
            }
            return Some(q);
        }
        self.metrics.queue_depth.fetch_sub(1, Relaxed);
        match outcome {
            Ok(_) => None,
            Err(e) => {
                self.metrics.failed.fetch_add(1, Relaxed);
                let _ = q.events.send(Event::Failed(e));
                None
            }
        }
    }

    fn try_admit(
        &mut self,
        request: &Request,
        events: &UnboundedSender<Event>,
    ) -> std::result::Result<Admission, EngineError> {
        let Request {
            prompt,
            images,
            params,
        } = request;
        let (mut prompt, params) = (prompt.clone(), params.clone());
        let mut embeddings = None;
        if !images.is_empty() {
            let mm = self
                .model
                .multimodal()
                .ok_or_else(|| EngineError::Rejected("this model does not take images".into()))?;
            let encoded = images
                .iter()
                .map(|im| mm.encode_image(im))
                .collect::<llama4_model::Result<Vec<_>>>()
                .map_err(|e| EngineError::Rejected(format!("image: {e}")))?;
            let prepared = mm
                .prepare(&prompt, &encoded)
                .map_err(|e| EngineError::Rejected(e.to_string()))?;
            prompt = prepared.ids;
            embeddings = Some(prepared.embeddings);
        }
        if prompt.is_empty() {
            return Err(EngineError::Rejected("the prompt is empty".into()));
        }
        let total = prompt.len() + params.max_tokens;
        if total > self.config.ctx_size {
            return Err(EngineError::Rejected(format!(
                "the prompt ({} tokens) plus max_tokens ({}) exceeds the context of {} tokens",
                prompt.len(),
                params.max_tokens,
                self.config.ctx_size
            )));
        }
        let sampler = Sampler::new(params.sampling).map_err(|e| EngineError::Rejected(e.to_string()))?;
        let reserved = match self.budget_for(total)? {
            Some(bytes) => bytes,
            None => return Ok(Admission::Wait),
        };
        let with_images = embeddings.is_some();
        // The prompt's tokens each slot holds (none across images: their tokens are
        // placeholders, equal whatever the pictures).
        let held: Vec<usize> = self
            .slots
            .iter()
            .map(|s| {
                if with_images || s.has_images {
                    0
                } else {
                    common_prefix(s.session.tokens(), &prompt)
                }
            })
            .collect();
        let (index, shared) = self
            .slots
            .iter()
            .zip(&held)
            .enumerate()
            .filter(|(_, (s, _))| s.job.is_none())
            // Longest shared prefix, then the least recently used.
            .max_by_key(|&(_, (s, &shared))| (shared, std::cmp::Reverse(s.last_used)))
            .map(|(i, (_, &shared))| (i, shared))
            .ok_or_else(|| EngineError::Internal("no free slot".into()))?;
        self.admitted += 1;
        // At least one prompt token runs: its logits choose the first generated token.
        let most = prompt.len() - 1;
        // Where a chunked layer no longer holds the keys a position needs, the slot restarts
        // at the start of that chunk.
        let mut reused = self.slots[index].session.cache().truncatable(shared.min(most));
        if !with_images {
            reused = self.share_from_another_slot(index, &held, most, reused);
        }
        let slot = &mut self.slots[index];
        if reused == 0 {
            slot.session.reset();
        } else if reused < slot.session.len() && slot.session.truncate(reused).is_err() {
            slot.session.reset();
            reused = 0;
        }
        slot.has_images = with_images;
        if self.pool.is_some() {
            // Only the pages of what is kept: the rest of the sequence is in `reserved`.
            slot.session.shrink_to_fit();
            self.release_idle_caches(index, reserved);
        }
        let slot = &mut self.slots[index];
        slot.last_used = self.admitted;
        self.metrics.requests_admitted.fetch_add(1, Relaxed);
        self.metrics.prompt_tokens.fetch_add(prompt.len() as u64, Relaxed);
        self.metrics
            .prompt_tokens_reused
            .fetch_add(reused as u64, Relaxed);
        let _ = events.send(Event::Started {
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
        });
        slot.job = Some(Job {
            events: events.clone(),
            stop: StopStrings::new(params.stop.clone()),
            params,
            sampler,
            prompt,
            embeddings,
            prefilled: reused,
            next: 0,
            generated: 0,
            decoder: StreamDecoder::new(),
            seq: self.admitted,
            reserved,
        });
        Ok(Admission::Admitted)
    }

    /// The cache bytes a sequence of `total` tokens may take, when they fit in the budget
    /// beside what the running requests may grow to (`Some(0)` without a budget); `None` when
    /// it must wait for running requests to finish.
    ///
    /// # Errors
    /// [`EngineError::Rejected`] when the sequence alone exceeds the budget.
    fn budget_for(&self, total: usize) -> std::result::Result<Option<u64>, EngineError> {
        let Some(pool) = &self.pool else {
            return Ok(Some(0));
        };
        let cache = self.slots[0].session.cache();
        let kinds: Vec<_> = cache.kinds().collect();
        let need = cache
            .spec()
            .estimate(&kinds, total)
            .map_err(|e| EngineError::Rejected(e.to_string()))?
            .total();
        if need > pool.budget() {
            return Err(EngineError::Rejected(format!(
                "the prompt and max_tokens ({total} tokens) need {need} bytes of key/value cache; \
                 the server's budget is {}",
                pool.budget()
            )));
        }
        let running = self.reserved_by_running();
        Ok((running + need <= pool.budget()).then_some(need))
    }

    /// Cache bytes the running requests may grow to.
    fn reserved_by_running(&self) -> u64 {
        self.slots
            .iter()
            .filter_map(|s| s.job.as_ref())
            .map(|j| j.reserved)
            .sum()
    }

    /// Drops the caches that idle slots keep for reuse, least recently used first, until the
    /// running requests' reservations, `reserved` for slot `index`, and what idle slots still
    /// hold fit in the budget: then no append can exceed it.
    fn release_idle_caches(&mut self, index: usize, reserved: u64) {
        let Some(budget) = self.pool.as_ref().map(PagePool::budget) else {
            return;
        };
        let running = self.reserved_by_running();
        let mut idle: Vec<(u64, usize)> = (0..self.slots.len())
            .filter(|&i| i != index && self.slots[i].job.is_none())
            .map(|i| (self.slots[i].last_used, i))
            .collect();
        idle.sort_unstable();
        let held = |s: &Slot| s.session.cache_memory().total();
        let mut kept: u64 = idle.iter().map(|&(_, i)| held(&self.slots[i])).sum();
        for (_, i) in idle {
            if running + reserved + kept <= budget {
                break;
            }
            let slot = &mut self.slots[i];
            kept -= held(slot);
            slot.session.reset();
            slot.session.shrink_to_fit();
            slot.has_images = false;
        }
    }

    /// When another slot, running or not, holds a longer prefix of the prompt (`held[i]`
    /// tokens of it in slot `i`; up to `most`) than the `own` tokens slot `index` can keep,
    /// shares that slot's cache pages into slot `index` (no copy, no prefill; see
    /// [`Session::share_prefix`]). Returns the prompt tokens slot `index` then holds.
    fn share_from_another_slot(&mut self, index: usize, held: &[usize], most: usize, own: usize) -> usize {
        let donor = self
            .slots
            .iter()
            .zip(held)
            .enumerate()
            .filter(|&(i, _)| i != index)
            .map(|(i, (s, &n))| (i, s.session.cache().truncatable(n.min(most))))
            .max_by_key(|&(_, n)| n);
        let Some((donor, n)) = donor.filter(|&(_, n)| n > own) else {
            return own;
        };
        let (target, source) = if donor < index {
            let (lo, hi) = self.slots.split_at_mut(index);
            (&mut hi[0], &lo[donor])
        } else {
            let (lo, hi) = self.slots.split_at_mut(donor);
            (&mut lo[index], &hi[0])
        };
        match target.session.share_prefix(&source.session, n) {
            Ok(held) => {
                self.metrics.prompt_tokens_shared.fetch_add(held as u64, Relaxed);
                held
            }
            // Sessions of one engine share model and format: not expected; prefill instead.
            Err(_) => own,
        }
    }

    fn drop_cancelled(&mut self) {
        for slot in &mut self.slots {
            if slot.job.as_ref().is_some_and(|j| j.events.is_closed()) {
                slot.job = None;
                self.metrics.cancelled.fetch_add(1, Relaxed);
            }
        }
    }

    /// What each slot runs this step: every decoding sequence its next token, then prompt
    /// pieces in admission order while the prefill budget lasts.
    fn plan(&self) -> Vec<Option<Piece>> {
        let mut plan: Vec<Option<Piece>> = self
            .slots
            .iter()
            .map(|s| s.job.as_ref().filter(|j| j.decoding()).map(|_| Piece::Decode))
            .collect();
        let mut prefilling: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.job.as_ref().filter(|j| !j.decoding()).map(|j| (j.seq, i)))
            .collect();
        prefilling.sort_unstable();
        let decoding = plan.iter().any(Option::is_some);
        let factor = if decoding { 1 } else { IDLE_PREFILL_FACTOR };
        let mut budget = self.config.prefill_chunk.max(1).saturating_mul(factor);
        for (_, i) in prefilling {
            if budget == 0 {
                break;
            }
            if let Some(job) = &self.slots[i].job {
                let n = (job.prompt.len() - job.prefilled).min(budget);
                plan[i] = Some(Piece::Prefill(job.prefilled..job.prefilled + n));
                budget -= n;
            }
        }
        plan
    }

    fn step(&mut self) {
        let plan = self.plan();
        let mut rows: Vec<usize> = (0..self.slots.len())
            .filter(|&i| plan[i].is_some() && self.slots[i].job.is_some())
            .collect();
        if rows.is_empty() {
            return;
        }
        let decodes = plan.iter().filter(|p| matches!(p, Some(Piece::Decode))).count();
        let started = Instant::now();
        let ran = self.run_pieces(&plan, &mut rows);
        let took = started.elapsed();
        self.metrics.steps.fetch_add(1, Relaxed);
        self.metrics
            .step_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
        self.metrics.batch_size.set(rows.len() as f64);
        if decodes > 0 {
            self.metrics
                .decode_tokens_per_s
                .set(decodes as f64 / took.as_secs_f64().max(1e-9));
        }
        for (r, &i) in ran.iter().enumerate() {
            self.take_logits(i, &plan, r);
        }
    }

    /// Runs the planned pieces of `rows` and returns the slots whose pieces ran, in the order of
    /// their rows of `ws.logits()`. A piece the batched pass refuses fails its request and the
    /// others run again without it. When the pass fails while running (every session is then
    /// as before), each piece runs alone, so that only those that fail alone fail.
    fn run_pieces(&mut self, plan: &[Option<Piece>], rows: &mut Vec<usize>) -> Vec<usize> {
        loop {
            if rows.is_empty() {
                return Vec::new();
            }
            match forward(&self.text, &mut self.slots, plan, rows, &mut self.ws) {
                Ok(()) => return std::mem::take(rows),
                Err(llama4_model::Error::BatchEntry { entry, source }) if entry < rows.len() => {
                    let i = rows.remove(entry);
                    self.fail(i, piece_error(&source));
                }
                Err(e) if rows.len() == 1 => {
                    self.fail(rows[0], piece_error(&e));
                    return Vec::new();
                }
                Err(_) => break,
            }
        }
        // One at a time: the logits of each are taken before the next runs.
        for &i in rows.iter() {
            match forward(&self.text, &mut self.slots, plan, &[i], &mut self.ws) {
                Ok(()) => self.take_logits(i, plan, 0),
                Err(e) => self.fail(i, piece_error(&e)),
            }
        }
        Vec::new()
    }

    /// Ends slot `i`'s request with `error`; its cache keeps what it held before the step.
    fn fail(&mut self, i: usize, error: EngineError) {
        if let Some(job) = self.slots[i].job.take() {
            self.metrics.failed.fetch_add(1, Relaxed);
            let _ = job.events.send(Event::Failed(error));
        }
    }

    /// Moves slot `i` past the piece it ran: a prefill piece advances its prompt; the last one,
    /// or a decode step, samples the next token from row `r` of the logits.
    fn take_logits(&mut self, i: usize, plan: &[Option<Piece>], r: usize) {
        let Some(piece) = &plan[i] else { return };
        let slot = &mut self.slots[i];
        let Some(job) = slot.job.as_mut() else { return };
        if let Piece::Prefill(range) = piece {
            job.prefilled = range.end;
            if !job.decoding() {
                return;
            }
        }
        let logits = self.ws.logits();
        let outcome = job
            .sampler
            .sample(logits.row(r).as_slice().unwrap_or_default())
            .map_err(|e| EngineError::Internal(e.to_string()))
            .and_then(|token| {
                accept(
                    self.tokenizer.as_deref(),
                    &self.stop_ids,
                    &self.metrics,
                    job,
                    token,
                )
            });
        match outcome {
            Ok(None) => {}
            Ok(Some(reason)) => {
                let counter = match reason {
                    FinishReason::Stop => &self.metrics.finished_stop,
                    FinishReason::Length => &self.metrics.finished_length,
                };
                counter.fetch_add(1, Relaxed);
                let _ = job.events.send(Event::Done {
                    reason,
                    completion_tokens: job.generated,
                });
                slot.job = None;
            }
            Err(e) => {
                self.metrics.failed.fetch_add(1, Relaxed);
                let _ = job.events.send(Event::Failed(e));
                slot.job = None;
            }
        }
    }
}

/// Takes a sampled token: sends its text, and says whether generation ends here.
fn accept(
    tokenizer: Option<&Tokenizer>,
    stop_ids: &[u32],
    metrics: &Metrics,
    job: &mut Job,
    token: u32,
) -> std::result::Result<Option<FinishReason>, EngineError> {
    job.generated += 1;
    metrics.generated_tokens.fetch_add(1, Relaxed);
    let send = |job: &mut Job, text: String| {
        if !text.is_empty() {
            let _ = job.events.send(Event::Text(text));
        }
    };
    if !job.params.ignore_eos && stop_ids.contains(&token) {
        let rest = job.stop.finish();
        send(job, rest);
        return Ok(Some(FinishReason::Stop));
    }
    let piece = match tokenizer {
        Some(t) => job
            .decoder
            .push(t, token)
            .map_err(|e| EngineError::Internal(e.to_string()))?,
        // No tokenizer: the text is the ids, each followed by a space.
        None => format!("{token} "),
    };
    let released = job.stop.push(&piece);
    send(job, released.text);
    if released.stopped {
        return Ok(Some(FinishReason::Stop));
    }
    if job.generated >= job.params.max_tokens {
        let rest = job.stop.finish();
        send(job, rest);
        return Ok(Some(FinishReason::Length));
    }
    job.next = token;
    Ok(None)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
