//! The allocation-free entry points (`forward_into`, `route_into`, `regroup`) give exactly,
//! bit for bit, what the allocating ones give, including when one `Scratch` (or `Routing`,
//! `ExpertGroups`) is reused across calls of different sizes, so that stale data left in a
//! buffer by a larger call would show.

mod common;

use common::{Dims, RawMoe, Rng};
use llama4_core::{DType, Layout, Weight, WeightData};
use moe_router::{
    sigmoid_top_k, softmax_top_k, softmax_top_k_into, Error, ExpertGroups, FeedForward, Llama4Router, Moe,
    Result, Router, Routing, Scratch, SoftmaxTopKRouter, WeightPlacement,
};
use ndarray::{s, Array2, ArrayView2};

/// Token counts in the order the reused buffers see them: large, then small, then large.
const SIZES: [usize; 7] = [17, 1, 3, 1, 17, 0, 3];

fn bits(a: ArrayView2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn router_weight(raw: &RawMoe, dtype: DType) -> Weight {
    let Dims { h, e, .. } = raw.dims;
    Weight::new(WeightData::from_f32(&raw.router, dtype), Layout::OutIn, e, h).unwrap()
}

/// `layer.forward_into` with one reused `scratch` equals `layer.forward`, bit for bit, for
/// every size of [`SIZES`], into contiguous and strided outputs, from contiguous and strided
/// inputs.
fn check_forward_into(layer: &dyn FeedForward, h: usize, rng: &mut Rng, scratch: &mut Scratch) {
    for t in SIZES {
        let x = rng.array(t, h, 2.0);
        let want = layer.forward(x.view()).unwrap();
        // Garbage in `out`, which must be overwritten.
        let mut out = Array2::from_elem((t, h), f32::NAN);
        layer.forward_into(x.view(), out.view_mut(), scratch).unwrap();
        assert_eq!(bits(out.view()), bits(want.view()), "T = {t}, contiguous");

        // Every other column of a wider array: a strided output.
        let mut wide = Array2::from_elem((t, 2 * h), f32::NAN);
        layer
            .forward_into(x.view(), wide.slice_mut(s![.., ..;2]), scratch)
            .unwrap();
        assert_eq!(
            bits(wide.slice(s![.., ..;2])),
            bits(want.view()),
            "T = {t}, strided out"
        );
        assert!(
            wide.slice(s![.., 1..;2]).iter().all(|v| v.is_nan()),
            "only `out` written"
        );

        // A transposed copy viewed back: a strided input.
        let xt = x.t().to_owned();
        layer.forward_into(xt.t(), out.view_mut(), scratch).unwrap();
        assert_eq!(bits(out.view()), bits(want.view()), "T = {t}, strided x");
    }
}

#[test]
fn moe_forward_into_equals_forward() {
    let mut scratch = Scratch::default();
    for (seed, k) in [(1, 1), (2, 2)] {
        let dims = Dims {
            h: 24,
            i: 12,
            e: 6,
            k,
        };
        let mut rng = Rng::new(seed);
        let raw = RawMoe::random(&mut rng, dims);
        for dtype in [DType::F32, DType::BF16] {
            for placement in [WeightPlacement::ExpertInput, WeightPlacement::ExpertOutput] {
                let moe = raw.build(dtype, placement);
                check_forward_into(&moe, dims.h, &mut rng, &mut scratch);
                let softmax = moe
                    .with_router(Box::new(
                        SoftmaxTopKRouter::new(router_weight(&raw, dtype), k, k > 1).unwrap(),
                    ))
                    .unwrap();
                check_forward_into(&softmax, dims.h, &mut rng, &mut scratch);
            }
        }
    }
}

#[test]
fn moe_without_shared_expert_forward_into_equals_forward() {
    let dims = Dims {
        h: 16,
        i: 8,
        e: 4,
        k: 2,
    };
    let mut rng = Rng::new(9);
    let raw = RawMoe::random(&mut rng, dims);
    let with_shared = raw.build(DType::F32, WeightPlacement::ExpertInput);
    let moe = Moe::new(
        Box::new(Llama4Router::new(router_weight(&raw, DType::F32), dims.k).unwrap()),
        with_shared.experts().clone(),
        None,
        WeightPlacement::ExpertInput,
    )
    .unwrap();
    check_forward_into(&moe, dims.h, &mut rng, &mut Scratch::default());
}

#[test]
fn mlp_forward_into_equals_forward() {
    let mut scratch = Scratch::default();
    for dtype in [DType::F32, DType::BF16] {
        let mut rng = Rng::new(4);
        let dims = Dims {
            h: 20,
            i: 36,
            e: 2,
            k: 1,
        };
        let mlp = raw_mlp(&mut rng, dims, dtype);
        check_forward_into(&mlp, dims.h, &mut rng, &mut scratch);
    }
}

fn raw_mlp(rng: &mut Rng, dims: Dims, dtype: DType) -> moe_router::Mlp {
    let moe = RawMoe::random(rng, dims).build(dtype, WeightPlacement::ExpertInput);
    moe.shared_expert().unwrap().clone()
}

/// One scratch serves layers of different sizes, in turn.
#[test]
fn one_scratch_serves_layers_of_different_sizes() {
    let mut rng = Rng::new(12);
    let small = RawMoe::random(
        &mut rng,
        Dims {
            h: 8,
            i: 4,
            e: 3,
            k: 1,
        },
    )
    .build(DType::F32, WeightPlacement::ExpertInput);
    let big = RawMoe::random(
        &mut rng,
        Dims {
            h: 32,
            i: 40,
            e: 9,
            k: 2,
        },
    )
    .build(DType::F32, WeightPlacement::ExpertInput);
    let mut scratch = Scratch::default();
    for _ in 0..2 {
        check_forward_into(&big, 32, &mut rng, &mut scratch);
        check_forward_into(&small, 8, &mut rng, &mut scratch);
        check_forward_into(big.shared_expert().unwrap(), 32, &mut rng, &mut scratch);
    }
}

/// The MoE output is, bit for bit, its parts added in the documented order: the shared
/// expert, then each selected expert once over its tokens, in ascending expert order (the
/// computation before `forward_into` existed, rebuilt from public pieces).
#[test]
fn moe_forward_into_is_its_parts_in_order() {
    for placement in [WeightPlacement::ExpertInput, WeightPlacement::ExpertOutput] {
        let dims = Dims {
            h: 16,
            i: 8,
            e: 5,
            k: 2,
        };
        let mut rng = Rng::new(21);
        let moe = RawMoe::random(&mut rng, dims).build(DType::BF16, placement);
        let x = rng.array(11, dims.h, 2.0);
        let routing = moe.router().route(x.view()).unwrap();
        let groups = ExpertGroups::from_routing(&routing);
        let mut want = moe.shared_expert().unwrap().forward(x.view()).unwrap();
        for e in groups.active_experts() {
            let (tokens, weights) = (groups.tokens(e), groups.weights(e));
            let mut rows = Array2::zeros((tokens.len(), dims.h));
            for (r, (&tok, &w)) in tokens.iter().zip(weights).enumerate() {
                let scale = if placement == WeightPlacement::ExpertInput {
                    w
                } else {
                    1.0
                };
                rows.row_mut(r).assign(&x.row(tok as usize).mapv(|v| v * scale));
            }
            let y = moe.experts().forward_expert(e, rows.view()).unwrap();
            for (r, (&tok, &w)) in tokens.iter().zip(weights).enumerate() {
                let scale = if placement == WeightPlacement::ExpertOutput {
                    w
                } else {
                    1.0
                };
                let mut orow = want.row_mut(tok as usize);
                orow.iter_mut().zip(y.row(r)).for_each(|(o, &v)| *o += scale * v);
            }
        }
        let mut out = Array2::zeros(x.dim());
        moe.forward_into(x.view(), out.view_mut(), &mut Scratch::default())
            .unwrap();
        assert_eq!(bits(out.view()), bits(want.view()), "{placement:?}");
    }
}

#[test]
fn forward_into_updates_stats_as_forward_does() {
    let dims = Dims {
        h: 16,
        i: 8,
        e: 6,
        k: 2,
    };
    let mut rng = Rng::new(5);
    let raw = RawMoe::random(&mut rng, dims);
    let (a, b) = (
        raw.build(DType::F32, WeightPlacement::ExpertInput),
        raw.build(DType::F32, WeightPlacement::ExpertInput),
    );
    let mut scratch = Scratch::default();
    for t in SIZES {
        let x = rng.array(t, dims.h, 2.0);
        a.forward(x.view()).unwrap();
        let mut out = Array2::zeros((t, dims.h));
        b.forward_into(x.view(), out.view_mut(), &mut scratch).unwrap();
    }
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.tokens_per_expert(), sb.tokens_per_expert());
    assert_eq!(sa.tokens(), sb.tokens());
    assert_eq!(sa.forward_calls(), sb.forward_calls());
    assert_eq!(sa.weight_bytes_read(), sb.weight_bytes_read());
    assert_eq!(sb.forward_calls(), SIZES.len() as u64);
}

#[test]
fn wrong_output_shape_is_an_error() {
    let dims = Dims {
        h: 8,
        i: 4,
        e: 3,
        k: 1,
    };
    let mut rng = Rng::new(3);
    let moe = RawMoe::random(&mut rng, dims).build(DType::F32, WeightPlacement::ExpertInput);
    let custom = Doubler;
    let x = rng.array(2, dims.h, 1.0);
    let mut scratch = Scratch::default();
    let layers: [&dyn FeedForward; 3] = [&moe, moe.shared_expert().unwrap(), &custom];
    for layer in layers {
        for (shape, expected, got) in [((3, 8), 2, 3), ((2, 7), 8, 7), ((1, 8), 2, 1)] {
            let mut out = Array2::zeros(shape);
            let err = layer.forward_into(x.view(), out.view_mut(), &mut scratch);
            assert!(
                matches!(err, Err(Error::Mismatch { expected: e, got: g, .. }) if e == expected && g == got),
                "{layer:?} into {shape:?}: {err:?}"
            );
        }
    }
    assert_eq!(moe.stats().forward_calls(), 0, "nothing ran");
}

/// A researcher's feed-forward that only implements `forward`: `2x`.
#[derive(Debug)]
struct Doubler;

impl FeedForward for Doubler {
    fn forward(&self, x: ArrayView2<f32>) -> Result<Array2<f32>> {
        Ok(x.mapv(|v| 2.0 * v))
    }
}

#[test]
fn provided_forward_into_calls_forward() {
    let mut rng = Rng::new(8);
    check_forward_into(&Doubler, 5, &mut rng, &mut Scratch::default());
}

/// A researcher's router that only implements `route`: every token to expert `t mod E`.
#[derive(Debug)]
struct RoundRobin {
    e: usize,
    h: usize,
}

impl Router for RoundRobin {
    fn num_experts(&self) -> usize {
        self.e
    }

    fn top_k(&self) -> usize {
        1
    }

    fn hidden_size(&self) -> usize {
        self.h
    }

    fn route(&self, x: ArrayView2<f32>) -> Result<Routing> {
        let t = x.nrows();
        Routing::new(
            self.e,
            1,
            (0..t).map(|t| (t % self.e) as u32).collect(),
            vec![0.5; t],
        )
    }
}

#[test]
fn route_into_equals_route_reusing_the_routing() {
    let dims = Dims {
        h: 16,
        i: 4,
        e: 7,
        k: 3,
    };
    let mut rng = Rng::new(17);
    let raw = RawMoe::random(&mut rng, dims);
    let routers: Vec<Box<dyn Router>> = vec![
        Box::new(Llama4Router::new(router_weight(&raw, DType::BF16), dims.k).unwrap()),
        Box::new(Llama4Router::new(router_weight(&raw, DType::F32), 1).unwrap()),
        Box::new(SoftmaxTopKRouter::new(router_weight(&raw, DType::F32), dims.k, false).unwrap()),
        Box::new(SoftmaxTopKRouter::new(router_weight(&raw, DType::BF16), 2, true).unwrap()),
        Box::new(RoundRobin { e: dims.e, h: dims.h }),
    ];
    let (mut routing, mut buf) = (Routing::default(), Vec::new());
    for _ in 0..2 {
        for router in &routers {
            for t in SIZES {
                let x = rng.array(t, dims.h, 2.0);
                router.route_into(x.view(), &mut routing, &mut buf).unwrap();
                assert_eq!(routing, router.route(x.view()).unwrap(), "{router:?}, T = {t}");
            }
        }
    }
    // A wrong input width is an error, as for `route`.
    let x = Array2::zeros((2, dims.h + 1));
    assert!(routers[0].route_into(x.view(), &mut routing, &mut buf).is_err());
}

#[test]
fn routing_functions_accept_strided_logits() {
    let mut rng = Rng::new(2);
    let logits = rng.array(6, 9, 4.0);
    let strided = logits.t().to_owned();
    let mut probs = vec![0.0; 9];
    let mut routing = Routing::default();
    softmax_top_k_into(strided.t(), 2, true, &mut probs, &mut routing).unwrap();
    assert_eq!(routing, softmax_top_k(logits.view(), 2, true).unwrap());
    assert_eq!(
        sigmoid_top_k(strided.t(), 3).unwrap(),
        sigmoid_top_k(logits.view(), 3).unwrap()
    );
    assert!(matches!(
        softmax_top_k_into(logits.view(), 2, true, &mut probs[..8], &mut routing),
        Err(Error::Mismatch {
            expected: 9,
            got: 8,
            ..
        })
    ));
}

#[test]
fn regroup_equals_from_routing_reusing_the_groups() {
    let mut rng = Rng::new(31);
    let mut groups = ExpertGroups::default();
    assert_eq!(groups.num_experts(), 0);
    assert!(groups.is_empty());
    // Many tokens, then fewer, then none, then more experts, then fewer.
    for (t, e, k) in [
        (40, 8, 2),
        (3, 8, 2),
        (1, 8, 1),
        (0, 8, 2),
        (25, 16, 4),
        (5, 3, 3),
        (2, 8, 1),
    ] {
        let logits = rng.array(t, e, 3.0);
        let routing = sigmoid_top_k(logits.view(), k).unwrap();
        groups.regroup(&routing);
        assert_eq!(
            groups,
            ExpertGroups::from_routing(&routing),
            "T = {t}, E = {e}, k = {k}"
        );
        // And what grouping means, independently of `from_routing`.
        assert_eq!(groups.num_experts(), e);
        for x in 0..e {
            let want: Vec<(u32, f32)> = (0..t)
                .filter_map(|tok| {
                    let slot = routing.experts_of(tok).iter().position(|&y| y as usize == x)?;
                    Some((tok as u32, routing.weights_of(tok)[slot]))
                })
                .collect();
            let got: Vec<(u32, f32)> = groups
                .tokens(x)
                .iter()
                .copied()
                .zip(groups.weights(x).iter().copied())
                .collect();
            assert_eq!(got, want, "expert {x}, T = {t}, E = {e}, k = {k}");
        }
    }
}

#[test]
fn default_routing_and_groups_are_empty() {
    let r = Routing::default();
    assert_eq!((r.num_tokens(), r.num_experts()), (0, 0));
    let g = ExpertGroups::from_routing(&r);
    assert_eq!((g.num_experts(), g.max_len()), (0, 0));
    assert_eq!(g.active_experts().count(), 0);
}

#[test]
fn scratch_is_send() {
    fn send<T: Send>() {}
    send::<Scratch>();
}
