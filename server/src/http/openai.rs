//! The OpenAI-compatible API for LLMs, on the HTTP port:
//! `POST /v1/chat/completions`, `POST /v1/completions` (both with
//! `stream: true` as server-sent events), `GET /v1/models`.
//!
//! Errors have OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`, with the status of the error kind (400, 404, 429, ...).
//! Dropping the connection cancels the request: the engine frees its slot
//! at the next step.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ErrorKind, InferError};
use crate::llm::request::{Event, FinishReason, GenerateOptions, Usage};
use crate::llm::template::ChatMessage;
use crate::llm::Generation;
use crate::model::Model;
use crate::state::ServerState;

type AppState = Arc<ServerState>;

/// Routes of the OpenAI-compatible API.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
}

/// An error as OpenAI reports it.
pub(crate) struct OpenAiError(InferError);

impl From<InferError> for OpenAiError {
    fn from(error: InferError) -> Self {
        OpenAiError(error)
    }
}

impl OpenAiError {
    fn body(&self) -> Value {
        let (kind, code) = match self.0.kind {
            ErrorKind::ContextLengthExceeded => ("invalid_request_error", Some("context_length_exceeded")),
            ErrorKind::InvalidArgument => ("invalid_request_error", None),
            ErrorKind::NotFound => ("invalid_request_error", Some("model_not_found")),
            ErrorKind::QueueFull => ("rate_limit_error", Some("queue_full")),
            ErrorKind::DeadlineExceeded => ("timeout_error", None),
            ErrorKind::Disabled => ("permission_error", None),
            ErrorKind::Unavailable | ErrorKind::Cancelled | ErrorKind::Internal => ("server_error", None),
        };
        json!({"error": {"message": self.0.message, "type": kind, "param": null, "code": code}})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (super::status(self.0.kind), Json(self.body())).into_response()
    }
}

type ApiResult<T> = Result<T, OpenAiError>;

/// Settings both endpoints share (OpenAI's names, plus vLLM's `top_k` and
/// `repetition_penalty`). Fields this server does not use are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Common {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    stop: Option<Stop>,
    n: Option<usize>,
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Value>,
    /// vLLM's and llama.cpp's extension: generate `max_tokens` regardless
    /// of end-of-sequence tokens (benchmarks).
    ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamOptions {
    include_usage: bool,
}

impl Common {
    fn options(&self) -> Result<GenerateOptions, InferError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(InferError::invalid("only n = 1 is supported"));
        }
        if self.logprobs.as_ref().is_some_and(|v| !v.is_null() && v != &Value::Bool(false)) {
            return Err(InferError::invalid("logprobs are not supported"));
        }
        Ok(GenerateOptions {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed.map(|s| s as u64),
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(list)) => list.clone(),
            },
            ignore_eos: self.ignore_eos,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<InMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Content,
}

/// Message content: a string, or a list of parts of which only text is
/// supported.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    #[default]
    Null,
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

impl Content {
    fn into_text(self) -> Result<String, InferError> {
        match self {
            Content::Text(text) => Ok(text),
            Content::Null => Ok(String::new()),
            Content::Parts(parts) => parts
                .into_iter()
                .map(|part| match part.kind.as_str() {
                    "text" => Ok(part.text),
                    other => Err(InferError::invalid(format!("content parts of type '{other}' are not supported"))),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    common: Common,
}

/// A completion prompt: text, a list of one text, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, InferError> {
    serde_json::from_slice(body).map_err(|e| InferError::invalid(format!("invalid request body: {e}")))
}

/// The LLM named by a request.
fn llm_model(state: &ServerState, name: &str) -> Result<Arc<Model>, InferError> {
    let model = state.model(name, "")?;
    if !model.generates_text() {
        return Err(InferError::not_found(format!("model '{name}' is not a language model")));
    }
    Ok(model)
}

async fn chat_completions(State(state): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let request: ChatRequest = parse(&body)?;
    let model = llm_model(&state, &request.model)?;
    let messages = request
        .messages
        .into_iter()
        .map(|m| Ok(ChatMessage { role: m.role, content: m.content.into_text()? }))
        .collect::<Result<Vec<_>, InferError>>()?;
    let options = request.common.options()?;
    let prompt = model.chat_prompt(&messages)?;
    let generation = model.generate(prompt, &options)?;
    let reply = Reply::new(Kind::Chat, request.model);
    if request.common.stream {
        Ok(reply.stream(generation, request.common.include_usage()).into_response())
    } else {
        Ok(Json(reply.collect(generation).await?).into_response())
    }
}

async fn completions(State(state): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let request: CompletionRequest = parse(&body)?;
    let model = llm_model(&state, &request.model)?;
    if request.echo {
        return Err(InferError::invalid("echo is not supported").into());
    }
    let options = request.common.options()?;
    let prompt = match request.prompt {
        Prompt::Text(text) => model.text_prompt(&text)?,
        Prompt::Texts(texts) if texts.len() == 1 => model.text_prompt(&texts[0])?,
        Prompt::Texts(_) => {
            return Err(InferError::invalid("prompt must be one string (batches are not supported)").into())
        }
        Prompt::Tokens(tokens) => model.token_prompt(tokens)?,
    };
    let generation = model.generate(prompt, &options)?;
    let reply = Reply::new(Kind::Completion, request.model);
    if request.common.stream {
        Ok(reply.stream(generation, request.common.include_usage()).into_response())
    } else {
        Ok(Json(reply.collect(generation).await?).into_response())
    }
}

/// Which endpoint a reply belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Builds the JSON objects of one reply.
#[derive(Debug, Clone)]
struct Reply {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
}

impl Reply {
    fn new(kind: Kind, model: String) -> Reply {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        let id = format!(
            "{prefix}-{:016x}",
            crate::llm::sampling::Rng::new(crate::llm::sampling::Rng::fresh_seed()).next_u64()
        );
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Reply { kind, id, model, created }
    }

    fn usage(usage: &Usage) -> Value {
        json!({
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens(),
        })
    }

    /// Waits for the whole answer.
    async fn collect(&self, generation: Generation) -> Result<Value, InferError> {
        let (text, finish_reason, usage) = generation.collect().await?;
        Ok(self.complete(text, finish_reason, &usage))
    }

    fn complete(&self, text: String, finish_reason: FinishReason, usage: &Usage) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason.as_str(),
            }),
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason.as_str()})
            }
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Self::usage(usage),
        })
    }

    /// One streamed chunk: new text (or the role, for the first chat
    /// chunk), or the finish reason.
    fn chunk(&self, text: Option<&str>, role: bool, finish_reason: Option<FinishReason>, with_usage: bool) -> Value {
        let finish = finish_reason.map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(text) = text {
                    delta["content"] = json!(text);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        let mut chunk = json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if with_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The last chunk when usage is asked for: no choices, the usage.
    fn usage_chunk(&self, usage: &Usage) -> Value {
        let mut chunk = self.chunk(None, false, None, true);
        chunk["choices"] = json!([]);
        chunk["usage"] = Self::usage(usage);
        chunk
    }

    /// The answer as server-sent events, ending with `data: [DONE]`.
    fn stream(
        self,
        generation: Generation,
        include_usage: bool,
    ) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
        let data = |value: Value| SseEvent::default().data(value.to_string());
        let first = (self.kind == Kind::Chat).then(|| data(self.chunk(Some(""), true, None, include_usage)));
        let events = stream::unfold(Some((self, generation)), move |state| async move {
            let (reply, mut generation) = state?;
            let events: Vec<SseEvent> = match generation.next().await {
                Some(Event::Text(text)) => {
                    let chunk = data(reply.chunk(Some(&text), false, None, include_usage));
                    return Some((vec![chunk], Some((reply, generation))));
                }
                Some(Event::Done { text, finish_reason, usage }) => {
                    let mut events = Vec::new();
                    if !text.is_empty() {
                        events.push(data(reply.chunk(Some(&text), false, None, include_usage)));
                    }
                    let last = match reply.kind {
                        Kind::Chat => reply.chunk(None, false, Some(finish_reason), include_usage),
                        Kind::Completion => reply.chunk(Some(""), false, Some(finish_reason), include_usage),
                    };
                    events.push(data(last));
                    if include_usage {
                        events.push(data(reply.usage_chunk(&usage)));
                    }
                    events
                }
                Some(Event::Error(error)) => vec![data(OpenAiError(error).body())],
                None => return None,
            };
            let mut events = events;
            events.push(SseEvent::default().data("[DONE]"));
            Some((events, None))
        })
        .flat_map(stream::iter);
        let all = stream::iter(first).chain(events).map(Ok);
        Sse::new(all).keep_alive(KeepAlive::default())
    }
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let mut names: Vec<String> =
        state.repository.loaded(None).iter().filter(|m| m.generates_text()).map(|m| m.name.clone()).collect();
    names.dedup();
    Json(json!({"object": "list", "data": names.iter().map(|n| model_object(n)).collect::<Vec<_>>()}))
}

async fn get_model(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    llm_model(&state, &name)?;
    Ok(Json(model_object(&name)))
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "ferrite"})
}
