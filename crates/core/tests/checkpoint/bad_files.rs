//! Bad files: each gives its own error variant, naming the file and the tensor.

use super::*;

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
