//! Chat templates against transformers' `apply_chat_template` (fixtures/chat, written by
//! tools/make_chat_fixture.py): the rendered text and its token ids, or the template's error.

use std::path::{Path, PathBuf};

use llama4_model::{
    chat_prompt, ChatOptions, ChatTemplate, Error, TemplateSource, Tokenizer, LLAMA4_CHAT_TEMPLATE,
};
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("fixtures/chat/cases.json")).unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn options(case: &Value) -> ChatOptions {
    ChatOptions {
        add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
        tools: case["tools"].as_array().cloned(),
        documents: None,
        extra: case["kwargs"].as_object().unwrap().clone(),
    }
}

#[test]
fn renders_and_tokenises_as_transformers() {
    let cases = cases();
    assert_eq!(cases.len(), 20);
    let (mut texts, mut errors) = (0, 0);
    for case in &cases {
        let dir = root().join(case["checkpoint"].as_str().unwrap());
        let name = case["name"].as_str().unwrap();
        let template = ChatTemplate::from_dir(&dir).unwrap();
        let tokenizer = Tokenizer::from_dir(&dir).unwrap().unwrap();
        let messages = case["messages"].as_array().unwrap();
        let got = template.render(messages, &options(case));
        match (&case["text"], &case["error"]) {
            (Value::String(want), _) => {
                let got = got.unwrap_or_else(|e| panic!("{name} on {}: {e}", dir.display()));
                assert_eq!(&got, want, "{name} on {}", dir.display());
                let ids = tokenizer.encode_with(&got, false).unwrap();
                let want_ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
                assert_eq!(ids, want_ids, "{name} on {}", dir.display());
                texts += 1;
            }
            (_, Value::String(want)) => {
                match got {
                    Err(Error::ChatRejected(msg)) => assert_eq!(&msg, want, "{name}"),
                    other => panic!("{name}: expected the template to raise {want:?}, got {other:?}"),
                }
                errors += 1;
            }
            _ => panic!("{name}: case has neither text nor error"),
        }
    }
    assert_eq!((texts, errors), (16, 4));
}

#[test]
fn template_sources() {
    let demo = ChatTemplate::from_dir(root().join("models/demo")).unwrap();
    assert_eq!(demo.source(), TemplateSource::Llama4Default);
    assert_eq!(demo.special_tokens()["bos_token"], "<|begin_of_text|>");
    let llama4 = ChatTemplate::from_dir(root().join("fixtures/chat/llama4")).unwrap();
    assert_eq!(llama4.source(), TemplateSource::TokenizerConfig);
    let pycompat = ChatTemplate::from_dir(root().join("fixtures/chat/pycompat")).unwrap();
    assert_eq!(pycompat.source(), TemplateSource::ChatTemplateJinja);
}

#[test]
fn embedded_template_is_the_one_transformers_ships() {
    let text = std::fs::read_to_string(root().join("fixtures/chat/llama4/tokenizer_config.json")).unwrap();
    let config: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["chat_template"].as_str().unwrap(), LLAMA4_CHAT_TEMPLATE);
}

#[test]
fn chat_prompt_is_the_default_template_for_one_user_turn() {
    let template = ChatTemplate::from_dir(root().join("models/demo")).unwrap();
    let opts = ChatOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let got = template
        .render(&[json!({"role": "user", "content": "sort 3 1 ="})], &opts)
        .unwrap();
    assert_eq!(got, chat_prompt("sort 3 1 ="));
}

#[test]
fn processor_file_and_named_templates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("chat_template.json"),
        r#"{"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<s>"}}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(t.source(), TemplateSource::ChatTemplateJson);
    let msgs = [json!({"role": "user", "content": "hi"})];
    assert_eq!(t.render(&msgs, &ChatOptions::default()).unwrap(), "<s>hi");

    // A list of named templates: `tool_use` is chosen when tools are given.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "default", "template": "plain"},
                              {"name": "tool_use", "template": "{{ tools | length }} tools"}]}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(t.source(), TemplateSource::TokenizerConfig);
    assert_eq!(t.render(&msgs, &ChatOptions::default()).unwrap(), "plain");
    let with_tools = ChatOptions {
        tools: Some(vec![json!({"name": "a"})]),
        ..Default::default()
    };
    assert_eq!(t.render(&msgs, &with_tools).unwrap(), "1 tools");

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": 3}"#,
    )
    .unwrap();
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::ConfigJson { .. }), "{err}");
    let err = ChatTemplate::new("x", Default::default())
        .unwrap()
        .render(&[json!("not an object")], &ChatOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::ChatTemplate { .. }), "{err}");
}

#[test]
fn null_keys_are_dropped_and_reasoning_is_aliased() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{{ m | tojson }}{% endfor %}",
        Default::default(),
    )
    .unwrap();
    let msgs = [json!({"role": "assistant", "content": null, "reasoning": "r", "x": 1})];
    let got = t.render(&msgs, &ChatOptions::default()).unwrap();
    assert_eq!(
        got,
        r#"{"thinking": "r", "role": "assistant", "reasoning": "r", "x": 1, "reasoning_content": "r"}"#
    );
}
