//! Loading Llama 4 from GGUF for generation ([`GgufModel`]: what `generate --model FILE.gguf`
//! and the server use) and the named errors for files that do not hold what Llama 4 needs.

use std::path::{Path, PathBuf};

use llama4_core::Error as CoreError;
use llama4_model::{is_gguf_path, ChatOptions, Error, GgufModel, TextModel};
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    llama4_testkit::fixture(&format!("gguf/{name}"))
}

#[test]
fn a_gguf_loads_with_its_tokenizer_template_and_stop_ids() {
    let path = fixture("tiny-Q8_0.gguf");
    assert!(is_gguf_path(&path));
    assert!(!is_gguf_path(fixture("")));
    let g = GgufModel::load(&path).unwrap();
    assert!(g.model.checkpoint().is_none());
    let tok = &g
        .tokenizer
        .as_ref()
        .expect("the fixtures carry a tokenizer")
        .tokenizer;
    // The fixture's vocabulary: <|begin_of_text|> and <|eot|> among its special tokens.
    let eot = tok.token_id("<|eot|>").unwrap();
    let eos = g.model.config().eos_token_ids[0];
    assert!(
        g.stop_ids.contains(&eot) && g.stop_ids.contains(&eos),
        "{:?}",
        g.stop_ids
    );
    assert_eq!(g.weight_bytes, {
        let f = llama4_core::gguf::GgufFile::open(&path).unwrap();
        f.header().tensors.iter().map(|t| t.nbytes).sum::<u64>()
    });
    let text = g
        .chat_template()
        .unwrap()
        .render(
            &[json!({"role": "user", "content": "hi"})],
            &ChatOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        text.starts_with("<|begin_of_text|>") && text.contains("hi"),
        "{text}"
    );
    let ids = tok.encode_with(&text, false).unwrap();
    assert_eq!(ids[0], g.tokenizer.as_ref().unwrap().bos_id.unwrap());
    // Runs: one greedy step from the rendered prompt.
    let logits = g.model.forward_uncached(&ids).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
}

/// `src` copied to a temporary file with `edit` applied to its bytes.
fn edited(src: &str, edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let mut bytes = std::fs::read(fixture(src)).unwrap();
    edit(&mut bytes);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(src);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// Offset of the tensor-info entry of `name` just past its name (at `n_dims`).
fn info_at(bytes: &[u8], name: &str) -> usize {
    llama4_testkit::gguf_string_end(bytes, name)
}

fn load_err(path: &Path) -> Error {
    TextModel::load_gguf(path).unwrap_err()
}

#[test]
fn a_missing_tensor_is_named() {
    let (_d, path) = edited("tiny-F32.gguf", |b| {
        let at = info_at(b, "blk.2.ffn_down.weight");
        b[at - "down.weight".len()] = b'D';
    });
    match load_err(&path) {
        Error::Core(CoreError::MissingTensor { name, .. }) => assert_eq!(name, "blk.2.ffn_down.weight"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    // ne [32, 16] → [16, 32]: the same bytes, the transposed shape.
    let (_d, path) = edited("tiny-F32.gguf", |b| {
        let at = info_at(b, "blk.1.attn_k.weight") + 4;
        let (a, c) = (b[at..at + 8].to_vec(), b[at + 8..at + 16].to_vec());
        b[at..at + 8].copy_from_slice(&c);
        b[at + 8..at + 16].copy_from_slice(&a);
    });
    match load_err(&path) {
        Error::Core(CoreError::ShapeMismatch {
            name, expected, got, ..
        }) => {
            assert_eq!(name, "blk.1.attn_k.weight");
            assert_eq!((expected, got), (vec![16, 32], vec![32, 16]));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn an_unsupported_type_names_the_tensor_and_the_type() {
    // Q4_0 (2) → IQ4_NL (20): the same block size (32 values in 18 bytes), no kernel here.
    let (_d, path) = edited("tiny-Q4_0.gguf", |b| {
        let at = info_at(b, "blk.0.attn_q.weight");
        let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        let ty = at + 4 + 8 * n_dims;
        assert_eq!(u32::from_le_bytes(b[ty..ty + 4].try_into().unwrap()), 2);
        b[ty..ty + 4].copy_from_slice(&20u32.to_le_bytes());
    });
    let e = load_err(&path);
    match &e {
        Error::Core(CoreError::UnsupportedDtype { name, dtype, .. }) => {
            assert_eq!((name.as_str(), dtype.as_str()), ("blk.0.attn_q.weight", "IQ4_NL"))
        }
        e => panic!("{e:?}"),
    }
    assert!(
        e.to_string().contains("IQ4_NL") && e.to_string().contains("blk.0.attn_q.weight"),
        "{e}"
    );
}

#[test]
fn a_file_of_another_architecture_is_refused() {
    let (_d, path) = edited("tiny-F32.gguf", |b| {
        let at = info_at(b, "general.architecture") + 4 + 8;
        assert_eq!(&b[at..at + 6], b"llama4");
        b[at..at + 6].copy_from_slice(b"llama5");
    });
    let e = load_err(&path).to_string();
    assert!(e.contains("llama5") && e.contains("general.architecture"), "{e}");
}

/// A GGUF whose tokenizer is of a kind not supported (here llama.cpp's `gpt-4o` pre-tokenizer,
/// whose split rules differ) loads without a tokenizer, says why, and runs on ids; building
/// that tokenizer directly is a named error.
#[test]
fn an_unsupported_tokenizer_is_left_out_and_named() {
    let (_d, path) = edited("tiny-Q8_0.gguf", |b| {
        let at = info_at(b, "tokenizer.ggml.pre") + 4 + 8;
        assert_eq!(&b[at..at + 6], b"llama4");
        b[at..at + 6].copy_from_slice(b"gpt-4o");
    });
    let g = GgufModel::load(&path).unwrap();
    assert!(g.tokenizer.is_none());
    let why = g.tokenizer_unsupported.as_deref().unwrap();
    assert!(why.contains("gpt-4o") && why.contains("pre-tokenizer"), "{why}");
    let logits = g.model.forward_uncached(&[1, 2, 3]).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    let f = llama4_core::gguf::GgufFile::open(&path).unwrap();
    let e = llama4_model::GgufTokenizer::from_gguf(&f)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gpt-4o"), "{e}");
    // The original file has no such note.
    assert!(GgufModel::load(fixture("tiny-Q8_0.gguf"))
        .unwrap()
        .tokenizer_unsupported
        .is_none());
}
