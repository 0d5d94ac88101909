//! proptest over the files a checkpoint directory is made of: config.json,
//! preprocessor_config.json, the safetensors header and the sharded index. Each case rewrites
//! values in one of them (numbers biased toward huge, negative, zero and overflowing ones,
//! strings toward paths that escape, wrong JSON types) or deletes keys, then loads the
//! multimodal fixture and, if it loads, runs an image and a few generated tokens through it.
//!
//! Asserted: no panic, no abort (the process runs under an 8 GB address-space limit, so an
//! allocation a number in a file asked for fails the test instead of swapping), an error or a
//! model, and an answer within 30 s (a watchdog thread; a hang fails the case).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Once};
use std::time::Duration;

use llama4_core::DType;
use llama4_model::{
    stop_ids, GenerateOptions, ImageTokenIds, MultimodalModel, SamplingConfig, Session, TextModel, Tokenizer,
};
use proptest::prelude::*;
use serde_json::Value;
use vision_encoder::image::DynamicImage;

mod common;

/// A step from a JSON value to one inside it.
#[derive(Clone, Debug)]
enum Key {
    Member(String),
    Element(usize),
}

/// Every path to a leaf or an object member / array element of `v` (the root excluded).
fn paths(v: &Value, prefix: &mut Vec<Key>, out: &mut Vec<Vec<Key>>) {
    let children: Vec<(Key, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, v)| (Key::Member(k.clone()), v)).collect(),
        Value::Array(a) => a.iter().enumerate().map(|(i, v)| (Key::Element(i), v)).collect(),
        _ => return,
    };
    for (k, child) in children {
        prefix.push(k);
        out.push(prefix.clone());
        paths(child, prefix, out);
        prefix.pop();
    }
}

fn child<'a>(v: &'a mut Value, k: &Key) -> Option<&'a mut Value> {
    match k {
        Key::Member(name) => v.get_mut(name.as_str()),
        Key::Element(i) => v.get_mut(*i),
    }
}

/// What a mutation does at the path it picks.
#[derive(Clone, Debug)]
enum Op {
    /// Replace the value with this JSON text (spliced verbatim, so integers past u64 stay exact
    /// and invalid JSON is possible).
    Set(String),
    /// Add `2^j` to an integer (`2^j` elsewhere): the product of the result with any factor of
    /// at least `2^(64 - j)` wraps to the product of the original, so a wrapped size can still
    /// match the weights.
    Wrap(u32),
    /// Remove the member or element.
    Delete,
}

/// One change: `op` at the path `pick` chooses, among every path of the file or, when
/// `focused`, among the paths that size work in it ([`Target::focus`]).
#[derive(Clone, Debug)]
struct Mutation {
    focused: bool,
    /// With `focused`: only the fields that multiply into the sizes of tensors and tables
    /// ([`CORE_FIELDS`]), where a wrapped value does the most harm.
    core: bool,
    pick: prop::sample::Index,
    op: Op,
}

/// The config fields whose products size tensors, tables and loops.
const CORE_FIELDS: &[&str] = &[
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_local_experts",
    "image_size",
    "patch_size",
    "max_patches",
    "size",
];

/// Config fields that size tensors, tables or loops.
const SIZE_FIELDS: &[&str] = &[
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "intermediate_size",
    "intermediate_size_mlp",
    "num_local_experts",
    "num_experts_per_tok",
    "max_position_embeddings",
    "attention_chunk_size",
    "interleave_moe_layer_step",
    "no_rope_layer_interval",
    "moe_layers",
    "no_rope_layers",
    "layer_types",
    "rope_theta",
    "rms_norm_eps",
    "floor_scale",
    "attn_scale",
    "factor",
    "original_max_position_embeddings",
    "eos_token_id",
    "image_token_index",
    "image_size",
    "patch_size",
    "pixel_shuffle_ratio",
    "projector_input_dim",
    "projector_output_dim",
    "vision_output_dim",
];

/// The name a path is known by: its last member name (an array element goes by its array's).
fn field_name(path: &[Key]) -> String {
    path.iter()
        .rev()
        .find_map(|k| match k {
            Key::Member(m) => Some(m.clone()),
            Key::Element(_) => None,
        })
        .unwrap_or_default()
}

/// Applies `mutations` to `json` text.
fn mutate(json: &[u8], target: Target, mutations: &[Mutation]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(json).expect("fixture JSON");
    let mut splices = Vec::new();
    for (
        n,
        Mutation {
            focused,
            core,
            pick,
            op,
        },
    ) in mutations.iter().enumerate()
    {
        let mut all = Vec::new();
        paths(&v, &mut Vec::new(), &mut all);
        if *focused {
            // A field name first, then one of its paths: every field is as likely, however
            // many places or list entries it has.
            let focus: Vec<_> = all.iter().filter(|p| target.focus(p)).cloned().collect();
            let mut names: Vec<String> = focus.iter().map(|p| field_name(p)).collect();
            names.sort();
            names.dedup();
            if *core && names.iter().any(|n| CORE_FIELDS.contains(&n.as_str())) {
                names.retain(|n| CORE_FIELDS.contains(&n.as_str()));
            }
            if !names.is_empty() {
                let name = &names[pick.index(names.len())];
                all = focus.into_iter().filter(|p| field_name(p) == *name).collect();
            }
        }
        if all.is_empty() {
            break;
        }
        let path = &all[pick.index(all.len())];
        let (last, parents) = path.split_last().expect("non-empty path");
        let mut parent = &mut v;
        for k in parents {
            parent = child(parent, k).expect("path exists");
        }
        match op {
            Op::Delete => match (last, parent) {
                (Key::Member(name), Value::Object(m)) => {
                    m.remove(name);
                }
                (Key::Element(i), Value::Array(a)) => {
                    a.remove(*i);
                }
                _ => {}
            },
            Op::Wrap(j) => {
                let slot = child(parent, last).expect("path exists");
                let base = slot.as_u64().unwrap_or(0);
                let text = (u128::from(base) + (1u128 << j)).to_string();
                let placeholder = format!("@@splice{n}@@");
                *slot = Value::String(placeholder.clone());
                splices.push((format!("\"{placeholder}\""), text));
            }
            Op::Set(text) => {
                let placeholder = format!("@@splice{n}@@");
                // A square tile size, so that the value itself is what is tested.
                let text = match (target, last) {
                    (Target::Preprocessor, Key::Member(k)) if k == "size" => {
                        format!("{{\"height\": {text}, \"width\": {text}}}")
                    }
                    _ => text.clone(),
                };
                *child(parent, last).expect("path exists") = Value::String(placeholder.clone());
                splices.push((format!("\"{placeholder}\""), text));
            }
        }
    }
    let mut text = serde_json::to_string(&v).expect("serialises");
    for (placeholder, value) in splices {
        text = text.replace(&placeholder, &value);
    }
    text.into_bytes()
}

/// JSON text for a value, biased toward numbers that overflow, wrap, vanish or are negative,
/// and toward strings that are paths out of the directory.
fn hostile_value() -> impl Strategy<Value = String> {
    let specials = prop::sample::select(vec![
        "0",
        "-1",
        "1",
        "2",
        "-0",
        "0.0",
        "0.5",
        "-0.5",
        "4294967295",
        "4294967296",
        "2147483648",
        "9223372036854775807",
        "9223372036854775808",
        "9223372036854775824",
        "4611686018427387904",
        "4611686018427387908",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "1e999",
        "-1e999",
        "1e-50",
        "1e-40",
        "1e38",
        "3.5e38",
        "1e300",
        "-1e300",
        "1e5",
        "100000",
        "1000000",
    ])
    .prop_map(str::to_string);
    let near_powers = (0u32..66, -4i128..=4).prop_map(|(k, d)| ((1i128 << k) + d).to_string());
    // 2^64 / 2^s + d: multiplied by a small power of two (a head count, a head width, a
    // factor 2) these wrap to a small number, which is how a wrapped size can match a weight.
    let wrapping = (1u32..=12, 0u64..=16).prop_map(|(s, d)| ((u64::MAX >> s) + 1 + d).to_string());
    let other_types = prop::sample::select(vec![
        "null",
        "true",
        "false",
        "\"\"",
        "[]",
        "{}",
        "[0, 1]",
        "\"x\"",
        "\"..\"",
        "\".\"",
        "\"../model.safetensors\"",
        "\"/dev/zero\"",
        "\"shard.safetensors/\"",
        "\"a/b.safetensors\"",
        "\"model.safetensors\"",
        "\"F8_E4M3\"",
        "\"BF16\"",
        "\"I64\"",
        "\"llama3\"",
        "\"llama4\"",
        "{\"rope_type\": \"llama3\", \"factor\": 1e-300}",
        "not json",
    ])
    .prop_map(str::to_string);
    prop_oneof![
        4 => specials,
        3 => near_powers,
        3 => wrapping,
        2 => any::<i64>().prop_map(|v| v.to_string()),
        2 => (0u64..300).prop_map(|v| v.to_string()),
        2 => other_types,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => hostile_value().prop_map(Op::Set),
        3 => (52u32..64).prop_map(Op::Wrap),
        1 => Just(Op::Delete),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::bool::weighted(0.75),
        prop::bool::weighted(0.5),
        any::<prop::sample::Index>(),
        op(),
    )
        .prop_map(|(focused, core, pick, op)| Mutation {
            focused,
            core,
            pick,
            op,
        })
}

/// Which file of the checkpoint a case rewrites.
#[derive(Clone, Copy, Debug)]
enum Target {
    Config,
    Preprocessor,
    Header,
    Index,
}

impl Target {
    /// Paths of this file whose values size work: config size fields (and the entries of the
    /// layer lists), every processor setting, header shapes and offsets, index shard names.
    fn focus(self, path: &[Key]) -> bool {
        let named = |k: &Key, names: &[&str]| matches!(k, Key::Member(m) if names.contains(&m.as_str()));
        match self {
            Target::Config => path.iter().any(|k| named(k, SIZE_FIELDS)),
            Target::Preprocessor => path.len() == 1,
            Target::Header => path.iter().any(|k| named(k, &["shape", "data_offsets", "dtype"])),
            Target::Index => path.first().is_some_and(|k| named(k, &["weight_map"])),
        }
    }
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => Just(Target::Config),
        2 => Just(Target::Preprocessor),
        2 => Just(Target::Header),
        2 => Just(Target::Index),
    ]
}

/// The fixture's files and what every case needs, read once.
struct Fixture {
    dir: PathBuf,
    config: Vec<u8>,
    preprocessor: Vec<u8>,
    weights: Vec<u8>,
    ids: ImageTokenIds,
    image: DynamicImage,
}

fn fixture() -> Arc<Fixture> {
    static F: std::sync::OnceLock<Arc<Fixture>> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = common::fixture_dir("multimodal");
        let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
        Arc::new(Fixture {
            config: std::fs::read(dir.join("config.json")).unwrap(),
            preprocessor: std::fs::read(dir.join("preprocessor_config.json")).unwrap(),
            weights: std::fs::read(dir.join("model.safetensors")).unwrap(),
            ids: ImageTokenIds::from_tokenizer(&tok).unwrap(),
            image: vision_encoder::load_image(dir.join("small.png")).unwrap(),
            dir,
        })
    })
    .clone()
}

/// Writes the case's checkpoint directory: the fixture with `target` rewritten.
fn build(f: &Fixture, target: Target, mutations: &[Mutation], out: &Path) {
    let link = |name: &str, to: &str| {
        std::os::unix::fs::symlink(f.dir.join(name), out.join(to)).unwrap();
    };
    for name in ["tokenizer.json", "generation_config.json"] {
        link(name, name);
    }
    let write = |name: &str, bytes: &[u8]| std::fs::write(out.join(name), bytes).unwrap();
    match target {
        Target::Config => write("config.json", &mutate(&f.config, target, mutations)),
        _ => link("config.json", "config.json"),
    }
    match target {
        Target::Preprocessor => write(
            "preprocessor_config.json",
            &mutate(&f.preprocessor, target, mutations),
        ),
        _ => link("preprocessor_config.json", "preprocessor_config.json"),
    }
    match target {
        Target::Header => {
            let len = u64::from_le_bytes(f.weights[..8].try_into().unwrap()) as usize;
            let header = mutate(&f.weights[8..8 + len], target, mutations);
            let mut file = (header.len() as u64).to_le_bytes().to_vec();
            file.extend_from_slice(&header);
            file.extend_from_slice(&f.weights[8 + len..]);
            write("model.safetensors", &file);
        }
        Target::Index => {
            // The same tensors as one shard behind an index.
            link("model.safetensors", "shard.safetensors");
            let header = llama4_core::safetensors::parse_header(&f.dir, &f.weights).unwrap();
            let map: serde_json::Map<String, Value> = header
                .tensors
                .keys()
                .map(|k| (k.clone(), Value::String("shard.safetensors".into())))
                .collect();
            let index = serde_json::json!({
                "metadata": {"total_size": f.weights.len()},
                "weight_map": map,
            });
            write(
                "model.safetensors.index.json",
                &mutate(&serde_json::to_vec(&index).unwrap(), target, mutations),
            );
        }
        _ => link("model.safetensors", "model.safetensors"),
    }
}

/// Loads the case's checkpoint as a multimodal and a text model and, where that succeeds,
/// encodes the image and generates a few tokens: the first error ends it.
fn exercise(dir: &Path, f: &Fixture) -> llama4_model::Result<()> {
    let mm = MultimodalModel::load_with_ids(dir, f.ids)?;
    let image = mm.encode_image(&f.image)?;
    let prepared = mm.prepare(&[1, 2, f.ids.image, 3], &[image])?;
    let options = GenerateOptions {
        max_new_tokens: 3,
        sampling: SamplingConfig {
            temperature: 0.7,
            ..SamplingConfig::default()
        },
        ..GenerateOptions::default()
    };
    let mut s = Session::new(mm.text(), DType::F32)?;
    s.generate_with_embeddings(&prepared.ids, prepared.embeddings, &options, |_| {
        ControlFlow::Continue(())
    })?;
    let text = TextModel::load(dir)?;
    stop_ids(dir, text.config())?;
    let mut s = Session::new(&text, DType::BF16)?;
    s.generate(&[1, 2, 3], &options, |_| ControlFlow::Continue(()))?;
    Ok(())
}

/// Caps this process's address space at 8 GB (as `ulimit -v 8000000` does), so that an
/// allocation sized by a hostile number fails here rather than succeeding lazily.
fn limit_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let limit = libc::rlimit {
            rlim_cur: 8_000_000 * 1024,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads the struct passed; lowering a soft limit is always allowed.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) };
    });
}

/// How a case ended.
#[derive(Debug)]
enum Outcome {
    Loaded,
    Refused(String),
}

proptest! {
    // A failing case that hangs costs the watchdog's 30 s per shrinking step: shrink for a
    // minute at most.
    #![proptest_config(ProptestConfig {
        cases: 160,
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_checkpoint_files_give_an_error_or_a_model(
        target in target(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        limit_memory();
        let f = fixture();
        let dir = tempfile::tempdir().unwrap();
        build(&f, target, &mutations, dir.path());
        let path = dir.path().to_path_buf();
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            let outcome = match exercise(&path, &f) {
                Ok(()) => Outcome::Loaded,
                Err(e) => Outcome::Refused(e.to_string()),
            };
            let _ = tx.send(outcome);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(outcome) => {
                if let Outcome::Refused(message) = &outcome {
                    // An error says something: never an empty message.
                    prop_assert!(!message.trim().is_empty());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                prop_assert!(false, "{target:?} {mutations:?}: no answer within 30 s");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let payload = worker.join().expect_err("the worker ended without an answer");
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                prop_assert!(false, "{target:?} {mutations:?}: panicked: {message}");
            }
        }
    }
}

/// The unmutated fixture loads and runs: the property is not vacuously "always an error".
#[test]
fn the_unmutated_fixture_loads_and_runs() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    for target in [
        Target::Config,
        Target::Preprocessor,
        Target::Header,
        Target::Index,
    ] {
        let sub = dir.path().join(format!("{target:?}"));
        std::fs::create_dir(&sub).unwrap();
        build(&f, target, &[], &sub);
        exercise(&sub, &f).unwrap_or_else(|e| panic!("{target:?}: {e}"));
    }
}
