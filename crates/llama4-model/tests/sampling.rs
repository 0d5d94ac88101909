//! Token selection: greedy, temperature, top-k, top-p, seeds.

use llama4_model::{Sampler, SamplingConfig};

fn sampler(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampler {
    Sampler::new(SamplingConfig {
        temperature,
        top_k,
        top_p,
        seed,
    })
    .unwrap()
}

#[test]
fn greedy_is_argmax_with_ties_to_the_lowest_id() {
    let mut s = sampler(0.0, None, None, 0);
    assert_eq!(s.sample(&[0.1, 3.0, -2.0, 3.0]).unwrap(), 1);
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    let logits = [0.5, 2.0, 1.9, -1.0];
    let mut s = sampler(5.0, Some(1), None, 42);
    for _ in 0..100 {
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }
}

#[test]
fn small_top_p_keeps_only_the_most_likely_token() {
    let logits = [1.0, 1.5, 0.0];
    let mut s = sampler(1.0, None, Some(0.01), 7);
    for _ in 0..100 {
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }
}

#[test]
fn top_p_keeps_the_nucleus_and_nothing_else() {
    // Probabilities ~ [0.643, 0.237, 0.087, 0.032]: p = 0.8 keeps the first two.
    let logits = [3.0, 2.0, 1.0, 0.0];
    let mut s = sampler(1.0, None, Some(0.8), 3);
    let mut seen = [0usize; 4];
    for _ in 0..2000 {
        seen[s.sample(&logits).unwrap() as usize] += 1;
    }
    assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
}

#[test]
fn same_seed_same_tokens_and_frequencies_follow_the_softmax() {
    let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()]; // probabilities 1/6, 2/6, 3/6
    let draw = |seed| {
        let mut s = sampler(1.0, None, None, seed);
        (0..6000).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
    };
    let a = draw(11);
    assert_eq!(a, draw(11));
    assert_ne!(a, draw(12));
    let mut counts = [0f64; 3];
    a.iter().for_each(|&i| counts[i as usize] += 1.0);
    for (c, p) in counts.iter().zip([1.0f64 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
        // Six standard deviations of a binomial with n = 6000.
        let sd = (6000.0 * p * (1.0 - p)).sqrt();
        assert!((c - 6000.0 * p).abs() < 6.0 * sd, "{counts:?}");
    }
}
