//! Writing small safetensors checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A tensor to write: dtype, shape and little-endian bytes.
pub struct T {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

pub fn t(name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> T {
    T {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

/// Little-endian f32 bytes of `v`.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `tensors` with `metadata` as `dir/model.safetensors`.
pub fn write(dir: &Path, tensors: &[T], metadata: Option<HashMap<String, String>>) -> PathBuf {
    let views = tensors.iter().map(|t| {
        (
            t.name.clone(),
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
        )
    });
    let bytes = safetensors::serialize(views, metadata).unwrap();
    let path = dir.join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    path
}
