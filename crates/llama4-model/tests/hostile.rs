//! Hostile input, class by class: each case ends in its own error variant, promptly, without
//! reading without bound. Integer overflow and unbounded work from config.json, files that are
//! not regular files, NaN/Inf in weights and scales, tiny temperatures, silently accepted
//! prompts, and the library calls that used to abort.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use llama4_core::input::{Cap, MAX_JSON_BYTES};
use llama4_core::{DType, QuantFormat, QuantScope, QuantSpec};
use llama4_model::config::{MAX_EXPERTS, MAX_HEADS, MAX_HEAD_DIM, MAX_LAYERS};
use llama4_model::{
    check_text_only_prompt, encode_chat, quantize_checkpoint, stop_ids, Error, GenerateOptions,
    ImageTokenIds, Logits, ModelConfig, MultimodalModel, Sampler, SamplingConfig, Session, TextConfig,
    TextModel, Tokenizer, MIN_TEMPERATURE,
};
use serde_json::{json, Value};

mod common;
use common::fixture_dir;

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

/// Runs `f` on another thread and fails if it has not returned within 20 s: a case that
/// blocks (on a FIFO) or loops must fail the test, not hang it.
fn promptly<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what}: no answer within 20 s"))
}

/// A directory whose files are symlinks to those of `src`, except `copied`, which are copies.
fn linked_copy(src: &Path, copied: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let from = entry.unwrap().path();
        let name = from.file_name().unwrap();
        let to = dir.path().join(name);
        if copied.iter().any(|c| *c == name) {
            std::fs::copy(&from, &to).unwrap();
        } else {
            std::os::unix::fs::symlink(&from, &to).unwrap();
        }
    }
    dir
}

/// The demo config with `edits` applied (`null` deletes a key), as JSON text; values are
/// spliced as text so integers past `u64` stay exact.
fn demo_config(edits: &[(&str, &str)]) -> String {
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(demo_dir().join("config.json")).unwrap()).unwrap();
    let obj = v.as_object_mut().unwrap();
    for (key, value) in edits {
        obj.remove(*key);
        if *value != "null" {
            obj.insert((*key).to_string(), json!(format!("@{key}@")));
        }
    }
    let mut text = serde_json::to_string(&v).unwrap();
    for (key, value) in edits {
        text = text.replace(&format!("\"@{key}@\""), value);
    }
    text
}

fn config_error(edits: &[(&str, &str)]) -> Error {
    let text = demo_config(edits);
    promptly("config", move || {
        ModelConfig::from_json_bytes(text.as_bytes()).unwrap_err()
    })
}

fn limit(err: &Error) -> (&'static str, &'static str) {
    match err {
        Error::ConfigLimit {
            field, limit_name, ..
        } => (field, limit_name),
        other => panic!("expected ConfigLimit, got {other:?}"),
    }
}

// ---- integer overflow in sizes from config.json ----------------------------------------------

#[test]
fn head_dim_and_head_counts_that_wrap_are_refused() {
    type Edits<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Edits, (&str, &str)); 4] = [
        // 2^63 + 16: used to panic with "capacity overflow" in Rope::new.
        (
            &[("head_dim", "9223372036854775824")],
            ("head_dim", "MAX_HEAD_DIM"),
        ),
        // 2^62 with 4 heads: the q width wrapped to 0 ("expected shape [0, 64]").
        (
            &[("head_dim", "4611686018427387904")],
            ("head_dim", "MAX_HEAD_DIM"),
        ),
        // 2^62 + 4 heads: q width wrapped to 64 and matched the weights, then a panic.
        (
            &[("num_attention_heads", "4611686018427387908")],
            ("num_attention_heads", "MAX_HEADS"),
        ),
        (
            &[("num_local_experts", "4611686018427387908")],
            ("num_local_experts", "MAX_EXPERTS"),
        ),
    ];
    for (edits, want) in cases {
        let err = config_error(edits);
        assert_eq!(limit(&err), want, "{edits:?}");
        assert!(err.to_string().contains(want.1), "{err}");
    }
    // Exactly at the bounds the config resolves (the weights then decide).
    let at = demo_config(&[
        ("head_dim", &MAX_HEAD_DIM.to_string()),
        ("num_local_experts", &MAX_EXPERTS.to_string()),
    ]);
    ModelConfig::from_json_bytes(at.as_bytes()).unwrap();
    let heads = demo_config(&[
        ("num_attention_heads", &MAX_HEADS.to_string()),
        ("num_key_value_heads", "2"),
    ]);
    ModelConfig::from_json_bytes(heads.as_bytes()).unwrap();
    // 2·intermediate_size wraps.
    let err = config_error(&[("intermediate_size", "9223372036854775824")]);
    assert!(matches!(err, Error::ConfigOverflow { .. }), "{err:?}");
    // Past u64, negative, or not an integer: a JSON error, not a wrapped value.
    for v in ["18446744073709551616", "-1", "1e999", "2.5"] {
        let err = config_error(&[("hidden_size", v)]);
        assert!(matches!(err, Error::ConfigJson { .. }), "{v}: {err:?}");
    }
    // Floats that vanish or overflow in the f32 the kernels use.
    for (key, v) in [
        ("rms_norm_eps", "1e-50"),
        ("floor_scale", "1e300"),
        ("attn_scale", "1e300"),
    ] {
        let err = config_error(&[(key, v)]);
        assert!(
            matches!(err, Error::Config { field, .. } if field == key),
            "{key}: {err:?}"
        );
    }
}

#[test]
fn a_config_that_wrapped_now_fails_at_load_not_in_the_forward_pass() {
    let dir = linked_copy(&demo_dir(), &["config.json"]);
    std::fs::write(
        dir.path().join("config.json"),
        demo_config(&[("num_attention_heads", "4611686018427387908")]),
    )
    .unwrap();
    let path = dir.path().to_path_buf();
    let err = promptly("load", move || TextModel::load(path).unwrap_err());
    assert_eq!(limit(&err).1, "MAX_HEADS");
}

// ---- work or memory proportional to a number in a file ----------------------------------------

#[test]
fn layer_counts_are_bounded_before_tables_are_sized() {
    let no_lists = [
        ("no_rope_layers", "null"),
        ("layer_types", "null"),
        ("moe_layers", "null"),
    ];
    for layers in ["4611686018427387904", "1000000", &(MAX_LAYERS + 1).to_string()] {
        let mut edits = no_lists.to_vec();
        edits.push(("num_hidden_layers", layers));
        let err = config_error(&edits);
        assert_eq!(limit(&err), ("num_hidden_layers", "MAX_LAYERS"), "{layers}");
    }
    // At the bound, with every layer MoE listed, the layer sets resolve at once (no quadratic
    // search over the list).
    let all: Vec<usize> = (0..MAX_LAYERS).collect();
    let text = demo_config(&[
        ("no_rope_layers", "null"),
        ("layer_types", "null"),
        ("num_hidden_layers", &MAX_LAYERS.to_string()),
        ("moe_layers", &serde_json::to_string(&all).unwrap()),
    ]);
    let cfg = promptly("resolve", move || {
        TextConfig::from_json_bytes(text.as_bytes()).unwrap()
    });
    assert_eq!(cfg.layers.len(), MAX_LAYERS);
    assert!(cfg.layers.iter().all(|l| l.moe));
}

// ---- files that are not regular files -------------------------------------------------------

fn mkfifo(path: &Path) -> bool {
    std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// Replaces `dir/name` by each kind of non-regular file in turn and checks `load` names it.
fn each_non_regular(src: &Path, name: &str, load: fn(PathBuf) -> Error) {
    type Make = fn(&Path) -> bool;
    let makers: [(&str, Make); 4] = [
        ("FIFO", mkfifo),
        ("directory", |p| std::fs::create_dir(p).is_ok()),
        ("character device", |p| {
            std::os::unix::fs::symlink("/dev/zero", p).is_ok()
        }),
        ("symbolic link", |p| {
            let other = p.with_extension("loop");
            std::os::unix::fs::symlink(&other, p).is_ok() && std::os::unix::fs::symlink(p, &other).is_ok()
        }),
    ];
    for (what, make) in makers {
        let dir = linked_copy(src, &[]);
        let path = dir.path().join(name);
        std::fs::remove_file(&path).unwrap();
        if !make(&path) {
            continue; // no mkfifo on this system
        }
        let root = dir.path().to_path_buf();
        let err = promptly(&format!("{name} as a {what}"), move || load(root));
        match &err {
            Error::Core(llama4_core::Error::NotRegularFile { path: p, .. })
            | Error::Vision(vision_encoder::Error::Core(llama4_core::Error::NotRegularFile {
                path: p,
                ..
            })) => assert_eq!(*p, path),
            other => panic!("{name} as a {what}: {other:?}"),
        }
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[test]
fn configs_tokenizers_and_weights_that_are_not_regular_files_are_named() {
    let demo = demo_dir();
    each_non_regular(&demo, "config.json", |d| ModelConfig::from_dir(d).unwrap_err());
    each_non_regular(&demo, "model.safetensors", |d| TextModel::load(d).unwrap_err());
    each_non_regular(&demo, "tokenizer.json", |d| Tokenizer::from_dir(d).unwrap_err());
    each_non_regular(&demo, "generation_config.json", |d| {
        let cfg = ModelConfig::from_dir(&d).unwrap();
        stop_ids(&d, &cfg.text).unwrap_err()
    });
    let mm = fixture_dir("multimodal");
    each_non_regular(&mm, "preprocessor_config.json", |d| {
        MultimodalModel::load(d).unwrap_err()
    });
    // An absent generation_config.json is not an error.
    let dir = linked_copy(&demo, &[]);
    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    assert_eq!(stop_ids(dir.path(), &cfg.text).unwrap(), cfg.text.eos_token_ids);
}

#[test]
fn oversized_json_and_endless_images_are_not_read() {
    // A sparse config.json one byte over the cap: refused from its length, nothing read.
    let dir = linked_copy(&demo_dir(), &[]);
    let path = dir.path().join("config.json");
    std::fs::remove_file(&path).unwrap();
    std::fs::File::create(&path)
        .unwrap()
        .set_len(MAX_JSON_BYTES + 1)
        .unwrap();
    let err = ModelConfig::from_dir(dir.path()).unwrap_err();
    match &err {
        Error::Core(llama4_core::Error::InputTooLarge {
            limit, limit_name, ..
        }) => assert_eq!((*limit, *limit_name), (Cap::JSON.bytes, "MAX_JSON_BYTES")),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("MAX_JSON_BYTES"), "{err}");

    let model = MultimodalModel::load(fixture_dir("multimodal")).unwrap();
    let img = tempfile::tempdir().unwrap();
    let zero = img.path().join("zero.png");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let fifo = img.path().join("fifo.png");
    let mut paths = vec![zero];
    if mkfifo(&fifo) {
        paths.push(fifo);
    }
    let model = std::sync::Arc::new(model);
    for p in paths {
        let m = model.clone();
        let err = promptly("image", move || m.encode_image_file(&p).unwrap_err());
        assert!(
            matches!(err, Error::Core(llama4_core::Error::NotRegularFile { .. })),
            "{err:?}"
        );
    }
}

// ---- non-finite numbers --------------------------------------------------------------------

/// Overwrites the first element of tensor `name` in `file` (F32, BF16 or F16) with `value`.
fn poison(file: &Path, name: &str, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let header = llama4_core::safetensors::parse_header(file, &bytes).unwrap();
    let info = &header.tensors[name];
    let at = header.data_start + info.data_offsets.0;
    let raw = match info.dtype.as_str() {
        "F32" => value.to_le_bytes().to_vec(),
        "BF16" => half::bf16::from_f32(value).to_le_bytes().to_vec(),
        "F16" => half::f16::from_f32(value).to_le_bytes().to_vec(),
        other => panic!("{other}"),
    };
    bytes[at..at + raw.len()].copy_from_slice(&raw);
    std::fs::write(file, bytes).unwrap();
}

fn generate(model: &TextModel, temperature: f32) -> llama4_model::Result<Vec<u32>> {
    let mut s = Session::new(model, DType::F32)?;
    let opts = GenerateOptions {
        max_new_tokens: 4,
        sampling: SamplingConfig {
            temperature,
            ..SamplingConfig::default()
        },
        ..GenerateOptions::default()
    };
    Ok(s.generate(&[0, 5, 6], &opts, |_| ControlFlow::Continue(()))?
        .generated_ids)
}

#[test]
fn nan_or_inf_in_weights_stops_generation_and_the_scan_names_the_tensor() {
    for (tensor, value) in [("model.norm.weight", f32::NAN), ("lm_head.weight", f32::INFINITY)] {
        let dir = linked_copy(&demo_dir(), &["model.safetensors"]);
        poison(&dir.path().join("model.safetensors"), tensor, value);
        let model = TextModel::load(dir.path()).unwrap();
        // Greedy used to emit id 0 forever; sampling blamed the sampling settings.
        for temperature in [0.0, 0.8] {
            let err = generate(&model, temperature).unwrap_err();
            assert!(matches!(err, Error::NonFiniteLogits { .. }), "{tensor}: {err:?}");
            assert!(err.to_string().contains("weights"), "{err}");
        }
        match model
            .checkpoint()
            .expect("loaded from safetensors")
            .check_finite()
        {
            Err(llama4_core::Error::NonFiniteWeight { name, index, .. }) => {
                assert_eq!((name.as_str(), index), (tensor, 0))
            }
            other => panic!("{other:?}"),
        }
    }
    TextModel::load(demo_dir())
        .unwrap()
        .checkpoint()
        .expect("loaded from safetensors")
        .check_finite()
        .unwrap();
}

#[test]
fn inf_in_quantisation_scales_is_caught_too() {
    let out = tempfile::tempdir().unwrap();
    let q8 = out.path().join("q8");
    let policy = llama4_model::quant_policy(QuantSpec::new(QuantFormat::Q8, 32), QuantScope::AllLinear);
    quantize_checkpoint(demo_dir(), &q8, &policy).unwrap();
    // Every token's logits read this scale (an expert's might not be routed to).
    let scale = "lm_head.weight.qscale";
    poison(&q8.join("model.safetensors"), scale, f32::INFINITY);
    let model = TextModel::load(&q8).unwrap();
    let err = generate(&model, 0.0).unwrap_err();
    assert!(matches!(err, Error::NonFiniteLogits { .. }), "{err:?}");
    assert!(matches!(
        model.checkpoint().expect("loaded from safetensors").check_finite(),
        Err(llama4_core::Error::NonFiniteWeight { name, .. }) if name == scale
    ));
}

#[test]
fn temperatures_below_the_floor_are_greedy() {
    let model = TextModel::load(demo_dir()).unwrap();
    let greedy = generate(&model, 0.0).unwrap();
    // 1e-40 used to overflow logits / t and pick the least likely token.
    for t in [1e-40, f32::MIN_POSITIVE, MIN_TEMPERATURE / 2.0] {
        assert_eq!(generate(&model, t).unwrap(), greedy, "{t}");
    }
    // The sampler on its own: NaN is an error in greedy mode too (it used to answer 0).
    let mut s = Sampler::new(SamplingConfig::greedy()).unwrap();
    assert!(matches!(
        s.sample(&[f32::NAN, 1.0]),
        Err(Error::NonFiniteLogits { id: 0, .. })
    ));
    assert_eq!(s.sample(&[f32::NEG_INFINITY, 1.0]).unwrap(), 1);
}

// ---- silent acceptance ------------------------------------------------------------------------

#[test]
fn chat_needs_its_special_tokens() {
    let tok = Tokenizer::from_dir(demo_dir()).unwrap().unwrap();
    let ids = encode_chat(&tok, "sort 2 1 =").unwrap();
    assert_eq!(ids[0], tok.token_id("<|begin_of_text|>").unwrap());
    // The demo tokenizer without <|header_start|>: the chat format used to be split into
    // ordinary pieces and run anyway.
    let dir = linked_copy(&demo_dir(), &["tokenizer.json"]);
    let path = dir.path().join("tokenizer.json");
    let mut t: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    t["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a["content"] != "<|header_start|>");
    t["model"]["vocab"]
        .as_object_mut()
        .unwrap()
        .remove("<|header_start|>");
    std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert!(matches!(
        encode_chat(&tok, "sort 2 1 ="),
        Err(Error::MissingChatToken {
            token: "<|header_start|>"
        })
    ));
}

#[test]
fn image_tokens_in_a_prompt_without_images_are_refused() {
    let dir = fixture_dir("multimodal");
    let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
    let ids = ImageTokenIds::from_tokenizer(&tok).unwrap();
    let prompt = tok.encode("what is this?<|image|>").unwrap();
    assert!(matches!(
        check_text_only_prompt(&prompt, &ids),
        Err(Error::ImageCount {
            placeholders: 1,
            images: 0
        })
    ));
    let prompt = tok.encode("a<|patch|>").unwrap();
    assert!(matches!(
        check_text_only_prompt(&prompt, &ids),
        Err(Error::ImageFeatureCount {
            patch_tokens: 1,
            features: 0
        })
    ));
    check_text_only_prompt(&tok.encode("plain text").unwrap(), &ids).unwrap();
}

// ---- library calls ---------------------------------------------------------------------------

#[test]
fn reserve_beyond_memory_is_an_error_and_embeddings_check_their_ids() {
    let model = TextModel::load(fixture_dir("scout")).unwrap();
    let mut s = Session::new(&model, DType::F32).unwrap();
    // 2^40 positions of the fixture's global layers: 2^48 bytes, which no system grants.
    let err = s.reserve(1 << 40).unwrap_err();
    assert!(
        matches!(err, Error::Cache(kv_cache::KvError::Alloc { .. })),
        "{err:?}"
    );
    assert!(s.is_empty());
    s.reserve(64).unwrap();
    s.prefill(&[1, 2], Logits::Last).unwrap();

    let mut s = Session::new(&model, DType::F32).unwrap();
    let h = model.config().hidden_size();
    let e = ndarray::Array2::zeros((2, h));
    assert!(matches!(
        s.prefill_embeddings(&[1, 512], e, Logits::Last),
        Err(Error::TokenOutOfRange { id: 512, vocab: 512 })
    ));
    assert!(s.is_empty());
}
