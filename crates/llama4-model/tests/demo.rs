//! The embedded demo model (models/demo) through our own inference path: tokenizer, cached
//! greedy generation, stop id, streamed decoding. Fails below 95% exact match on held-out inputs.

use std::ops::ControlFlow;
use std::path::PathBuf;

use llama4_core::DType;
use llama4_model::{stop_ids, GenerateOptions, SamplingConfig, Session, StreamDecoder, TextModel, Tokenizer};

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

fn heldout() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(demo().join("heldout.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["prompt"].as_str().unwrap().to_string(),
                e["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn demo_sorts_digits_on_held_out_inputs() {
    let model = TextModel::load(demo()).unwrap();
    let tok = Tokenizer::from_dir(demo()).unwrap().unwrap();
    let stops = stop_ids(demo(), model.config()).unwrap();
    assert!(!stops.is_empty());
    let options = GenerateOptions {
        max_new_tokens: 16,
        sampling: SamplingConfig::greedy(),
        stop_ids: stops.clone(),
        keep_logits: false,
    };
    let cases = heldout();
    assert!(cases.len() >= 200);
    let mut correct = 0;
    for (prompt, answer) in &cases {
        let ids = tok.encode(prompt).unwrap();
        let mut session = Session::new(&model, DType::F32).unwrap();
        let mut stream = StreamDecoder::with_stop_ids(&stops);
        let mut streamed = String::new();
        let g = session
            .generate(&ids, &options, |id| {
                streamed.push_str(&stream.push(&tok, id).unwrap());
                ControlFlow::Continue(())
            })
            .unwrap();
        let body = g.answer_ids();
        let text = tok.decode(body).unwrap();
        assert_eq!(streamed, text, "streamed decoding must equal decoding at once");
        correct += usize::from(&text == answer && g.generated_ids.last().is_some_and(|i| stops.contains(i)));
    }
    let accuracy = correct as f64 / cases.len() as f64;
    println!(
        "demo held-out exact match: {correct}/{} = {:.1}%",
        cases.len(),
        accuracy * 100.0
    );
    assert!(accuracy >= 0.95, "exact match {correct}/{}", cases.len());
}

#[test]
fn demo_tokenizer_recognises_special_tokens_and_round_trips() {
    let tok = Tokenizer::from_dir(demo()).unwrap().unwrap();
    let text = "<|begin_of_text|>sort 3 1 2 =";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids[0], tok.token_id("<|begin_of_text|>").unwrap());
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let chat = llama4_model::chat_prompt("sort 3 1 2 =");
    let ids = tok.encode_with(&chat, false).unwrap();
    for special in ["<|header_start|>", "<|header_end|>", "<|eot|>"] {
        assert!(
            ids.contains(&tok.token_id(special).unwrap()),
            "{special} is one token"
        );
    }
}
