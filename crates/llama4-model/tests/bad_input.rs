//! Bad input gets a clear error, never a panic: broken checkpoints, prompts over the context
//! limit, ids outside the vocabulary, invalid sampling settings.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use llama4_core::DType;
use llama4_model::{Error, GenerateOptions, Logits, Sampler, SamplingConfig, Session, TextModel, Workspace};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

/// A copy of the scout fixture in a temporary directory.
fn scout_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("scout").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// Rewrites `dir/model.safetensors` with `edit` applied to its tensors.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn missing_tensor_names_it() {
    let dir = scout_copy();
    rewrite(dir.path(), |t| {
        t.remove("model.layers.2.feed_forward.router.weight");
    });
    let err = TextModel::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Moe(moe_router::Error::Core(llama4_core::Error::MissingTensor { name, .. }))
            if name == "model.layers.2.feed_forward.router.weight"),
        "{err:?}"
    );
}

#[test]
fn mis_shaped_tensor_names_it_and_both_shapes() {
    let dir = scout_copy();
    rewrite(dir.path(), |t| {
        let e = t.get_mut("model.layers.0.input_layernorm.weight").unwrap();
        e.1 = vec![32];
        e.2.truncate(32 * 4);
    });
    let err = TextModel::load(dir.path()).unwrap_err();
    match &err {
        Error::Core(llama4_core::Error::ShapeMismatch {
            name, expected, got, ..
        }) => {
            assert_eq!(name, "model.layers.0.input_layernorm.weight");
            assert_eq!(
                (expected.as_slice(), got.as_slice()),
                (&[64usize][..], &[32usize][..])
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn config_that_disagrees_with_the_weights_is_a_shape_error() {
    let dir = scout_copy();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"intermediate_size\": 32", "\"intermediate_size\": 48");
    std::fs::write(&path, text).unwrap();
    let err = TextModel::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("gate_up_proj"), "{err}");
}

#[test]
fn malformed_config_json_and_missing_weights() {
    let dir = scout_copy();
    std::fs::write(dir.path().join("config.json"), b"{\"hidden_size\": 64,").unwrap();
    assert!(matches!(
        TextModel::load(dir.path()),
        Err(Error::ConfigJson { .. })
    ));

    let dir = scout_copy();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(matches!(
        TextModel::load(dir.path()),
        Err(Error::Core(llama4_core::Error::NoCheckpoint { .. }))
    ));
}

#[test]
fn truncated_weights_file() {
    let dir = scout_copy();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        TextModel::load(dir.path()),
        Err(Error::Core(llama4_core::Error::OutOfBounds { .. }))
    ));
}

#[test]
fn prompt_over_the_context_limit_is_refused_and_the_session_is_unchanged() {
    let model = TextModel::load(fixture("scout")).unwrap();
    let mut s = Session::new(&model, DType::F32).unwrap().with_max_len(16);
    s.prefill(&[5; 10], Logits::Last).unwrap();
    let is_17_of_16 = |e: &Error| {
        matches!(
            e,
            Error::ContextOverflow {
                tokens: 17,
                limit: 16
            }
        )
    };
    let err = s.prefill(&[5; 7], Logits::Last).unwrap_err();
    assert!(is_17_of_16(&err), "{err:?}");
    assert_eq!(s.len(), 10);
    s.prefill(&[5; 6], Logits::Last).unwrap();

    // Generation checks prompt + new tokens before running anything, without overflow, and
    // says when the new tokens are the cause.
    let mut s = Session::new(&model, DType::F32).unwrap().with_max_len(16);
    for max_new_tokens in [8, usize::MAX - 5, usize::MAX] {
        let opts = GenerateOptions {
            max_new_tokens,
            ..GenerateOptions::default()
        };
        let err = s
            .generate(&[5; 10], &opts, |_| ControlFlow::Continue(()))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::MaxNewTokens {
                    prompt: 10,
                    limit: 16,
                    most: 7,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("max_new_tokens"), "{err}");
        assert!(s.is_empty());
    }
    let err = s
        .generate(&[5; 17], &GenerateOptions::default(), |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(is_17_of_16(&err), "{err:?}");
}

#[test]
fn token_ids_outside_the_vocabulary_and_empty_prompts() {
    let model = TextModel::load(fixture("scout")).unwrap();
    let mut s = Session::new(&model, DType::F32).unwrap();
    assert!(matches!(
        s.prefill(&[1, 512], Logits::Last),
        Err(Error::TokenOutOfRange { id: 512, vocab: 512 })
    ));
    assert!(matches!(s.prefill(&[], Logits::Last), Err(Error::Empty(_))));
    assert!(s.is_empty());
    s.prefill(&[1, 2], Logits::Last).unwrap();
    assert!(matches!(
        s.step_logits(600),
        Err(Error::TokenOutOfRange { id: 600, vocab: 512 })
    ));
    assert_eq!(s.tokens(), &[1, 2]);
    let mut s = s.with_max_len(3);
    s.step_logits(3).unwrap();
    assert!(matches!(
        s.step_logits(4),
        Err(Error::ContextOverflow { tokens: 4, limit: 3 })
    ));
    assert_eq!(s.tokens(), &[1, 2, 3]);
}

#[test]
fn buffers_of_the_wrong_shape_are_errors() {
    let model = TextModel::load(fixture("scout")).unwrap();
    let h = model.config().hidden_size();
    let mut wrong = ndarray::Array2::zeros((2, h + 1));
    assert!(matches!(
        model.embed_into(&[1, 2], wrong.view_mut()),
        Err(Error::Core(llama4_core::Error::Shape { .. }))
    ));
    let mut short = ndarray::Array2::zeros((1, h));
    assert!(matches!(
        model.embed_into(&[1, 2], short.view_mut()),
        Err(Error::Core(llama4_core::Error::Shape { .. }))
    ));
    let mut cache = model.new_cache(DType::F32).unwrap();
    let mut ws = Workspace::new();
    assert!(matches!(
        model.forward_hidden_in(wrong.view_mut(), &mut cache, &mut ws),
        Err(Error::Core(llama4_core::Error::Shape { .. }))
    ));
    assert!(cache.is_empty());
    let mut s = Session::new(&model, DType::F32).unwrap();
    assert!(matches!(
        s.prefill_embeddings(&[1, 2], wrong, Logits::Last),
        Err(Error::Core(llama4_core::Error::Shape { .. }))
    ));
    assert!(s.is_empty());
}

#[test]
fn invalid_sampling_settings() {
    for cfg in [
        SamplingConfig {
            temperature: -1.0,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            temperature: f32::NAN,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            top_p: Some(0.0),
            ..SamplingConfig::default()
        },
        SamplingConfig {
            top_p: Some(1.5),
            ..SamplingConfig::default()
        },
    ] {
        assert!(matches!(Sampler::new(cfg), Err(Error::Sampling(_))), "{cfg:?}");
    }
    let mut s = Sampler::new(SamplingConfig::greedy()).unwrap();
    assert!(matches!(s.sample(&[]), Err(Error::Empty(_))));
}

#[test]
fn malformed_held_out_sets_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = llama4_model::heldout::cases(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    for (text, says) in [
        ("{\"prompt\": \"a\"}", "not a list"),
        ("[{\"prompt\": \"a\", \"answer\": 3}]", "entry 0"),
        ("[{\"prompt\": \"a\", \"answer\": \"b\"}, {}]", "entry 1"),
        ("[{\"prompt\": \"a\"", "EOF"),
    ] {
        std::fs::write(dir.path().join("heldout.json"), text).unwrap();
        let err = llama4_model::heldout::cases(dir.path()).unwrap_err();
        assert!(matches!(err, Error::HeldOut { .. }), "{text}: {err}");
        assert!(
            err.to_string().contains("heldout.json") && err.to_string().contains(says),
            "{err}"
        );
    }
    std::fs::write(
        dir.path().join("heldout.json"),
        "[{\"prompt\": \"a\", \"answer\": \"b\"}]",
    )
    .unwrap();
    let cases = llama4_model::heldout::cases(dir.path()).unwrap();
    assert_eq!(cases.len(), 1);
    assert_eq!((cases[0].prompt.as_str(), cases[0].answer.as_str()), ("a", "b"));
}
