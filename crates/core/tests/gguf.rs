//! GGUF reading: every value type, tensors read in place, a named error for each malformed
//! field, and proptest over mutated and random files (no panic; an accepted header's tensors lie
//! inside the file, aligned, sized by type and dimensions, disjoint).

mod common;

use std::path::Path;

use common::gguf::*;
use llama4_core::ggml::GgmlType;
use llama4_core::gguf::{parse_header, Array, GgufFile, Header, Value, MAX_DEPTH};
use llama4_core::{kernels, Error};
use proptest::prelude::*;
use tempfile::TempDir;

fn p() -> &'static Path {
    Path::new("t.gguf")
}

fn u32b(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Q4_K blocks with small finite scales.
fn q4k_blocks(n: usize, seed: u8) -> Vec<u8> {
    let mut v: Vec<u8> = (0..n * 144)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    for b in v.chunks_exact_mut(144) {
        b[0..4].copy_from_slice(&[0x00, 0x20, 0x00, 0x1c]); // d = 2^-7, dmin = 2^-8
    }
    v
}

/// Every value type, a nested array, F32 / Q4_K / Q8_0 / IQ2_XXS tensors, alignment 64.
fn rich(version: u32) -> Gguf {
    let nested = {
        let inner1 = array(I32, 2, &[1i32.to_le_bytes(), (-2i32).to_le_bytes()].concat());
        let inner2 = array(STRING, 1, &string(b"x"));
        array(ARRAY, 2, &[inner1, inner2].concat())
    };
    let mut g = Gguf::new(version)
        .kv("general.architecture", STRING, string(b"llama4"))
        .kv("general.alignment", U32, u32b(64))
        .kv("a.u8", U8, vec![200])
        .kv("a.i8", I8, vec![0xff])
        .kv("a.u16", U16, 65535u16.to_le_bytes().to_vec())
        .kv("a.i16", I16, (-300i16).to_le_bytes().to_vec())
        .kv("a.i32", I32, (-7i32).to_le_bytes().to_vec())
        .kv("a.f32", F32, 0.5f32.to_le_bytes().to_vec())
        .kv("a.bool", BOOL, vec![1])
        .kv("a.u64", U64, (1u64 << 40).to_le_bytes().to_vec())
        .kv("a.i64", I64, (-5i64).to_le_bytes().to_vec())
        .kv("a.f64", F64, 2.25f64.to_le_bytes().to_vec())
        .kv(
            "a.tokens",
            ARRAY,
            array(
                STRING,
                3,
                &[string(b"a"), string("é".as_bytes()), string(b"")].concat(),
            ),
        )
        .kv("a.bools", ARRAY, array(BOOL, 2, &[0, 1]))
        .kv("a.nested", ARRAY, nested)
        .kv("a.empty", ARRAY, array(F64, 0, &[]));
    g.alignment = 64;
    let norm: Vec<u8> = (0..256).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let q8: Vec<u8> = (0..2 * 3 * 2)
        .flat_map(|b| {
            let mut blk = vec![0x00, 0x24]; // d = 2^-6
            blk.extend((0..32).map(|j| (j as u8).wrapping_sub(b as u8 * 3)));
            blk
        })
        .collect();
    g.tensor(tensor("norm", &[256], 0, norm))
        .tensor(tensor("w", &[512, 3], 12, q4k_blocks(6, 1)))
        .tensor(tensor("experts", &[64, 3, 2], 8, q8))
        .tensor(tensor("iq", &[256, 1], 16, vec![0; 66]))
}

/// A file copied into huge pages reads the same tensors, still borrowed from a map; it is
/// copied exactly when the kernel offers transparent huge pages (it fits in any memory).
#[test]
fn a_copy_into_huge_pages_reads_the_same_tensors() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, rich(3).build()).unwrap();
    let offered = std::env::var("LLAMA4_WEIGHTS").is_err()
        && std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|mode| mode.contains("[always]") || mode.contains("[madvise]"));
    let mapped = GgufFile::open(&path).unwrap();
    let mut copied = GgufFile::open(&path).unwrap();
    assert_eq!(copied.copy_to_huge_pages(), offered);
    for name in ["norm", "w", "experts"] {
        assert_eq!(
            copied.raw_bytes(name).unwrap(),
            mapped.raw_bytes(name).unwrap(),
            "{name}"
        );
    }
    assert_eq!(copied.to_f32("norm", &[256]).unwrap()[5], 1.25);
    let (w, want) = (
        copied.weight("w", [3, 512]).unwrap(),
        mapped.weight("w", [3, 512]).unwrap(),
    );
    assert!(w.data().is_mapped());
    assert_eq!(w.to_f32_out_in(), want.to_f32_out_in());
}

#[test]
fn every_value_type_and_tensor_reads_back() {
    for version in [2, 3] {
        let bytes = rich(version).build();
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let h = f.header();
        assert_eq!((h.version, h.alignment), (version, 64));
        assert_eq!(h.data_start % 64, 0);
        // Text models, and a multimodal projector (`clip`).
        let arch = f.get("general.architecture").and_then(Value::as_str);
        assert!(matches!(arch, Some("llama4" | "clip")), "{arch:?}");
        assert_eq!(f.get("a.u8"), Some(&Value::U8(200)));
        assert_eq!(f.get("a.i8"), Some(&Value::I8(-1)));
        assert_eq!(f.get("a.u16").and_then(Value::as_u64), Some(65535));
        assert_eq!(f.get("a.i16").and_then(Value::as_i64), Some(-300));
        assert_eq!(f.get("a.i32").and_then(Value::as_u64), None);
        assert_eq!(f.get("a.f32").and_then(Value::as_f32), Some(0.5));
        assert_eq!(f.get("a.bool").and_then(Value::as_bool), Some(true));
        assert_eq!(f.get("a.u64").and_then(Value::as_u64), Some(1 << 40));
        assert_eq!(f.get("a.i64").and_then(Value::as_i64), Some(-5));
        assert_eq!(f.get("a.f64"), Some(&Value::F64(2.25)));
        let tokens = f.get("a.tokens").and_then(Value::as_array).unwrap();
        assert_eq!(tokens.as_strings().unwrap(), ["a", "é", ""]);
        assert_eq!(
            f.get("a.bools")
                .and_then(Value::as_array)
                .and_then(Array::as_bools),
            Some(&[false, true][..])
        );
        let Some(Value::Array(Array::Array(nested))) = f.get("a.nested") else {
            panic!()
        };
        assert_eq!(nested[0].to_i64s(), Some(vec![1, -2]));
        assert_eq!(nested[1].as_strings().unwrap(), ["x"]);
        assert!(f.get("a.empty").and_then(Value::as_array).unwrap().is_empty());
        assert_eq!(h.metadata.len(), 16);

        assert_eq!(f.info("w").unwrap().shape(), [3, 512]);
        assert_eq!(f.to_f32("norm", &[256]).unwrap()[5], 1.25);
        let w = f.weight("w", [3, 512]).unwrap();
        assert!(w.data().is_mapped());
        assert_eq!(w.data().ggml(), Some(GgmlType::Q4K));
        assert_eq!(f.raw_bytes("w").unwrap(), &q4k_blocks(6, 1)[..]);
        let x = ndarray::Array2::from_elem((1, 512), 0.5f32);
        assert!(kernels::linear(x.view(), &w)
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
        let e = f.batched("experts", [2, 3, 64]).unwrap();
        assert_eq!((e.batch(), e.out_features(), e.in_features()), (2, 3, 64));
        let m1 = e.get(1).to_f32_out_in();
        // Block 6 (expert 1, row 0, first block): element j is (j − 18) · 2^-6.
        assert_eq!(m1[[0, 0]], (0u8.wrapping_sub(18) as i8) as f32 / 64.0);

        // Named errors at access: unsupported type (named), missing tensor, wrong shape.
        match f.data("iq") {
            Err(Error::UnsupportedDtype { name, dtype, .. }) => {
                assert_eq!((name.as_str(), dtype.as_str()), ("iq", "IQ2_XXS"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            f.weight("nope", [1, 1]),
            Err(Error::MissingTensor { .. })
        ));
        assert!(matches!(
            f.weight("w", [512, 3]),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}

/// `base` with the kv list replaced by `kvs`.
fn with_kvs(kvs: Vec<(&str, u32, Vec<u8>)>) -> Vec<u8> {
    let mut g = Gguf::new(3);
    for (k, t, v) in kvs {
        g = g.kv(k, t, v);
    }
    g.tensor(tensor("t", &[32], 0, vec![0; 128])).build()
}

fn header_err(bytes: &[u8]) -> Error {
    parse_header(p(), bytes).expect_err("accepted a malformed file")
}

fn is_header(e: &Error, needle: &str) -> bool {
    matches!(e, Error::GgufHeader { reason, .. } if reason.contains(needle))
}

#[test]
fn each_malformed_field_has_a_named_error() {
    let good = rich(3).build();
    assert!(parse_header(p(), &good).is_ok());

    let mut b = good.clone();
    b[0] = b'G' ^ 1;
    assert!(is_header(&header_err(&b), "magic"));
    for (v, why) in [
        (1u32, "version 1"),
        (3 << 24, "big-endian"),
        (9, "unknown GGUF version"),
    ] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(is_header(&header_err(&b), why), "{v}");
    }
    assert!(matches!(header_err(&good[..30]), Error::GgufTruncated { .. }));
    assert!(is_header(
        &header_err(&with_kvs(vec![("k", 13, vec![0])])),
        "unknown value type 13"
    ));
    assert!(is_header(
        &header_err(&with_kvs(vec![("k", BOOL, vec![2])])),
        "bool byte 2"
    ));
    assert!(is_header(
        &header_err(&with_kvs(vec![("k", U8, vec![1]), ("k", U8, vec![2])])),
        "duplicate key"
    ));
    assert!(is_header(
        &header_err(&with_kvs(vec![("", U8, vec![1])])),
        "empty key"
    ));
    assert!(is_header(
        &header_err(&with_kvs(vec![("k", STRING, string(&[0xff, 0xfe]))])),
        "UTF-8"
    ));
    assert!(is_header(
        &header_err(&with_kvs(vec![(
            "general.alignment",
            U64,
            64u64.to_le_bytes().to_vec()
        )])),
        "alignment"
    ));
    assert!(is_header(
        &header_err(&with_kvs(vec![("general.alignment", U32, u32b(48))])),
        "alignment"
    ));
    assert!(is_header(
        &header_err(&with_kvs(vec![("general.alignment", U32, u32b(0))])),
        "alignment"
    ));
    assert!(is_header(
        &header_err(&with_kvs(vec![("k", ARRAY, array(77, 0, &[]))])),
        "element type 77"
    ));

    // Counts and lengths beyond the file, or beyond the limits, before anything is allocated.
    let huge = |t: u32| with_kvs(vec![("k", ARRAY, array(t, 1 << 60, &[]))]);
    for t in [U8, U64, STRING, ARRAY, BOOL] {
        assert!(matches!(header_err(&huge(t)), Error::GgufTruncated { .. }), "{t}");
    }
    let long = with_kvs(vec![(
        "k",
        STRING,
        [(1u64 << 40).to_le_bytes().to_vec(), vec![b'a'; 8]].concat(),
    )]);
    assert!(matches!(
        header_err(&long),
        Error::GgufLimit {
            what: "string value",
            ..
        }
    ));
    let mut deep = array(U8, 0, &[]);
    for _ in 0..MAX_DEPTH + 1 {
        deep = array(ARRAY, 1, &deep);
    }
    assert!(matches!(
        header_err(&with_kvs(vec![("k", ARRAY, deep)])),
        Error::GgufLimit {
            what: "array nesting",
            ..
        }
    ));
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(matches!(
        header_err(&b),
        Error::GgufLimit {
            what: "tensor count",
            ..
        }
    ));
    let mut b = good.clone();
    b[8..16].copy_from_slice(&100_000u64.to_le_bytes());
    assert!(matches!(header_err(&b), Error::GgufTruncated { .. }));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        header_err(&b),
        Error::GgufLimit {
            what: "metadata count",
            ..
        }
    ));

    // Tensor infos.
    let one = |t: Tensor| Gguf::new(3).tensor(t).build();
    let mut t = tensor("t", &[32], 0, vec![0; 128]);
    t.name = vec![b'n'; 64];
    assert!(matches!(
        header_err(&one(t)),
        Error::GgufLimit {
            what: "tensor name",
            ..
        }
    ));
    assert!(is_header(
        &header_err(&one(tensor("t", &[1, 1, 1, 1, 1], 0, vec![0; 4]))),
        "5 dimensions"
    ));
    assert!(is_header(
        &header_err(&one(tensor("t", &[32], 31, vec![0; 128]))),
        "unknown ggml type id 31"
    ));
    assert!(is_header(
        &header_err(&one(tensor("t", &[100], 12, vec![0; 144]))),
        "block size 256"
    ));
    assert!(matches!(
        header_err(&one(tensor("t", &[1 << 40, 1 << 40], 0, vec![]))),
        Error::Overflow { .. }
    ));
    assert!(matches!(
        header_err(&one(tensor("t", &[64], 0, vec![0; 128]))),
        Error::OutOfBounds { .. }
    ));
    let mut t = tensor("t", &[8], 0, vec![0; 64]);
    t.offset = Some(16);
    assert!(is_header(&header_err(&one(t)), "alignment 32"));
    let mut b = tensor("b", &[8], 0, vec![0; 32]);
    b.offset = Some(0);
    let over = Gguf::new(3)
        .tensor(tensor("a", &[16], 0, vec![0; 64]))
        .tensor(b)
        .build();
    assert!(matches!(header_err(&over), Error::Overlap { .. }));
    let dup = Gguf::new(3)
        .tensor(tensor("a", &[8], 0, vec![0; 32]))
        .tensor(tensor("a", &[8], 0, vec![0; 32]))
        .build();
    assert!(is_header(&header_err(&dup), "duplicate tensor name"));

    // Accepted: zero-sized tensors, no tensors at all, an empty file's data section.
    let zero = Gguf::new(3)
        .tensor(tensor("z", &[0, 5], 0, vec![]))
        .tensor(tensor("a", &[8], 0, vec![0; 32]))
        .build();
    assert!(parse_header(p(), &zero).is_ok());
    assert!(parse_header(p(), &Gguf::new(2).kv("k", U8, vec![1]).build()).is_ok());
}

// ---------------------------------------------------------------------------------------------
// proptest
// ---------------------------------------------------------------------------------------------

/// What an accepted header guarantees.
fn check_accepted(bytes: &[u8], h: &Header) -> Result<(), TestCaseError> {
    prop_assert!(h.alignment.is_power_of_two());
    prop_assert!(h.data_start.is_multiple_of(h.alignment));
    prop_assert!(h.tensors.is_empty() || h.data_start <= bytes.len() as u64);
    let mut ranges = Vec::new();
    for t in &h.tensors {
        prop_assert!(t.ne.len() <= 4);
        let elements =
            t.ne.iter()
                .try_fold(1u128, |a, &d| a.checked_mul(d as u128))
                .unwrap();
        prop_assert_eq!(elements % t.ty.block_size() as u128, 0);
        prop_assert_eq!(
            elements / t.ty.block_size() as u128 * t.ty.type_size() as u128,
            t.nbytes as u128
        );
        prop_assert!(t.offset.is_multiple_of(h.alignment));
        prop_assert!(h.data_start as u128 + t.offset as u128 + t.nbytes as u128 <= bytes.len() as u128);
        if t.nbytes > 0 {
            ranges.push((t.offset, t.offset + t.nbytes));
        }
    }
    ranges.sort();
    for w in ranges.windows(2) {
        prop_assert!(w[0].1 <= w[1].0);
    }
    Ok(())
}

fn parse_and_check(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(h) = parse_header(p(), bytes) {
        check_accepted(bytes, &h)?;
    }
    Ok(())
}

/// u64 spellings near the boundaries that matter.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..300,
        1 => Just(u64::MAX),
        1 => Just(1u64 << 63),
        1 => Just(1u64 << 62),
        1 => Just((1u64 << 32) - 1),
        1 => Just(1u64 << 32),
        1 => (0u64..8).prop_map(|s| 32 << s),
    ]
}

/// Offsets of the u32 / u64 fields of `rich(3)`: counts, lengths, types, dims and offsets.
fn numeric_fields() -> Vec<(usize, usize)> {
    // Walk the file with the format's grammar (valid input, so no checks).
    let b = rich(3).build();
    let mut f = vec![(8, 8), (16, 8)];
    let mut pos = 24;
    let rd = |pos: usize, n: usize| -> u64 {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&b[pos..pos + n]);
        u64::from_le_bytes(a)
    };
    fn value(pos: &mut usize, t: u64, f: &mut Vec<(usize, usize)>, rd: &dyn Fn(usize, usize) -> u64) {
        match t {
            0 | 1 | 7 => *pos += 1,
            2 | 3 => *pos += 2,
            4..=6 => {
                f.push((*pos, 4));
                *pos += 4
            }
            10..=12 => {
                f.push((*pos, 8));
                *pos += 8
            }
            8 => {
                f.push((*pos, 8));
                *pos += 8 + rd(*pos, 8) as usize
            }
            _ => {
                let et = rd(*pos, 4);
                f.push((*pos, 4));
                let n = rd(*pos + 4, 8);
                f.push((*pos + 4, 8));
                *pos += 12;
                for _ in 0..n {
                    value(pos, et, f, rd)
                }
            }
        }
    }
    for _ in 0..rd(16, 8) {
        f.push((pos, 8));
        pos += 8 + rd(pos, 8) as usize;
        let t = rd(pos, 4);
        f.push((pos, 4));
        pos += 4;
        value(&mut pos, t, &mut f, &rd);
    }
    for _ in 0..rd(8, 8) {
        f.push((pos, 8));
        pos += 8 + rd(pos, 8) as usize;
        let nd = rd(pos, 4) as usize;
        f.push((pos, 4));
        pos += 4;
        for _ in 0..nd {
            f.push((pos, 8));
            pos += 8
        }
        f.push((pos, 4));
        f.push((pos + 4, 8));
        pos += 12;
    }
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        parse_and_check(&bytes)?;
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend(&bytes);
        parse_and_check(&b)?;
    }

    #[test]
    fn overwritten_bytes(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut b = rich(3).build();
        let end = parse_header(p(), &b).unwrap().data_start as usize;
        for (at, v) in edits {
            b[at.index(end)] = v;
        }
        parse_and_check(&b)?;
    }

    #[test]
    fn flipped_bits(edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6)) {
        let mut b = rich(2).build();
        for (at, bit) in edits {
            let i = at.index(b.len());
            b[i] ^= 1 << bit;
        }
        parse_and_check(&b)?;
    }

    /// Counts, lengths, type ids, dimensions and offsets replaced by boundary values.
    #[test]
    fn spliced_numbers(edits in prop::collection::vec((any::<prop::sample::Index>(), number()), 1..4)) {
        let fields = numeric_fields();
        let mut b = rich(3).build();
        for (at, v) in edits {
            let (pos, len) = fields[at.index(fields.len())];
            b[pos..pos + len].copy_from_slice(&v.to_le_bytes()[..len]);
        }
        parse_and_check(&b)?;
    }

    #[test]
    fn truncated_anywhere(cut in any::<prop::sample::Index>()) {
        let b = rich(3).build();
        let n = cut.index(b.len());
        // The last tensor ends at the end of the file: every cut loses bytes it needs.
        prop_assert!(parse_header(p(), &b[..n]).is_err(), "accepted a cut at {} of {}", n, b.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever a mutated file parses to, every tensor reads back through the map or gives an
    /// error naming it: never a panic.
    #[test]
    fn accepted_files_read_back(edits in prop::collection::vec((any::<prop::sample::Index>(), number()), 1..3)) {
        let fields = numeric_fields();
        let mut b = rich(3).build();
        for (at, v) in edits {
            let (pos, len) = fields[at.index(fields.len())];
            b[pos..pos + len].copy_from_slice(&v.to_le_bytes()[..len]);
        }
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &b).unwrap();
        let Ok(f) = GgufFile::open(&path) else { return Ok(()) };
        for t in f.header().tensors.clone() {
            match f.data(&t.name) {
                Ok(d) => prop_assert_eq!(d.len() as u64, t.elements()),
                Err(e) => prop_assert!(matches!(e, Error::UnsupportedDtype { .. }), "{:?}", e),
            }
            prop_assert_eq!(f.raw_bytes(&t.name).unwrap().len() as u64, t.nbytes);
        }
    }
}

/// Every file llama.cpp's converter and llama-quantize wrote for the fixtures opens; each tensor
/// has a supported type and reads back its size; each matrix multiplies as the scalar twin.
#[test]
fn llama_cpp_written_files_read() {
    use llama4_core::ggml::dot::{linear_reference, rounding_bound};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf");
    let mut seen = std::collections::HashSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            continue;
        }
        let f = GgufFile::open(&path).unwrap();
        // Text models, and a multimodal projector (`clip`).
        let arch = f.get("general.architecture").and_then(Value::as_str);
        assert!(matches!(arch, Some("llama4" | "clip")), "{arch:?}");
        assert_eq!(f.header().alignment, 32);
        for t in &f.header().tensors {
            seen.insert(t.ty);
            let data = f.data(&t.name).unwrap();
            assert_eq!(data.len() as u64, t.elements(), "{}", t.name);
            let shape = t.shape();
            if shape.len() != 2 {
                continue;
            }
            let w = f.weight(&t.name, [shape[0], shape[1]]).unwrap();
            let k = shape[1];
            let x =
                ndarray::Array2::from_shape_fn((2, k), |(r, i)| ((r * 7 + i * 13) % 17) as f32 / 8.0 - 1.0);
            let y = kernels::linear(x.view(), &w).unwrap();
            let mut want = vec![0f32; 2 * shape[0]];
            linear_reference(x.as_slice().unwrap(), 2, k, shape[0], &data, &mut want);
            for (g, e) in y.iter().zip(&want) {
                // A loose bound here (the sum of |terms| is not at hand): 1e-5 of the row scale.
                let tol = rounding_bound(k, e.abs().max(1.0)) * 1e3;
                assert!((g - e).abs() <= tol, "{}: {g} vs {e}", t.name);
            }
        }
    }
    for ty in GgmlType::SUPPORTED {
        assert!(seen.contains(&ty), "no fixture tensor of {ty}");
    }
}
