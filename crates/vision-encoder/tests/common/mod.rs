//! Fixture reading shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use half::bf16;
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

/// `fixtures/vision` (written by `tools/make_vision_fixtures.py`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vision")
}

/// Every tensor of a safetensors file as f32 (bf16/f32/i64 converted).
pub fn read_tensors(path: &std::path::Path) -> HashMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            let arr = ArrayD::from_shape_vec(IxDyn(view.shape()), values).expect("shape");
            (name, arr)
        })
        .collect()
}

/// One bf16 step at `x`: the spacing of bf16 numbers around `|x|` (8 significant bits).
pub fn bf16_step(x: f32) -> f32 {
    let a = x.abs().max(f32::MIN_POSITIVE);
    let exp = a.log2().floor();
    2f32.powf(exp - 7.0)
}
