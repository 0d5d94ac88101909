#![deny(missing_docs)]
//! Expert parallelism for Llama 4: the routed experts of every MoE layer shared among the
//! processes of a group (MPI ranks, on one host or several), so that a model larger than one
//! host's memory runs with each host holding a share of its experts.
//!
//! Rank 0 runs the model as usual: embeddings, attention and its caches, norms, routers, the
//! shared experts, `lm_head`, sampling, serving. Its MoE layers are [`ShardedMoe`]s: at each
//! one it broadcasts the layer's input rows `[T, H]` and their routing, every rank runs the
//! rows routed to the experts it holds ([`shard`]: contiguous shares, uneven splits allowed),
//! and one reduction sums the contributions `[T, H]` into rank 0 (the same bytes an allreduce
//! moves). The other ranks ([`ExpertWorker`]) hold only their experts: no caches, no
//! tokenizer, no sampler; they never see what the model is asked.
//!
//! Because rank 0 routes, every rank runs the experts of the same routing even on hosts whose
//! kernels round differently; because only rank 0 keeps state, a request that fails on rank 0
//! leaves nothing to resynchronise. With one routed expert per token (Llama 4) each row's sum
//! has two non-zero terms, the shared expert's and its expert's, added as one process adds
//! them: results equal the single-process model's bit for bit.
//!
//! The message layer is a [`Transport`]: MPI with the `mpi` feature (`MpiTransport`, built
//! on rsmpi; needs an MPI installation and libclang to build), or [`LocalGroup`]'s threads,
//! which test the protocol in one process.
//!
//! ```
//! use std::path::Path;
//! use expert_parallel::{load_leader, run_worker, LocalGroup};
//! use llama4_model::TextModel;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/scout");
//! let mut group = LocalGroup::new(3).into_iter();
//! let leader_transport = group.next().unwrap();
//! let workers: Vec<_> = group
//!     .map(|t| {
//!         let dir = dir.clone();
//!         std::thread::spawn(move || run_worker(&dir, None, t).map(|(w, _)| w.experts()))
//!     })
//!     .collect();
//! let (model, leader) = load_leader(&dir, None, leader_transport)?;
//! let logits = model.forward_uncached(&[1, 2, 3])?;
//! let alone = TextModel::load(&dir)?.forward_uncached(&[1, 2, 3])?;
//! assert_eq!(logits, alone);
//! drop(model);
//! drop(leader); // the workers return
//! let shares: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect::<Result<_, _>>()?;
//! assert_eq!(shares, [5..10, 10..16]); // rank 0 holds 0..5
//! # Ok(())
//! # }
//! ```

mod error;
mod leader;
#[cfg(feature = "mpi")]
mod mpi_transport;
mod plan;
mod protocol;
mod resident;
mod transport;
mod worker;

use std::path::Path;
use std::sync::Arc;

use llama4_core::QuantPolicy;
use llama4_model::{ImageTokenIds, ModelConfig, MultimodalModel, TextModel};

pub use error::{Error, Result};
pub use leader::{CommStats, Leader, ShardedMoe};
#[cfg(feature = "mpi")]
pub use mpi_transport::{Mpi, MpiTransport};
pub use plan::{memory_plan, shard, RankMemory};
pub use protocol::{exchange_bytes, Exchange};
pub use resident::{expert_residency, resident_bytes, ExpertResidency};
pub use transport::{LocalGroup, Transport};
pub use worker::{run_worker, ExpertWorker, WorkerStats};

/// Rank 0: loads the text model of the checkpoint in `dir` with its MoE layers shared among
/// `transport`'s group ([`Leader::build_moe`]; `policy` quantises at load time), and starts
/// the group. The workers return when the returned [`Leader`] and model are dropped.
///
/// # Errors
/// Loading errors; [`Error::Group`] when another rank failed to load. Either way the workers
/// are told to stop.
pub fn load_leader(
    dir: impl AsRef<Path>,
    policy: Option<QuantPolicy>,
    transport: Arc<dyn Transport>,
) -> Result<(TextModel, Arc<Leader>)> {
    let dir = dir.as_ref();
    let leader = new_leader(dir, transport)?;
    let model = TextModel::load_with_moe(dir, policy, &mut |i, scope, cfg| leader.build_moe(i, scope, cfg))?;
    Ok((model, leader))
}

/// [`load_leader`] for a multimodal checkpoint: the vision tower stays on rank 0.
///
/// # Errors
/// As [`load_leader`] and [`MultimodalModel::load_with_quantization`].
pub fn load_leader_multimodal(
    dir: impl AsRef<Path>,
    token_ids: ImageTokenIds,
    policy: Option<QuantPolicy>,
    transport: Arc<dyn Transport>,
) -> Result<(MultimodalModel, Arc<Leader>)> {
    let dir = dir.as_ref();
    let leader = new_leader(dir, transport)?;
    let model = MultimodalModel::load_with_moe(dir, token_ids, policy, &mut |i, scope, cfg| {
        leader.build_moe(i, scope, cfg)
    })?;
    Ok((model, leader))
}

/// The leader for the checkpoint in `dir`; on failure the workers are told to stop (they wait
/// for rank 0's first message).
pub fn new_leader(dir: &Path, transport: Arc<dyn Transport>) -> Result<Arc<Leader>> {
    let leader = ModelConfig::from_dir(dir)
        .map_err(Error::from)
        .and_then(|config| Leader::new(transport.clone(), &config.text));
    if leader.is_err() && transport.rank() == 0 {
        // Best effort: the error to report is the one above.
        let _ = stop_workers(transport.as_ref());
    }
    leader
}

/// Rank 0, when it gives up before creating its [`Leader`] (a bad flag, a checkpoint it cannot
/// use): tells the workers, which wait for rank 0's first message, to return. Not to be
/// called once a leader exists (dropping it does this).
///
/// # Errors
/// Transport errors.
pub fn stop_workers(transport: &dyn Transport) -> Result<()> {
    transport.broadcast(&mut protocol::stop_header())
}
