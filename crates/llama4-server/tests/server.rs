//! The server in-process on a free port, called with a real HTTP client: concurrent requests on
//! the demo model, streaming, cancellation, errors, chat templates, the API key, cache reuse and
//! images on a multimodal checkpoint.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use llama4_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn start(config: ServerConfig) -> RunningServer {
    RunningServer::start(ServerConfig { port: 0, ..config }).expect("server starts")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// POSTs `body` (JSON or raw text); returns the status and the parsed body.
fn post(server: &RunningServer, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = agent()
        .post(format!("{}{path}", server.url()))
        .header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.send(body).unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn post_json(server: &RunningServer, path: &str, body: Value) -> (u16, Value) {
    post(server, path, &body.to_string(), None)
}

fn get(server: &RunningServer, path: &str, key: Option<&str>) -> (u16, String) {
    let mut req = agent().get(format!("{}{path}", server.url()));
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.call().unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

/// One metric's value from `/metrics`.
fn metric(server: &RunningServer, name: &str) -> f64 {
    let (_, text) = get(server, "/metrics", None);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .parse()
        .unwrap()
}

/// Every `data:` payload of a streamed response, `[DONE]` as a string.
fn stream(server: &RunningServer, path: &str, body: Value) -> Vec<Value> {
    let resp = agent()
        .post(format!("{}{path}", server.url()))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let reader = BufReader::new(resp.into_body().into_reader());
    reader
        .lines()
        .map(|l| l.unwrap())
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .map(|d| serde_json::from_str(&d).unwrap_or(Value::String(d)))
        .collect()
}

/// The lines of a streamed completion, as they arrive.
fn open_stream(server: &RunningServer, body: &Value) -> std::io::Lines<BufReader<impl std::io::Read>> {
    let resp = agent()
        .post(format!("{}/v1/completions", server.url()))
        .send(body.to_string())
        .unwrap();
    BufReader::new(resp.into_body().into_reader()).lines()
}

/// The demo's held-out prompts and answers.
fn heldout() -> Vec<(String, String)> {
    llama4_model::heldout::cases(root().join("models/demo"))
        .unwrap()
        .into_iter()
        .map(|c| (c.prompt, c.answer))
        .collect()
}

fn assert_error(status: u16, body: &Value, want: u16, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert!(err["type"].is_string(), "{what}: {body}");
    assert!(err.get("code").is_some(), "{what}: {body}");
}

#[test]
fn sixteen_concurrent_completions_answer_correctly() {
    // Prompts of 13 tokens prefilled in pieces of at most 8 per step, over eight slots.
    let server = start(ServerConfig {
        parallel: 8,
        queue_size: 16,
        prefill_chunk: 8,
        ..Default::default()
    });
    // Held-out entry 8 is the demo's one miss in 200 (in transformers too): leave it out.
    let cases: Vec<_> = heldout()
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| i != 8)
        .map(|(_, c)| c)
        .take(16)
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(prompt, answer)| {
                let server = &server;
                s.spawn(move || {
                    let (status, body) = post_json(
                        server,
                        "/v1/completions",
                        json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}),
                    );
                    assert_eq!(status, 200, "{body}");
                    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), answer, "{prompt}");
                    assert_eq!(body["choices"][0]["finish_reason"], "stop");
                    assert_eq!(body["usage"]["completion_tokens"], 11);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    assert_eq!(metric(&server, "llama4_requests_admitted_total"), 16.0);
    assert_eq!(metric(&server, "llama4_generated_tokens_total"), 16.0 * 11.0);
}

/// The text of a streamed completion.
fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e.get("choices")?.get(0)?.get("text")?.as_str())
        .collect()
}

#[test]
fn concurrent_streams_give_the_text_of_sequential_requests() {
    // Prompts of different lengths, past their answers (`ignore_eos`) so the streams decode side
    // by side for many steps; one batched pass per step over six slots, prompts in pieces of 5.
    let mut bodies: Vec<Value> = heldout()
        .iter()
        .take(5)
        .enumerate()
        .map(|(i, (prompt, _))| {
            let prompt = prompt.repeat(1 + i % 3);
            json!({"prompt": prompt, "max_tokens": 24 + i, "temperature": 0, "ignore_eos": true})
        })
        .collect();
    bodies.push(json!({"prompt": heldout()[9].0, "max_tokens": 20, "temperature": 1.2, "seed": 5, "ignore_eos": true}));

    let alone = start(ServerConfig {
        parallel: 1,
        ..Default::default()
    });
    let want: Vec<String> = bodies
        .iter()
        .map(|b| {
            let (status, body) = post_json(&alone, "/v1/completions", b.clone());
            assert_eq!(status, 200, "{body}");
            body["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    let steps_alone = metric(&alone, "llama4_steps_total");

    let batched = start(ServerConfig {
        parallel: 6,
        prefill_chunk: 5,
        ..Default::default()
    });
    let got: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| {
                let server = &batched;
                let mut b = b.clone();
                b["stream"] = json!(true);
                s.spawn(move || streamed_text(&stream(server, "/v1/completions", b)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(!w.is_empty());
        assert_eq!(g, w, "request {i}: {}", bodies[i]);
    }
    // The streams shared steps: fewer passes than the requests needed one after another. How many
    // fewer depends on when the client threads' requests arrive, so only the direction is asserted.
    let steps_batched = metric(&batched, "llama4_steps_total");
    assert!(
        steps_batched < steps_alone,
        "{steps_batched} batched steps, {steps_alone} alone"
    );
}

#[test]
fn streamed_text_equals_whole_text() {
    let server = start(ServerConfig::default());
    let (prompt, _) = &heldout()[3];
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}),
        ),
        // Sampled with a seed: the same seed gives the same tokens either way.
        (
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 20, "temperature": 1.5, "seed": 11, "ignore_eos": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "sort 4 2 ="}], "max_tokens": 6, "temperature": 0.9, "seed": 3}),
        ),
    ] {
        let (status, whole) = post_json(&server, path, body.clone());
        assert_eq!(status, 200, "{whole}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let events = stream(&server, path, streamed);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chat = path.contains("chat");
        let text: String = events
            .iter()
            .filter_map(|e| {
                let c = e.get("choices")?.get(0)?;
                if chat {
                    c["delta"]["content"].as_str()
                } else {
                    c["text"].as_str()
                }
            })
            .collect();
        let choice = &whole["choices"][0];
        let want = if chat {
            &choice["message"]["content"]
        } else {
            &choice["text"]
        };
        assert_eq!(text, want.as_str().unwrap(), "{body}");
        assert!(!text.is_empty());
        let finish: Vec<&Value> = events
            .iter()
            .filter_map(|e| e.get("choices")?.get(0)?.get("finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, vec![&choice["finish_reason"]]);
        let usage = &events[events.len() - 2]["usage"];
        assert_eq!(usage, &whole["usage"]);
        if chat {
            assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        }
    }
}

#[test]
fn an_abandoned_stream_frees_its_slot() {
    // One slot and a long generation: the next request can only run if the slot is freed.
    let server = start(ServerConfig {
        parallel: 1,
        ctx_size: Some(60_000),
        ..Default::default()
    });
    let (prompt, answer) = &heldout()[0];
    let body =
        json!({"prompt": prompt, "max_tokens": 50_000, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut lines = open_stream(&server, &body);
    let mut data = 0;
    while data < 3 {
        if lines.next().unwrap().unwrap().starts_with("data: ") {
            data += 1;
        }
    }
    drop(lines);
    let started = Instant::now();
    while metric(&server, "llama4_requests_finished_total{reason=\"cancelled\"}") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the stream was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(metric(&server, "llama4_generated_tokens_total") < 50_000.0);
    let (status, body) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": prompt, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), answer);
}

#[test]
fn bad_requests_get_4xx_and_error_objects() {
    let server = start(ServerConfig {
        max_body_bytes: 4096,
        ..Default::default()
    });
    let user = json!([{"role": "user", "content": "sort 1 ="}]);
    let png = "data:image/png;base64,iVBORw0KGgo=";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "malformed JSON"),
        ("/v1/completions", "[1, 2]".into(), 400, "not an object"),
        ("/v1/completions", json!({"prompt": 5}).to_string(), 400, "prompt of the wrong type"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": "10"}).to_string(), 400, "max_tokens a string"),
        ("/v1/completions", json!({"prompt": "x", "stream": 1}).to_string(), 400, "stream a number"),
        ("/v1/completions", json!({"prompt": "x", "temperature": -1}).to_string(), 400, "negative temperature"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": -5}).to_string(), 400, "negative max_tokens"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 0}).to_string(), 400, "zero max_tokens"),
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 300}).to_string(), 400, "max_tokens over the context"),
        ("/v1/completions", json!({"prompt": [0, 38]}).to_string(), 400, "id outside the vocabulary"),
        ("/v1/completions", json!({"prompt": [0, -1]}).to_string(), 400, "negative id"),
        ("/v1/completions", json!({"prompt": ""}).to_string(), 400, "empty prompt"),
        ("/v1/completions", json!({"prompt": vec![0; 300]}).to_string(), 400, "prompt over the context"),
        ("/v1/completions", json!({"prompt": ["a", "b"]}).to_string(), 400, "batched prompts"),
        ("/v1/completions", json!({"prompt": "x", "n": 3}).to_string(), 400, "n > 1"),
        ("/v1/chat/completions", json!({"messages": []}).to_string(), 400, "empty messages"),
        ("/v1/chat/completions", json!({"messages": "hi"}).to_string(), 400, "messages a string"),
        ("/v1/chat/completions", json!({}).to_string(), 400, "no messages"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            "unknown role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}]}]})
                .to_string(),
            400,
            "an image without a multimodal model",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "max_completion_tokens": -1}).to_string(),
            400,
            "negative max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "stop": {"a": 1}}).to_string(),
            400,
            "stop of the wrong type",
        ),
        ("/v1/completions", format!("{{\"prompt\": \"{}\"}}", "x".repeat(5000)), 413, "body over the cap"),
        ("/v1/nothing", "{}".into(), 404, "unknown endpoint"),
    ];
    for (path, body, want, what) in &cases {
        let (status, got) = post(&server, path, body, None);
        assert_error(status, &got, *want, what);
    }
    let resp = agent()
        .get(format!("{}/v1/completions", server.url()))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    // The server kept serving.
    let (prompt, answer) = &heldout()[1];
    let (status, body) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": prompt, "temperature": 0}),
    );
    assert_eq!(status, 200);
    assert_eq!(body["choices"][0]["text"].as_str().unwrap(), answer);
    assert_eq!(
        metric(&server, "llama4_requests_finished_total{reason=\"error\"}"),
        0.0
    );
}

#[test]
fn a_full_queue_answers_503() {
    let server = start(ServerConfig {
        parallel: 1,
        queue_size: 1,
        ctx_size: Some(60_000),
        ..Default::default()
    });
    let (prompt, answer) = &heldout()[2];
    // Hold the one slot with a long stream.
    let body = json!({"prompt": prompt, "max_tokens": 50_000, "ignore_eos": true, "stream": true});
    let mut lines = open_stream(&server, &body);
    while !lines.next().unwrap().unwrap().starts_with("data: ") {}
    std::thread::scope(|s| {
        // One request waits in the queue...
        let waiting = s.spawn(|| {
            post_json(
                &server,
                "/v1/completions",
                json!({"prompt": prompt, "temperature": 0}),
            )
        });
        let started = Instant::now();
        while metric(&server, "llama4_queue_depth") < 1.0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the request was not queued"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // ...so the next one is refused.
        let (status, body) = post_json(&server, "/v1/completions", json!({"prompt": prompt}));
        assert_error(status, &body, 503, "queue full");
        assert_eq!(body["error"]["code"], "queue_full");
        drop(lines);
        let (status, body) = waiting.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["text"].as_str().unwrap(), answer);
    });
}

#[test]
fn chat_prompt_token_counts_equal_transformers() {
    // The tool definitions make one prompt longer than the demo's 256 positions.
    let server = start(ServerConfig {
        ctx_size: Some(1024),
        ..Default::default()
    });
    let text = std::fs::read_to_string(root().join("fixtures/chat/cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for case in cases
        .iter()
        .filter(|c| c["checkpoint"] == "models/demo" && c["ids"].is_array())
    {
        // What the OpenAI API can carry: text content, generation prompt on.
        let messages = case["messages"].as_array().unwrap();
        let plain = messages.iter().all(|m| m["content"].is_string());
        if !plain || case["add_generation_prompt"] != true {
            continue;
        }
        let mut body = json!({"messages": messages, "max_tokens": 1,
                              "chat_template_kwargs": case["kwargs"]});
        if case["tools"].is_array() {
            body["tools"] = case["tools"].clone();
        }
        let (status, got) = post_json(&server, "/v1/chat/completions", body);
        let want = case["ids"].as_array().unwrap().len();
        assert_eq!(status, 200, "{}: {got}", case["name"]);
        assert_eq!(got["usage"]["prompt_tokens"], want, "{}", case["name"]);
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn with_an_api_key_requests_without_it_get_401() {
    let server = start(ServerConfig {
        api_key: Some("sekrit".into()),
        ..Default::default()
    });
    let (prompt, answer) = &heldout()[0];
    let body = json!({"prompt": prompt, "temperature": 0}).to_string();
    for key in [None, Some("wrong"), Some("sekrit2")] {
        let (status, got) = post(&server, "/v1/completions", &body, key);
        assert_error(status, &got, 401, "no key");
        let (status, _) = get(&server, "/v1/models", key);
        assert_eq!(status, 401);
    }
    assert_eq!(get(&server, "/health", None).0, 200);
    assert_eq!(get(&server, "/v1/models", Some("sekrit")).0, 200);
    assert_eq!(get(&server, "/metrics", None).0, 401);
    let (_, metrics) = get(&server, "/metrics", Some("sekrit"));
    assert!(
        metrics.contains("llama4_requests_admitted_total 0"),
        "nothing ran without the key"
    );
    let (status, got) = post(&server, "/v1/completions", &body, Some("sekrit"));
    assert_eq!(status, 200);
    assert_eq!(got["choices"][0]["text"].as_str().unwrap(), answer);
}

#[test]
fn a_prompt_that_extends_a_finished_one_reuses_its_cache() {
    let server = start(ServerConfig {
        parallel: 2,
        ..Default::default()
    });
    let (p1, a1) = &heldout()[5];
    let (status, first) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": p1, "temperature": 0}),
    );
    assert_eq!(
        (status, first["choices"][0]["text"].as_str().unwrap()),
        (200, a1.as_str())
    );
    // The slot holds the prompt and every generated id but the last (<|eot|>, never run).
    let held = first["usage"]["prompt_tokens"].as_u64().unwrap()
        + first["usage"]["completion_tokens"].as_u64().unwrap()
        - 1;
    let (p2, _) = &heldout()[6];
    let next = format!("{p1}{a1}<|eot|>{}", p2.trim_start_matches("<|begin_of_text|>"));
    let (status, second) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": next, "temperature": 0}),
    );
    assert_eq!(status, 200, "{second}");
    assert_eq!(metric(&server, "llama4_prompt_tokens_reused_total"), held as f64);
    // The same prompt on a fresh server (nothing to reuse) gives the same answer.
    let fresh = start(ServerConfig::default());
    let (_, want) = post_json(
        &fresh,
        "/v1/completions",
        json!({"prompt": next, "temperature": 0}),
    );
    assert_eq!(metric(&fresh, "llama4_prompt_tokens_reused_total"), 0.0);
    assert_eq!(second["choices"][0]["text"], want["choices"][0]["text"]);
    assert_eq!(second["usage"], want["usage"]);
}

/// A request whose prompt another slot holds while it is still generating shares that slot's
/// cache pages rather than prefilling them; both answer as they would alone.
#[test]
fn a_prompt_held_by_a_running_slot_shares_its_pages() {
    let server = start(ServerConfig {
        parallel: 2,
        ctx_size: Some(60_000),
        ..Default::default()
    });
    let (prompt, answer) = &heldout()[3];
    let body =
        json!({"prompt": prompt, "max_tokens": 50_000, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut lines = open_stream(&server, &body);
    let mut text = String::new();
    let mut next_text = |text: &mut String| loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(d).unwrap();
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            return;
        }
    };
    for _ in 0..3 {
        next_text(&mut text);
    }
    // The first request is running: its slot holds the prompt and what it generated so far.
    let (status, second) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": prompt, "temperature": 0}),
    );
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["choices"][0]["text"].as_str().unwrap(), answer);
    let shared = metric(&server, "llama4_prompt_tokens_shared_total");
    let prompt_tokens = second["usage"]["prompt_tokens"].as_f64().unwrap();
    // Up to the start of the demo's chunk of 8 that holds the last prompt token but one.
    assert!(
        shared >= prompt_tokens - 9.0 && shared > 0.0,
        "{shared} of {prompt_tokens}"
    );
    assert_eq!(metric(&server, "llama4_prompt_tokens_reused_total"), shared);
    // The first request, whose pages were shared while it ran, still generates its answer.
    while text.len() < answer.len() {
        next_text(&mut text);
    }
    assert!(text.starts_with(answer.as_str()), "{text:?} vs {answer:?}");
}

/// Cache bytes the demo's sequence of `tokens` takes in the server's default (f32) cache.
fn demo_cache_bytes(tokens: usize) -> u64 {
    let model = llama4_model::TextModel::load(root().join("models/demo")).unwrap();
    let cache = model.new_cache(llama4_model::llama4_core::DType::F32).unwrap();
    let kinds: Vec<_> = cache.kinds().collect();
    cache.spec().estimate(&kinds, tokens).unwrap().total()
}

/// With a cache budget for one sequence, a second request waits until the first has finished,
/// then answers; a request that could never fit is refused; the caches stay within the budget.
#[test]
fn a_request_beyond_the_cache_budget_waits_for_room() {
    // Sequences below a page of the global layers all take the same bytes.
    let one = demo_cache_bytes(400);
    let budget = one + one / 2;
    assert!(demo_cache_bytes(6000) > budget);
    let server = start(ServerConfig {
        parallel: 2,
        ctx_size: Some(8000),
        kv_budget: Some(budget),
        ..Default::default()
    });
    let (prompt, answer) = &heldout()[1];
    let body =
        json!({"prompt": prompt, "max_tokens": 300, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut lines = open_stream(&server, &body);
    while !lines.next().unwrap().unwrap().starts_with("data: ") {}
    // The first holds its reservation: the second cannot be admitted until it ends.
    let (status, second) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 300, "temperature": 0}),
    );
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["choices"][0]["text"].as_str().unwrap(), answer);
    assert_eq!(
        metric(&server, "llama4_requests_waited_for_cache_budget_total"),
        1.0
    );
    let streamed: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert_eq!(
        streamed.iter().rev().find(|l| l.starts_with("data: ")).unwrap(),
        "data: [DONE]"
    );
    assert!(metric(&server, "llama4_kv_cache_bytes") <= budget as f64);
    let (status, too_big) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 6000, "temperature": 0}),
    );
    assert_error(status, &too_big, 400, "beyond the budget");
    assert!(
        too_big["error"]["message"].as_str().unwrap().contains("budget"),
        "{too_big}"
    );
}

#[test]
fn an_image_in_a_chat_message_reaches_the_vision_tower() {
    // The vision demo answers `<|begin_of_text|>what is this?<|image|> =`; a chat template that
    // writes the parts as they are makes a chat request give exactly that prompt.
    let dir = tempfile::tempdir().unwrap();
    let demo = root().join("models/vision-demo");
    for entry in std::fs::read_dir(&demo).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::os::unix::fs::symlink(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}{% for p in m.content %}\
         {% if p.type == 'text' %}{{ p.text }}{% else %}<|image|>{% endif %}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let server = start(ServerConfig {
        model_dir: dir.path().to_path_buf(),
        ..Default::default()
    });
    let text = std::fs::read_to_string(demo.join("heldout.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    use base64::Engine as _;
    for case in &cases[..3] {
        let png = std::fs::read(demo.join(case["image"].as_str().unwrap())).unwrap();
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        );
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": " ="},
        ]}], "max_tokens": 8, "temperature": 0});
        let (status, got) = post_json(&server, "/v1/chat/completions", body);
        assert_eq!(status, 200, "{got}");
        assert_eq!(
            got["choices"][0]["message"]["content"], case["answer"],
            "{}",
            case["image"]
        );
        // The prompt counts the image's expanded tokens.
        assert!(got["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    }
    let bad = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]});
    let (status, got) = post_json(&server, "/v1/chat/completions", bad);
    assert_error(status, &got, 400, "bytes that are not an image");
}

#[test]
fn a_checkpoint_without_a_tokenizer_serves_ids() {
    let server = start(ServerConfig {
        model_dir: root().join("fixtures/models/scout"),
        ..Default::default()
    });
    let (status, got) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": true, "temperature": 0}),
    );
    assert_eq!(status, 200, "{got}");
    let text = got["choices"][0]["text"].as_str().unwrap();
    let ids: Vec<u32> = text.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(ids.len(), 3, "{text}");
    assert!(ids.iter().all(|&i| i < 512));
    let (status, got) = post_json(&server, "/v1/completions", json!({"prompt": "text"}));
    assert_error(status, &got, 400, "text without a tokenizer");
    let (status, got) = post_json(
        &server,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_error(status, &got, 400, "chat without a tokenizer");
}

#[test]
fn a_gguf_file_serves_llama_cpp_greedy_text() {
    let server = start(ServerConfig {
        model_dir: root().join("fixtures/gguf/k-Q4_K_M.gguf"),
        ..Default::default()
    });
    let (status, models) = get(&server, "/v1/models", None);
    assert_eq!(status, 200);
    assert!(models.contains("\"k-Q4_K_M\""), "{models}");
    // llama.cpp's prompt and greedy continuation on this file (make_gguf_fixtures.py).
    let reference = llama4_testkit::read_tensors(&root().join("fixtures/gguf/reference.safetensors"));
    let as_ids = |name: &str| -> Vec<u32> { reference[name].iter().map(|&x| x as u32).collect() };
    let (prompt, greedy) = (as_ids("prompt_ids"), as_ids("k-Q4_K_M.greedy_ids"));
    let (status, got) = post_json(
        &server,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": greedy.len(), "ignore_eos": true, "temperature": 0}),
    );
    assert_eq!(status, 200, "{got}");
    // The file's own tokenizer (from its metadata) turns the ids into the text, withholding a
    // character whose bytes are not all out yet, as streams do.
    let f =
        llama4_model::llama4_core::gguf::GgufFile::open(root().join("fixtures/gguf/k-Q4_K_M.gguf")).unwrap();
    let tok = llama4_model::GgufTokenizer::from_gguf(&f).unwrap().tokenizer;
    let mut stream = llama4_model::StreamDecoder::new();
    let want: String = greedy.iter().map(|&id| stream.push(&tok, id).unwrap()).collect();
    assert_eq!(got["choices"][0]["text"], want, "{got}");
    assert_eq!(got["usage"]["completion_tokens"], greedy.len(), "{got}");
    // Chat goes through the file's template (or Llama 4's) and its tokenizer.
    let (status, got) = post_json(
        &server,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{got}");
}

#[test]
fn a_gguf_file_refuses_load_time_quantisation() {
    let config = ServerConfig {
        model_dir: root().join("fixtures/gguf/tiny-Q8_0.gguf"),
        quantization: Some(llama4_model::quant_policy(
            llama4_core::QuantSpec::new(llama4_core::QuantFormat::Q8, 32),
            llama4_core::QuantScope::Experts,
        )),
        port: 0,
        ..Default::default()
    };
    let Err(err) = RunningServer::start(config) else {
        panic!("a GGUF with --quantize started")
    };
    assert!(err.to_string().contains("GGUF"), "{err}");
}

#[test]
fn a_gguf_file_with_its_projector_takes_images() {
    let e2e = root().join("fixtures/gguf/mm-e2e");
    let server = start(ServerConfig {
        model_dir: e2e.join("text-F32.gguf"),
        mmproj: Some(e2e.join("mmproj-F32.gguf")),
        ..Default::default()
    });
    let (status, models) = get(&server, "/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["meta"]["multimodal"], true, "{models}");
    // An image part passes the server's checks and reaches the model: the fixture's own chat
    // template writes text only, so the image makes a `<|image|>`-less prompt, refused by
    // name, where a server without a tower refuses the image itself.
    use base64::Engine as _;
    let png = std::fs::read(root().join("fixtures/models/multimodal/small.png")).unwrap();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let body = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 2});
    let (status, got) = post_json(&server, "/v1/chat/completions", body);
    assert_error(status, &got, 400, "an image with no placeholder in the prompt");
    let message = got["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("0 <|image|> placeholder(s) but 1 image"),
        "{message}"
    );

    // A projector is refused with a checkpoint directory, for another model, or with a model
    // whose vocabulary has no image tokens.
    let other = root().join("fixtures/gguf/mmproj-multimodal-F32.gguf");
    for (model, mmproj, what) in [
        (
            root().join("fixtures/models/multimodal"),
            e2e.join("mmproj-F32.gguf"),
            "GGUF",
        ),
        (e2e.join("text-F32.gguf"), other, "another model"),
        (
            root().join("fixtures/gguf/tiny-F32.gguf"),
            e2e.join("mmproj-F32.gguf"),
            "<|image_start|>",
        ),
    ] {
        let config = ServerConfig {
            model_dir: model,
            mmproj: Some(mmproj),
            port: 0,
            ..Default::default()
        };
        let Err(err) = RunningServer::start(config) else {
            panic!("{what}: started")
        };
        assert!(err.to_string().contains(what), "{err}");
    }
}

/// Greedy completions of two id prompts (the fixture has no tokenizer: the text is the ids).
fn id_completions(server: &RunningServer) -> Vec<Value> {
    [json!([1, 2, 3, 4, 5, 6, 7, 8]), json!([40, 7, 300, 12])]
        .into_iter()
        .map(|prompt| {
            let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 8});
            let (status, got) = post_json(server, "/v1/completions", body);
            assert_eq!(status, 200, "{got}");
            got["choices"].clone()
        })
        .collect()
}

#[test]
fn experts_shared_among_a_group_answer_as_one_process() {
    // Threads stand in for MPI ranks (`tools/mpi_tests.sh` runs the same under mpirun).
    let dir = root().join("fixtures/models/scout");
    let alone = start(ServerConfig {
        model_dir: dir.clone(),
        ..Default::default()
    });
    let want = id_completions(&alone);
    drop(alone);

    let mut group = expert_parallel::LocalGroup::new(3).into_iter();
    let leader = group.next().unwrap();
    let workers: Vec<_> = group
        .map(|t| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                expert_parallel::run_worker(&dir, None, t)
                    .map(|(w, stats)| (w.experts(), stats.unwrap_or_default().calls))
            })
        })
        .collect();
    let server = start(ServerConfig {
        model_dir: dir,
        expert_group: Some(leader),
        ..Default::default()
    });
    assert_eq!(id_completions(&server), want);
    // The scout fixture has 5 MoE layers: the prefill and each decode step call each once.
    assert!(metric(&server, "llama4_expert_parallel_layer_calls_total") >= 2.0 * 8.0 * 5.0);
    assert!(metric(&server, "llama4_expert_parallel_reduced_bytes_total") > 0.0);
    // Shutting down drops the model, which stops the workers.
    drop(server);
    let served: Vec<_> = workers.into_iter().map(|w| w.join().unwrap().unwrap()).collect();
    assert_eq!(
        served.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        [5..10, 10..16]
    );
    assert!(served.iter().all(|s| s.1 > 0), "{served:?}");
}

#[test]
fn a_group_given_a_gguf_file_stops_its_workers() {
    let path = root().join("fixtures/gguf/tiny-Q8_0.gguf");
    let mut group = expert_parallel::LocalGroup::new(2).into_iter();
    let leader = group.next().unwrap();
    let worker = group.next().unwrap();
    let worker = {
        let path = path.clone();
        std::thread::spawn(move || expert_parallel::run_worker(&path, None, worker).map(|_| ()))
    };
    let Err(err) = RunningServer::start(ServerConfig {
        model_dir: path,
        port: 0,
        expert_group: Some(leader),
        ..Default::default()
    }) else {
        panic!("a GGUF file started with a group")
    };
    assert!(err.to_string().contains("GGUF"), "{err}");
    // The worker, which could not load a GGUF file either, returns its own error instead of
    // waiting for rank 0.
    let Err(worker_err) = worker.join().unwrap() else {
        panic!("the worker loaded a GGUF file")
    };
    assert!(
        !matches!(worker_err, expert_parallel::Error::Transport(_)),
        "{worker_err}"
    );
}

/// Requests that reach an idle server within its batch window are prefilled in one step and
/// then decode together (`max_tokens` steps in all); with no window the first starts alone.
#[test]
fn a_burst_of_requests_starts_in_one_step() {
    let n = 6;
    let body =
        |prompt: [u32; 3]| json!({"prompt": prompt, "max_tokens": n, "ignore_eos": true, "temperature": 0});
    for window in [Duration::from_secs(5), Duration::ZERO] {
        let server = start(ServerConfig {
            parallel: 2,
            batch_window: window,
            ..Default::default()
        });
        std::thread::scope(|s| {
            let first = s.spawn(|| post_json(&server, "/v1/completions", body([1, 5, 9])));
            std::thread::sleep(Duration::from_millis(50));
            let (status, second) = post_json(&server, "/v1/completions", body([1, 7, 3]));
            assert_eq!(status, 200, "{second}");
            let (status, first) = first.join().unwrap();
            assert_eq!(status, 200, "{first}");
            for r in [&first, &second] {
                assert_eq!(r["usage"]["completion_tokens"], n, "{r}");
            }
        });
        let steps = metric(&server, "llama4_steps_total");
        if window.is_zero() {
            assert!(steps > n as f64, "no window: {steps} steps");
        } else {
            assert_eq!(steps, n as f64, "a {window:?} window");
        }
    }
}

/// Two 7-id prompts gathered by the window, at a chunk of 4: with nothing decoding a step takes
/// up to 16 prompt tokens, so one step prefills both and samples their first tokens, and every
/// later step decodes both (`max_tokens` steps in all). At 4 tokens per step the prefill alone
/// would take four steps.
#[test]
fn a_burst_is_prefilled_in_larger_steps_while_nothing_decodes() {
    let n = 5;
    let server = start(ServerConfig {
        parallel: 2,
        prefill_chunk: 4,
        batch_window: Duration::from_secs(5),
        ..Default::default()
    });
    std::thread::scope(|s| {
        let handles: Vec<_> = [[1u32, 5, 9, 2, 6, 3, 7], [1, 7, 3, 8, 4, 9, 5]]
            .into_iter()
            .map(|prompt| {
                let server = &server;
                s.spawn(move || {
                    post_json(
                        server,
                        "/v1/completions",
                        json!({"prompt": prompt, "max_tokens": n, "ignore_eos": true, "temperature": 0}),
                    )
                })
            })
            .collect();
        for h in handles {
            let (status, body) = h.join().unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["usage"]["completion_tokens"], n, "{body}");
        }
    });
    assert_eq!(metric(&server, "llama4_steps_total"), n as f64);
}
