//! Heap allocations of the attention kernel in steady state: none, once its scratch has seen
//! the shapes. The counting allocator sees every thread of this binary, so the binary holds
//! this one test (libtest runs the tests of a binary concurrently).

use half::bf16;
use llama4_core::alloc_count::CountingAllocator;
use llama4_core::kernels::attention::{attention_with_into, AttentionScratch, AttnContext};
use llama4_core::kernels::available_isas;
use llama4_core::{KvData, KvView, LayerKind};
use ndarray::Array3;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

use llama4_testkit::values;

#[test]
fn steady_state_calls_allocate_nothing() {
    // Decoding in Scout's head layout at D = 64 over 300 cached keys (bf16 and f32), a chunked
    // layer whose chunk starts inside the cache, a few tokens of speculative decoding, and a
    // short prefill (the rows-in-lanes kernel on AVX-512): one scratch for all, as a session.
    let (hq, hkv, d, len) = (16, 4, 64, 300);
    let q1 = Array3::from_shape_vec((1, hq, d), values(hq * d, 1)).unwrap();
    let q4 = Array3::from_shape_vec((4, hq, d), values(4 * hq * d, 2)).unwrap();
    let q64 = Array3::from_shape_vec((64, hq, d), values(64 * hq * d, 3)).unwrap();
    let kf = values(hkv * len * d, 4);
    let vf = values(hkv * len * d, 5);
    let kb: Vec<bf16> = kf.iter().map(|&x| bf16::from_f32(x)).collect();
    let vb: Vec<bf16> = vf.iter().map(|&x| bf16::from_f32(x)).collect();
    let view = |data| KvView::contiguous(data, hkv, len, d, len * d, 0);
    let (kb, vb, kf, vf) = (
        view(KvData::BF16(&kb)),
        view(KvData::BF16(&vb)),
        view(KvData::F32(&kf)),
        view(KvData::F32(&vf)),
    );
    let last = [len - 1];
    let last4: Vec<usize> = (len - 4..len).collect();
    let last64: Vec<usize> = (len - 64..len).collect();
    let (global, chunked) = (LayerKind::Global, LayerKind::chunked(128).unwrap());
    let ctx = |positions, mask| AttnContext {
        positions,
        mask,
        scale: 0.125,
    };
    let calls = [
        (&q1, &kb, &vb, ctx(&last[..], &global)),
        (&q1, &kf, &vf, ctx(&last[..], &global)),
        (&q1, &kb, &vb, ctx(&last[..], &chunked)),
        (&q4, &kb, &vb, ctx(&last4[..], &chunked)),
        (&q64, &kb, &vb, ctx(&last64[..], &global)),
    ];
    let mut outs: Vec<Array3<f32>> = calls.iter().map(|c| Array3::zeros(c.0.dim())).collect();

    // And a cache that grows by 450 keys a round, over one kv head: decoding splits its keys
    // between threads, into more pieces as it grows (up to 4 on 2 threads). With a scratch of
    // its own, which the other calls would have grown.
    const ROUNDS: usize = 13;
    let grown = |round: usize| 300 + 450 * round;
    let cap = grown(ROUNDS - 1);
    let kg: Vec<bf16> = values(cap * d, 6).iter().map(|&x| bf16::from_f32(x)).collect();
    let vg: Vec<bf16> = values(cap * d, 7).iter().map(|&x| bf16::from_f32(x)).collect();
    let positions: Vec<[usize; 1]> = (0..ROUNDS).map(|r| [grown(r) - 1]).collect();
    let mut out_g = Array3::<f32>::zeros((1, hq, d));

    let isas = available_isas();
    let mut scratch = AttentionScratch::default();
    let mut scratch_g = AttentionScratch::default();
    let mut round = |r: usize, scratch: &mut AttentionScratch| {
        for &isa in &isas {
            for ((q, k, v, ctx), out) in calls.iter().zip(&mut outs) {
                attention_with_into(isa, q.view(), k, v, ctx, out.view_mut(), scratch).unwrap();
            }
            let k = KvView::contiguous(KvData::BF16(&kg), 1, grown(r), d, cap * d, 0);
            let v = KvView::contiguous(KvData::BF16(&vg), 1, grown(r), d, cap * d, 0);
            let ctx = ctx(&positions[r][..], &global);
            attention_with_into(isa, q1.view(), &k, &v, &ctx, out_g.view_mut(), &mut scratch_g).unwrap();
        }
    };
    for r in 0..3 {
        round(r, &mut scratch);
    }
    let before = ALLOC.allocations();
    for r in 3..ROUNDS {
        round(r, &mut scratch);
    }
    let allocs = ALLOC.allocations() - before;
    assert_eq!(
        allocs, 0,
        "{allocs} allocations in 10 rounds of steady-state calls"
    );
    // The calls did run.
    assert!(outs.iter().chain([&out_g]).all(|o| o.iter().any(|&x| x != 0.0)));
}
