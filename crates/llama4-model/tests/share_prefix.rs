//! Sessions that share a prefix's cache pages compute what a session that ran the prefix
//! itself computes, and neither sees the other's later tokens.

use llama4_core::DType;
use llama4_model::{Logits, Session, TextModel};

mod common;
use common::{fixture_dir, rel_err, text_reference};

const TOL: f32 = 1e-4;

#[test]
fn a_shared_prefix_continues_like_the_reference_and_leaves_the_source_alone() {
    let dir = fixture_dir("scout");
    let model = TextModel::load(&dir).unwrap();
    let r = text_reference(&dir);
    let all: Vec<u32> = r.prompt.iter().chain(&r.generated).copied().collect();
    let n = all.len();
    // Pages of 3 positions: a shared prefix ends inside a page, which the continuation copies.
    let mut source = Session::new(&model, DType::F32)
        .unwrap()
        .with_page_len(3)
        .unwrap();
    source.prefill(&all, Logits::Last).unwrap();
    let keys = |s: &Session<&TextModel>| {
        (0..s.cache().num_layers())
            .map(|i| s.cache().layer(i).unwrap().keys_f32())
            .collect::<Vec<_>>()
    };
    let before = keys(&source);
    let mut held_any_chunk_start = false;
    for want in [1, 5, 9, n - 3, n] {
        let mut s = Session::new(&model, DType::F32)
            .unwrap()
            .with_page_len(3)
            .unwrap();
        let held = s.share_prefix(&source, want).unwrap();
        assert!(held <= want && held == s.len() && s.tokens() == &all[..held]);
        held_any_chunk_start |= held < want;
        if held == n {
            continue;
        }
        assert!(s.cache().layer(0).unwrap().shared_pages() > 0 || held == 0);
        let logits = s.prefill(&all[held..], Logits::All).unwrap();
        let e = rel_err(logits.view(), r.logits_full.slice(ndarray::s![held.., ..]));
        assert!(e < TOL, "prefix of {held}: logits off by {e:e}");
    }
    // Some requests lowered to a chunk start: the chunked layers had moved on.
    assert!(held_any_chunk_start);
    assert_eq!(keys(&source), before, "the source's keys changed");

    // Another model's session: refused, nothing changed.
    let other = TextModel::load(fixture_dir("maverick")).unwrap();
    let mut s = Session::new(&other, DType::F32).unwrap();
    s.prefill(&all[..2], Logits::Last).unwrap();
    assert!(s.share_prefix(&source, 5).is_err());
    assert_eq!(s.tokens(), &all[..2]);
}
