//! `forward_batch` against single-session runs: several sessions of mixed lengths, decode steps
//! and prefill pieces in one pass, pieces that cross the fixtures' 8-token attention chunks. The
//! logits of every entry equal what the same sequence gives alone (1e-5 of the largest logit),
//! and a bad entry is refused by name with no session changed.

use llama4_core::DType;
use llama4_model::{forward_batch, BatchEntry, Error, Logits, Session, TextModel, Workspace};
use llama4_testkit::Rng;
use ndarray::Array2;

mod common;

const TOL: f32 = 1e-5;

/// max |a − b| / max |b| over one row of logits.
fn row_err(a: &[f32], b: &[f32]) -> f32 {
    llama4_testkit::rel_err(a, b) as f32
}

/// The logits after every position of `seq` when it runs alone: its first `prompt` tokens as
/// one prefill, the rest as decode steps.
fn alone(model: &TextModel, seq: &[u32], prompt: usize) -> Vec<Vec<f32>> {
    let mut s = Session::new(model, DType::F32).unwrap();
    let pre = s.prefill(&seq[..prompt], Logits::All).unwrap();
    let mut rows: Vec<Vec<f32>> = pre.rows().into_iter().map(|r| r.to_vec()).collect();
    for &t in &seq[prompt..] {
        rows.push(s.step_logits(t).unwrap().to_vec());
    }
    rows
}

/// Random token ids below `vocab`.
fn tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

/// Runs `steps` (each a list of `(sequence, end)`: the sequence's next tokens up to position
/// `end`) through `forward_batch` and checks every entry's logits against `alone`.
fn run_schedule(
    name: &str,
    model: &TextModel,
    seqs: &[Vec<u32>],
    prompts: &[usize],
    steps: &[&[(usize, usize)]],
) {
    let want: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .zip(prompts)
        .map(|(s, &p)| alone(model, s, p))
        .collect();
    let mut sessions: Vec<Session<&TextModel>> = seqs
        .iter()
        .map(|_| Session::new(model, DType::F32).unwrap())
        .collect();
    let mut ws = Workspace::new();
    let mut worst = 0.0f32;
    for (k, step) in steps.iter().enumerate() {
        // Entries in the step's order, which is not the sessions' order.
        let mut by_seq: Vec<Option<&mut Session<&TextModel>>> = sessions.iter_mut().map(Some).collect();
        let mut entries = Vec::new();
        for &(i, end) in step.iter() {
            let session = by_seq[i].take().expect("one entry per session in a step");
            let start = session.len();
            entries.push(BatchEntry {
                session,
                tokens: &seqs[i][start..end],
                embeddings: None,
            });
        }
        let logits = forward_batch(model, &mut entries, &mut ws).unwrap();
        assert_eq!(logits.nrows(), step.len());
        for (r, &(i, end)) in step.iter().enumerate() {
            let got = logits.row(r).to_vec();
            let e = row_err(&got, &want[i][end - 1]);
            assert!(e < TOL, "{name}: step {k}, sequence {i} at {end}: off by {e:e}");
            worst = worst.max(e);
        }
        drop(entries);
        for &(i, end) in step.iter() {
            assert_eq!(sessions[i].len(), end);
            assert_eq!(sessions[i].tokens(), &seqs[i][..end]);
        }
    }
    println!("{name}: {} steps, worst {worst:.2e}", steps.len());
}

/// Four sequences: prompts of 3, 7, 13 and 21 tokens, prefilled in pieces beside the decode
/// steps of the others; the pieces and the decodes cross positions 8, 16 and 24.
fn mixed(name: &str) {
    let model = TextModel::load(common::fixture_dir(name)).unwrap();
    let vocab = model.config().vocab_size;
    let mut rng = Rng::new(20);
    let prompts = [3, 7, 13, 21];
    let lens = [14, 12, 19, 27];
    let seqs: Vec<Vec<u32>> = lens.iter().map(|&n| tokens(&mut rng, n, vocab)).collect();
    let steps: &[&[(usize, usize)]] = &[
        &[(0, 3), (1, 5), (2, 4)],
        // 0 decodes; 1 finishes its prompt; 2 crosses 8; 3 starts.
        &[(0, 4), (1, 7), (2, 10), (3, 9)],
        &[(3, 17), (0, 5), (1, 8), (2, 13)],
        &[(2, 14), (3, 21), (1, 9), (0, 6)],
        &[(0, 7), (1, 10), (2, 15), (3, 22)],
        &[(0, 8), (1, 11), (2, 16), (3, 23)],
        &[(0, 9), (1, 12), (2, 17), (3, 24)],
        &[(0, 10), (2, 18), (3, 25)],
        // A sequence alone in a step, then the rest.
        &[(3, 26)],
        &[(0, 14), (2, 19), (3, 27)],
    ];
    run_schedule(name, &model, &seqs, &prompts, steps);
}

#[test]
fn mixed_batch_equals_single_sessions_scout() {
    mixed("scout");
}

#[test]
fn mixed_batch_equals_single_sessions_top2_tied() {
    // Two experts per token, no chunking.
    mixed("top2_tied");
}

#[test]
fn mixed_batch_equals_single_sessions_maverick() {
    // Dense and MoE layers interleaved, bf16 weights.
    mixed("maverick");
}

#[test]
fn embeddings_entry_equals_token_entry() {
    let model = TextModel::load(common::fixture_dir("scout")).unwrap();
    let vocab = model.config().vocab_size;
    let mut rng = Rng::new(7);
    let a = tokens(&mut rng, 11, vocab);
    let b = tokens(&mut rng, 5, vocab);
    let want_a = alone(&model, &a, 11);
    let want_b = alone(&model, &b, 5);
    let emb = model.embed(&a).unwrap();
    let mut sa = Session::new(&model, DType::F32).unwrap();
    let mut sb = Session::new(&model, DType::F32).unwrap();
    let mut ws = Workspace::new();
    let mut entries = [
        BatchEntry {
            session: &mut sa,
            tokens: &a,
            embeddings: Some(emb.view()),
        },
        BatchEntry {
            session: &mut sb,
            tokens: &b,
            embeddings: None,
        },
    ];
    let logits = forward_batch(&model, &mut entries, &mut ws).unwrap();
    assert!(row_err(logits.row(0).as_slice().unwrap(), &want_a[10]) < TOL);
    assert!(row_err(logits.row(1).as_slice().unwrap(), &want_b[4]) < TOL);
}

/// A bad second entry: its tokens, its embeddings, whether its session holds another model.
type Case<'a> = (&'a [u32], Option<ndarray::ArrayView2<'a, f32>>, bool);

/// The entry index and the reason of a refused batch.
fn refused(e: Error) -> (usize, Error) {
    match e {
        Error::BatchEntry { entry, source } => (entry, *source),
        other => panic!("expected a refused entry, got {other}"),
    }
}

#[test]
fn bad_entries_are_refused_and_change_nothing() {
    let model = TextModel::load(common::fixture_dir("scout")).unwrap();
    let other = TextModel::load(common::fixture_dir("scout")).unwrap();
    let vocab = model.config().vocab_size;
    let mut rng = Rng::new(3);
    let a = tokens(&mut rng, 6, vocab);
    let b = tokens(&mut rng, 4, vocab);
    let want_a = alone(&model, &[a.clone(), vec![a[0]]].concat(), 6);
    let mut sa = Session::new(&model, DType::F32).unwrap();
    sa.prefill(&a, Logits::Last).unwrap();
    let mut sb = Session::new(&model, DType::F32).unwrap().with_max_len(5);
    let mut ws = Workspace::new();

    let empty: &mut [BatchEntry<'_, &TextModel>] = &mut [];
    assert!(matches!(
        forward_batch(&model, empty, &mut ws),
        Err(Error::Empty(_))
    ));

    let bad_id = [vocab as u32];
    let wrong_emb = Array2::<f32>::zeros((2, model.config().hidden_size()));
    let mut s_other = Session::new(&other, DType::F32).unwrap();
    let cases: Vec<Case<'_>> = vec![
        (&[], None, false),
        (&bad_id, None, false),
        (&b[..3], Some(wrong_emb.view()), false),
        // Past the second session's limit of 5 (it holds 0 and gets 6).
        (&a, None, false),
        // A session of another model.
        (&b, None, true),
    ];
    for (k, (toks, emb, foreign)) in cases.into_iter().enumerate() {
        let second = if foreign { &mut s_other } else { &mut sb };
        let mut entries = [
            BatchEntry {
                session: &mut sa,
                tokens: std::slice::from_ref(&a[0]),
                embeddings: None,
            },
            BatchEntry {
                session: second,
                tokens: toks,
                embeddings: emb,
            },
        ];
        let (entry, why) = refused(forward_batch(&model, &mut entries, &mut ws).unwrap_err());
        assert_eq!(entry, 1, "case {k}");
        match k {
            0 => assert!(matches!(why, Error::Empty(_)), "case {k}: {why}"),
            1 => assert!(matches!(why, Error::TokenOutOfRange { id, .. } if id as usize == vocab)),
            2 => assert!(matches!(why, Error::Core(_)), "case {k}: {why}"),
            3 => assert!(matches!(why, Error::ContextOverflow { tokens: 6, limit: 5 })),
            _ => assert!(
                matches!(why, Error::Config { field: "session", .. }),
                "case {k}: {why}"
            ),
        }
        assert_eq!(sa.len(), 6, "case {k}: the good entry ran");
        assert_eq!(sb.len(), 0);
        assert_eq!(s_other.len(), 0);
    }

    // The sessions are as before: the good entry still gives its single-session logits.
    let mut entries = [BatchEntry {
        session: &mut sa,
        tokens: std::slice::from_ref(&a[0]),
        embeddings: None,
    }];
    let logits = forward_batch(&model, &mut entries, &mut ws).unwrap();
    let e = row_err(logits.row(0).as_slice().unwrap(), &want_a[6]);
    assert!(e < TOL, "after refusals: off by {e:e}");
}
