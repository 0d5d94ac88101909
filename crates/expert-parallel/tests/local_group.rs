//! Expert parallelism over the in-process group (threads): with the experts of every MoE layer
//! shared among 2 and 3 ranks (even and uneven splits), the logits equal the single-process
//! model's on the committed fixtures and greedy generation gives the same ids (those of
//! transformers, stored with the fixture).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use expert_parallel::{
    exchange_bytes, load_leader, memory_plan, run_worker, shard, LocalGroup, Transport, WorkerStats,
};
use llama4_core::DType;
use llama4_model::{GenerateOptions, Logits, ModelConfig, SamplingConfig, Session, TextModel};
use llama4_testkit::{fixture, ids, rel_err_2d};
use safetensors::SafeTensors;

/// Relative error allowed against the single-process run (max |Δ| / max |single|).
const TOL: f64 = 1e-6;

fn dir(name: &str) -> PathBuf {
    fixture(&format!("models/{name}"))
}

/// What a worker thread returns: its experts, the weight bytes it loaded, its stats.
type Worker = JoinHandle<expert_parallel::Result<(std::ops::Range<usize>, usize, Option<WorkerStats>)>>;

fn spawn_workers(dir: &Path, group: Vec<Arc<dyn Transport>>) -> Vec<Worker> {
    group
        .into_iter()
        .map(|t| {
            let dir = dir.to_path_buf();
            std::thread::spawn(move || {
                run_worker(&dir, None, t).map(|(w, s)| (w.experts(), w.checkpoint().weight_bytes(), s))
            })
        })
        .collect()
}

/// Prompt and transformers' greedy ids of a fixture.
fn reference(dir: &Path) -> (Vec<u32>, Vec<u32>) {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    (ids(&st, "prompt_ids"), ids(&st, "generated_ids"))
}

fn greedy(model: &TextModel, prompt: &[u32], n: usize) -> (Vec<u32>, ndarray::Array2<f32>) {
    let mut session = Session::new(model, DType::F32).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingConfig::greedy(),
        stop_ids: vec![],
        keep_logits: true,
    };
    let g = session
        .generate(prompt, &opts, |_| ControlFlow::Continue(()))
        .unwrap();
    (g.generated_ids, g.logits.unwrap())
}

fn check(name: &str, dtype: DType, ranks: usize) {
    let dir = dir(name);
    let (prompt, generated) = reference(&dir);
    let alone = TextModel::load(&dir).unwrap();
    let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
    let want_full = alone.forward_uncached(&all).unwrap();
    let (want_ids, want_steps) = greedy(&alone, &prompt, generated.len());
    assert_eq!(
        want_ids, generated,
        "{name}: the single-process run is not transformers'"
    );

    let mut group = LocalGroup::new(ranks);
    let workers = spawn_workers(&dir, group.split_off(1));
    let (model, leader) = load_leader(&dir, None, group.remove(0)).unwrap();
    let e_full = rel_err_2d(model.forward_uncached(&all).unwrap().view(), want_full.view());
    let mut session = Session::new(&model, DType::F32).unwrap();
    let prefill = session.prefill(&prompt, Logits::All).unwrap();
    let rows = want_full.slice(ndarray::s![..prompt.len(), ..]);
    let e_prefill = rel_err_2d(prefill.view(), rows);
    let before = leader.stats();
    let (got_ids, got_steps) = greedy(&model, &prompt, generated.len());
    let comm = leader.stats().since(&before);
    let e_steps = rel_err_2d(got_steps.view(), want_steps.view());
    drop(session);
    drop(model);
    drop(leader);

    let config = ModelConfig::from_dir(&dir).unwrap();
    let e = config.text.num_local_experts;
    let plan = memory_plan(&config.text, dtype, None, ranks).unwrap();
    for (rank, w) in (1..).zip(workers) {
        let (experts, bytes, stats) = w.join().unwrap().unwrap();
        assert_eq!(experts, shard(e, ranks, rank).unwrap());
        assert_eq!(
            bytes as u64,
            plan[rank].total(),
            "{name}: rank {rank} loaded other bytes than planned"
        );
        let stats = stats.expect("the group started");
        // Every MoE layer call of the leader reached every worker.
        assert_eq!(stats.calls, leader_calls(&config, generated.len()));
    }
    println!(
        "{name} on {ranks} ranks: uncached {e_full:.1e}, prefill {e_prefill:.1e}, decode {e_steps:.1e}; \
         decode exchanged {} B sent + {} B reduced over {} layer calls",
        comm.bytes_sent, comm.bytes_reduced, comm.calls
    );
    assert!(
        e_full <= TOL,
        "{name} on {ranks} ranks: uncached logits off by {e_full:e}"
    );
    assert!(
        e_prefill <= TOL,
        "{name} on {ranks} ranks: prefill logits off by {e_prefill:e}"
    );
    assert!(
        e_steps <= TOL,
        "{name} on {ranks} ranks: decode logits off by {e_steps:e}"
    );
    assert_eq!(got_ids, want_ids, "{name} on {ranks} ranks: greedy ids differ");
    // The greedy run: a prefill of the prompt's rows, then one row per step, at every MoE layer.
    let moe = config.text.moe_layers().count() as u64;
    let (pre, step) = (
        exchange_bytes(&config.text, prompt.len(), ranks),
        exchange_bytes(&config.text, 1, ranks),
    );
    let steps = generated.len() as u64 - 1;
    assert_eq!(comm.calls, moe * (1 + steps));
    assert_eq!(comm.bytes_sent, moe * (pre.broadcast + steps * step.broadcast));
    assert_eq!(comm.bytes_reduced, moe * (pre.reduce + steps * step.reduce));
}

/// MoE layer calls the leader makes in `check`: an uncached pass, a prefill, and a greedy
/// generation of `n` tokens (one prefill pass, then `n - 1` steps).
fn leader_calls(config: &ModelConfig, n: usize) -> u64 {
    let moe = config.text.moe_layers().count() as u64;
    moe * (1 + 1 + 1 + (n as u64 - 1))
}

#[test]
fn scout_like_two_ranks_even_split() {
    check("scout", DType::F32, 2);
}

#[test]
fn scout_like_three_ranks_uneven_split() {
    check("scout", DType::F32, 3);
}

#[test]
fn top2_three_ranks_uneven_split() {
    // Two routed experts per token: a row's terms come from up to three ranks.
    check("top2_tied", DType::F32, 3);
}

#[test]
fn maverick_like_bf16_interleaved_two_and_three_ranks() {
    check("maverick", DType::BF16, 2);
    check("maverick", DType::BF16, 3);
}

#[test]
fn more_ranks_than_experts_is_a_named_error_on_every_rank() {
    let dir = dir("top2_tied");
    let mut group = LocalGroup::new(9);
    let workers = spawn_workers(&dir, group.split_off(1));
    let err = load_leader(&dir, None, group.remove(0)).unwrap_err();
    assert!(matches!(err, expert_parallel::Error::Plan { .. }), "{err}");
    for w in workers {
        // Each worker fails to plan its share and returns instead of waiting for ever.
        assert!(w.join().unwrap().is_err());
    }
}
