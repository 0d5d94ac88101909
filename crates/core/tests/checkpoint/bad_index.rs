//! Bad indexes and shards.

use super::*;

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
