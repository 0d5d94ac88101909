//! Steady-state `forward_into` calls allocate nothing.
//!
//! A counting global allocator sees every allocation of the process, so this binary holds ONE
//! test: nothing else may run while it counts.

mod common;

use common::{Dims, RawMoe, Rng};
use llama4_core::alloc_count::CountingAllocator;
use llama4_core::DType;
use moe_router::{FeedForward, Scratch, WeightPlacement};
use ndarray::Array2;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

#[test]
fn steady_state_forward_into_allocates_nothing() {
    let dims = Dims {
        h: 64,
        i: 32,
        e: 16,
        k: 1,
    };
    let mut rng = Rng::new(42);
    let raw = RawMoe::random(&mut rng, dims);
    let moe = raw.build(DType::BF16, WeightPlacement::ExpertInput);
    let mlp = moe.shared_expert().expect("built with a shared expert").clone();
    let layers: [(&str, &dyn FeedForward); 2] = [("moe", &moe), ("mlp", &mlp)];
    // Inputs and outputs made up front: only the calls are counted.
    let x1 = rng.array(1, dims.h, 2.0);
    let x8 = rng.array(8, dims.h, 2.0);
    let (mut out1, mut out8) = (Array2::zeros((1, dims.h)), Array2::zeros((8, dims.h)));

    for (name, layer) in layers {
        let mut scratch = Scratch::default();
        let mut call = |x: &Array2<f32>, out: &mut Array2<f32>| {
            layer
                .forward_into(x.view(), out.view_mut(), &mut scratch)
                .expect("forward_into");
        };
        // Warm-up: buffers, the kernels' thread-local buffers and the thread pool.
        for _ in 0..3 {
            call(&x1, &mut out1);
        }
        let n = ALLOC.count(|| {
            for _ in 0..10 {
                call(&x1, &mut out1);
            }
        });
        assert_eq!(n, 0, "{name}: allocations over 10 decode calls after warm-up");

        // A larger call grows the buffers once; smaller ones after it reuse them.
        call(&x8, &mut out8);
        let n = ALLOC.count(|| {
            for _ in 0..10 {
                call(&x1, &mut out1);
            }
        });
        assert_eq!(n, 0, "{name}: allocations over 10 decode calls after a T=8 call");
        let n = ALLOC.count(|| call(&x8, &mut out8));
        assert_eq!(n, 0, "{name}: allocations of a second T=8 call");
    }
    assert_eq!(moe.stats().forward_calls(), 3 + 10 + 1 + 10 + 1);
}
