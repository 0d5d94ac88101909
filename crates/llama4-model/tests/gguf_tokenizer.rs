//! The tokenizer rebuilt from a GGUF file's metadata equals the Hugging Face tokenizer of the
//! same model. Fixture (`tools/llamacpp/make_llama4_tokenizer.py --ranks 4096 --corpus`): the
//! Llama 4 tokenizer restricted to its 4,096 first BPE ranks plus all 1,134 special tokens, as
//! `tokenizer.json` (transformers' converter) and as `vocab.gguf` (llama.cpp's converter), with
//! the Hugging Face ids of a varied corpus. Set `LLAMA4_FULL_TOKENIZER_DIR` to a directory made
//! without `--ranks` to run the same checks on the full 201,134-token vocabulary.

use std::path::{Path, PathBuf};

use llama4_core::gguf::GgufFile;
use llama4_model::{GgufTokenizer, Tokenizer};
use proptest::prelude::*;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizer/llama4")
}

fn load(dir: &Path) -> (GgufTokenizer, Tokenizer, serde_json::Value) {
    let gguf = GgufFile::open(dir.join("vocab.gguf")).unwrap();
    let g = GgufTokenizer::from_gguf(&gguf).unwrap();
    let hf = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let corpus: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("corpus.json")).unwrap()).unwrap();
    (g, hf, corpus)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_corpus(dir: &Path) {
    let (g, hf, corpus) = load(dir);
    assert_eq!(g.bos_id, Some(corpus["bos"].as_u64().unwrap() as u32));
    assert_eq!(g.eos_id, Some(corpus["eot"].as_u64().unwrap() as u32));
    assert_eq!(
        g.tokenizer.vocab_size(),
        corpus["vocab"].as_u64().unwrap() as usize
    );
    assert!(g.chat_template.as_deref().unwrap().contains("<|header_start|>"));
    for item in corpus["items"].as_array().unwrap() {
        let text = item["text"].as_str().unwrap();
        let with = g.tokenizer.encode(text).unwrap();
        let plain = g.tokenizer.encode_with(text, false).unwrap();
        assert_eq!(with, ids(&item["ids"]), "{text:?}");
        assert_eq!(plain, ids(&item["ids_plain"]), "{text:?}");
        assert_eq!(with, hf.encode(text).unwrap(), "{text:?}");
        assert_eq!(
            g.tokenizer.decode(&plain).unwrap(),
            hf.decode(&plain).unwrap(),
            "{text:?}"
        );
        assert_eq!(
            g.tokenizer.decode(&plain).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
}

#[test]
fn equals_hugging_face_on_the_corpus() {
    check_corpus(&fixture_dir());
}

#[test]
fn full_vocabulary_when_available() {
    match std::env::var("LLAMA4_FULL_TOKENIZER_DIR") {
        Ok(dir) => check_corpus(Path::new(&dir)),
        Err(_) => eprintln!("LLAMA4_FULL_TOKENIZER_DIR not set: the full vocabulary is not checked"),
    }
}

#[test]
fn special_tokens_and_ids_are_the_gguf_ones() {
    let (g, hf, _) = load(&fixture_dir());
    for t in [
        "<|begin_of_text|>",
        "<|eot|>",
        "<|header_start|>",
        "<|image|>",
        "<|patch|>",
        "<|vision_reserved_special_token_1047|>",
    ] {
        assert_eq!(g.tokenizer.token_id(t), hf.token_id(t), "{t}");
        assert!(g.tokenizer.token_id(t).is_some(), "{t}");
    }
}

#[test]
fn malformed_metadata_gets_named_errors() {
    // A GGUF with an unsupported pre-tokenizer, and one without merges.
    let dir = tempfile::TempDir::new().unwrap();
    let write = |name: &str, pre: &str, merges: bool| {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((if merges { 4u64 } else { 3 }).to_le_bytes());
        let s = |v: &mut Vec<u8>, x: &str| {
            v.extend((x.len() as u64).to_le_bytes());
            v.extend(x.as_bytes());
        };
        s(&mut b, "tokenizer.ggml.model");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "gpt2");
        s(&mut b, "tokenizer.ggml.pre");
        b.extend(8u32.to_le_bytes());
        s(&mut b, pre);
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "b");
        if merges {
            s(&mut b, "tokenizer.ggml.merges");
            b.extend(9u32.to_le_bytes());
            b.extend(8u32.to_le_bytes());
            b.extend(1u64.to_le_bytes());
            s(&mut b, "ab");
        }
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        GgufFile::open(p).unwrap()
    };
    let err = |f: &GgufFile| GgufTokenizer::from_gguf(f).unwrap_err().to_string();
    assert!(err(&write("a.gguf", "qwen2", true)).contains("pre-tokenizer `qwen2`"));
    assert!(err(&write("b.gguf", "llama4", false)).contains("tokenizer.ggml.merges"));
    assert!(err(&write("c.gguf", "llama4", true)).contains("merge `ab` is not two tokens"));
}

/// Text drawn from a mix of scripts, digits, whitespace runs, punctuation and special tokens.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z]{1,12}",
        "[ \t\n\r]{1,6}",
        "[0-9]{1,7}",
        "[.,;:!?'\"()\\[\\]{}<>|/\\\\_#@%&*+=~`^$-]{1,4}",
        "[àéîõüßçñÀÉÎÕÜ]{1,5}",
        "[а-яА-Я]{1,8}",
        "[一-龥ぁ-んア-ン]{1,6}",
        "[😀-🙏🎉❤👍]{1,3}",
        prop::sample::select(vec![
            "<|eot|>",
            "<|begin_of_text|>",
            "<|header_start|>",
            "'s",
            "'LL",
            "<|",
            "|>"
        ])
        .prop_map(str::to_string),
        any::<char>().prop_map(|c| c.to_string()),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_text_encodes_as_hugging_face(s in text()) {
        thread_local! {
            // The full vocabulary when it is given, else the fixture.
            static T: (GgufTokenizer, Tokenizer, serde_json::Value) = load(
                &std::env::var("LLAMA4_FULL_TOKENIZER_DIR").map(PathBuf::from).unwrap_or_else(|_| fixture_dir()),
            );
        }
        T.with(|(g, hf, _)| {
            let ours = g.tokenizer.encode(&s).unwrap();
            prop_assert_eq!(&ours, &hf.encode(&s).unwrap(), "{:?}", s);
            prop_assert_eq!(g.tokenizer.decode(&ours).unwrap(), hf.decode(&ours).unwrap());
            Ok(())
        })?;
    }
}
