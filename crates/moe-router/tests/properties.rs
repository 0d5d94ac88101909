//! Invariants of routing, grouping and sparse dispatch on random inputs.

mod common;

use common::{Dims, RawMoe, Rng};
use llama4_core::DType;
use moe_router::{
    sigmoid_top_k, softmax_top_k, top_k, Error, ExpertGroups, FeedForward, Routing, WeightPlacement,
};
use ndarray::Array2;
use proptest::prelude::*;

/// Random `[T, E]` logits with `E ≥ k`, and k. Values in `[-12, 12]`, where the f32 sigmoid
/// is strictly inside (0, 1); a few exact ties via rounding to quarter units.
fn logits_and_k() -> impl Strategy<Value = (Array2<f32>, usize)> {
    (1usize..40, 1usize..20, any::<u64>(), any::<bool>()).prop_flat_map(|(t, e, seed, ties)| {
        (1..=e).prop_map(move |k| {
            let mut rng = Rng::new(seed);
            let mut l = rng.array(t, e, 12.0);
            if ties {
                l.mapv_inplace(|v| (v * 0.25).round() * 4.0 / 16.0);
            }
            (l, k)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sigmoid_routing_picks_k_distinct_best_experts((logits, k) in logits_and_k()) {
        let r = sigmoid_top_k(logits.view(), k).unwrap();
        prop_assert_eq!(r.num_tokens(), logits.nrows());
        prop_assert_eq!(r.top_k(), k);
        for (t, row) in logits.rows().into_iter().enumerate() {
            let chosen = r.experts_of(t);
            let mut sorted = chosen.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), k, "distinct experts");
            // Every chosen logit is ≥ every unchosen one, and chosen ones are in rank order
            // (descending value, ascending index among equals).
            let min_chosen = chosen.iter().map(|&e| row[e as usize]).fold(f32::INFINITY, f32::min);
            for (e, &v) in row.iter().enumerate() {
                if !chosen.contains(&(e as u32)) {
                    prop_assert!(v <= min_chosen);
                }
            }
            for pair in chosen.windows(2) {
                let (a, b) = (row[pair[0] as usize], row[pair[1] as usize]);
                prop_assert!(a > b || (a == b && pair[0] < pair[1]));
            }
            for (&e, &w) in chosen.iter().zip(r.weights_of(t)) {
                prop_assert!(w > 0.0 && w < 1.0, "weight {w} not in (0, 1)");
                // sigmoid of the RAW logit, nothing else.
                let want = 1.0 / (1.0 + (-(row[e as usize] as f64)).exp());
                prop_assert!((w as f64 - want).abs() <= 1e-6 * want);
            }
        }
    }

    #[test]
    fn softmax_routing_weights_are_probabilities((logits, k) in logits_and_k()) {
        let plain = softmax_top_k(logits.view(), k, false).unwrap();
        let renorm = softmax_top_k(logits.view(), k, true).unwrap();
        let sig = sigmoid_top_k(logits.view(), k).unwrap();
        prop_assert_eq!(plain.experts(), sig.experts(), "same selection rule");
        for t in 0..plain.num_tokens() {
            let s: f32 = plain.weights_of(t).iter().sum();
            prop_assert!(plain.weights_of(t).iter().all(|&w| w > 0.0 && w <= 1.0));
            prop_assert!(s <= 1.0 + 1e-5);
            let s: f32 = renorm.weights_of(t).iter().sum();
            prop_assert!((s - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn grouping_is_a_permutation_of_the_assignments((logits, k) in logits_and_k()) {
        let r = sigmoid_top_k(logits.view(), k).unwrap();
        let g = ExpertGroups::from_routing(&r);
        let t = r.num_tokens();
        // Every (token, expert, weight) assignment appears exactly once across the groups.
        let mut from_groups = Vec::new();
        for e in 0..g.num_experts() {
            prop_assert!(g.tokens(e).windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
            prop_assert_eq!(g.len(e), r.tokens_per_expert()[e]);
            for (&tok, &w) in g.tokens(e).iter().zip(g.weights(e)) {
                from_groups.push((tok as usize, e, w.to_bits()));
            }
        }
        let mut from_routing: Vec<_> = (0..t)
            .flat_map(|tok| {
                r.experts_of(tok)
                    .iter()
                    .zip(r.weights_of(tok))
                    .map(move |(&e, &w)| (tok, e as usize, w.to_bits()))
            })
            .collect();
        from_groups.sort_unstable();
        from_routing.sort_unstable();
        prop_assert_eq!(&from_groups, &from_routing);
        // So the token lists are each token repeated k times.
        let mut all: Vec<u32> = g.all_tokens().to_vec();
        all.sort_unstable();
        let want: Vec<u32> = (0..t as u32).flat_map(|tok| std::iter::repeat_n(tok, k)).collect();
        prop_assert_eq!(all, want);
        prop_assert_eq!(g.active_experts().count(), r.tokens_per_expert().iter().filter(|&&c| c > 0).count());
    }

    #[test]
    fn sparse_dispatch_equals_the_dense_formula(
        h in 1usize..24,
        i in 1usize..16,
        e in 1usize..10,
        k_pick in 0usize..10,
        t in 0usize..24,
        seed in any::<u64>(),
        bf16 in any::<bool>(),
        on_output in any::<bool>(),
    ) {
        let k = 1 + k_pick % e;
        let mut rng = Rng::new(seed);
        let raw = RawMoe::random(&mut rng, Dims { h, i, e, k });
        let placement = if on_output { WeightPlacement::ExpertOutput } else { WeightPlacement::ExpertInput };
        let moe = raw.build(if bf16 { DType::BF16 } else { DType::F32 }, placement);
        let x = rng.array(t, h, 2.0);
        let sparse = moe.forward_with_routing(x.view()).unwrap();
        let dense = moe.forward_routed_dense_reference(x.view(), &sparse.routing).unwrap();
        // Same routing whichever entry point routes.
        prop_assert_eq!(&moe.router().route(x.view()).unwrap(), &sparse.routing);
        let (diff, scale) = common::max_abs_diff(sparse.output.view(), dense.view());
        // f32 accumulation against f64 over at most 24 terms per dot product.
        prop_assert!(diff <= 1e-5 * scale + 1e-6, "max |Δ| {diff:e}, max |ref| {scale:e}");

        // Statistics: T·k assignments, and the bytes of the router, the shared expert and
        // each active expert once.
        let counts = moe.stats().tokens_per_expert();
        prop_assert_eq!(counts.iter().sum::<u64>(), (t * k) as u64);
        let active = counts.iter().filter(|&&c| c > 0).count();
        let per_dtype = if bf16 { 2 } else { 4 };
        let want_bytes = per_dtype * (e * h + 3 * h * i + active * 3 * h * i);
        prop_assert_eq!(moe.stats().weight_bytes_read(), want_bytes as u64);
        prop_assert_eq!(moe.stats().forward_calls(), 1);
        prop_assert_eq!(moe.stats().tokens(), t as u64);
    }

    #[test]
    fn hostile_routings_are_rejected_with_their_variant(
        e in 1usize..8,
        k in 1usize..4,
        ids in proptest::collection::vec(0u32..12, 0..24),
    ) {
        let weights = vec![0.5f32; ids.len()];
        let got = Routing::new(e, k, ids.clone(), weights);
        if k > e {
            prop_assert!(
                matches!(got, Err(Error::TopK { top_k, num_experts }) if top_k == k && num_experts == e),
                "expected a top-k error, got {:?}", got
            );
            return Ok(());
        }
        if ids.len() % k != 0 {
            prop_assert!(matches!(got, Err(Error::Mismatch { .. })), "expected a length error, got {:?}", got);
            return Ok(());
        }
        // The first bad slot, in token-major order, decides the variant.
        let mut first_bad = None;
        'outer: for (tok, chosen) in ids.chunks_exact(k).enumerate() {
            for (s, &id) in chosen.iter().enumerate() {
                if id as usize >= e {
                    first_bad = Some(Err((tok, id)));
                    break 'outer;
                }
                if chosen[..s].contains(&id) {
                    first_bad = Some(Ok((tok, id)));
                    break 'outer;
                }
            }
        }
        match first_bad {
            None => prop_assert!(got.is_ok()),
            Some(Err((tok, id))) => prop_assert!(
                matches!(got, Err(Error::ExpertOutOfRange { token, expert, num_experts })
                    if token == tok && expert == id as usize && num_experts == e),
                "got {:?}", got
            ),
            Some(Ok((tok, id))) => prop_assert!(
                matches!(got, Err(Error::DuplicateExpert { token, expert }) if token == tok && expert == id as usize),
                "got {:?}", got
            ),
        }
    }
}

#[test]
fn top_k_follows_torch_tie_order() {
    // Equal values: lower index first; then values descending.
    assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0, 3.0], 4), vec![1, 2, 4, 3]);
}

#[test]
fn input_and_output_weighting_differ() {
    let mut rng = Rng::new(7);
    let raw = RawMoe::random(
        &mut rng,
        Dims {
            h: 16,
            i: 8,
            e: 4,
            k: 2,
        },
    );
    let x = rng.array(5, 16, 2.0);
    let a = raw
        .build(DType::F32, WeightPlacement::ExpertInput)
        .forward(x.view())
        .unwrap();
    let b = raw
        .build(DType::F32, WeightPlacement::ExpertOutput)
        .forward(x.view())
        .unwrap();
    let (diff, scale) = common::max_abs_diff(a.view(), b.view());
    assert!(
        diff > 1e-3 * scale,
        "SwiGLU is not linear, so the placements must differ"
    );
}

#[test]
fn mismatched_input_width_is_an_error() {
    let mut rng = Rng::new(3);
    let raw = RawMoe::random(
        &mut rng,
        Dims {
            h: 8,
            i: 4,
            e: 3,
            k: 1,
        },
    );
    let moe = raw.build(DType::F32, WeightPlacement::ExpertInput);
    let x = Array2::<f32>::zeros((2, 9));
    assert!(matches!(
        moe.forward(x.view()),
        Err(Error::Mismatch {
            expected: 8,
            got: 9,
            ..
        })
    ));
    let r = Routing::new(3, 1, vec![0], vec![1.0]).unwrap();
    assert!(matches!(
        moe.forward_routed(Array2::<f32>::zeros((2, 8)).view(), &r),
        Err(Error::Mismatch {
            expected: 2,
            got: 1,
            ..
        })
    ));
}

#[test]
fn forward_expert_is_one_expert_of_the_layer() {
    let mut rng = Rng::new(5);
    let raw = RawMoe::random(
        &mut rng,
        Dims {
            h: 16,
            i: 8,
            e: 4,
            k: 1,
        },
    );
    let moe = raw.build(DType::BF16, WeightPlacement::ExpertInput);
    let x = rng.array(6, 16, 2.0);
    // Every token forced to expert 2 with weight 1: output = shared(x) + expert_2(x).
    let r = Routing::new(4, 1, vec![2; 6], vec![1.0; 6]).unwrap();
    let layer = moe.forward_routed(x.view(), &r).unwrap();
    let parts = moe.shared_expert().unwrap().forward(x.view()).unwrap()
        + moe.experts().forward_expert(2, x.view()).unwrap();
    let (diff, scale) = common::max_abs_diff(layer.view(), parts.view());
    assert!(diff <= 1e-6 * scale, "max |Δ| {diff:e}");
    assert!(matches!(
        moe.experts().forward_expert(4, x.view()),
        Err(Error::NoSuchExpert {
            expert: 4,
            num_experts: 4
        })
    ));
}
