//! Expert parallelism over MPI, checked: run under `mpirun` (see `tools/mpi_tests.sh`).
//!
//! ```text
//! cargo build --release -p expert-parallel --features mpi --example mpi_parity
//! mpirun --oversubscribe -np 3 target/release/examples/mpi_parity [--model DIR] [--max-new-tokens N] [--prompt-len N]
//! ```
//!
//! Rank 0 loads the model with its share of the experts, runs an uncached pass, a prefill and
//! greedy decode steps with the other ranks serving theirs, then checks the logits against the
//! same model loaded whole in this one process (1e-6 relative) and the greedy ids against it and
//! against transformers' (`reference.safetensors` of the fixture, when present). Every rank
//! prints the bytes of the mapped expert tensors resident in its own page table (about 1/N of
//! them) and asserts that it touched none of the others' experts beyond the kernel's
//! fault-around at the edges of its share; rank 0 prints the time in communication per decode
//! step. The exit status is non-zero when a check fails on any rank.
//!
//! `--model DIR` defaults to the `scout` fixture (16 experts per layer: 3 ranks split it 5/5/6).
//! Without the fixture's reference, the prompt is ids `1..=N` (`--prompt-len N`, default 8); a
//! long one routes rows to every expert, so that each rank's resident bytes reach its share.
//!
//! The residency figure means something only when experts are larger than the fault-around
//! window (the fixtures' are not: every rank then maps nearly every page), and when the
//! checkpoint's pages were not brought into the page cache by another reader: Linux (6.18 with
//! large folios on ext4) maps the whole cached folio around a fault, up to 2 MiB, so pages that
//! the writer of the file or a reader of a neighbouring share cached as one folio show as
//! resident here too. `tools/mpi_tests.sh` writes a checkpoint with MB-sized experts
//! (`make_checkpoint --preset ep-resident`) and drops its cached pages before each run, as on
//! hosts whose page cache only their own rank filled.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use expert_parallel::{expert_residency, load_leader, run_worker, ExpertResidency, Mpi, Transport};
use llama4_core::DType;
use llama4_model::{Logits, ModelConfig, Sampler, SamplingConfig, Session, TextModel};
use ndarray::Array2;
use safetensors::SafeTensors;

type Error = Box<dyn std::error::Error>;

/// Relative error allowed against the single-process run (max |Δ| / max |single|).
const TOL: f64 = 1e-6;

/// Largest window the kernel maps in around a faulting page of a file mapping
/// (`fault_around_bytes`, 64 KiB by default): pages of other ranks' experts next to the edges
/// of a share may be mapped without being read.
const FAULT_AROUND: u64 = 64 << 10;

struct Args {
    model: PathBuf,
    max_new_tokens: Option<usize>,
    prompt_len: usize,
}

fn args() -> Result<Args, Error> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut a = Args {
        model: root.join("fixtures/models/scout"),
        max_new_tokens: None,
        prompt_len: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value()?),
            "--max-new-tokens" => a.max_new_tokens = Some(value()?.parse()?),
            "--prompt-len" => a.prompt_len = value()?.parse()?,
            other => return Err(format!("unknown option `{other}`").into()),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let mpi = match Mpi::init() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let transport = mpi.transport();
    let rank = transport.rank();
    let result = args().and_then(|a| {
        if rank == 0 {
            leader(&a, transport)
        } else {
            worker(&a, transport)
        }
    });
    // Every model and worker is dropped; MPI is finalised last.
    drop(mpi);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rank {rank}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prompt and transformers' greedy ids of a fixture, or ids `1..=len` (wrapped into the
/// vocabulary).
fn prompt(dir: &Path, len: usize) -> Result<(Vec<u32>, Option<Vec<u32>>), Error> {
    let Ok(bytes) = std::fs::read(dir.join("reference.safetensors")) else {
        let vocab = ModelConfig::from_dir(dir)?.text.vocab_size.max(2);
        let ids = (1..=len.max(1))
            .map(|i| (1 + (i - 1) % (vocab - 1)) as u32)
            .collect();
        return Ok((ids, None));
    };
    let st = SafeTensors::deserialize(&bytes)?;
    let ids = |name: &str| -> Result<Vec<u32>, Error> {
        let t = st.tensor(name)?;
        Ok(t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as u32)
            .collect())
    };
    Ok((ids("prompt_ids")?, Some(ids("generated_ids")?)))
}

/// What one run gives: the uncached logits of prompt + generated, the prefill's, each decode
/// step's, and the greedy ids.
struct Run {
    full: Array2<f32>,
    prefill: Array2<f32>,
    steps: Vec<f32>,
    ids: Vec<u32>,
}

/// The uncached pass over `all`, a prefill of `prompt` and `n` greedy tokens (`n - 1` decode
/// steps); `between` is called after the prefill and after the last step.
fn run(
    model: &TextModel,
    prompt: &[u32],
    all: &[u32],
    n: usize,
    mut between: impl FnMut(),
) -> Result<Run, Error> {
    let full = model.forward_uncached(all)?;
    let mut session = Session::new(model, DType::F32)?;
    let prefill = session.prefill(prompt, Logits::All)?;
    let mut sampler = Sampler::new(SamplingConfig::greedy())?;
    let last = prefill.row(prefill.nrows() - 1);
    let mut ids = vec![sampler.sample(last.as_slice().ok_or("non-standard logits")?)?];
    let mut steps = Vec::new();
    between();
    for _ in 1..n {
        let logits = session.step_logits(*ids.last().ok_or("no token")?)?;
        steps.extend_from_slice(logits);
        ids.push(sampler.sample(logits)?);
    }
    between();
    Ok(Run {
        full,
        prefill,
        steps,
        ids,
    })
}

fn rel_err<'a>(a: impl IntoIterator<Item = &'a f32>, b: impl IntoIterator<Item = &'a f32>) -> f64 {
    let (mut diff, mut scale) = (0f64, 0f64);
    for (&x, &y) in a.into_iter().zip(b) {
        diff = diff.max((x as f64 - y as f64).abs());
        if diff.is_nan() || x.is_nan() {
            return f64::NAN;
        }
        scale = scale.max((y as f64).abs());
    }
    diff / scale.max(f64::MIN_POSITIVE)
}

fn leader(a: &Args, transport: Arc<expert_parallel::MpiTransport>) -> Result<(), Error> {
    let ranks = transport.size();
    let (prompt, reference) = prompt(&a.model, a.prompt_len)?;
    let n = a
        .max_new_tokens
        .or(reference.as_ref().map(Vec::len))
        .unwrap_or(8)
        .max(2);
    let (model, leader) = load_leader(&a.model, None, transport)?;
    // The uncached pass covers the greedy continuation as far as the reference knows it.
    let all: Vec<u32> = prompt.iter().chain(reference.iter().flatten()).copied().collect();
    let mut marks = Vec::new();
    let got = run(&model, &prompt, &all, n, || marks.push(leader.stats()))?;
    let decode = marks[1].since(&marks[0]);
    let config = ModelConfig::from_dir(&a.model)?;
    let residency = expert_residency(
        model.checkpoint().ok_or("a safetensors checkpoint is needed")?,
        &config,
        leader.experts(),
    )?;
    let experts = leader.experts();
    drop(model);
    drop(leader); // the workers report and return

    // The same model in this one process.
    let alone = TextModel::load(&a.model)?;
    let want = run(&alone, &prompt, &all, n, || {})?;
    let e_full = rel_err(&got.full, &want.full);
    let e_prefill = rel_err(&got.prefill, &want.prefill);
    let e_steps = rel_err(&got.steps, &want.steps);
    let steps = (n - 1) as f64;
    println!(
        "rank 0 of {ranks}: {}: logits vs one process: uncached {e_full:.1e}, prefill {e_prefill:.1e}, \
         {} decode steps {e_steps:.1e}; greedy ids {}",
        a.model.display(),
        n - 1,
        if got.ids == want.ids { "equal" } else { "DIFFER" }
    );
    println!(
        "rank 0 of {ranks}: decode: {:.3} ms/step in communication (broadcast {:.3} + reduce {:.3}, \
         the reduce including waiting for the slowest rank), {:.3} ms/step on its own experts; \
         {:.0} B sent + {:.0} B reduced per step over {} MoE layers",
        decode.comm().as_secs_f64() * 1e3 / steps,
        decode.broadcast.as_secs_f64() * 1e3 / steps,
        decode.reduce.as_secs_f64() * 1e3 / steps,
        decode.local.as_secs_f64() * 1e3 / steps,
        decode.bytes_sent as f64 / steps,
        decode.bytes_reduced as f64 / steps,
        decode.calls as f64 / steps,
    );
    print_residency(0, ranks, &experts, &residency, expert_tensors(&config));
    check_residency(&residency, expert_tensors(&config))?;
    if !(e_full <= TOL && e_prefill <= TOL && e_steps <= TOL) {
        return Err(format!("logits differ from one process's by more than {TOL:e}").into());
    }
    if got.ids != want.ids {
        return Err(format!("greedy ids {:?}, one process {:?}", got.ids, want.ids).into());
    }
    if let Some(r) = reference {
        if got.ids[..n.min(r.len())] != r[..n.min(r.len())] {
            return Err(format!("greedy ids {:?}, transformers {r:?}", got.ids).into());
        }
    }
    Ok(())
}

fn worker(a: &Args, transport: Arc<expert_parallel::MpiTransport>) -> Result<(), Error> {
    let (rank, ranks) = (transport.rank(), transport.size());
    let (worker, stats) = run_worker(&a.model, None, transport)?;
    let residency = expert_residency(worker.checkpoint(), worker.config(), worker.experts())?;
    if let Some(s) = stats {
        println!(
            "rank {rank} of {ranks}: served {} layer calls, {} routed rows: {:.1} ms on its experts, \
             {:.1} ms in reductions, {:.1} ms receiving (mostly waiting for rank 0)",
            s.calls,
            s.routed_rows,
            s.compute.as_secs_f64() * 1e3,
            s.reduce.as_secs_f64() * 1e3,
            s.receive.as_secs_f64() * 1e3,
        );
    }
    print_residency(
        rank,
        ranks,
        &worker.experts(),
        &residency,
        expert_tensors(worker.config()),
    );
    check_residency(&residency, expert_tensors(worker.config()))
}

fn print_residency(
    rank: usize,
    ranks: usize,
    experts: &std::ops::Range<usize>,
    r: &ExpertResidency,
    tensors: u64,
) {
    println!(
        "rank {rank} of {ranks}: experts {experts:?}: {} of {} expert bytes resident ({:.3} of the total; \
         its share is {:.3}, allowed {:.3}): {} in its share, {} outside",
        r.resident(),
        r.total,
        r.resident() as f64 / r.total as f64,
        r.share as f64 / r.total as f64,
        allowance(r, tensors) as f64 / r.total as f64,
        r.in_share,
        r.outside,
    );
}

/// The share, and what fault-around may map at the two edges of the share in each of the
/// `tensors` expert tensors (pages are whole, so the share's own edge pages count in that
/// allowance too).
fn allowance(r: &ExpertResidency, tensors: u64) -> u64 {
    r.share + tensors * 2 * FAULT_AROUND
}

/// No page of the other ranks' experts resident but what [`allowance`] allows.
fn check_residency(r: &ExpertResidency, tensors: u64) -> Result<(), Error> {
    let allowed = allowance(r, tensors);
    if r.resident() > allowed {
        return Err(format!(
            "{} expert bytes resident: more than its share of {} and the fault-around allowance",
            r.resident(),
            r.share
        )
        .into());
    }
    Ok(())
}

/// Expert tensors of a checkpoint: two per MoE layer.
fn expert_tensors(config: &ModelConfig) -> u64 {
    2 * config.text.moe_layers().count() as u64
}
