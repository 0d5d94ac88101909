//! Checkpoint reading: the happy paths (one file, shards, every stored dtype, aligned and
//! misaligned data) and hostile input. Every bad file must give its own error variant, naming the
//! file and the tensor, and never a panic; proptest mutates valid files to look for panics and for
//! headers accepted with ranges outside the data section.

mod bad_files;
mod bad_index;
mod fuzz;
mod happy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llama4_core::safetensors::{parse_header, Header, SafetensorsFile, MAX_HEADER_LEN};
use llama4_core::{
    bf16, f16, Checkpoint, DType, Error, Layout, QuantFormat, QuantPolicy, QuantScope, QuantSpec, TensorRole,
    Weight,
};
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Building files
// ---------------------------------------------------------------------------------------------

/// A tensor to write: its little-endian bytes and the exact f32 value of every element.
struct Tensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    values: Vec<f32>,
}

/// `n` values from a formula with many distinct bit patterns (`k / 13 - 7.5` is not exact in any
/// of the dtypes, so rounding matters), rounded to `dtype`. Returns the stored bytes and the f32
/// each stored element widens to (widening is exact, so these are the values to expect).
fn values(n: usize, seed: usize, dtype: DType) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::with_capacity(n * dtype.size());
    let mut exact = Vec::with_capacity(n);
    for i in 0..n {
        let v = ((i * 37 + seed * 101) % 211) as f32 / 13.0 - 7.5;
        match dtype {
            DType::F32 => {
                bytes.extend(v.to_le_bytes());
                exact.push(v);
            }
            DType::BF16 => {
                let b = bf16::from_f32(v);
                bytes.extend(b.to_le_bytes());
                exact.push(b.to_f32());
            }
            DType::F16 => {
                let h = f16::from_f32(v);
                bytes.extend(h.to_le_bytes());
                exact.push(h.to_f32());
            }
        }
    }
    (bytes, exact)
}

fn tensor(name: &str, dtype: DType, shape: &[usize], seed: usize) -> Tensor {
    let (bytes, values) = values(shape.iter().product(), seed, dtype);
    Tensor {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        bytes,
        values,
    }
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
    }
}

/// A file written by the `safetensors` crate (which aligns the data section and every tensor).
fn serialize(tensors: &[Tensor]) -> Vec<u8> {
    let views = tensors.iter().map(|t| {
        let view = TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.bytes).unwrap();
        (t.name.clone(), view)
    });
    safetensors::serialize(views, None).unwrap()
}

/// A file written by hand: header length, `header` verbatim, then `data`.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Like [`raw_file`], with the header padded by spaces so that the data section starts at a
/// file offset `≡ residue (mod 8)`. The map is page-aligned, so this is its memory alignment.
fn raw_file_at(header: &str, residue: usize, data: &[u8]) -> Vec<u8> {
    let mut header = header.to_string();
    while (8 + header.len()) % 8 != residue {
        header.push(' ');
    }
    raw_file(&header, data)
}

/// A file whose 8-byte length prefix is `len`, followed by `rest`.
fn with_len(len: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(rest);
    out
}

/// A header entry.
fn entry(name: &str, dtype: &str, shape: &str, offsets: &str) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}"#)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Writes `bytes` as the `model.safetensors` of a fresh directory; returns the directory (kept
/// alive by the caller) and the file's path.
fn single(bytes: &[u8]) -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let path = write(dir.path(), "model.safetensors", bytes);
    (dir, path)
}

/// The error `Checkpoint::open` gives for a directory holding only `bytes` as `model.safetensors`,
/// with the file's path. `parse_header` must agree on the variant (checked by the caller through
/// [`same_variant`]).
fn open_err(bytes: &[u8]) -> (Error, PathBuf) {
    let (dir, path) = single(bytes);
    let err = match Checkpoint::open(dir.path()) {
        Ok(_) => panic!("a bad file was accepted"),
        Err(e) => e,
    };
    (err, path)
}

fn same_variant(a: &Error, b: &Error) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// Asserts the error's message mentions each of `parts` (file paths, tensor names).
fn assert_names(err: &Error, parts: &[&str]) {
    let msg = err.to_string();
    for part in parts {
        assert!(msg.contains(part), "message `{msg}` does not name `{part}`");
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Opens `bytes` as a checkpoint and returns the error; also checks that `parse_header` on the
/// same bytes gives the same variant and that the message names the file and `parts`.
fn bad_file(bytes: &[u8], parts: &[&str]) -> Error {
    let (err, path) = open_err(bytes);
    let direct = parse_header(&path, bytes).expect_err("parse_header accepted a bad file");
    assert!(
        same_variant(&err, &direct),
        "open gave {err:?}, parse_header gave {direct:?}"
    );
    let mut all = vec![shown(&path)];
    all.extend(parts.iter().map(|s| s.to_string()));
    assert_names(&err, &all.iter().map(String::as_str).collect::<Vec<_>>());
    err
}

// ---------------------------------------------------------------------------------------------
// Checking weights
// ---------------------------------------------------------------------------------------------

/// `w` as `[out, in]` must equal `expected_out_in` (row-major) exactly.
fn assert_out_in(w: &Weight, expected_out_in: &[f32]) {
    let got: Vec<f32> = w.to_f32_out_in().iter().copied().collect();
    assert_eq!(got.len(), expected_out_in.len());
    for (i, (g, e)) in got.iter().zip(expected_out_in).enumerate() {
        assert_eq!(g.to_bits(), e.to_bits(), "element {i}: {g} != {e}");
    }
}

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

fn assert_bits_eq(got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g.to_bits(), e.to_bits(), "element {i}: {g} != {e}");
    }
}
