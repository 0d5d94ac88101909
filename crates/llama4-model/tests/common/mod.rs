//! Helpers shared by the integration tests: committed fixtures and their reference outputs.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};
use safetensors::SafeTensors;

pub use llama4_testkit::{ids, matrix};

/// `fixtures/models/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    llama4_testkit::fixture(&format!("models/{name}"))
}

/// max |a − b| / max |b|.
pub fn rel_err(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    llama4_testkit::rel_err_2d(a, b) as f32
}

/// What transformers produced for a text checkpoint (`reference.safetensors` in its directory).
pub struct TextReference {
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    pub step_logits: Array2<f32>,
    pub logits_full: Array2<f32>,
}

pub fn text_reference(dir: &Path) -> TextReference {
    text_reference_in(dir, "reference.safetensors")
}

/// [`text_reference`] from another file of the fixture's directory.
pub fn text_reference_in(dir: &Path, file: &str) -> TextReference {
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    TextReference {
        prompt: ids(&st, "prompt_ids"),
        generated: ids(&st, "generated_ids"),
        step_logits: matrix(&st, "step_logits"),
        logits_full: matrix(&st, "logits_full"),
    }
}
