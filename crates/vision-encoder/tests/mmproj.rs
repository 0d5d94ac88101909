//! The vision tower and projector from a llama.cpp multimodal projector GGUF
//! (`fixtures/gguf/mmproj-multimodal-F32.gguf`, written by llama.cpp's converter from
//! `fixtures/models/multimodal`: see `tools/llamacpp/make_mmproj_fixture.py`) equal the ones
//! loaded from the safetensors, and the F16 file of the same (`mmproj-multimodal-F16.gguf`)
//! equals them to f16 rounding; malformed projector files get named errors.

use std::path::{Path, PathBuf};

use llama4_core::ggml::GgmlType;
use llama4_core::{Checkpoint, Error as CoreError};
use llama4_testkit::{fixture, gguf_string_end, rel_err, Rng};
use ndarray::Array4;
use vision_encoder::{Error, Mmproj, MultimodalConfig, ProcessorConfig, Projector, VisionModel};

const MMPROJ: &str = "gguf/mmproj-multimodal-F32.gguf";

fn safetensors_tower() -> (MultimodalConfig, VisionModel, Projector) {
    let dir = fixture("models/multimodal");
    let cfg = MultimodalConfig::from_file(dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let vision = VisionModel::load(ckpt.scope("vision_model"), &cfg.vision).unwrap();
    let projector = Projector::load(
        ckpt.scope("multi_modal_projector"),
        &cfg.vision,
        cfg.text_hidden_size,
    )
    .unwrap();
    (cfg, vision, projector)
}

#[test]
fn the_gguf_tower_equals_the_safetensors_tower() {
    let (cfg, _, _) = safetensors_tower();
    let m = Mmproj::load(fixture(MMPROJ)).unwrap();
    // The config read from `clip.*` keys and projector shapes is the checkpoint's, but for
    // `norm_eps`, stored as f32 (and unused: the tower's LayerNorm epsilon is fixed).
    let mut want = cfg.vision.clone();
    want.norm_eps = m.vision.config().norm_eps;
    assert_eq!(m.vision.config(), &want);
    assert!((m.vision.config().norm_eps - cfg.vision.norm_eps).abs() < 1e-12);
    assert_eq!(m.projector.output_dim(), cfg.text_hidden_size);
    // The processor: tile size, mean and std from the file, the rest Llama 4's defaults.
    let p = &m.processor;
    assert_eq!(p.tile_size, 84);
    assert_eq!((p.image_mean, p.image_std), ([0.5; 3], [0.5; 3]));
    assert_eq!(p.max_patches, ProcessorConfig::default().max_patches);

    let (tower, projected) = tower_errors(&m);
    assert!(tower < 1e-6, "tower: relative error {tower:e}");
    assert!(projected < 1e-6, "projector: relative error {projected:e}");
}

/// Relative errors of `m`'s tower and projector against the safetensors ones, on three tiles of
/// random pixels in the normalised range.
fn tower_errors(m: &Mmproj) -> (f64, f64) {
    let (cfg, vision, projector) = safetensors_tower();
    let s = cfg.vision.image_size;
    let mut rng = Rng::new(20260606);
    let tiles = Array4::from_shape_simple_fn((3, 3, s, s), || rng.uniform(1.0));
    let want = vision.forward(tiles.view()).unwrap();
    let got = m.vision.forward(tiles.view()).unwrap();
    assert_eq!(got.dim(), want.dim());
    let tower = rel_err(got.as_slice().unwrap(), want.as_slice().unwrap());
    let want = projector.forward_tiles(want.view()).unwrap();
    let got = m.projector.forward_tiles(got.view()).unwrap();
    assert!(want.iter().all(|v| v.is_finite()) && want.iter().any(|&v| v != 0.0));
    (tower, rel_err(got.as_slice().unwrap(), want.as_slice().unwrap()))
}

/// The projector GGUF as published (`--outtype f16`: matrices in F16, 1-D tensors in F32) runs
/// its matrices as llama.cpp does, f16 weights times f16-rounded activations: against the f32
/// tower the error is that rounding (unit roundoff 2^-11 ≈ 4.9e-4 per operand, partly averaging
/// out in the sums), so it lies well below 1e-2 and above the F32 file's 1e-6 (the F16 matrices
/// are really in use). A misread F16 tensor would give errors of order 1.
#[test]
fn the_f16_projector_file_equals_the_tower_to_f16_rounding() {
    let path = fixture("gguf/mmproj-multimodal-F16.gguf");
    let file = llama4_core::gguf::GgufFile::open(&path).unwrap();
    let f16 = file
        .header()
        .tensors
        .iter()
        .filter(|t| t.ty == GgmlType::F16)
        .count();
    assert!(f16 >= 4, "the fixture holds {f16} F16 tensors");
    let m = Mmproj::load(&path).unwrap();
    let (tower, projected) = tower_errors(&m);
    eprintln!("F16 projector file: tower {tower:e}, projector {projected:e}");
    for (what, err) in [("tower", tower), ("projector", projected)] {
        assert!((1e-5..5e-3).contains(&err), "{what}: relative error {err:e}");
    }
}

/// The fixture copied to a temporary file with `edit` applied to its bytes.
fn edited(edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let mut bytes = std::fs::read(fixture(MMPROJ)).unwrap();
    edit(&mut bytes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mmproj.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// Overwrites the string value of metadata `key` (same length) with `new`.
fn set_string(bytes: &mut [u8], key: &str, old: &str, new: &str) {
    assert_eq!(old.len(), new.len());
    // Past the key: value type u32, string length u64, the bytes.
    let at = gguf_string_end(bytes, key) + 4 + 8;
    assert_eq!(&bytes[at..at + old.len()], old.as_bytes());
    bytes[at..at + new.len()].copy_from_slice(new.as_bytes());
}

fn load_err(path: &Path) -> Error {
    Mmproj::load(path).unwrap_err()
}

#[test]
fn a_missing_tensor_is_named() {
    let (_d, path) = edited(|b| {
        let at = gguf_string_end(b, "v.blk.1.attn_k.weight");
        b[at - "k.weight".len()] = b'K';
    });
    match load_err(&path) {
        Error::Core(CoreError::MissingTensor { name, .. }) => assert_eq!(name, "v.blk.1.attn_k.weight"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    // ne [32, 128] → [128, 32]: the same bytes, the transposed shape.
    let (_d, path) = edited(|b| {
        let at = gguf_string_end(b, "v.blk.0.ffn_up.weight") + 4;
        let (x, y) = (b[at..at + 8].to_vec(), b[at + 8..at + 16].to_vec());
        b[at..at + 8].copy_from_slice(&y);
        b[at + 8..at + 16].copy_from_slice(&x);
    });
    match load_err(&path) {
        Error::Core(CoreError::ShapeMismatch {
            name, expected, got, ..
        }) => {
            assert_eq!(name, "v.blk.0.ffn_up.weight");
            assert_eq!((expected, got), (vec![128, 32], vec![32, 128]));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn another_projector_type_is_refused_by_name() {
    let (_d, path) = edited(|b| set_string(b, "clip.projector_type", "llama4", "gemma3"));
    let e = load_err(&path);
    assert!(matches!(e, Error::Mmproj { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("clip.projector_type") && text.contains("gemma3"),
        "{text}"
    );
}

#[test]
fn a_file_that_is_not_a_projector_is_refused() {
    let (_d, path) = edited(|b| set_string(b, "general.architecture", "clip", "clap"));
    let text = load_err(&path).to_string();
    assert!(
        text.contains("general.architecture") && text.contains("clap"),
        "{text}"
    );
    // A text model's GGUF given as the projector.
    let e = load_err(&fixture("gguf/tiny-F32.gguf"));
    assert!(
        matches!(&e, Error::Mmproj { reason, .. } if reason.contains("llama4")),
        "{e:?}"
    );
}

#[test]
fn a_missing_hyperparameter_is_named() {
    // The key renamed: `block_count` → `block_cOunt`.
    let (_d, path) = edited(|b| {
        let at = gguf_string_end(b, "clip.vision.block_count");
        b[at - "ount".len()] = b'O';
    });
    let e = load_err(&path);
    assert!(
        matches!(&e, Error::Mmproj { reason, .. } if reason.contains("clip.vision.block_count")),
        "{e:?}"
    );
}
