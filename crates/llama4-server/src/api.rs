//! The HTTP side: routes, the API key check, OpenAI error objects, and the handlers, which parse,
//! template, tokenize, queue the request with the engine and send back what it streams.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use llama4_model::{ChatOptions, ChatTemplate, Tokenizer};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{Engine, EngineError, Event, GenParams, Request as EngineRequest, SubmitError};
use crate::metrics::Metrics;
use crate::openai::{self, Body, Common, Kind, Prompt, Responder, SamplingDefaults, Usage};

/// An OpenAI error response: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `type`.
    pub kind: &'static str,
    /// `message`.
    pub message: String,
    /// `param`: the request field at fault.
    pub param: Option<&'static str>,
    /// `code`.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: None,
        }
    }

    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: Some(code),
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Rejected(m) => ApiError::bad_request(m, None),
            EngineError::Internal(m) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal", m)
            }
        }
    }
}

/// What the handlers need once the model is loaded.
pub(crate) struct Ready {
    pub engine: Engine,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub template: ChatTemplate,
    pub model_name: String,
    pub vocab_size: usize,
    pub ctx_size: usize,
    pub takes_images: bool,
    pub defaults: SamplingDefaults,
    pub created: u64,
}

impl Ready {
    fn tokenizer(&self) -> Result<&Tokenizer, ApiError> {
        self.tokenizer.as_deref().ok_or_else(|| {
            ApiError::bad_request(
                "this model has no tokenizer (no tokenizer.json, or a GGUF tokenizer of a kind not \
                 supported): send the prompt as token ids to /v1/completions",
                None,
            )
        })
    }
}

/// State shared by every handler.
pub(crate) struct AppState {
    pub ready: OnceLock<Ready>,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
}

impl AppState {
    fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "loading",
                "the model is still loading",
            )
        })
    }
}

/// The routes, behind the API key check and the body cap.
pub(crate) fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Checks the API key (every route but `/health`) and counts responses.
async fn guard(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let endpoint = match path {
        "/health" | "/v1/models" | "/v1/completions" | "/v1/chat/completions" | "/metrics" => {
            path.to_string()
        }
        _ => "other".to_string(),
    };
    let response = match &state.api_key {
        Some(key) if path != "/health" && !authorised(&request, key) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "a valid API key is required: send `Authorization: Bearer KEY`",
        )
        .into_response(),
        _ => next.run(request).await,
    };
    state
        .metrics
        .count_response(&endpoint, response.status().as_u16());
    response
}

fn authorised(request: &Request, key: &str) -> bool {
    let Some(given) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compare every byte whatever the first difference, so timing does not reveal the key.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.ready() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": ready.model_name, "object": "model", "created": ready.created, "owned_by": "llama4-rs",
            "meta": {"n_ctx": ready.ctx_size, "n_vocab": ready.vocab_size, "multimodal": ready.takes_images},
        }],
    }))
    .into_response())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        "not_found",
        "no such endpoint",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "this endpoint does not take this method",
    )
}

/// The body, or the error object for a body too large (413) or unreadable.
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Body, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let e = ApiError {
            status,
            kind: "invalid_request_error",
            message: r.body_text(),
            param: None,
            code: None,
        };
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            e.with_code("request_too_large")
        } else {
            e
        }
    })?;
    Body::parse(&bytes)
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    let body = body_of(body)?;
    let common = openai::common(&body, &ready.defaults, &["max_tokens"])?;
    let ids = match openai::prompt(&body)? {
        Prompt::Text(text) => ready
            .tokenizer()?
            .encode(&text)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))?,
        Prompt::Ids(ids) => ids
            .into_iter()
            .map(|id| {
                u32::try_from(id)
                    .ok()
                    .filter(|&i| (i as usize) < ready.vocab_size)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            format!(
                                "token id {id} is outside the vocabulary of {} entries",
                                ready.vocab_size
                            ),
                            Some("prompt"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    // OpenAI's default for completions.
    generate(ready, Kind::Completion, ids, vec![], common, Some(16)).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    let body = body_of(body)?;
    let common = openai::common(&body, &ready.defaults, &["max_completion_tokens", "max_tokens"])?;
    let input = openai::chat_input(&body, ready.takes_images)?;
    // Extra template variables (`tools_in_user_message`, ...), as vLLM takes them.
    let extra = match body.get("chat_template_kwargs") {
        None => Default::default(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "`chat_template_kwargs` must be an object",
                Some("chat_template_kwargs"),
            ))
        }
    };
    let options = ChatOptions {
        add_generation_prompt: true,
        tools: input.tools,
        documents: None,
        extra,
    };
    let text = ready
        .template
        .render(&input.messages, &options)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
    let ids = ready
        .tokenizer()?
        .encode_with(&text, false)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
    generate(ready, Kind::Chat, ids, input.images, common, None).await
}

/// Checks the budget, queues the request, waits for its slot, then answers whole or streamed.
async fn generate(
    ready: &Ready,
    kind: Kind,
    prompt: Vec<u32>,
    images: Vec<vision_encoder::image::DynamicImage>,
    common: Common,
    default_max_tokens: Option<usize>,
) -> Result<Response, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
    }
    let room = ready.ctx_size.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::bad_request(
            format!(
                "the prompt has {} tokens; the context holds {}",
                prompt.len(),
                ready.ctx_size
            ),
            None,
        )
        .with_code("context_length_exceeded"));
    }
    let max_tokens = match (common.max_tokens, default_max_tokens) {
        (Some(n), _) if n > room => {
            return Err(ApiError::bad_request(
                format!(
                    "max_tokens {n} plus the prompt's {} tokens exceeds the context of {}",
                    prompt.len(),
                    ready.ctx_size
                ),
                Some("max_tokens"),
            )
            .with_code("context_length_exceeded"))
        }
        (Some(n), _) => n,
        (None, Some(d)) => d.min(room),
        (None, None) => room,
    };
    let request = EngineRequest {
        prompt,
        images,
        params: GenParams {
            max_tokens,
            sampling: common.sampling,
            stop: common.stop,
            ignore_eos: common.ignore_eos,
        },
    };
    let mut events = ready.engine.submit(request).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            "queue_full",
            e.to_string(),
        ),
        SubmitError::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            "stopped",
            e.to_string(),
        ),
    })?;
    let prompt_tokens = match events.recv().await {
        Some(Event::Started { prompt_tokens, .. }) => prompt_tokens,
        Some(Event::Failed(e)) => return Err(e.into()),
        _ => return Err(EngineError::Internal("the engine dropped the request".into()).into()),
    };
    let responder = Responder::new(kind, &ready.model_name);
    if common.stream {
        let stream = sse_stream(events, responder, prompt_tokens, common.include_usage);
        return Ok(Sse::new(stream).into_response());
    }
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(Event::Text(piece)) => text.push_str(&piece),
            Some(Event::Done {
                reason,
                completion_tokens,
            }) => {
                let usage = Usage {
                    prompt: prompt_tokens,
                    completion: completion_tokens,
                };
                return Ok(Json(responder.full(&text, reason, usage)).into_response());
            }
            Some(Event::Failed(e)) => return Err(e.into()),
            Some(Event::Started { .. }) | None => {
                return Err(EngineError::Internal("the engine dropped the request".into()).into())
            }
        }
    }
}

/// The engine's events as server-sent events, ending with `data: [DONE]`. Dropping the stream
/// (the client went away) drops `events`, which cancels the request in the engine.
fn sse_stream(
    events: UnboundedReceiver<Event>,
    responder: Responder,
    prompt_tokens: usize,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let opening: Vec<SseEvent> = responder.opening().into_iter().map(data).collect();
    let rest = stream::unfold(Some(events), move |events| {
        let responder = responder.clone();
        async move {
            let mut events = events?;
            let out: Vec<SseEvent> = match events.recv().await {
                Some(Event::Text(piece)) => vec![data(responder.piece(&piece))],
                Some(Event::Done {
                    reason,
                    completion_tokens,
                }) => {
                    let mut out = vec![data(responder.finish(reason))];
                    if include_usage {
                        out.push(data(responder.usage(Usage {
                            prompt: prompt_tokens,
                            completion: completion_tokens,
                        })));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    return Some((out, None));
                }
                Some(Event::Failed(e)) => {
                    let err = ApiError::from(e);
                    let body = json!({"error": {"message": err.message, "type": err.kind, "param": null, "code": err.code}});
                    return Some((vec![data(body), SseEvent::default().data("[DONE]")], None));
                }
                Some(Event::Started { .. }) => vec![],
                None => return None,
            };
            Some((out, Some(events)))
        }
    });
    stream::iter(opening).chain(rest.flat_map(stream::iter)).map(Ok)
}
