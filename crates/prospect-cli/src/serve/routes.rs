//! The HTTP surface of `prospect serve`: OpenAI's chat-completions shape, feedback, models, health,
//! Prometheus metrics and the chat page. Errors are OpenAI-style bodies: `{"error": {"message", "type",
//! "param", "code"}}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use prospect::data::Message;
use prospect::eval::generate::RowSpec;
use prospect::eval::{FinishReason, Generation, SamplingConfig};
use prospect::feedback::{now_ms, Answer, Recorded, Thumb};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{AppState, Job, RowEvent};

pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/feedback", post(feedback))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

// ---- errors and auth ----

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with its status.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

fn api_error(
    status: StatusCode,
    message: impl Into<String>,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
) -> ApiError {
    ApiError { status, message: message.into(), kind, param, code }
}

/// A 500: something on the server's side failed.
fn internal(message: impl Into<String>) -> Response {
    api_error(StatusCode::INTERNAL_SERVER_ERROR, message, "server_error", None, None).into_response()
}

fn bad_request(message: impl Into<String>, param: &'static str) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, message, "invalid_request_error", Some(param), None)
}

/// The body as the JSON the endpoint takes, whatever its Content-Type says (`curl -d` sends a form type).
/// A body that cannot be read is its rejection's status (413 when too large); JSON that does not parse
/// or fit is a 400 with serde's reason.
fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| api_error(r.status(), r.body_text(), "invalid_request_error", None, None))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| bad_request(format!("the body is not valid JSON for this endpoint: {e}"), "body"))
}

/// `Authorization: Bearer KEY` must match `key` when one is set.
fn authorise(headers: &HeaderMap, key: Option<&str>) -> Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key) {
        Ok(())
    } else {
        Err(api_error(
            StatusCode::UNAUTHORIZED,
            "missing or incorrect API key",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ))
    }
}

// ---- metrics ----

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeedbackLabels {
    label: String,
}

/// The server's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    latency: Histogram,
    feedback: Family<FeedbackLabels, Counter>,
    /// Rows per decoding batch (the decode thread observes it).
    pub batch_rows: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("prospect");
        let requests = Family::<RequestLabels, Counter>::default();
        let (prompt_tokens, completion_tokens) = (Counter::default(), Counter::default());
        let latency = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let feedback = Family::<FeedbackLabels, Counter>::default();
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register("requests", "HTTP requests by endpoint and status", requests.clone());
        registry.register("prompt_tokens", "Prompt tokens of chat completions", prompt_tokens.clone());
        registry.register("completion_tokens", "Tokens generated", completion_tokens.clone());
        registry.register("chat_latency_seconds", "Time from request to the last token", latency.clone());
        registry.register("feedback", "Thumbs recorded, by label", feedback.clone());
        registry.register("batch_rows", "Rows decoded together in one batch", batch_rows.clone());
        Self { registry, requests, prompt_tokens, completion_tokens, latency, feedback, batch_rows }
    }

    fn count(&self, endpoint: &str, status: StatusCode) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.into(), status: status.as_u16() }).inc();
    }
}

/// Count the response under its endpoint and status, and return it.
fn counted(state: &AppState, endpoint: &str, r: Response) -> Response {
    state.metrics.count(endpoint, r.status());
    r
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => internal(e.to_string()),
    }
}

// ---- small endpoints ----

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorise(&headers, state.api_key.as_deref()) {
        return counted(&state, "models", r.into_response());
    }
    let body = json!({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "prospect"}]});
    counted(&state, "models", Json(body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
    id: String,
    label: bool,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

async fn feedback(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let key = state.feedback_key.as_deref().or(state.api_key.as_deref());
    let r = match authorise(&headers, key).and_then(|()| parse::<FeedbackRequest>(body)) {
        Err(r) => r.into_response(),
        Ok(f) => record(&state, f).await,
    };
    counted(&state, "feedback", r)
}

async fn record(state: &Arc<AppState>, f: FeedbackRequest) -> Response {
    let thumb = Thumb {
        answer_id: f.id.clone(),
        user: f.user.unwrap_or_default(),
        label: f.label,
        comment: f.comment,
        created_ms: now_ms(),
    };
    let s = state.clone();
    let outcome = tokio::task::spawn_blocking(move || s.db.record(&thumb)).await;
    match outcome {
        Ok(Ok(Recorded::UnknownAnswer)) => api_error(
            StatusCode::NOT_FOUND,
            format!("no answer with id {:?} was given by this server", f.id),
            "invalid_request_error",
            Some("id"),
            Some("answer_not_found"),
        )
        .into_response(),
        Ok(Ok(done)) => {
            let label = if f.label { "up" } else { "down" };
            state.metrics.feedback.get_or_create(&FeedbackLabels { label: label.into() }).inc();
            Json(json!({"id": f.id, "label": f.label, "replaced": done == Recorded::Replaced})).into_response()
        }
        Ok(Err(e)) => internal(e.to_string()),
        Err(e) => internal(e.to_string()),
    }
}

// ---- chat completions ----

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens`.
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stream: bool,
}

/// A checked request: its rows, seeds and what to store with its answers.
struct Prepared {
    rows: Vec<RowSpec>,
    seeds: Vec<u64>,
    messages: Vec<Message>,
    params: Value,
    prompt_tokens: usize,
    stream: bool,
}

fn prepare(state: &AppState, req: ChatRequest) -> Result<Prepared, ApiError> {
    if req.messages.is_empty() {
        return Err(bad_request("`messages` must hold at least one message", "messages"));
    }
    if let Some(m) = req.messages.iter().find(|m| !["system", "user", "assistant", "tool"].contains(&m.role.as_str())) {
        return Err(bad_request(format!("unknown role {:?} (system, user, assistant or tool)", m.role), "messages"));
    }
    if let Some(model) = req.model.as_deref().filter(|m| *m != state.model_name) {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            format!("this server serves {:?}, not {model:?}", state.model_name),
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        ));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad_request(format!("`temperature` must be in [0, 2], got {temperature}"), "temperature"));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_request(format!("`top_p` must be in (0, 1], got {top_p}"), "top_p"));
    }
    let n = req.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(bad_request(format!("`n` must be in [1, 16], got {n}"), "n"));
    }
    let stop = match req.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(bad_request("`stop` takes up to 4 non-empty strings", "stop"));
    }
    let text = state.template.render(&req.messages, true).map_err(|e| bad_request(e.to_string(), "messages"))?;
    let ids = state.tok.encode_raw(&text).map_err(|e| bad_request(e.to_string(), "messages"))?;
    if ids.len() >= state.context {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            format!("the prompt is {} tokens; the model's context is {} tokens", ids.len(), state.context),
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        ));
    }
    let asked = req.max_completion_tokens.or(req.max_tokens).unwrap_or(state.default_max_tokens);
    if asked == 0 {
        return Err(bad_request("`max_tokens` must be at least 1", "max_tokens"));
    }
    let max_new_tokens = asked.min(state.context - ids.len());
    let seed = req.seed.unwrap_or_else(rand::random);
    let sampling = SamplingConfig { temperature, top_k: 0, top_p };
    let row = RowSpec { prompt_ids: ids.clone(), max_new_tokens, sampling, stop: stop.clone() };
    let params = json!({"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop, "n": n});
    Ok(Prepared {
        rows: vec![row; n],
        seeds: (0..n as u64).map(|k| seed.wrapping_add(k)).collect(),
        messages: req.messages,
        params,
        prompt_tokens: ids.len(),
        stream: req.stream,
    })
}

fn finish_reason(g: &Generation) -> &'static str {
    match g.finish {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Choice k's answer id: the response id, then `-1`, `-2`, ... for further choices.
fn answer_id(id: &str, k: usize) -> String {
    if k == 0 {
        id.to_string()
    } else {
        format!("{id}-{k}")
    }
}

/// Store choice `k`'s answer.
async fn store(state: &Arc<AppState>, id: &str, k: usize, p: &Prepared, g: &Generation) -> Result<(), String> {
    let answer = Answer {
        id: answer_id(id, k),
        created_ms: now_ms(),
        model: state.model_name.clone(),
        adapter: state.adapter.clone(),
        messages: serde_json::to_value(&p.messages).map_err(|e| e.to_string())?,
        completion: g.completion.clone(),
        params: p.params.clone(),
        finish: finish_reason(g).into(),
        prompt_tokens: p.prompt_tokens,
        completion_tokens: g.completion_ids.len(),
    };
    let s = state.clone();
    match tokio::task::spawn_blocking(move || s.db.insert_answer(&answer)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let started = Instant::now();
    let prepared = authorise(&headers, state.api_key.as_deref())
        .and_then(|()| parse::<ChatRequest>(body))
        .and_then(|req| prepare(&state, req));
    let p = match prepared {
        Ok(p) => p,
        Err(r) => return counted(&state, "chat", r.into_response()),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job { rows: p.rows.clone(), seeds: p.seeds.clone(), events: tx };
    let sent = state.jobs.lock().map(|j| j.send(job).is_ok()).unwrap_or(false);
    if !sent {
        return counted(
            &state,
            "chat",
            api_error(StatusCode::SERVICE_UNAVAILABLE, "the decoder has stopped", "server_error", None, None)
                .into_response(),
        );
    }
    state.metrics.prompt_tokens.inc_by((p.prompt_tokens * p.rows.len()) as u64);
    let id = format!("chatcmpl-{:032x}", rand::random::<u128>());
    let r =
        if p.stream { stream(state.clone(), id, p, rx, started) } else { complete(&state, &id, &p, rx, started).await };
    counted(&state, "chat", r)
}

/// Wait for every choice, store each answer, answer with one JSON body.
async fn complete(
    state: &Arc<AppState>,
    id: &str,
    p: &Prepared,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(usize, RowEvent)>,
    started: Instant,
) -> Response {
    let mut gens: Vec<Option<Generation>> = vec![None; p.rows.len()];
    while let Some((k, event)) = rx.recv().await {
        match event {
            RowEvent::Text(_) => {}
            RowEvent::Done(g) => gens[k] = Some(g),
            RowEvent::Failed(e) => return internal(e),
        }
        if gens.iter().all(Option::is_some) {
            break;
        }
    }
    let gens: Vec<Generation> = gens.into_iter().flatten().collect();
    if gens.len() != p.rows.len() {
        return internal("the decoder stopped mid-request");
    }
    let mut choices = Vec::new();
    for (k, g) in gens.iter().enumerate() {
        if let Err(e) = store(state, id, k, p, g).await {
            return internal(format!("cannot store the answer: {e}"));
        }
        choices.push(json!({"index": k, "id": answer_id(id, k), "message": {"role": "assistant", "content": g.completion}, "finish_reason": finish_reason(g)}));
    }
    let completion_tokens: usize = gens.iter().map(|g| g.completion_ids.len()).sum();
    state.metrics.completion_tokens.inc_by(completion_tokens as u64);
    state.metrics.latency.observe(started.elapsed().as_secs_f64());
    Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now_ms() / 1000,
        "model": state.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": p.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": p.prompt_tokens + completion_tokens},
    }))
    .into_response()
}

/// Server-sent events: a role chunk per choice, content chunks as text arrives, a chunk with the finish
/// reason when a choice ends (its answer then stored), and `[DONE]`.
fn stream(
    state: Arc<AppState>,
    id: String,
    p: Prepared,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(usize, RowEvent)>,
    started: Instant,
) -> Response {
    let (out, events) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    let chunk = {
        let (id, model) = (id.clone(), state.model_name.clone());
        move |k: usize, delta: Value, finish: Option<&str>| {
            let body = json!({"id": id, "object": "chat.completion.chunk", "created": now_ms() / 1000, "model": model,
                              "choices": [{"index": k, "delta": delta, "finish_reason": finish}]});
            Ok(SseEvent::default().data(body.to_string()))
        }
    };
    tokio::spawn(async move {
        for k in 0..p.rows.len() {
            let _ = out.send(chunk(k, json!({"role": "assistant", "content": ""}), None));
        }
        let mut left = p.rows.len();
        while let Some((k, event)) = rx.recv().await {
            match event {
                RowEvent::Text(t) => _ = out.send(chunk(k, json!({"content": t}), None)),
                RowEvent::Done(g) => {
                    if let Err(e) = store(&state, &id, k, &p, &g).await {
                        let _ = out.send(Ok(SseEvent::default()
                            .data(json!({"error": {"message": e, "type": "server_error"}}).to_string())));
                        return;
                    }
                    state.metrics.completion_tokens.inc_by(g.completion_ids.len() as u64);
                    let _ = out.send(chunk(k, json!({}), Some(finish_reason(&g))));
                    left -= 1;
                }
                RowEvent::Failed(e) => {
                    let _ = out
                        .send(Ok(SseEvent::default()
                            .data(json!({"error": {"message": e, "type": "server_error"}}).to_string())));
                    return;
                }
            }
            if left == 0 {
                break;
            }
        }
        state.metrics.latency.observe(started.elapsed().as_secs_f64());
        let _ = out.send(Ok(SseEvent::default().data("[DONE]")));
    });
    Sse::new(UnboundedReceiverStream::new(events)).into_response()
}
