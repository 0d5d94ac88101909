//! Ranks 1 and up: hold a share of every MoE layer's experts and run them on what rank 0
//! sends, until it says stop.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama4_core::{Checkpoint, QuantPolicy};
use llama4_model::{ModelConfig, TextConfig};
use moe_router::{Moe, MoeConfig, Routing, Scratch};
use ndarray::{ArrayView2, ArrayViewMut2};

use crate::protocol::{fingerprint, Op, FINGERPRINT, HEADER};
use crate::{shard, Error, Result, Transport};

/// What a worker did, for its report at exit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// MoE layer calls served.
    pub calls: u64,
    /// Rows received, summed over calls.
    pub rows: u64,
    /// Rows this rank's experts ran on (a row routed to two of them counts twice).
    pub routed_rows: u64,
    /// Time running its experts.
    pub compute: Duration,
    /// Time waiting for and receiving rank 0's messages (mostly waiting while rank 0 runs
    /// attention).
    pub receive: Duration,
    /// Time in the reductions.
    pub reduce: Duration,
}

/// One rank's share of every MoE layer's routed experts (no router use, no shared expert, no
/// attention: rank 0 routes and sends the rows), served over a [`Transport`].
pub struct ExpertWorker {
    transport: Arc<dyn Transport>,
    fingerprint: [u32; FINGERPRINT],
    hidden: usize,
    experts: Range<usize>,
    /// Indexed by decoder layer; `None` for dense layers.
    layers: Vec<Option<Moe>>,
    checkpoint: Checkpoint,
    config: ModelConfig,
}

impl std::fmt::Debug for ExpertWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The checkpoint (mapped files) has nothing to show.
        f.debug_struct("ExpertWorker")
            .field("rank", &self.transport.rank())
            .field("experts", &self.experts)
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

impl ExpertWorker {
    /// Loads this rank's share of the experts of the checkpoint in `dir`, quantising at load
    /// time what `policy` selects (only the share is read: see
    /// [`llama4_core::Scope::batched_in_out_range`]).
    ///
    /// # Errors
    /// Loading errors; [`Error::Plan`] when the experts cannot be shared among the group.
    pub fn load(
        dir: impl AsRef<Path>,
        policy: Option<QuantPolicy>,
        transport: Arc<dyn Transport>,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = ModelConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?.with_quantization(policy);
        let text = &config.text;
        let experts = shard(text.num_local_experts, transport.size(), transport.rank())?;
        let root = checkpoint.scope(config.text_prefix.trim_end_matches('.'));
        let moe = moe_config(text);
        let layers = (0..text.layers.len())
            .map(|i| {
                text.layers[i]
                    .moe
                    .then(|| {
                        let scope = root.scope(&format!("model.layers.{i}.feed_forward"));
                        Moe::load_partial(&scope, &moe, experts.clone(), false)
                    })
                    .transpose()
            })
            .collect::<moe_router::Result<Vec<_>>>()?;
        if checkpoint.quantization().is_some() {
            // The float originals of the share were read once to quantise them.
            checkpoint.release_resident_pages();
        }
        Ok(ExpertWorker {
            fingerprint: fingerprint(text, transport.size()),
            hidden: text.hidden_size(),
            experts,
            layers,
            transport,
            checkpoint,
            config,
        })
    }

    /// The routed experts this rank holds of every MoE layer.
    pub fn experts(&self) -> Range<usize> {
        self.experts.clone()
    }

    /// The checkpoint the share was loaded from ([`Checkpoint::weight_bytes`] is what this
    /// rank holds).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The checkpoint's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Waits for rank 0 to start the group, then serves MoE layer calls until it says stop.
    /// Returns `Ok(None)` when rank 0 stopped before starting (it failed to load: its message
    /// says why).
    ///
    /// # Errors
    /// [`Error::Group`] when some rank failed to load; [`Error::Protocol`] on a message this
    /// protocol does not send; transport errors. A failure to run this rank's experts on one
    /// call is reported to rank 0 (whose call fails) and printed, and serving goes on.
    pub fn serve(&self) -> Result<Option<WorkerStats>> {
        serve(self.transport.as_ref(), Ok(self))
    }
}

/// Loads this rank's share of the checkpoint in `dir` ([`ExpertWorker::load`]) and serves
/// ([`ExpertWorker::serve`]). A load that fails is reported to rank 0 when it starts the
/// group, so that every rank stops instead of waiting for ever; the error is returned.
///
/// # Errors
/// As [`ExpertWorker::load`] and [`ExpertWorker::serve`].
pub fn run_worker(
    dir: impl AsRef<Path>,
    policy: Option<QuantPolicy>,
    transport: Arc<dyn Transport>,
) -> Result<(ExpertWorker, Option<WorkerStats>)> {
    let worker = ExpertWorker::load(dir, policy, transport.clone());
    match worker {
        Ok(w) => {
            let stats = w.serve()?;
            Ok((w, stats))
        }
        Err(e) => {
            serve(transport.as_ref(), Err(()))?;
            Err(e)
        }
    }
}

/// The MoE settings of the checkpoint's layers.
pub(crate) fn moe_config(text: &TextConfig) -> MoeConfig {
    MoeConfig::llama4(
        text.hidden_size(),
        text.intermediate_size,
        text.num_local_experts,
        text.num_experts_per_tok,
    )
}

/// The worker's side of the protocol; `worker` is `Err` when this rank failed to load (it then
/// takes part in starting, to fail it, and returns).
fn serve(t: &dyn Transport, worker: std::result::Result<&ExpertWorker, ()>) -> Result<Option<WorkerStats>> {
    let mut header = [0u32; HEADER];
    t.broadcast(&mut header)?;
    match Op::from_word(header[0]) {
        Some(Op::Stop) => return Ok(None),
        Some(Op::Start) => {}
        _ => return Err(Error::Protocol(format!("expected START, got {header:?}"))),
    }
    let matches = worker.is_ok_and(|w| header[1..1 + FINGERPRINT] == w.fingerprint);
    if let Ok(w) = worker {
        if !matches {
            eprintln!(
                "rank {}: rank 0 runs a model of another shape or group size ({:?}, here {:?})",
                t.rank(),
                &header[1..1 + FINGERPRINT],
                w.fingerprint
            );
        }
    }
    let mut flags = vec![0.0; t.size()];
    flags[t.rank()] = if matches { 0.0 } else { 1.0 };
    t.reduce_sum(&flags, &mut [])?;
    let mut go = [0u32];
    t.broadcast(&mut go)?;
    let worker = match worker {
        Ok(w) if go[0] == 1 => w,
        // This rank's own failure is the caller's to report.
        Err(()) => return Ok(None),
        Ok(_) => {
            return Err(Error::Group(
                "another rank did not load its share of the model".into(),
            ))
        }
    };
    worker.run_calls(t).map(Some)
}

impl ExpertWorker {
    /// Serves `RUN` messages until `STOP`.
    fn run_calls(&self, t: &dyn Transport) -> Result<WorkerStats> {
        let mut stats = WorkerStats::default();
        let (mut payload, mut out, mut scratch) = (Vec::<u32>::new(), Vec::<f32>::new(), Scratch::default());
        let mut routing = Routing::default();
        let mut header = [0u32; HEADER];
        loop {
            let waiting = Instant::now();
            t.broadcast(&mut header)?;
            let [op, layer, rows, k, ..] = header;
            match Op::from_word(op) {
                Some(Op::Stop) => return Ok(stats),
                Some(Op::Run) => {}
                _ => return Err(Error::Protocol(format!("expected RUN or STOP, got {header:?}"))),
            }
            let (layer, rows, k, h) = (layer as usize, rows as usize, k as usize, self.hidden);
            payload.clear();
            payload.resize(rows * h + 2 * rows * k, 0);
            t.broadcast(&mut payload)?;
            let received = Instant::now();
            out.clear();
            out.resize(rows * h + 1, 0.0);
            let (contribution, flag) = out.split_at_mut(rows * h);
            let ran = self.run_layer(layer, rows, k, &payload, contribution, &mut routing, &mut scratch);
            match ran {
                Ok(n) => stats.routed_rows += n as u64,
                Err(e) => {
                    eprintln!("rank {}: layer {layer}: {e}", t.rank());
                    contribution.fill(0.0);
                    flag[0] = 1.0;
                }
            }
            let computed = Instant::now();
            t.reduce_sum(&out, &mut [])?;
            stats.calls += 1;
            stats.rows += rows as u64;
            stats.receive += received - waiting;
            stats.compute += computed - received;
            stats.reduce += computed.elapsed();
        }
    }

    /// This rank's experts of `layer` over the rows of `payload`, into `out` (`rows · H`);
    /// returns the rows routed here.
    #[allow(clippy::too_many_arguments)]
    fn run_layer(
        &self,
        layer: usize,
        rows: usize,
        k: usize,
        payload: &[u32],
        out: &mut [f32],
        routing: &mut Routing,
        scratch: &mut Scratch,
    ) -> Result<usize> {
        let h = self.hidden;
        let moe = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Protocol(format!("layer {layer} is not a MoE layer here")))?;
        let (xs, rest) = payload.split_at(rows * h);
        let (weights, ids) = rest.split_at(rows * k);
        routing.refill(moe.num_experts(), k, rows, |t, e, w| {
            e.copy_from_slice(&ids[t * k..(t + 1) * k]);
            w.iter_mut()
                .zip(&weights[t * k..(t + 1) * k])
                .for_each(|(w, &bits)| *w = f32::from_bits(bits));
        })?;
        let xs: &[f32] = bytemuck::cast_slice(xs);
        let x = ArrayView2::from_shape((rows, h), xs).map_err(|e| Error::Protocol(e.to_string()))?;
        let out = ArrayViewMut2::from_shape((rows, h), out).map_err(|e| Error::Protocol(e.to_string()))?;
        moe.forward_routed_into(x, routing, out, scratch)?;
        let held = moe.expert_range();
        Ok(routing
            .experts()
            .iter()
            .filter(|&&e| held.contains(&(e as usize)))
            .count())
    }
}
