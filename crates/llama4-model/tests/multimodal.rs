//! Images in the prompt, against transformers' `Llama4Processor` and
//! `Llama4ForConditionalGeneration` on the tiny multimodal fixture (tools/make_multimodal_fixture.py):
//! expanded prompt ids equal, image tokens, greedy ids and logits within 1e-4 of the largest
//! reference logit, with the cache and in one pass; several images; count mismatches and bad files.

use std::ops::ControlFlow;
use std::path::PathBuf;

use llama4_core::DType;
use llama4_model::{
    EncodedImage, Error, GenerateOptions, Logits, MultimodalModel, SamplingConfig, Session, Tokenizer,
};
use ndarray::{s, Array2};
use safetensors::SafeTensors;

mod common;
use common::{ids, matrix, rel_err};

const TOL: f32 = 1e-4;

fn dir() -> PathBuf {
    common::fixture_dir("multimodal")
}

struct Reference {
    prompt: String,
    images: Vec<PathBuf>,
    aspect_ratios: Vec<(usize, usize)>,
    input_ids: Vec<u32>,
    image_features: Array2<f32>,
    generated: Vec<u32>,
    step_logits: Array2<f32>,
    logits_full: Array2<f32>,
}

fn reference() -> Reference {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    Reference {
        prompt: meta["prompt"].as_str().unwrap().to_string(),
        images: meta["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| dir().join(v.as_str().unwrap()))
            .collect(),
        aspect_ratios: meta["aspect_ratios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap() as usize, r[1].as_u64().unwrap() as usize))
            .collect(),
        input_ids: ids(&st, "input_ids"),
        image_features: matrix(&st, "image_features"),
        generated: ids(&st, "generated_ids"),
        step_logits: matrix(&st, "step_logits"),
        logits_full: matrix(&st, "logits_full"),
    }
}

fn load() -> (MultimodalModel, Tokenizer) {
    let model = MultimodalModel::load(dir()).unwrap();
    let tok = Tokenizer::from_dir(dir()).unwrap().unwrap();
    (model, tok)
}

fn encode_all(model: &MultimodalModel, files: &[PathBuf]) -> Vec<EncodedImage> {
    files
        .iter()
        .map(|f| model.encode_image_file(f).unwrap())
        .collect()
}

#[test]
fn expanded_prompt_and_image_tokens_match_the_processor() {
    let (model, tok) = load();
    let r = reference();
    assert_eq!(r.images.len(), 2);
    let images = encode_all(&model, &r.images);
    let ratios: Vec<_> = images.iter().map(|i| i.aspect_ratio).collect();
    assert_eq!(ratios, r.aspect_ratios);
    // The first image is not square and needs several tiles.
    assert!(ratios[0].0 * ratios[0].1 > 1 && ratios[0].0 != ratios[0].1);

    let prompt = tok.encode(&r.prompt).unwrap();
    let prepared = model.prepare(&prompt, &images).unwrap();
    assert_eq!(prepared.ids, r.input_ids);

    // Image tokens in prompt order, each image's tiles then its global tile.
    let features: Vec<f32> = images.iter().flat_map(|i| i.features.iter().copied()).collect();
    let features = Array2::from_shape_vec(r.image_features.dim(), features).unwrap();
    let e = rel_err(features.view(), r.image_features.view());
    assert!(e < TOL, "image tokens off by {e:e}");

    // They sit at the <|patch|> positions; every other row is the token's embedding.
    let patch = model.token_ids().patch;
    let plain = model.text().embed(&prepared.ids).unwrap();
    let mut k = 0;
    for (i, &id) in prepared.ids.iter().enumerate() {
        if id == patch {
            assert_eq!(prepared.embeddings.row(i), features.row(k));
            k += 1;
        } else {
            assert_eq!(prepared.embeddings.row(i), plain.row(i));
        }
    }
    assert_eq!(k, features.nrows());
}

#[test]
fn greedy_generation_matches_llama4_for_conditional_generation() {
    let (model, tok) = load();
    let r = reference();
    let images = encode_all(&model, &r.images);
    let prompt = tok.encode(&r.prompt).unwrap();
    let prepared = model.prepare(&prompt, &images).unwrap();
    let n = r.generated.len();
    let t = prepared.ids.len();

    // Cached: one prefill over the embeddings, then one step per token.
    let options = GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingConfig::greedy(),
        stop_ids: vec![],
        keep_logits: true,
    };
    let mut session = Session::new(model.text(), DType::F32).unwrap();
    let g = session
        .generate_with_embeddings(&prepared.ids, prepared.embeddings.clone(), &options, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(g.prompt_ids, r.input_ids);
    assert_eq!(g.generated_ids, r.generated);
    let e_steps = rel_err(g.logits.as_ref().unwrap().view(), r.step_logits.view());
    assert!(e_steps < TOL, "per-step logits off by {e_steps:e}");
    assert_eq!(session.len(), t + n - 1);

    // The prompt's logits at every position from one prefill.
    let mut session = Session::new(model.text(), DType::F32).unwrap();
    let prefill = session
        .prefill_embeddings(&prepared.ids, prepared.embeddings.clone(), Logits::All)
        .unwrap();
    let e_prefill = rel_err(prefill.view(), r.logits_full.slice(s![..t, ..]));
    assert!(e_prefill < TOL, "prefill logits off by {e_prefill:e}");

    // One pass over prompt + generated ids (the reference's no-cache forward).
    assert!(!r.generated.contains(&model.token_ids().image));
    let all: Vec<u32> = prompt.iter().chain(&r.generated).copied().collect();
    let full = model.prepare(&all, &images).unwrap();
    let mut session = Session::new(model.text(), DType::F32).unwrap();
    let logits = session
        .prefill_embeddings(&full.ids, full.embeddings, Logits::All)
        .unwrap();
    let e_full = rel_err(logits.view(), r.logits_full.view());
    assert!(e_full < TOL, "one-pass logits off by {e_full:e}");
    eprintln!("errors / max|ref|: steps {e_steps:.2e}, prefill {e_prefill:.2e}, one pass {e_full:.2e}");
}

#[test]
fn eight_images_in_one_prompt() {
    let (model, tok) = load();
    let r = reference();
    let files: Vec<PathBuf> = (0..8).map(|i| r.images[i % 2].clone()).collect();
    let images = encode_all(&model, &files);
    let text = (0..8)
        .map(|i| format!(" image<|image|>{}", if i % 2 == 0 { "," } else { " and" }))
        .collect::<String>();
    let prompt = tok.encode(&format!("look at{text} compare.")).unwrap();
    let prepared = model.prepare(&prompt, &images).unwrap();

    let ids = model.token_ids();
    let count = |id: u32| prepared.ids.iter().filter(|&&t| t == id).count();
    let per_tile = model.tokens_per_tile();
    let tiles: usize = images.iter().map(|i| i.features.nrows() / per_tile).sum();
    assert_eq!(tiles, 4 * (2 * 3 + 1) + 4);
    assert_eq!(count(ids.patch), tiles * per_tile);
    assert_eq!(count(ids.image_start), 8);
    assert_eq!(count(ids.image_end), 8);
    // The user's placeholders are gone; each layout has its own <|image|> before the global tile.
    assert_eq!(count(ids.image), 8);
    assert_eq!(count(ids.tile_y_separator), 4 * 2);
    assert_eq!(count(ids.tile_x_separator), 4 * 2 * 2);
    assert_eq!(
        prepared.embeddings.dim(),
        (prepared.ids.len(), model.text().config().hidden_size())
    );

    let mut session = Session::new(model.text(), DType::F32).unwrap();
    let logits = session
        .prefill_embeddings(&prepared.ids, prepared.embeddings, Logits::Last)
        .unwrap();
    assert_eq!(logits.dim(), (1, model.text().config().vocab_size));
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn mismatched_counts_are_errors() {
    let (model, tok) = load();
    let r = reference();
    let images = encode_all(&model, &r.images);
    let two = tok.encode(&r.prompt).unwrap();

    let err = model.prepare(&two, &images[..1]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ImageCount {
                placeholders: 2,
                images: 1
            }
        ),
        "{err}"
    );
    let none = tok.encode("look at this picture.").unwrap();
    let err = model.prepare(&none, &images).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ImageCount {
                placeholders: 0,
                images: 2
            }
        ),
        "{err}"
    );

    // A <|patch|> written in the prompt has no image token to take.
    let extra = tok.encode(&format!("<|patch|>{}", r.prompt)).unwrap();
    let err = model.prepare(&extra, &images).unwrap_err();
    let patches: usize = images.iter().map(|i| i.features.nrows()).sum();
    assert!(
        matches!(err, Error::ImageFeatureCount { patch_tokens, features } if patch_tokens == patches + 1 && features == patches),
        "{err}"
    );
}

#[test]
fn unreadable_image_files_are_errors() {
    let (model, _) = load();
    let missing = dir().join("no_such_image.png");
    let err = model.encode_image_file(&missing).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if *path == missing),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.png");
    std::fs::write(&garbage, b"this is not an image").unwrap();
    let err = model.encode_image_file(&garbage).unwrap_err();
    assert!(
        matches!(&err, Error::Image { path, source: vision_encoder::Error::UnknownImageFormat } if *path == garbage),
        "{err}"
    );

    let png = std::fs::read(dir().join("small.png")).unwrap();
    let truncated = tmp.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let err = model.encode_image_file(&truncated).unwrap_err();
    assert!(matches!(&err, Error::Image { .. }), "{err}");
}

#[test]
fn a_text_only_checkpoint_takes_no_images() {
    let (model, _) = load();
    let scout = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/scout");
    let err = MultimodalModel::load_with_ids(&scout, *model.token_ids()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config {
                field: "vision_config",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn layout_follows_image_order() {
    let (model, tok) = load();
    let r = reference();
    let images = encode_all(&model, &r.images);
    let swapped = [images[1].clone(), images[0].clone()];
    let prompt = tok.encode(&r.prompt).unwrap();
    let a = model.prepare(&prompt, &images).unwrap();
    let b = model.prepare(&prompt, &swapped).unwrap();
    assert_eq!(a.ids.len(), b.ids.len());
    assert_ne!(a.ids, b.ids);
    // The small image (one tile) first: its layout has no tile separators.
    let ids = model.token_ids();
    let first_end = b.ids.iter().position(|&t| t == ids.image_end).unwrap();
    assert!(!b.ids[..first_end].contains(&ids.tile_y_separator));
}
