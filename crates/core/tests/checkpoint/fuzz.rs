//! proptest: mutated headers must never panic, and an accepted header must lie inside the data.

use super::*;

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
