//! Helpers shared by the integration tests: committed fixtures and their reference outputs.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};
use safetensors::SafeTensors;

/// `fixtures/models/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

/// Token ids stored as I64.
pub fn ids(st: &SafeTensors, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// A 2-D F32 tensor.
pub fn matrix(st: &SafeTensors, name: &str) -> Array2<f32> {
    let t = st.tensor(name).unwrap();
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Array2::from_shape_vec((t.shape()[0], t.shape()[1]), v).unwrap()
}

/// max |a − b| / max |b|.
pub fn rel_err(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// What transformers produced for a text checkpoint (`reference.safetensors` in its directory).
pub struct TextReference {
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    pub step_logits: Array2<f32>,
    pub logits_full: Array2<f32>,
}

pub fn text_reference(dir: &Path) -> TextReference {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    TextReference {
        prompt: ids(&st, "prompt_ids"),
        generated: ids(&st, "generated_ids"),
        step_logits: matrix(&st, "step_logits"),
        logits_full: matrix(&st, "logits_full"),
    }
}
