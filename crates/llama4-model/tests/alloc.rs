//! Decode steps allocate nothing once the session is warmed up.
//!
//! A counting global allocator sees every thread's allocations, so this binary holds a single
//! test: nothing else may run beside it.

use llama4_core::alloc_count::CountingAllocator;
use llama4_core::{DType, QuantFormat, QuantScope, QuantSpec};
use llama4_model::{Logits, Sampler, SamplingConfig, Session, TextModel};

mod common;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

/// Prefills 5 tokens, warms up with 2 steps, then counts the allocations of each of 20 more
/// steps (with sampling), which cross chunk boundaries (chunk 8).
fn steady_state_allocations(model: &TextModel, cache: DType, sampling: SamplingConfig) -> Vec<usize> {
    let vocab = model.config().vocab_size as u32;
    let mut session = Session::new(model, cache).unwrap();
    session.reserve(32).unwrap();
    let prompt: Vec<u32> = (0..5).map(|i| (3 + 7 * i) % vocab).collect();
    session.prefill(&prompt, Logits::Last).unwrap();
    let mut sampler = Sampler::new(sampling).unwrap();
    let mut token = 1;
    for _ in 0..2 {
        token = sampler.sample(session.step_logits(token).unwrap()).unwrap();
    }
    (0..20)
        .map(|_| {
            ALLOC.count(|| {
                token = sampler.sample(session.step_logits(token).unwrap()).unwrap();
            })
        })
        .collect()
}

#[test]
fn decode_steps_allocate_nothing() {
    let sampled = SamplingConfig {
        temperature: 0.8,
        top_k: Some(10),
        top_p: Some(0.9),
        seed: 7,
    };
    let scout = TextModel::load(common::fixture_dir("scout")).unwrap();
    let maverick = TextModel::load(common::fixture_dir("maverick")).unwrap();
    let demo_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
    let q8 = llama4_model::quant_policy(QuantSpec::new(QuantFormat::Q8, 32), QuantScope::AllLinear);
    let q8_demo = TextModel::load_with_quantization(&demo_dir, Some(q8)).unwrap();
    let q4 = llama4_model::quant_policy(QuantSpec::new(QuantFormat::Q4, 32), QuantScope::Experts);
    let q4_demo = TextModel::load_with_quantization(&demo_dir, Some(q4)).unwrap();
    let cases: [(&str, &TextModel, DType, SamplingConfig); 5] = [
        (
            "scout, f32 cache, greedy",
            &scout,
            DType::F32,
            SamplingConfig::greedy(),
        ),
        ("scout, bf16 cache, sampled", &scout, DType::BF16, sampled),
        (
            "maverick, f16 cache, greedy",
            &maverick,
            DType::F16,
            SamplingConfig::greedy(),
        ),
        ("demo q8 all-linear, bf16 cache", &q8_demo, DType::BF16, sampled),
        (
            "demo q4 experts, f32 cache",
            &q4_demo,
            DType::F32,
            SamplingConfig::greedy(),
        ),
    ];
    for (name, model, cache, sampling) in cases {
        let per_step = steady_state_allocations(model, cache, sampling);
        assert!(
            per_step.iter().all(|&n| n == 0),
            "{name}: allocations per decode step {per_step:?}"
        );
    }
}
