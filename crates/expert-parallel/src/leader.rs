//! Rank 0: runs the model, and at each MoE layer sends the layer's input and routing to the
//! other ranks and sums their experts' contributions with its own.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llama4_core::Scope;
use llama4_model::{FeedForwardLayer, TextConfig};
use moe_router::{FeedForward, Moe, MoeConfig, Routing, Scratch};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::protocol::{fingerprint, run_header, start_header, stop_header, FINGERPRINT};
use crate::{shard, Error, Result, Transport};

/// Time and bytes rank 0 spent exchanging with the other ranks, summed over MoE layer calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommStats {
    /// MoE layer calls that exchanged.
    pub calls: u64,
    /// Rows (tokens) sent, summed over calls.
    pub rows: u64,
    /// Bytes rank 0 broadcast (headers and payloads).
    pub bytes_sent: u64,
    /// Bytes of the contributions summed into rank 0 (each rank's `rows · H + 1` floats).
    pub bytes_reduced: u64,
    /// Time in the broadcasts.
    pub broadcast: Duration,
    /// Time in the reductions. Rank 0 enters a reduction after its own experts and the shared
    /// expert, so this includes waiting for a rank whose experts took longer.
    pub reduce: Duration,
    /// Time rank 0 spent on its own experts and the shared expert, between the two.
    pub local: Duration,
}

impl CommStats {
    /// Time in communication: broadcasts and reductions.
    pub fn comm(&self) -> Duration {
        self.broadcast + self.reduce
    }

    /// The counts accumulated since `earlier` (a copy taken before).
    pub fn since(&self, earlier: &CommStats) -> CommStats {
        CommStats {
            calls: self.calls - earlier.calls,
            rows: self.rows - earlier.rows,
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_reduced: self.bytes_reduced - earlier.bytes_reduced,
            broadcast: self.broadcast.saturating_sub(earlier.broadcast),
            reduce: self.reduce.saturating_sub(earlier.reduce),
            local: self.local.saturating_sub(earlier.local),
        }
    }
}

/// Rank 0 of an expert-parallel group: builds the MoE layers of the model it runs
/// ([`Leader::build_moe`], the hook of [`llama4_model::TextModel::load_with_moe`]) and drives
/// the other ranks ([`crate::ExpertWorker`]) through the protocol of [`crate::protocol`].
///
/// Once every MoE layer is built, the group checks that every rank loaded its share of the
/// same model ([`Leader::start`]). Dropping the leader (the model) tells the workers to stop.
#[derive(Debug)]
pub struct Leader {
    transport: Arc<dyn Transport>,
    fingerprint: [u32; FINGERPRINT],
    experts: Range<usize>,
    moe_layers: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    built: usize,
    started: bool,
    stopped: bool,
    payload: Vec<u32>,
    send: Vec<f32>,
    recv: Vec<f32>,
    stats: CommStats,
}

impl Leader {
    /// The leader of the group `transport` belongs to (it must be rank 0), for a model of
    /// `config`.
    ///
    /// # Errors
    /// [`Error::Group`] on another rank; [`Error::Plan`] when the experts cannot be shared
    /// among the group.
    pub fn new(transport: Arc<dyn Transport>, config: &TextConfig) -> Result<Arc<Self>> {
        if transport.rank() != 0 {
            return Err(Error::Group(format!(
                "rank {} is not the leader: rank 0 runs the model",
                transport.rank()
            )));
        }
        let experts = shard(config.num_local_experts, transport.size(), 0)?;
        Ok(Arc::new(Leader {
            fingerprint: fingerprint(config, transport.size()),
            moe_layers: config.moe_layers().count(),
            experts,
            transport,
            state: Mutex::new(State::default()),
        }))
    }

    /// The routed experts rank 0 holds of every MoE layer.
    pub fn experts(&self) -> Range<usize> {
        self.experts.clone()
    }

    /// Processes in the group.
    pub fn size(&self) -> usize {
        self.transport.size()
    }

    /// Communication so far.
    pub fn stats(&self) -> CommStats {
        self.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// Loads MoE layer `layer` from `scope` with rank 0's share of the experts and the shared
    /// expert, as a feed-forward that adds the other ranks' shares. After the model's last MoE
    /// layer, starts the group ([`Leader::start`]).
    ///
    /// # Errors
    /// Loading errors; [`Error::Group`] from starting.
    pub fn build_moe(
        self: &Arc<Self>,
        layer: usize,
        scope: &Scope<'_>,
        config: &MoeConfig,
    ) -> llama4_model::Result<FeedForwardLayer> {
        let local = Moe::load_partial(scope, config, self.experts(), true)?;
        let built = {
            let mut st = self.lock().map_err(into_model)?;
            st.built += 1;
            st.built
        };
        if built == self.moe_layers {
            self.start().map_err(into_model)?;
        }
        Ok(FeedForwardLayer::Custom(Box::new(ShardedMoe {
            layer,
            local,
            leader: self.clone(),
        })))
    }

    /// Checks that every rank loaded its share of a model of the same shape and tells the
    /// workers to begin; done once (later calls return at once).
    ///
    /// # Errors
    /// [`Error::Group`] naming the ranks that failed (their own messages say why).
    pub fn start(&self) -> Result<()> {
        let mut st = self.lock()?;
        self.start_locked(&mut st)
    }

    fn start_locked(&self, st: &mut State) -> Result<()> {
        if st.started {
            return Ok(());
        }
        if st.stopped {
            return Err(Error::Group("the group has stopped".into()));
        }
        st.started = true;
        let t = &self.transport;
        t.broadcast(&mut start_header(self.fingerprint))?;
        let flags = vec![0.0; t.size()];
        let mut failed = vec![0.0; t.size()];
        t.reduce_sum(&flags, &mut failed)?;
        let bad: Vec<usize> = (0..t.size()).filter(|&r| failed[r] != 0.0).collect();
        t.broadcast(&mut [u32::from(bad.is_empty())])?;
        if !bad.is_empty() {
            st.stopped = true;
            return Err(Error::Group(format!(
                "rank(s) {bad:?} did not load their share of the same model (see their messages)"
            )));
        }
        Ok(())
    }

    /// Tells the workers to return; done once. Dropping the leader does it too.
    pub fn stop(&self) -> Result<()> {
        let mut st = self.lock()?;
        if st.stopped {
            return Ok(());
        }
        st.stopped = true;
        self.transport.broadcast(&mut stop_header())
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::Group("a thread panicked while exchanging".into()))
    }

    /// One MoE layer call: sends `x` (standard layout) and `routing` to the workers, runs
    /// `local` (rank 0's experts and the shared expert) into `out`, and replaces `out` with the
    /// sum of every rank's contribution.
    fn run(
        &self,
        layer: usize,
        x: ArrayView2<f32>,
        routing: &Routing,
        mut out: ArrayViewMut2<f32>,
        local: impl FnOnce(ArrayViewMut2<f32>) -> moe_router::Result<()>,
    ) -> Result<()> {
        if self.transport.size() == 1 {
            return Ok(local(out)?);
        }
        let mut guard = self.lock()?;
        let st = &mut *guard;
        self.start_locked(st)?;
        if st.stopped {
            return Err(Error::Group("the group has stopped".into()));
        }
        let (rows, h) = x.dim();
        let k = routing.top_k();
        let word = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| Error::Protocol(format!("{what} {v} does not fit a message")))
        };
        let mut header = run_header(word(layer, "layer")?, word(rows, "rows")?, word(k, "top-k")?);
        let Some(xs) = x.as_slice() else {
            unreachable!("callers pass standard-layout inputs")
        };
        st.payload.clear();
        st.payload.extend(xs.iter().map(|v| v.to_bits()));
        st.payload.extend(routing.weights().iter().map(|v| v.to_bits()));
        st.payload.extend_from_slice(routing.experts());

        let started = Instant::now();
        self.transport.broadcast(&mut header)?;
        self.transport.broadcast(&mut st.payload)?;
        let sent = Instant::now();
        let computed = local(out.view_mut());
        let computed_at = Instant::now();
        st.send.clear();
        match &computed {
            Ok(()) => st.send.extend(out.iter()),
            Err(_) => st.send.resize(rows * h, 0.0),
        }
        st.send.push(0.0);
        st.recv.clear();
        st.recv.resize(st.send.len(), 0.0);
        self.transport.reduce_sum(&st.send, &mut st.recv)?;
        let done = Instant::now();

        let s = &mut st.stats;
        s.calls += 1;
        s.rows += rows as u64;
        s.bytes_sent += 4 * (header.len() + st.payload.len()) as u64;
        s.bytes_reduced += 4 * (st.send.len() * self.transport.size()) as u64;
        s.broadcast += sent - started;
        s.local += computed_at - sent;
        s.reduce += done - computed_at;

        computed?;
        let failed = st.recv[rows * h];
        if failed != 0.0 {
            return Err(Error::Group(format!(
                "{failed} rank(s) failed to run their experts of layer {layer} (see their messages)"
            )));
        }
        let sum = ArrayView2::from_shape((rows, h), &st.recv[..rows * h])
            .map_err(|e| Error::Protocol(e.to_string()))?;
        out.assign(&sum);
        Ok(())
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Nothing to report to: a worker left waiting would hang its process.
        let _ = self.stop();
    }
}

/// A MoE layer whose routed experts are shared among the ranks of a group: rank 0 routes,
/// runs its share and the shared expert, and sums in the others' (see [`Leader`]). What the
/// decoder sees as the layer's feed-forward.
#[derive(Debug)]
pub struct ShardedMoe {
    layer: usize,
    local: Moe,
    leader: Arc<Leader>,
}

impl ShardedMoe {
    /// Rank 0's part of the layer: the router, its experts and the shared expert.
    pub fn local(&self) -> &Moe {
        &self.local
    }
}

impl FeedForward for ShardedMoe {
    /// # Shapes
    /// `x: [T, H]` → `[T, H]`.
    fn forward(&self, x: ArrayView2<f32>) -> moe_router::Result<Array2<f32>> {
        let mut out = Array2::zeros(x.dim());
        self.forward_into(x, out.view_mut(), &mut Scratch::default())?;
        Ok(out)
    }

    /// # Shapes
    /// `x: [T, H]`, `out: [T, H]`.
    fn forward_into(
        &self,
        x: ArrayView2<f32>,
        out: ArrayViewMut2<f32>,
        scratch: &mut Scratch,
    ) -> moe_router::Result<()> {
        let h = self.local.experts().hidden_size();
        if x.ncols() != h {
            return Err(moe_router::Error::Mismatch {
                what: "input width (H)",
                expected: h,
                got: x.ncols(),
            });
        }
        if out.dim() != x.dim() {
            return Err(moe_router::Error::Mismatch {
                what: "output rows (T)",
                expected: x.nrows(),
                got: out.nrows(),
            });
        }
        // The decoder passes standard-layout rows; anything else is copied once.
        let x = x.as_standard_layout();
        // Taken out of the scratch so that the local experts can borrow the rest of it.
        let mut routing = std::mem::take(&mut scratch.routing);
        let result = self
            .local
            .router()
            .route_into(x.view(), &mut routing, &mut scratch.logits)
            .and_then(|()| {
                self.leader
                    .run(self.layer, x.view(), &routing, out, |out| {
                        self.local.forward_routed_into(x.view(), &routing, out, scratch)
                    })
                    .map_err(into_moe)
            });
        scratch.routing = routing;
        result
    }
}

/// This crate's error as a feed-forward's.
fn into_moe(e: Error) -> moe_router::Error {
    match e {
        Error::Moe(e) => e,
        e => moe_router::Error::component("expert-parallel", e),
    }
}

/// This crate's error as a model loader's.
fn into_model(e: Error) -> llama4_model::Error {
    match e {
        Error::Model(e) => e,
        e => llama4_model::Error::Moe(into_moe(e)),
    }
}
