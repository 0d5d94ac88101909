//! The documented llama.cpp layout of Llama 4 (`llama4_model::gguf_names`) against files made
//! by llama.cpp's converter and quantiser (`fixtures/gguf`, `tools/llamacpp/make_gguf_fixtures.py`).

use std::collections::BTreeMap;
use std::path::Path;

use llama4_core::gguf::GgufFile;
use llama4_model::gguf_names::{attn_temperature, GgufLlama4};

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
