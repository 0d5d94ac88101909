//! The documented llama.cpp layout of Llama 4 (`llama4_model::gguf_names`) against files made
//! by llama.cpp's converter and quantiser (`fixtures/gguf`, `tools/llamacpp/make_gguf_fixtures.py`).

use std::collections::BTreeMap;
use std::path::Path;

use llama4_core::gguf::GgufFile;
use llama4_model::gguf_names::{attn_temperature, GgufLlama4};

#[path = "../../core/tests/common/gguf.rs"]
#[allow(dead_code)]
mod writer;
use writer::{array, string, tensor, Gguf, ARRAY, F32, STRING, U32};

fn open(name: &str) -> GgufFile {
    GgufFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/gguf")
            .join(name),
    )
    .unwrap()
}

#[test]
fn fixture_files_hold_exactly_the_documented_tensors() {
    for (file, hidden, moe) in [
        ("tiny-F32.gguf", 32, vec![1, 3]),
        ("k-Q4_K_M.gguf", 256, vec![3]),
        ("k-mixed.gguf", 256, vec![3]),
    ] {
        let f = open(file);
        let h = GgufLlama4::from_gguf(&f).unwrap();
        assert_eq!((h.n_layer, h.n_embd, h.n_vocab), (4, hidden, 528), "{file}");
        assert!(h.chunked && h.qk_norm, "{file}");
        let moe_layers: Vec<usize> = (0..4).filter(|&l| h.is_moe(l)).collect();
        assert_eq!(moe_layers, moe, "{file}");
        assert_eq!(
            (0..4).map(|l| h.uses_rope(l)).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(
            (0..4).map(|l| h.is_chunked(l)).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        let mut stored: BTreeMap<String, Vec<usize>> = f
            .header()
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape()))
            .collect();
        for (name, shape) in h.tensors() {
            assert_eq!(stored.remove(&name), Some(shape), "{file}: {name}");
        }
        // What is left: the untied output and the llama3 RoPE factors (D / 2 of them).
        assert_eq!(
            stored.remove("output.weight"),
            Some(vec![h.n_vocab, h.n_embd]),
            "{file}"
        );
        assert_eq!(
            stored.remove("rope_freqs.weight"),
            Some(vec![h.head_dim / 2]),
            "{file}"
        );
        assert!(stored.is_empty(), "{file}: undocumented {stored:?}");
    }
}

#[test]
fn temperature_is_one_until_the_first_floor() {
    assert_eq!(attn_temperature(0), 1.0);
    assert_eq!(attn_temperature(8190), 1.0);
    assert_eq!(attn_temperature(8191), 1.0 + 0.1 * 2f32.ln());
    assert_eq!(attn_temperature(8192 * 3 - 1), 1.0 + 0.1 * 4f32.ln());
}

/// A Llama 4 header with `expert_count` and `expert_feed_forward_length` as given (and a
/// one-element embedding), opened from a temporary file.
fn header(n_expert: u32, ff_exp: (u32, Vec<u8>)) -> Result<GgufLlama4, llama4_model::Error> {
    let u = |v: u32| v.to_le_bytes().to_vec();
    let mut g = Gguf::new(3).kv("general.architecture", STRING, string(b"llama4"));
    for (k, v) in [
        ("block_count", 2),
        ("embedding_length", 8),
        ("attention.head_count", 2),
        ("attention.head_count_kv", 1),
        ("attention.key_length", 4),
        ("feed_forward_length", 16),
        ("expert_used_count", 1),
        ("interleave_moe_layer_step", 1),
    ] {
        g = g.kv(&format!("llama4.{k}"), U32, u(v));
    }
    g = g
        .kv("llama4.expert_count", U32, u(n_expert))
        .kv("llama4.expert_feed_forward_length", ff_exp.0, ff_exp.1)
        .kv(
            "llama4.attention.layer_norm_rms_epsilon",
            F32,
            1e-5f32.to_le_bytes().to_vec(),
        )
        .kv("llama4.rope.freq_base", F32, 5e5f32.to_le_bytes().to_vec())
        .tensor(tensor("token_embd.weight", &[8, 3], 0, vec![0; 96]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.gguf");
    std::fs::write(&path, g.build()).unwrap();
    GgufLlama4::from_gguf(&GgufFile::open(&path).unwrap())
}

#[test]
fn expert_count_and_per_layer_widths_as_llama_cpp_reads_them() {
    let u = |v: u32| v.to_le_bytes().to_vec();
    let per_layer = |a: u32, b: u32| (ARRAY, array(U32, 2, &[u(a), u(b)].concat()));
    let h = header(16, (U32, u(24))).unwrap();
    assert_eq!((h.n_expert, h.n_ff_exp, h.n_vocab, h.qk_norm), (16, 24, 3, true));
    assert!(!header(128, (U32, u(24))).unwrap().qk_norm);
    // One width per layer, all equal: accepted; differing or of the wrong count: named errors.
    assert_eq!(header(16, per_layer(24, 24)).unwrap().n_ff_exp, 24);
    for (ff, needle) in [
        (per_layer(24, 32), "differ"),
        ((ARRAY, array(U32, 1, &u(24))), "one per layer"),
        (
            (ARRAY, array(STRING, 2, &[string(b"a"), string(b"b")].concat())),
            "not integers",
        ),
    ] {
        let e = header(16, ff).unwrap_err().to_string();
        assert!(
            e.contains("expert_feed_forward_length") && e.contains(needle),
            "{e}"
        );
    }
    let e = header(0, (U32, u(24))).unwrap_err().to_string();
    assert!(e.contains("expert_count"), "{e}");
}
