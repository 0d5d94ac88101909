//! Parity with transformers 5.23.0 + torchvision 0.29.2 (fixtures written by
//! `tools/make_vision_fixtures.py`): the image processor, the vision tower, the projector, the
//! prompt layout.

mod common;

use std::collections::BTreeMap;

use common::{bf16_step, fixtures, read_tensors};
use llama4_core::Checkpoint;
use ndarray::{ArrayD, Ix3, Ix4};
use vision_encoder::{
    image_prompt, load_image, ImageProcessor, MultimodalConfig, ProcessorConfig, Projector, VisionModel,
};

/// Compares every processor fixture in `dir`; returns (images checked, values not bit-identical).
fn check_processor_dir(dir: &str) -> (usize, usize) {
    let root = fixtures();
    let processor = ImageProcessor::from_dir(root.join(dir)).expect("processor config");
    let reference = read_tensors(&root.join(dir).join("reference.safetensors"));
    let names: BTreeMap<_, _> = reference
        .keys()
        .filter_map(|k| k.strip_suffix(".pixel_values"))
        .map(|n| (n.to_string(), ()))
        .collect();
    assert!(!names.is_empty());
    let mut differing = 0;
    for name in names.keys() {
        let png = root.join("images").join(format!("{name}.png"));
        let jpg = root.join("images").join(format!("{name}.jpg"));
        let is_jpeg = !png.exists();
        let image = load_image(if is_jpeg { &jpg } else { &png }).expect("fixture image");
        let got = processor.process(&image).expect("process");
        let want = &reference[&format!("{name}.pixel_values")];
        let aspect = &reference[&format!("{name}.aspect_ratio")];
        assert_eq!(
            (got.aspect_ratio.0 as f32, got.aspect_ratio.1 as f32),
            (aspect[[0]], aspect[[1]]),
            "{dir}/{name}: aspect ratio"
        );
        assert_eq!(got.tiles.shape(), want.shape(), "{dir}/{name}: tiles shape");
        let want = want.view().into_dimensionality::<Ix4>().expect("4-D");
        if is_jpeg {
            // JPEG decoders may differ by a level or so per pixel (IDCT, chroma upsampling), so
            // only closeness is asserted; PNG below is checked to one bf16 step.
            let mean = (&got.tiles - &want.to_owned())
                .mapv(f32::abs)
                .mean()
                .expect("non-empty");
            assert!(
                mean < 0.02,
                "{dir}/{name}: mean |diff| {mean} after JPEG decoding"
            );
            continue;
        }
        for ((idx, &g), &w) in got.tiles.indexed_iter().zip(want.iter()) {
            assert!(
                (g - w).abs() <= bf16_step(w),
                "{dir}/{name}: tile value at {idx:?}: got {g}, reference {w}"
            );
            differing += usize::from(g != w);
        }
    }
    (names.len(), differing)
}

#[test]
fn processor_matches_reference_56px_tiles() {
    let (n, differing) = check_processor_dir("processor_56");
    assert!(n >= 10);
    eprintln!("processor_56: {n} images, {differing} values not bit-identical");
}

#[test]
fn processor_matches_reference_28px_tiles_max_4_nested_config() {
    let cfg = ProcessorConfig::from_dir(fixtures().join("processor_28_max4")).unwrap();
    assert_eq!((cfg.tile_size, cfg.max_patches), (28, 4));
    let (n, differing) = check_processor_dir("processor_28_max4");
    eprintln!("processor_28_max4: {n} images, {differing} values not bit-identical");
}

#[test]
fn processor_matches_reference_default_336() {
    let cfg = ProcessorConfig::from_dir(fixtures().join("processor_336")).unwrap();
    assert_eq!(cfg, ProcessorConfig::default());
    let (n, differing) = check_processor_dir("processor_336");
    eprintln!("processor_336: {n} images, {differing} values not bit-identical");
}

#[test]
fn rescale_and_normalise_match_reference_for_every_byte() {
    let lut = &read_tensors(&fixtures().join("bf16_lut.safetensors"))["lut"];
    let processor = ImageProcessor::new(ProcessorConfig {
        tile_size: 1,
        max_patches: 1,
        ..ProcessorConfig::default()
    })
    .unwrap();
    // A 1×1 image is exactly one tile: no resize, the value is the normalised byte.
    for v in 0..=255u8 {
        let img = ndarray::Array3::from_elem((3, 1, 1), v);
        let out = processor.process_chw(img.view()).unwrap();
        for c in 0..3 {
            assert_eq!(out.tiles[[0, c, 0, 0]], lut[[v as usize]], "byte {v}");
        }
    }
}

fn tower() -> (
    MultimodalConfig,
    VisionModel,
    Projector,
    std::collections::HashMap<String, ArrayD<f32>>,
) {
    let dir = fixtures().join("model");
    let cfg = MultimodalConfig::from_file(dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let vision = VisionModel::load(ckpt.scope("vision_model"), &cfg.vision).expect("vision");
    let projector = Projector::load(
        ckpt.scope("multi_modal_projector"),
        &cfg.vision,
        cfg.text_hidden_size,
    )
    .expect("projector");
    let reference = read_tensors(&dir.join("reference.safetensors"));
    (cfg, vision, projector, reference)
}

fn max_rel_err(got: &ArrayD<f32>, want: &ArrayD<f32>) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}

#[test]
fn vision_model_matches_reference() {
    let (cfg, vision, _, reference) = tower();
    assert_eq!(vision.tokens_per_tile(), 9);
    assert_eq!(cfg.text_hidden_size, 64);
    let tiles = reference["tiles"].view().into_dimensionality::<Ix4>().unwrap();
    let got = vision.forward(tiles).unwrap().into_dyn();
    let err = max_rel_err(&got, &reference["vision_output"]);
    eprintln!("vision model: max |diff| / max |ref| = {err:e}");
    assert!(err < 1e-4, "vision output relative error {err}");
    // Tiles are independent: one tile alone gives that tile's rows.
    let one = vision
        .forward(tiles.slice(ndarray::s![1..2, .., .., ..]))
        .unwrap();
    let want = reference["vision_output"]
        .slice(ndarray::s![1..2, .., ..])
        .to_owned();
    assert!(max_rel_err(&one.into_dyn(), &want.into_dyn()) < 1e-4);
}

#[test]
fn projector_matches_reference() {
    let (_, _, projector, reference) = tower();
    let input = reference["vision_output"]
        .view()
        .into_dimensionality::<Ix3>()
        .unwrap();
    let got = projector.forward_tiles(input).unwrap().into_dyn();
    let err = max_rel_err(&got, &reference["projector_output"]);
    eprintln!("projector: max |diff| / max |ref| = {err:e}");
    assert!(err < 1e-4, "projector relative error {err}");
}

#[test]
fn processed_image_runs_through_tower_with_matching_token_count() {
    let (_, vision, projector, _) = tower();
    let processor = ImageProcessor::new(ProcessorConfig {
        tile_size: vision.config().image_size,
        max_patches: 4,
        ..ProcessorConfig::default()
    })
    .unwrap();
    let image = load_image(fixtures().join("images/wide.png")).unwrap();
    let processed = processor.process(&image).unwrap();
    let features = vision.forward(processed.tiles.view()).unwrap();
    let embeddings = projector.forward_tiles(features.view()).unwrap();
    let layout = image_prompt(processed.aspect_ratio, vision.tokens_per_tile());
    assert_eq!(layout.matches("<|patch|>").count(), embeddings.nrows());
}

#[test]
fn prompt_layout_matches_reference() {
    let text = std::fs::read_to_string(fixtures().join("prompts.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let ar = case["aspect_ratio"].as_array().unwrap();
        let ar = (ar[0].as_u64().unwrap() as usize, ar[1].as_u64().unwrap() as usize);
        let n = case["tokens_per_tile"].as_u64().unwrap() as usize;
        assert_eq!(image_prompt(ar, n), case["text"].as_str().unwrap(), "{ar:?}");
    }
}
