//! The OpenAI request bodies, read field by field so that each wrong field is named in its
//! error, and the response objects (whole and streamed chunks).

use base64::Engine as _;
use llama4_model::SamplingConfig;
use serde_json::{json, Map, Value};
use vision_encoder::image::DynamicImage;

use crate::api::ApiError;
use crate::engine::FinishReason;

/// Sampling defaults of the checkpoint (`generation_config.json`), used for fields a request
/// leaves out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingDefaults {
    /// Temperature (0 when the checkpoint says `do_sample: false`).
    pub temperature: f32,
    /// Top-p.
    pub top_p: Option<f32>,
    /// Top-k.
    pub top_k: Option<usize>,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        SamplingDefaults {
            temperature: 1.0,
            top_p: None,
            top_k: None,
        }
    }
}

impl SamplingDefaults {
    /// Reads `generation_config.json` of `dir` if present; `do_sample: false` means greedy.
    pub fn from_dir(dir: &std::path::Path) -> Self {
        let mut d = SamplingDefaults::default();
        // A missing or unreadable file leaves the defaults (the model loader reports bad files).
        let Some(v) = llama4_core::input::read_optional_json(&dir.join("generation_config.json"))
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        else {
            return d;
        };
        if v.get("do_sample").and_then(Value::as_bool) == Some(false) {
            d.temperature = 0.0;
            return d;
        }
        if let Some(t) = v.get("temperature").and_then(Value::as_f64) {
            d.temperature = t as f32;
        }
        d.top_p = v.get("top_p").and_then(Value::as_f64).map(|p| p as f32);
        d.top_k = v.get("top_k").and_then(Value::as_u64).map(|k| k as usize);
        d
    }
}

/// A request body: a JSON object.
pub struct Body(pub Map<String, Value>);

impl Body {
    /// Parses `bytes` as a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"), None))?;
        match v {
            Value::Object(m) => Ok(Body(m)),
            _ => Err(ApiError::bad_request("the body must be a JSON object", None)),
        }
    }

    /// The field, absent when missing or `null`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn typed<T>(
        &self,
        name: &'static str,
        what: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| {
                ApiError::bad_request(format!("`{name}` must be {what}, not {v}"), Some(name))
            }),
        }
    }

    /// A boolean field.
    pub fn bool(&self, name: &'static str) -> Result<Option<bool>, ApiError> {
        self.typed(name, "a boolean", Value::as_bool)
    }

    /// A number field.
    pub fn number(&self, name: &'static str) -> Result<Option<f64>, ApiError> {
        self.typed(name, "a number", Value::as_f64)
    }

    /// An integer field.
    pub fn int(&self, name: &'static str) -> Result<Option<i64>, ApiError> {
        self.typed(name, "an integer", |v| {
            v.as_i64()
                .or_else(|| v.as_u64().map(|u| u.min(i64::MAX as u64) as i64))
        })
    }
}

/// What every generation request shares: streaming, token budget, sampling, stops.
#[derive(Clone, Debug)]
pub struct Common {
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`: a last chunk carrying `usage`.
    pub include_usage: bool,
    /// `max_tokens` (or `max_completion_tokens`) if given.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingConfig,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Generate through stop ids.
    pub ignore_eos: bool,
}

/// Stop strings a request may give at most.
const MAX_STOPS: usize = 16;

/// Reads the fields every generation request shares; `max_token_fields` are the names the
/// token budget may come under, first found wins.
pub fn common(
    body: &Body,
    defaults: &SamplingDefaults,
    max_token_fields: &[&'static str],
) -> Result<Common, ApiError> {
    for name in max_token_fields {
        if let Some(n) = body.int(name)? {
            if n < 1 {
                return Err(ApiError::bad_request(
                    format!("`{name}` must be at least 1, not {n}"),
                    Some(name),
                ));
            }
        }
    }
    let max_tokens = max_token_fields
        .iter()
        .find_map(|name| body.get(name).and_then(Value::as_i64))
        .map(|n| n as usize);
    if let Some(n) = body.int("n")? {
        if n != 1 {
            return Err(ApiError::bad_request("only `n: 1` is supported", Some("n")));
        }
    }
    if body.int("best_of")?.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(
            "only `best_of: 1` is supported",
            Some("best_of"),
        ));
    }
    if body.bool("echo")? == Some(true) {
        return Err(ApiError::bad_request("`echo` is not supported", Some("echo")));
    }
    let logprobs = match body.get("logprobs") {
        None | Some(Value::Bool(false)) => false,
        Some(_) => true,
    };
    if logprobs {
        return Err(ApiError::bad_request(
            "`logprobs` is not supported",
            Some("logprobs"),
        ));
    }
    let temperature = body
        .number("temperature")?
        .map(|t| t as f32)
        .unwrap_or(defaults.temperature);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::bad_request(
            format!("`temperature` must be ≥ 0, not {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = body.number("top_p")?.map(|p| p as f32).or(defaults.top_p);
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad_request(
                format!("`top_p` must be in (0, 1], not {p}"),
                Some("top_p"),
            ));
        }
    }
    let top_k = match body.int("top_k")? {
        None => defaults.top_k,
        // -1 and 0 both mean "no limit" in the servers that take top_k.
        Some(-1 | 0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::bad_request(
                format!("`top_k` must be ≥ -1, not {k}"),
                Some("top_k"),
            ));
        }
    };
    let seed = match body.int("seed")? {
        Some(s) => s as u64,
        None => fresh_seed(),
    };
    let stop = match body.get("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad_request("`stop` must be a string or an array of strings", Some("stop"))
            })?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`stop` must be a string or an array of strings",
                Some("stop"),
            ))
        }
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::bad_request(
            format!("`stop` takes at most {MAX_STOPS} strings"),
            Some("stop"),
        ));
    }
    let stream = body.bool("stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "`stream_options.include_usage` must be a boolean",
                    Some("stream_options"),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                "`stream_options` must be an object",
                Some("stream_options"),
            ))
        }
    };
    Ok(Common {
        stream,
        include_usage,
        max_tokens,
        sampling: SamplingConfig {
            temperature,
            top_k,
            top_p,
            seed,
        },
        stop,
        ignore_eos: body.bool("ignore_eos")?.unwrap_or(false),
    })
}

/// A seed for a request that gives none: different from request to request.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// A completion prompt: text to tokenise, or ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids (checked against the vocabulary by the caller).
    Ids(Vec<i64>),
}

/// `prompt` of `/v1/completions`: a string, an array of ids, or a batch of one of either.
pub fn prompt(body: &Body) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "`prompt` must be a string or an array of token ids",
            Some("prompt"),
        )
    };
    let v = body
        .get("prompt")
        .ok_or_else(|| ApiError::bad_request("`prompt` is required", Some("prompt")))?;
    let ids = |a: &[Value]| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>();
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => match &a[0] {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(inner) => ids(inner).map(Prompt::Ids).ok_or_else(bad),
            _ => Err(bad()),
        },
        Value::Array(a) if a.iter().all(|x| x.is_string() || x.is_array()) && !a.is_empty() => {
            Err(ApiError::bad_request(
                "batched prompts are not supported: send one request per prompt",
                Some("prompt"),
            ))
        }
        Value::Array(a) => ids(a).map(Prompt::Ids).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// A chat request's messages as the template takes them, and the images they carry in order.
#[derive(Debug)]
pub struct ChatInput {
    /// Messages for [`llama4_model::ChatTemplate::render`]: image parts become `{"type": "image"}`,
    /// tool-call arguments given as JSON text become objects.
    pub messages: Vec<Value>,
    /// Decoded images, one per image part.
    pub images: Vec<DynamicImage>,
    /// `tools`, when given.
    pub tools: Option<Vec<Value>>,
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Reads `messages` (and `tools`) of `/v1/chat/completions`.
pub fn chat_input(body: &Body, takes_images: bool) -> Result<ChatInput, ApiError> {
    let messages = body
        .get("messages")
        .ok_or_else(|| ApiError::bad_request("`messages` is required", Some("messages")))?
        .as_array()
        .ok_or_else(|| ApiError::bad_request("`messages` must be an array", Some("messages")))?;
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "`messages` must not be empty",
            Some("messages"),
        ));
    }
    let mut images = Vec::new();
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let bad = |what: String| ApiError::bad_request(format!("messages[{i}]: {what}"), Some("messages"));
        let obj = m.as_object().ok_or_else(|| bad("must be an object".into()))?;
        let role = obj
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("`role` must be a string".into()))?;
        if !ROLES.contains(&role) {
            return Err(bad(format!(
                "unknown role `{role}` (expected one of {})",
                ROLES.join(", ")
            )));
        }
        let mut msg = obj.clone();
        match obj.get("content") {
            None | Some(Value::Null) if role == "assistant" && obj.contains_key("tool_calls") => {}
            None | Some(Value::Null) => return Err(bad("`content` is required".into())),
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                let parts = parts
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        content_part(p, takes_images, &mut images)
                            .map_err(|e| bad(format!("content[{j}]: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                msg.insert("content".into(), Value::Array(parts));
            }
            Some(_) => return Err(bad("`content` must be a string or an array of parts".into())),
        }
        if let Some(calls) = obj.get("tool_calls").filter(|v| !v.is_null()) {
            let calls = calls
                .as_array()
                .ok_or_else(|| bad("`tool_calls` must be an array".into()))?;
            msg.insert(
                "tool_calls".into(),
                Value::Array(calls.iter().map(parsed_arguments).collect()),
            );
        }
        out.push(Value::Object(msg));
    }
    let tools = match body.get("tools") {
        None => None,
        Some(Value::Array(t)) if t.iter().all(Value::is_object) => Some(t.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "`tools` must be an array of objects",
                Some("tools"),
            ))
        }
    };
    Ok(ChatInput {
        messages: out,
        images,
        tools,
    })
}

/// A tool call whose `function.arguments` is JSON text gets the parsed object instead (templates
/// write the arguments with `tojson`, as Hugging Face's convention has them as a mapping).
fn parsed_arguments(call: &Value) -> Value {
    let mut call = call.clone();
    if let Some(args) = call.pointer_mut("/function/arguments") {
        if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
            *args = parsed;
        }
    }
    call
}

/// One content part: text stays, an image is decoded and becomes `{"type": "image"}`.
fn content_part(part: &Value, takes_images: bool, images: &mut Vec<DynamicImage>) -> Result<Value, String> {
    let kind = part
        .get("type")
        .and_then(Value::as_str)
        .ok_or("a part needs a string `type`")?;
    match kind {
        "text" => {
            let text = part
                .get("text")
                .and_then(Value::as_str)
                .ok_or("a text part needs a string `text`")?;
            Ok(json!({"type": "text", "text": text}))
        }
        "image_url" => {
            if !takes_images {
                return Err("this model does not take images (its checkpoint has no vision tower)".into());
            }
            let url = match part.get("image_url") {
                Some(Value::String(s)) => s.as_str(),
                Some(Value::Object(o)) => o
                    .get("url")
                    .and_then(Value::as_str)
                    .ok_or("`image_url.url` must be a string")?,
                _ => return Err("an image_url part needs `image_url` with a `url`".into()),
            };
            images.push(decode_data_url(url)?);
            Ok(json!({"type": "image"}))
        }
        other => Err(format!(
            "unsupported content part type `{other}` (expected text or image_url)"
        )),
    }
}

/// The image of a `data:image/...;base64,...` URL (the server fetches nothing).
fn decode_data_url(url: &str) -> Result<DynamicImage, String> {
    let rest = url
        .strip_prefix("data:")
        .ok_or("only `data:` URLs are accepted for images")?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or("a data URL needs a comma before its data")?;
    if !meta.ends_with(";base64") {
        return Err("an image data URL must be base64 (`data:image/png;base64,...`)".into());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("the image's base64 is invalid: {e}"))?;
    vision_encoder::decode_image(&bytes).map_err(|e| format!("the image cannot be decoded: {e}"))
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt: usize,
    /// Generated tokens.
    pub completion: usize,
}

impl Usage {
    fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        })
    }
}

/// Which endpoint's objects to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`: `text_completion`.
    Completion,
    /// `/v1/chat/completions`: `chat.completion` / `chat.completion.chunk`.
    Chat,
}

/// Writes one request's response objects.
#[derive(Clone, Debug)]
pub struct Responder {
    /// Which endpoint.
    pub kind: Kind,
    /// `cmpl-...` / `chatcmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
}

impl Responder {
    /// A responder with a fresh id.
    pub fn new(kind: Kind, model: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        Responder {
            kind,
            id: format!(
                "{prefix}-{:x}{:04x}",
                now.as_millis(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            created: now.as_secs(),
            model: model.to_string(),
        }
    }

    /// The whole answer.
    pub fn full(&self, text: &str, reason: FinishReason, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": reason.as_str(),
            }),
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason.as_str(),
            }),
        };
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage.json(),
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices})
    }

    /// The first chunk of a chat stream (the role); none for completions.
    pub fn opening(&self) -> Option<Value> {
        (self.kind == Kind::Chat).then(|| {
            self.chunk(json!([{
                "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null,
            }]))
        })
    }

    /// A chunk with a piece of text.
    pub fn piece(&self, text: &str) -> Value {
        self.chunk(match self.kind {
            Kind::Completion => json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": null}]),
            Kind::Chat => {
                json!([{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}])
            }
        })
    }

    /// The chunk that says why generation ended.
    pub fn finish(&self, reason: FinishReason) -> Value {
        self.chunk(match self.kind {
            Kind::Completion => {
                json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": reason.as_str()}])
            }
            Kind::Chat => {
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}])
            }
        })
    }

    /// The last chunk with `stream_options.include_usage`: no choices, the usage.
    pub fn usage(&self, usage: Usage) -> Value {
        let mut v = self.chunk(json!([]));
        v["usage"] = usage.json();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Body {
        Body(v.as_object().unwrap().clone())
    }

    #[test]
    fn prompt_forms() {
        assert_eq!(
            prompt(&body(json!({"prompt": "a"}))).unwrap(),
            Prompt::Text("a".into())
        );
        assert_eq!(
            prompt(&body(json!({"prompt": [1, 2]}))).unwrap(),
            Prompt::Ids(vec![1, 2])
        );
        assert_eq!(
            prompt(&body(json!({"prompt": ["a"]}))).unwrap(),
            Prompt::Text("a".into())
        );
        assert_eq!(
            prompt(&body(json!({"prompt": [[3]]}))).unwrap(),
            Prompt::Ids(vec![3])
        );
        for bad in [
            json!({}),
            json!({"prompt": 3}),
            json!({"prompt": ["a", "b"]}),
            json!({"prompt": [1, "a"]}),
        ] {
            let e = prompt(&body(bad.clone())).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
        }
    }

    #[test]
    fn sampling_fields_are_checked() {
        let d = SamplingDefaults::default();
        let c = common(
            &body(json!({"temperature": 0, "top_k": 5, "seed": 7, "stop": "x"})),
            &d,
            &["max_tokens"],
        )
        .unwrap();
        assert_eq!(c.sampling.temperature, 0.0);
        assert_eq!(c.sampling.top_k, Some(5));
        assert_eq!(c.sampling.seed, 7);
        assert_eq!(c.stop, vec!["x".to_string()]);
        for (bad, param) in [
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"max_tokens": "ten"}), "max_tokens"),
            (json!({"temperature": -0.5}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"stop": [1]}), "stop"),
            (json!({"n": 2}), "n"),
            (json!({"stream": "yes"}), "stream"),
        ] {
            let e = common(&body(bad.clone()), &d, &["max_tokens"]).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param), (400, Some(param)), "{bad}");
        }
    }

    #[test]
    fn chat_messages_are_checked_and_converted() {
        let b = body(json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        ]}));
        let input = chat_input(&b, false).unwrap();
        assert_eq!(
            input.messages[1]["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
        for bad in [
            json!({"messages": []}),
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            json!({"messages": [{"role": "user"}]}),
            json!({"messages": [{"role": "user", "content": 5}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
        ] {
            let e = chat_input(&body(bad.clone()), false).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
        }
        // With a vision tower: only data URLs, and only decodable images.
        for url in [
            "https://example.com/a.png",
            "data:image/png;base64,!!",
            "data:image/png;base64,AAAA",
        ] {
            let b = body(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}),
            );
            assert!(chat_input(&b, true).is_err(), "{url}");
        }
    }
}
