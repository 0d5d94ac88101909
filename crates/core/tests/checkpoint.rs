//! Checkpoint reading: the happy paths (one file, shards, every stored dtype, aligned and
//! misaligned data) and hostile input. Every bad file must give its own error variant, naming the
//! file and the tensor, and never a panic; proptest mutates valid files to look for panics and for
//! headers accepted with ranges outside the data section.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llama4_core::safetensors::{parse_header, Header, SafetensorsFile, MAX_HEADER_LEN};
use llama4_core::{bf16, f16, Checkpoint, DType, Error, Layout, Weight};
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

// ---------------------------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------------------------

#[test]
fn single_file_every_dtype_and_accessor() {
    let tensors = [
        tensor("model.embed_tokens.weight", DType::F32, &[5, 3], 1),
        tensor("model.layers.0.self_attn.q_proj.weight", DType::BF16, &[4, 6], 2),
        tensor("model.layers.0.input_layernorm.weight", DType::BF16, &[6], 3),
        tensor(
            "model.layers.0.feed_forward.experts.down_proj",
            DType::BF16,
            &[3, 4, 6],
            4,
        ),
        tensor(
            "model.layers.0.feed_forward.router.weight",
            DType::F16,
            &[3, 6],
            5,
        ),
        tensor("model.layers.0.extra.w_in_out", DType::F16, &[6, 2], 6),
        tensor("model.norm.weight", DType::F32, &[3], 7),
    ];
    let (dir, file) = single(&serialize(&tensors));

    // Through the directory and through the file itself.
    for location in [dir.path(), file.as_path()] {
        let ckpt = Checkpoint::open(location).unwrap();
        assert_eq!(ckpt.location(), location);
        assert_eq!(ckpt.tensor_names().count(), tensors.len());
        let model = ckpt.scope("model");
        let layer = model.scope("layers.0");
        assert!(layer.contains("input_layernorm.weight"));
        assert!(!layer.contains("post_attention_layernorm.weight"));

        let embed = model.weight("embed_tokens.weight", [5, 3]).unwrap();
        assert_eq!((embed.out_features(), embed.in_features()), (5, 3));
        assert_eq!((embed.dtype(), embed.layout()), (Some(DType::F32), Layout::OutIn));
        assert!(embed.data().is_mapped());
        assert_out_in(&embed, &tensors[0].values);

        let q = layer.scope("self_attn").weight("q_proj.weight", [4, 6]).unwrap();
        assert_eq!(q.dtype(), Some(DType::BF16));
        assert!(q.data().is_mapped());
        assert_out_in(&q, &tensors[1].values);

        let norm = layer.vector("input_layernorm.weight", 6).unwrap();
        assert_bits_eq(norm.as_slice().unwrap(), &tensors[2].values);

        // `[E, in, out]`: matrix e holds elements e·in·out.., row-major `[in, out]`.
        let experts = layer
            .batched_in_out("feed_forward.experts.down_proj", [3, 4, 6])
            .unwrap();
        assert_eq!(experts.batch(), 3);
        assert_eq!((experts.in_features(), experts.out_features()), (4, 6));
        assert_eq!(experts.layout(), Layout::InOut);
        for e in 0..3 {
            let w = experts.get(e);
            assert!(w.data().is_mapped(), "expert {e} was copied");
            let in_out = &tensors[3].values[e * 24..(e + 1) * 24];
            assert_out_in(&w, &transpose(in_out, 4, 6));
        }

        let router = layer.weight("feed_forward.router.weight", [3, 6]).unwrap();
        assert_eq!(router.dtype(), Some(DType::F16));
        assert!(router.data().is_mapped());
        assert_out_in(&router, &tensors[4].values);

        let w = layer.weight_in_out("extra.w_in_out", [6, 2]).unwrap();
        assert_eq!(
            (w.in_features(), w.out_features(), w.layout()),
            (6, 2, Layout::InOut)
        );
        assert_out_in(&w, &transpose(&tensors[5].values, 6, 2));

        let accepted = layer
            .weight_of("feed_forward.router.weight", [3, 6], &[DType::F16, DType::BF16])
            .unwrap();
        assert_eq!(accepted.dtype(), Some(DType::F16));

        let arr = model.array("norm.weight", &[3]).unwrap();
        assert_bits_eq(arr.as_slice().unwrap(), &tensors[6].values);
        assert_eq!(ckpt.shape("model.layers.0.extra.w_in_out").unwrap(), &[6, 2]);
    }
}

#[test]
fn sharded_checkpoint() {
    let dir = TempDir::new().unwrap();
    let first = [
        tensor("model.embed_tokens.weight", DType::BF16, &[7, 4], 11),
        tensor("model.layers.0.input_layernorm.weight", DType::F32, &[4], 12),
    ];
    let second = [
        tensor(
            "model.layers.0.feed_forward.experts.gate_up_proj",
            DType::BF16,
            &[2, 4, 6],
            13,
        ),
        tensor("model.layers.0.self_attn.o_proj.weight", DType::F16, &[4, 5], 14),
    ];
    // The second shard goes through `serialize_to_file`, the first through `serialize`.
    write(dir.path(), "model-00001-of-00002.safetensors", &serialize(&first));
    let second_views = second.iter().map(|t| {
        let view = TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.bytes).unwrap();
        (t.name.clone(), view)
    });
    safetensors::serialize_to_file(
        second_views,
        None,
        &dir.path().join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let mut weight_map = serde_json::Map::new();
    for t in &first {
        weight_map.insert(t.name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for t in &second {
        weight_map.insert(t.name.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 1234}, "weight_map": weight_map});
    write(
        dir.path(),
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );

    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.tensor_names().count(), 4);
    let model = ckpt.scope("model");
    let embed = model.weight("embed_tokens.weight", [7, 4]).unwrap();
    assert!(embed.data().is_mapped());
    assert_out_in(&embed, &first[0].values);
    let layer = model.scope("layers.0");
    let norm = layer.vector("input_layernorm.weight", 4).unwrap();
    assert_bits_eq(norm.as_slice().unwrap(), &first[1].values);
    let experts = layer
        .scope("feed_forward.experts")
        .batched_in_out("gate_up_proj", [2, 4, 6])
        .unwrap();
    for e in 0..2 {
        let w = experts.get(e);
        assert!(w.data().is_mapped());
        assert_out_in(&w, &transpose(&second[0].values[e * 24..(e + 1) * 24], 4, 6));
    }
    let o = layer.weight("self_attn.o_proj.weight", [4, 5]).unwrap();
    assert_eq!(o.dtype(), Some(DType::F16));
    assert_out_in(&o, &second[1].values);
}

#[test]
fn misaligned_data_is_copied_once_and_read_right() {
    // A BF16 tensor at an odd file offset: the data section itself starts odd.
    let (bytes, bf) = values(6, 21, DType::BF16);
    let header = format!("{{{}}}", entry("w", "BF16", "[2,3]", "[0,12]"));
    let (_dir, path) = single(&raw_file_at(&header, 1, &bytes));
    let ckpt = Checkpoint::open(&path).unwrap();
    let w = ckpt.root().weight("w", [2, 3]).unwrap();
    assert!(!w.data().is_mapped());
    assert_out_in(&w, &bf);

    // An F32 tensor 2 bytes into an 8-aligned data section, after a BF16 that stays mapped; an
    // F16 at an odd offset after a one-byte gap (the format allows gaps).
    let (b_bytes, b_vals) = values(1, 22, DType::BF16);
    let (f_bytes, f_vals) = values(6, 23, DType::F32);
    let (h_bytes, h_vals) = values(4, 24, DType::F16);
    let (g_bytes, g_vals) = values(4, 25, DType::F32);
    let mut data = b_bytes.clone();
    data.extend(&f_bytes); // 2..26
    data.push(0xAB); // 26: unused
    data.extend(&h_bytes); // 27..35
    data.extend(&g_bytes); // 35..51
    let header = format!(
        "{{{},{},{},{}}}",
        entry("b", "BF16", "[1]", "[0,2]"),
        entry("f", "F32", "[3,2]", "[2,26]"),
        entry("h", "F16", "[2,2]", "[27,35]"),
        entry("g", "F32", "[2,1,2]", "[35,51]")
    );
    let (dir, _) = single(&raw_file_at(&header, 0, &data));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let root = ckpt.root();
    let b = root.vector("b", 1).unwrap();
    assert_bits_eq(b.as_slice().unwrap(), &b_vals);
    assert!(ckpt.data("b", &[1]).unwrap().is_mapped());
    let f = root.weight("f", [3, 2]).unwrap();
    assert!(!f.data().is_mapped());
    assert_out_in(&f, &f_vals);
    let h = root.weight_in_out("h", [2, 2]).unwrap();
    assert!(!h.data().is_mapped());
    assert_out_in(&h, &transpose(&h_vals, 2, 2));
    // A misaligned batch is copied once; its matrices then share the copy.
    let g = root.batched_in_out("g", [2, 1, 2]).unwrap();
    assert!(!g.get(1).data().is_mapped());
    // `[in, out] = [1, 2]` transposed to `[out, in] = [2, 1]` keeps the element order.
    assert_out_in(&g.get(1), &g_vals[2..4]);

    // The same layout at an aligned start is zero-copy for every tensor that is aligned.
    let header = format!("{{{}}}", entry("w", "F32", "[3,2]", "[8,32]"));
    let mut data = vec![0u8; 8];
    data.extend(&f_bytes);
    let (dir, _) = single(&raw_file_at(&header, 0, &data));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let w = ckpt.root().weight("w", [3, 2]).unwrap();
    assert!(w.data().is_mapped());
    assert_out_in(&w, &f_vals);
}

#[test]
fn empty_tensors_and_metadata_are_accepted() {
    let header = format!(
        r#"{{"__metadata__":{{"format":"pt"}},{},{}}}"#,
        entry("empty", "F32", "[0,3]", "[4,4]"),
        entry("v", "F32", "[1]", "[0,4]")
    );
    let (dir, _) = single(&raw_file_at(&header, 0, &1.5f32.to_le_bytes()));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let root = ckpt.root();
    assert_eq!(root.weight("empty", [0, 3]).unwrap().data().len(), 0);
    assert_eq!(root.vector("v", 1).unwrap()[0], 1.5);
    assert_eq!(
        ckpt.metadata_of("v")
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
}

// ---------------------------------------------------------------------------------------------
// Bad files: each gives its own variant
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_files() {
    let err = bad_file(&[], &[]);
    assert!(
        matches!(
            err,
            Error::Truncated {
                file_len: 0,
                needed: 8,
                ..
            }
        ),
        "{err:?}"
    );
    let err = bad_file(&[1, 0, 0, 0, 0, 0, 0], &[]);
    assert!(
        matches!(
            err,
            Error::Truncated {
                file_len: 7,
                needed: 8,
                ..
            }
        ),
        "{err:?}"
    );

    // Header length larger than the file.
    let err = bad_file(&with_len(100, b"{}"), &[]);
    assert!(
        matches!(
            err,
            Error::Truncated {
                file_len: 10,
                needed: 108,
                ..
            }
        ),
        "{err:?}"
    );
    // Exactly at the limit, still larger than the file.
    let err = bad_file(&with_len(MAX_HEADER_LEN, b"{}"), &[]);
    assert!(
        matches!(err, Error::Truncated { needed, .. } if needed == MAX_HEADER_LEN + 8),
        "{err:?}"
    );

    // A valid file cut inside its data section: a tensor now points past the end.
    let full = serialize(&[tensor("t", DType::F32, &[4], 0)]);
    let err = bad_file(&full[..full.len() - 1], &["`t`"]);
    assert!(
        matches!(
            err,
            Error::OutOfBounds {
                end: 16,
                data_len: 15,
                ..
            }
        ),
        "{err:?}"
    );
    // Cut inside its header.
    let err = bad_file(&full[..12], &[]);
    assert!(matches!(err, Error::Truncated { file_len: 12, .. }), "{err:?}");
}

#[test]
fn header_length_out_of_range() {
    let err = bad_file(&with_len(u64::MAX, b"{}"), &[]);
    assert!(
        matches!(
            err,
            Error::HeaderLength {
                header_len: u64::MAX,
                ..
            }
        ),
        "{err:?}"
    );
    let err = bad_file(&with_len(u64::MAX - 7, b"{}"), &[]);
    assert!(matches!(err, Error::HeaderLength { .. }), "{err:?}");
    let err = bad_file(&with_len(MAX_HEADER_LEN + 1, b"{}"), &[]);
    assert!(
        matches!(err, Error::HeaderLength { header_len, .. } if header_len == MAX_HEADER_LEN + 1),
        "{err:?}"
    );
}

#[test]
fn malformed_headers() {
    let cases: &[(&str, &[&str])] = &[
        ("{not json", &["not JSON"]),
        ("", &["not JSON"]),
        ("[1,2,3]", &["not a JSON object"]),
        ("\"BF16\"", &["not a JSON object"]),
        (r#"{"w":[1,2]}"#, &["`w`", "not an object"]),
        (r#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, &["`w`", "dtype"]),
        (
            r#"{"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}"#,
            &["`w`", "dtype"],
        ),
        (r#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#, &["`w`", "shape"]),
        (
            r#"{"w":{"dtype":"F32","shape":1,"data_offsets":[0,4]}}"#,
            &["`w`", "shape"],
        ),
        (r#"{"w":{"dtype":"F32","shape":[1]}}"#, &["`w`", "data_offsets"]),
        (
            r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            &["`w`", "shape"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}"#,
            &["`w`", "shape"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1e30],"data_offsets":[0,4]}}"#,
            &["`w`", "shape"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}}"#,
            &["`w`", "shape"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,4]}}"#,
            &["`w`", "shape"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
            &["`w`", "data_offsets"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
            &["`w`", "data_offsets"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}"#,
            &["`w`", "offsets"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.5]}}"#,
            &["`w`", "offsets"],
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551616]}}"#,
            &["`w`", "offsets"],
        ),
        (r#"{"__metadata__":[1]}"#, &["__metadata__"]),
        (r#"{"__metadata__":{"k":1}}"#, &["__metadata__", "`k`"]),
    ];
    for (header, parts) in cases {
        let err = bad_file(&raw_file(header, &[0; 16]), parts);
        assert!(matches!(err, Error::Header { .. }), "{header}: {err:?}");
    }
    // Not UTF-8 / nested beyond serde_json's recursion limit: still a header error, no overflow.
    let err = bad_file(&with_len(3, &[0xff, 0xfe, 0xfd]), &[]);
    assert!(matches!(err, Error::Header { .. }), "{err:?}");
    let deep = format!(r#"{{"w":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
    let err = bad_file(&raw_file(&deep, &[]), &[]);
    assert!(matches!(err, Error::Header { .. }), "{err:?}");
}

#[test]
fn offsets_out_of_bounds() {
    let data = [0u8; 16];
    let cases = [
        ("[8,4]", 8, 4),                           // end < start
        ("[12,20]", 12, 20),                       // past the data section
        ("[16,20]", 16, 20),                       // starts at the end
        ("[0,18446744073709551615]", 0, u64::MAX), // huge end
        ("[18446744073709551615,18446744073709551615]", u64::MAX, u64::MAX),
        ("[18446744073709551615,4]", u64::MAX, 4),
    ];
    for (offsets, s, e) in cases {
        let header = format!("{{{}}}", entry("w.weight", "F32", "[2]", offsets));
        let err = bad_file(&raw_file(&header, &data), &["`w.weight`"]);
        assert!(
            matches!(err, Error::OutOfBounds { start, end, data_len: 16, .. } if start == s && end == e),
            "{offsets}: {err:?}"
        );
    }
}

#[test]
fn size_arithmetic_overflow() {
    // 4 · 2³² · 2³² overflows u64 while the offsets are in bounds.
    let header = format!("{{{}}}", entry("w", "F32", "[4294967296,4294967296]", "[0,8]"));
    let err = bad_file(&raw_file(&header, &[0; 8]), &["`w`"]);
    assert!(
        matches!(err, Error::Overflow { ref name, .. } if name == "w"),
        "{err:?}"
    );
    let header = format!("{{{}}}", entry("w", "BF16", "[18446744073709551615,2]", "[0,8]"));
    let err = bad_file(&raw_file(&header, &[0; 8]), &["`w`"]);
    assert!(matches!(err, Error::Overflow { .. }), "{err:?}");
    // A zero dimension makes the byte count 0, but the other dimensions describe an array no
    // machine can index (ndarray refuses it, so later look-ups would panic): refused up front.
    let header = format!("{{{}}}", entry("z", "F32", "[0,4611686018427387904,8]", "[0,0]"));
    let err = bad_file(&raw_file(&header, &[0; 8]), &["`z`"]);
    assert!(
        matches!(err, Error::Overflow { ref name, .. } if name == "z"),
        "{err:?}"
    );
}

#[test]
fn byte_length_not_matching_shape() {
    let cases = [
        ("F32", "[2,2]", "[0,12]", 16, 12),
        ("BF16", "[3]", "[0,8]", 6, 8),
        ("F16", "[]", "[0,4]", 2, 4),
    ];
    for (dtype, shape, offsets, want, have) in cases {
        let header = format!("{{{}}}", entry("t", dtype, shape, offsets));
        let err = bad_file(&raw_file(&header, &[0; 16]), &["`t`"]);
        assert!(
            matches!(err, Error::ByteLength { expected, got, .. } if expected == want && got == have),
            "{dtype} {shape}: {err:?}"
        );
    }
}

#[test]
fn overlapping_tensors() {
    let cases = [
        ("[0,8]", "[4,12]"),  // partial
        ("[0,16]", "[4,8]"),  // one inside the other
        ("[4,12]", "[4,12]"), // identical
    ];
    for (a, b) in cases {
        let len = |o: &str| -> usize {
            let v: Vec<usize> = serde_json::from_str(o).unwrap();
            (v[1] - v[0]) / 4
        };
        let header = format!(
            "{{{},{}}}",
            entry("a", "F32", &format!("[{}]", len(a)), a),
            entry("b", "F32", &format!("[{}]", len(b)), b)
        );
        let err = bad_file(&raw_file(&header, &[0; 16]), &["`a`", "`b`"]);
        assert!(matches!(err, Error::Overlap { .. }), "{a} {b}: {err:?}");
    }
    // Touching ranges and empty tensors inside others are not overlaps.
    let header = format!(
        "{{{},{},{}}}",
        entry("a", "F32", "[2]", "[0,8]"),
        entry("b", "F32", "[2]", "[8,16]"),
        entry("e", "F32", "[0]", "[4,4]")
    );
    let (dir, _) = single(&raw_file(&header, &[0; 16]));
    assert!(Checkpoint::open(dir.path()).is_ok());
}

#[test]
fn unknown_dtype_fails_at_open() {
    let header = format!(
        "{{{},{}}}",
        entry("ok", "F32", "[1]", "[0,4]"),
        entry("q", "Q7", "[1]", "[4,5]")
    );
    let err = bad_file(&raw_file(&header, &[0; 8]), &["`q`", "Q7"]);
    assert!(
        matches!(err, Error::UnsupportedDtype { ref name, ref dtype, .. } if name == "q" && dtype == "Q7"),
        "{err:?}"
    );
}

#[test]
fn known_but_unsupported_dtype_fails_at_look_up() {
    let header = format!(
        "{{{},{}}}",
        entry("ids", "I64", "[2]", "[0,16]"),
        entry("v", "F32", "[2]", "[16,24]")
    );
    let (dir, path) = single(&raw_file(&header, &[0; 24]));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert!(ckpt.contains("ids"));
    assert_eq!(ckpt.shape("ids").unwrap(), &[2]);
    assert!(ckpt.root().vector("v", 2).is_ok());
    let err = ckpt.root().vector("ids", 2).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedDtype { ref name, ref dtype, ref path, .. }
            if name == "ids" && dtype == "I64" && path.ends_with("model.safetensors")),
        "{err:?}"
    );
    assert_names(&err, &[&shown(&path), "`ids`"]);
    let err = ckpt.root().weight("ids", [1, 2]).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
}

#[test]
fn look_up_errors() {
    let tensors = [
        tensor("model.a.weight", DType::F16, &[2, 3], 0),
        tensor("model.experts", DType::BF16, &[2, 3, 4], 1),
    ];
    let (dir, path) = single(&serialize(&tensors));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let model = ckpt.scope("model");
    let file = shown(&path);

    // Shape mismatch, for every accessor: names the full tensor and its file.
    let errs = [
        model.weight("a.weight", [3, 2]).unwrap_err(),
        model.weight_in_out("a.weight", [2, 4]).unwrap_err(),
        model.batched_in_out("experts", [2, 4, 3]).unwrap_err(),
        model.vector("a.weight", 6).unwrap_err(),
        model.array("experts", &[6, 4]).unwrap_err(),
        model.weight_of("a.weight", [3, 2], &[DType::F16]).unwrap_err(),
    ];
    for err in &errs {
        assert!(
            matches!(err, Error::ShapeMismatch { path: p, .. } if *p == path),
            "{err:?}"
        );
        assert_names(err, &[&file]);
    }
    assert!(
        matches!(&errs[0], Error::ShapeMismatch { name, expected, got, .. }
        if name == "model.a.weight" && expected == &[3, 2] && got == &[2, 3])
    );
    assert_names(&errs[0], &["`model.a.weight`"]);

    // Dtype not accepted.
    let err = model
        .weight_of("a.weight", [2, 3], &[DType::BF16, DType::F32])
        .unwrap_err();
    assert!(
        matches!(err, Error::DtypeMismatch { ref name, got: DType::F16, ref path }
            if name == "model.a.weight" && path.ends_with("model.safetensors")),
        "{err:?}"
    );
    assert_names(&err, &["`model.a.weight`", &file, "F16"]);

    // Missing tensor: names the full name and the checkpoint it was looked for in.
    let err = model
        .scope("layers.9")
        .weight("q_proj.weight", [2, 3])
        .unwrap_err();
    assert!(
        matches!(err, Error::MissingTensor { ref name, ref path }
            if name == "model.layers.9.q_proj.weight" && path == dir.path()),
        "{err:?}"
    );
    assert_names(&err, &["`model.layers.9.q_proj.weight`", &shown(dir.path())]);
    assert!(matches!(ckpt.shape("nope"), Err(Error::MissingTensor { .. })));
    // A prefix of a name is not the name.
    assert!(matches!(
        ckpt.root().vector("model.a", 6),
        Err(Error::MissingTensor { .. })
    ));
}

#[test]
fn no_checkpoint() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "pytorch_model.bin", b"not ours");
    for location in [dir.path().to_path_buf(), dir.path().join("absent")] {
        let err = match Checkpoint::open(&location) {
            Ok(_) => panic!("opened {location:?}"),
            Err(e) => e,
        };
        assert!(
            matches!(err, Error::NoCheckpoint { ref dir } if *dir == location),
            "{err:?}"
        );
        assert_names(&err, &[&shown(&location)]);
    }
}

/// A directory, FIFO, device or link loop where a weight file or the index should be is
/// named for what it is, never reported as missing, and never opened (a FIFO would block).
#[cfg(unix)]
#[test]
fn weight_files_that_are_not_regular_files() {
    use std::os::unix::fs::symlink;
    type Make = fn(&Path) -> bool;
    let makers: [(&str, Make); 4] = [
        ("directory", |p| std::fs::create_dir(p).is_ok()),
        ("character device", |p| symlink("/dev/null", p).is_ok()),
        ("symbolic link", |p| {
            let other = p.with_extension("other");
            symlink(&other, p).is_ok() && symlink(p, &other).is_ok()
        }),
        ("FIFO", |p| {
            std::process::Command::new("mkfifo")
                .arg(p)
                .status()
                .is_ok_and(|s| s.success())
        }),
    ];
    for file in ["model.safetensors", "model.safetensors.index.json"] {
        for (what, make) in makers {
            let dir = TempDir::new().unwrap();
            let path = dir.path().join(file);
            if !make(&path) {
                continue; // no mkfifo here
            }
            let err = match Checkpoint::open(dir.path()) {
                Ok(_) => panic!("{file} as a {what} opened"),
                Err(e) => e,
            };
            assert!(
                matches!(&err, Error::NotRegularFile { path: p, .. } if *p == path),
                "{file} as a {what}: {err:?}"
            );
            assert!(err.to_string().contains(what), "{err}");
        }
    }
    // A shard named by the index.
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "model.safetensors.index.json",
        br#"{"weight_map": {"x": "a.safetensors"}}"#,
    );
    let shard = dir.path().join("a.safetensors");
    std::fs::create_dir(&shard).unwrap();
    let err = match Checkpoint::open(dir.path()) {
        Ok(_) => panic!("a directory shard opened"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, Error::NotRegularFile { path, .. } if *path == shard),
        "{err:?}"
    );
    // SafetensorsFile::open itself refuses a device before mapping it.
    let err = match llama4_core::safetensors::SafetensorsFile::open("/dev/zero") {
        Ok(_) => panic!("/dev/zero opened"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::NotRegularFile { .. }), "{err:?}");
}

/// An index that never ends (a link to `/dev/zero`) is refused, not read until memory runs out.
#[cfg(unix)]
#[test]
fn endless_index_is_refused() {
    let dir = TempDir::new().unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("model.safetensors.index.json")).unwrap();
    let err = match Checkpoint::open(dir.path()) {
        Ok(_) => panic!("opened"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::NotRegularFile { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Bad indexes and shards
// ---------------------------------------------------------------------------------------------

/// A directory with one valid shard `a.safetensors` holding `x` (F32 `[2]`) and the given index
/// text; returns the error of opening it and the index path.
fn index_err(index: &str) -> (TempDir, Error, PathBuf) {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "a.safetensors",
        &serialize(&[tensor("x", DType::F32, &[2], 0)]),
    );
    let index_path = write(dir.path(), "model.safetensors.index.json", index.as_bytes());
    let err = match Checkpoint::open(dir.path()) {
        Ok(_) => panic!("index accepted: {index}"),
        Err(e) => e,
    };
    (dir, err, index_path)
}

#[test]
fn malformed_index() {
    let cases: &[(&str, &str)] = &[
        ("{\"weight_map\": ", "not JSON"),
        ("", "not JSON"),
        ("[]", "weight_map"),
        (r#"{"metadata":{}}"#, "weight_map"),
        (r#"{"weight_map":["a.safetensors"]}"#, "weight_map"),
        (r#"{"weight_map":{"x":1}}"#, "`x`"),
        (r#"{"weight_map":{"x":null}}"#, "`x`"),
        (r#"{"weight_map":{"x":["a.safetensors"]}}"#, "`x`"),
        (r#"{"weight_map":{"x":"../a.safetensors"}}"#, "../a.safetensors"),
        (
            r#"{"weight_map":{"x":"sub/../../a.safetensors"}}"#,
            "sub/../../a.safetensors",
        ),
        (r#"{"weight_map":{"x":"/etc/passwd"}}"#, "/etc/passwd"),
        (r#"{"weight_map":{"x":""}}"#, "``"),
        (r#"{"weight_map":{"x":"."}}"#, "`.`"),
    ];
    for (index, part) in cases {
        let (_dir, err, index_path) = index_err(index);
        assert!(
            matches!(err, Error::Index { ref path, .. } if *path == index_path),
            "{index}: {err:?}"
        );
        assert_names(&err, &[&shown(&index_path), part]);
    }
}

#[test]
fn missing_shard() {
    let (dir, err, index_path) = index_err(r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#);
    let shard = dir.path().join("b.safetensors");
    assert!(
        matches!(err, Error::MissingShard { ref index, shard: ref s } if *index == index_path && *s == shard),
        "{err:?}"
    );
    assert_names(&err, &[&shown(&index_path), &shown(&shard)]);
}

#[test]
fn bad_shard_reports_the_shard() {
    let dir = TempDir::new().unwrap();
    let shard = write(dir.path(), "a.safetensors", &with_len(u64::MAX, b"{}"));
    write(
        dir.path(),
        "model.safetensors.index.json",
        br#"{"weight_map":{"x":"a.safetensors"}}"#,
    );
    let err = match Checkpoint::open(dir.path()) {
        Ok(_) => panic!("bad shard accepted"),
        Err(e) => e,
    };
    assert!(
        matches!(err, Error::HeaderLength { ref path, .. } if *path == shard),
        "{err:?}"
    );
}

#[test]
fn index_names_a_tensor_its_shard_lacks() {
    let dir = TempDir::new().unwrap();
    let shard = write(
        dir.path(),
        "a.safetensors",
        &serialize(&[tensor("x", DType::F32, &[2], 0)]),
    );
    write(
        dir.path(),
        "model.safetensors.index.json",
        br#"{"weight_map":{"x":"a.safetensors","ghost":"a.safetensors"}}"#,
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert!(ckpt.root().vector("x", 2).is_ok());
    let err = ckpt.root().vector("ghost", 2).unwrap_err();
    assert!(
        matches!(err, Error::MissingTensor { ref name, ref path } if name == "ghost" && *path == shard),
        "{err:?}"
    );
    assert_names(&err, &["`ghost`", &shown(&shard)]);
    // A name the index does not list at all names the directory.
    let err = ckpt.root().vector("absent", 2).unwrap_err();
    assert!(
        matches!(err, Error::MissingTensor { ref path, .. } if path == dir.path()),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// proptest: mutated headers
// ---------------------------------------------------------------------------------------------

/// Bytes per element of the dtypes the format defines (from the format's specification, kept
/// separate from the library's table on purpose).
fn spec_size(dtype: &str) -> Option<u128> {
    match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => Some(1),
        "I16" | "U16" | "F16" | "BF16" => Some(2),
        "I32" | "U32" | "F32" => Some(4),
        "I64" | "U64" | "F64" => Some(8),
        _ => None,
    }
}

/// What an accepted header must guarantee: the announced length, every range inside the data
/// section and exactly as long as dtype × shape, and no two non-empty ranges sharing bytes.
fn check_accepted(bytes: &[u8], header: &Header) -> std::result::Result<(), TestCaseError> {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[..8]);
    prop_assert_eq!(header.data_start as u64, 8 + u64::from_le_bytes(le));
    prop_assert!(header.data_start <= bytes.len());
    let data_len = bytes.len() - header.data_start;
    let mut ranges = Vec::new();
    for (name, t) in &header.tensors {
        let (s, e) = t.data_offsets;
        prop_assert!(
            s <= e && e <= data_len,
            "`{}`: {}..{} of {}",
            name,
            s,
            e,
            data_len
        );
        let size = spec_size(&t.dtype);
        prop_assert!(size.is_some(), "`{}`: dtype {} accepted", name, t.dtype);
        let elems = t
            .shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128));
        let bytes = elems.and_then(|n| n.checked_mul(size.unwrap_or(0)));
        prop_assert_eq!(bytes, Some((e - s) as u128), "`{}`", name);
        // No look-up may fail on an accepted shape: the non-zero dimensions must describe an
        // array that ndarray (and slices) can index.
        let nonzero = t
            .shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(size.unwrap_or(0), |acc, &d| acc.checked_mul(d as u128));
        prop_assert!(
            nonzero.is_some_and(|n| n <= isize::MAX as u128),
            "`{}`: shape {:?} accepted",
            name,
            t.shape
        );
        if s < e {
            ranges.push((s, e));
        }
    }
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            prop_assert!(a.1 <= b.0 || b.1 <= a.0, "{:?} and {:?} overlap", a, b);
        }
    }
    Ok(())
}

/// A valid small file: F32 `[2,3]`, BF16 `[4]`, F16 `[3,1]`, and an empty tensor.
fn base_file() -> Vec<u8> {
    serialize(&[
        tensor("a", DType::F32, &[2, 3], 0),
        tensor("b", DType::BF16, &[4], 1),
        tensor("c", DType::F16, &[3, 1], 2),
        tensor("d", DType::F32, &[0], 3),
    ])
}

fn header_end(bytes: &[u8]) -> usize {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[..8]);
    8 + u64::from_le_bytes(le) as usize
}

/// JSON number spellings near the interesting boundaries (and some that are not valid JSON).
fn json_number(data_len: u64) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0u64..48).prop_map(|n| n.to_string()),
        2 => (0u64..=2).prop_map(move |d| (data_len + d).saturating_sub(1).to_string()),
        1 => Just(u64::MAX.to_string()),
        1 => Just((u64::MAX - 1).to_string()),
        1 => Just("18446744073709551616".to_string()),
        1 => Just((1u64 << 32).to_string()),
        1 => Just((1u64 << 62).to_string()),
        1 => Just((1u64 << 63).to_string()),
        1 => Just((usize::MAX / 4 + 1).to_string()),
        1 => (-5i64..0).prop_map(|n| n.to_string()),
        1 => Just("1.5".to_string()),
        1 => Just("4.0".to_string()),
        1 => Just("1e30".to_string()),
        1 => Just("-0".to_string()),
        1 => Just("007".to_string()),
        1 => Just("null".to_string()),
        1 => Just("0".to_string()),
    ]
}

fn dtype_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["F32", "BF16", "F16"]).prop_map(str::to_string),
        1 => prop::sample::select(vec!["I64", "U8", "BOOL", "F64", "Q7", "", "f32"])
            .prop_map(str::to_string),
    ]
}

/// A header of 1–4 tensors whose every number is drawn from [`json_number`]. Half of the
/// tensors get offsets consistent with their dtype and shape, placed one after the other, so
/// that headers also get past the byte-length check to the later ones; the data section is then
/// long enough for them when that is small.
fn spliced_file() -> impl Strategy<Value = Vec<u8>> {
    (0u64..64).prop_flat_map(|data_len| {
        let one = (
            dtype_name(),
            prop::collection::vec(json_number(data_len), 0..4),
            json_number(data_len),
            json_number(data_len),
            any::<bool>(),
        );
        (prop::collection::vec(one, 1..5), Just(data_len)).prop_map(|(tensors, data_len)| {
            let mut cursor: u128 = 0;
            let mut entries = Vec::new();
            for (i, (dtype, shape, s, e, consistent)) in tensors.iter().enumerate() {
                let dims: Option<Vec<u128>> = shape.iter().map(|d| d.parse().ok()).collect();
                let bytes = dims
                    .zip(spec_size(dtype))
                    .and_then(|(dims, size)| dims.iter().try_fold(size, |acc, &d| acc.checked_mul(d)));
                let offsets = match bytes.and_then(|b| cursor.checked_add(b)) {
                    Some(end) if *consistent => {
                        let offsets = format!("[{cursor},{end}]");
                        cursor = end;
                        offsets
                    }
                    _ => format!("[{s},{e}]"),
                };
                let shape = format!("[{}]", shape.join(","));
                entries.push(entry(&format!("t{i}"), dtype, &shape, &offsets));
            }
            let header = format!("{{{}}}", entries.join(","));
            let data_len = if cursor <= 4096 {
                (data_len as usize).max(cursor as usize)
            } else {
                data_len as usize
            };
            raw_file(&header, &vec![0x5a; data_len])
        })
    })
}

fn fuzz_path() -> &'static Path {
    Path::new("fuzz.safetensors")
}

/// Parses `bytes`; an accepted header must satisfy [`check_accepted`].
fn parse_and_check(bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
    if let Ok(header) = parse_header(fuzz_path(), bytes) {
        check_accepted(bytes, &header)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        parse_and_check(&bytes)?;
    }

    /// Random bytes after a length prefix that fits, so the JSON parser sees them.
    #[test]
    fn arbitrary_header_bytes_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..300),
        cut in any::<prop::sample::Index>(),
    ) {
        let len = cut.index(body.len() + 1) as u64;
        parse_and_check(&with_len(len, &body))?;
    }

    #[test]
    fn overwritten_header_bytes(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = base_file();
        let end = header_end(&bytes);
        for (at, byte) in edits {
            let i = at.index(end);
            bytes[i] = byte;
        }
        parse_and_check(&bytes)?;
    }

    /// Flips bits, with the length prefix left alone, so the JSON itself is damaged.
    #[test]
    fn flipped_json_bits(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6),
    ) {
        let mut bytes = base_file();
        let end = header_end(&bytes);
        for (at, bit) in edits {
            let i = 8 + at.index(end - 8);
            bytes[i] ^= 1 << bit;
        }
        parse_and_check(&bytes)?;
    }

    /// Digits replaced inside the header: numbers change, the JSON stays mostly valid.
    #[test]
    fn rewritten_digits(
        edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(b"0123456789-.e ".to_vec())), 1..6),
    ) {
        let mut bytes = base_file();
        let end = header_end(&bytes);
        let digits: Vec<usize> = (8..end).filter(|&i| bytes[i].is_ascii_digit()).collect();
        for (at, c) in edits {
            bytes[digits[at.index(digits.len())]] = c;
        }
        parse_and_check(&bytes)?;
    }

    #[test]
    fn truncated_anywhere(cut in any::<prop::sample::Index>()) {
        let bytes = base_file();
        let n = cut.index(bytes.len());
        let res = parse_header(fuzz_path(), &bytes[..n]);
        // Every tensor but the empty one ends at the end of the file.
        prop_assert!(res.is_err(), "accepted a file cut to {} of {} bytes", n, bytes.len());
    }

    #[test]
    fn spliced_numbers(bytes in spliced_file()) {
        parse_and_check(&bytes)?;
    }
}

proptest! {
    // Fewer cases: each writes and maps a file.
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Whatever a spliced header parses to, every look-up returns a value or an error: reading
    /// each accepted tensor through the map yields exactly `shape` elements.
    #[test]
    fn accepted_spliced_files_read_back(bytes in spliced_file()) {
        let dir = TempDir::new().unwrap();
        let path = write(dir.path(), "model.safetensors", &bytes);
        let file = match SafetensorsFile::open(&path) {
            Ok(f) => f,
            Err(_) => return Ok(()),
        };
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let infos: HashMap<String, Vec<usize>> = file
            .header()
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        for (name, shape) in infos {
            match ckpt.root().array(&name, &shape) {
                Ok(a) => prop_assert_eq!(a.len(), shape.iter().product::<usize>()),
                Err(e) => prop_assert!(matches!(e, Error::UnsupportedDtype { .. }), "{:?}", e),
            }
            let _ = ckpt.root().weight(&name, [shape.first().copied().unwrap_or(1), shape.iter().skip(1).product()]);
        }
    }
}
