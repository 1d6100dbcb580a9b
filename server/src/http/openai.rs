//! The OpenAI-compatible API for LLMs, on the HTTP port:
//! `POST /v1/chat/completions`, `POST /v1/completions` (both with
//! `stream: true` as server-sent events), `GET /v1/models`.
//!
//! Errors have OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`, with the status of the error kind (400, 404, 429, ...).
//! Dropping the connection cancels the request: the engine frees its slot
//! at the next step.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::error::{ErrorKind, InferError};
use crate::llm::request::{Event, FinishReason, GenerateOptions, Usage};
use crate::llm::structured::ResponseFormat;
use crate::llm::template::ChatMessage;
use crate::llm::{Generation, MAX_STOP_STRINGS};
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

/// An OpenAI request body: both endpoints' fields (OpenAI's names, plus
/// vLLM's `top_k`, `repetition_penalty` and `ignore_eos`). Fields this
/// server does not use are skipped while parsing, never kept; lists are
/// read into typed values (no generic JSON buffering).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RequestBody {
    /// Chat only.
    messages: Option<Vec<InMessage>>,
    /// Completions only.
    prompt: Option<Prompt>,
    echo: bool,
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
    logprobs: Option<Logprobs>,
    /// Structured output: `{"type": "json_object"}` or `{"type":
    /// "json_schema", "json_schema": {...}}`. Kept as text while parsing
    /// (a `Value` can take 40x its text), size-checked, then read.
    response_format: Option<Box<RawValue>>,
    /// vLLM's and llama.cpp's extension: generate `max_tokens` regardless
    /// of end-of-sequence tokens (benchmarks); only where the server allows it.
    ignore_eos: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamOptions {
    include_usage: bool,
}

impl RequestBody {
    fn options(&mut self) -> Result<GenerateOptions, InferError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(InferError::invalid("only n = 1 is supported"));
        }
        if self.logprobs.as_ref().is_some_and(|l| l.0) {
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
            stop: self.stop.take().map(|s| s.0).unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            response_format: match self.response_format.take() {
                Some(raw) => ResponseFormat::from_text(raw.get())?,
                None => None,
            },
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Content,
}

/// `stop`: a string or a list of at most `MAX_STOP_STRINGS` strings.
#[derive(Debug)]
struct Stop(Vec<String>);

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StopVisitor;
        impl<'de> Visitor<'de> for StopVisitor {
            type Value = Stop;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Stop, E> {
                Ok(Stop(vec![text.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Stop, A::Error> {
                let mut stops = Vec::new();
                while let Some(stop) = seq.next_element::<String>()? {
                    if stops.len() == MAX_STOP_STRINGS {
                        return Err(de::Error::custom(format!("at most {MAX_STOP_STRINGS} stop strings are allowed")));
                    }
                    stops.push(stop);
                }
                Ok(Stop(stops))
            }
        }
        deserializer.deserialize_any(StopVisitor)
    }
}

/// Message content: a string, null, or a list of parts of which only text
/// is supported (joined).
#[derive(Debug, Default)]
struct Content(String);

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;
        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, null or a list of content parts")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Content, E> {
                Ok(Content(text.to_owned()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Content, E> {
                Ok(Content(text))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Content, E> {
                Ok(Content::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut text = String::new();
                while let Some(part) = seq.next_element::<Part>()? {
                    if part.kind != "text" {
                        let message = format!("content parts of type '{}' are not supported", part.kind);
                        return Err(de::Error::custom(message));
                    }
                    text.push_str(&part.text);
                }
                Ok(Content(text))
            }
        }
        deserializer.deserialize_any(ContentVisitor)
    }
}

/// A completion prompt: text, a list of one text, or token ids.
#[derive(Debug)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// The first element of a list prompt: it says which kind the list is.
        enum First {
            Text(String),
            Token(u32),
        }
        impl<'de> Deserialize<'de> for First {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct FirstVisitor;
                impl<'de> Visitor<'de> for FirstVisitor {
                    type Value = First;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string or a token id")
                    }
                    fn visit_str<E: de::Error>(self, text: &str) -> Result<First, E> {
                        Ok(First::Text(text.to_owned()))
                    }
                    fn visit_u64<E: de::Error>(self, id: u64) -> Result<First, E> {
                        u32::try_from(id).map(First::Token).map_err(|_| E::custom("token ids are below 2^32"))
                    }
                }
                deserializer.deserialize_any(FirstVisitor)
            }
        }
        struct PromptVisitor;
        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a list of one string, or a list of token ids")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(text.to_owned()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Prompt, E> {
                Ok(Prompt::Text(text))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                match seq.next_element::<First>()? {
                    None => Ok(Prompt::Tokens(Vec::new())),
                    Some(First::Text(text)) => match seq.next_element::<IgnoredAny>()? {
                        None => Ok(Prompt::Text(text)),
                        Some(_) => Err(de::Error::custom("prompt must be one string (batches are not supported)")),
                    },
                    Some(First::Token(id)) => {
                        let mut tokens = vec![id];
                        while let Some(id) = seq.next_element::<u32>()? {
                            tokens.push(id);
                        }
                        Ok(Prompt::Tokens(tokens))
                    }
                }
            }
        }
        deserializer.deserialize_any(PromptVisitor)
    }
}

/// `logprobs`: a flag (chat) or a count (completions); either asks for them.
#[derive(Debug)]
struct Logprobs(bool);

impl<'de> Deserialize<'de> for Logprobs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LogprobsVisitor;
        impl<'de> Visitor<'de> for LogprobsVisitor {
            type Value = Logprobs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a boolean or a count")
            }
            fn visit_bool<E: de::Error>(self, asked: bool) -> Result<Logprobs, E> {
                Ok(Logprobs(asked))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Logprobs, E> {
                Ok(Logprobs(true))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Logprobs, E> {
                Ok(Logprobs(true))
            }
        }
        deserializer.deserialize_any(LogprobsVisitor)
    }
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

/// The largest request body for prompts of `max_prompt_bytes`: the prompt
/// written with JSON escapes, and room for the rest.
fn body_limit(max_prompt_bytes: usize) -> usize {
    max_prompt_bytes.saturating_mul(JSON_ESCAPE_BYTES).saturating_add(BODY_SLACK_BYTES)
}

/// Bytes a JSON string may spend per byte of text (`\u0001`).
const JSON_ESCAPE_BYTES: usize = 6;
/// Room in a request body for everything but the prompt.
const BODY_SLACK_BYTES: usize = 64 << 10;

/// Reads an OpenAI request, cheapest checks first: without a language
/// model loaded, 404 without keeping the body; a body longer than the
/// loaded models' longest prompt allows is not read past that; the model is
/// found by reading only the `model` field (the rest skipped, nothing
/// kept), and only then is the whole body parsed.
async fn read_request(state: &ServerState, body: Body) -> Result<(Arc<Model>, RequestBody), InferError> {
    let largest = state.repository.loaded(None).iter().filter_map(|m| m.max_prompt_bytes()).max();
    let Some(largest) = largest else {
        // Read and dropped (nothing kept), so that the client gets the 404.
        read_body(body, 0, state.max_message_bytes).await?;
        return Err(InferError::not_found("no language model is loaded on this server"));
    };
    let too_large = |limit: usize| {
        InferError::new(
            ErrorKind::ContextLengthExceeded,
            format!(
                "The request body is larger than {limit} bytes, the most this model takes (its longest prompt, \
                 --llm-max-prompt-bytes, written as JSON). Please reduce the prompt."
            ),
        )
    };
    let bytes = read_body(body, body_limit(largest), state.max_message_bytes)
        .await?
        .ok_or_else(|| too_large(body_limit(largest)))?;
    #[derive(Deserialize)]
    struct Named {
        model: String,
    }
    let model = llm_model(state, &parse::<Named>(&bytes)?.model)?;
    let limit = body_limit(model.max_prompt_bytes().unwrap_or(largest));
    if bytes.len() > limit {
        return Err(too_large(limit));
    }
    Ok((model, parse(&bytes)?))
}

/// Reads a body of at most `limit` bytes; `None` when it is longer. The
/// rest of a longer body (up to `drain` bytes) is read and dropped, so the
/// client, still sending, gets the answer rather than a broken connection.
async fn read_body(body: Body, limit: usize, drain: usize) -> Result<Option<Bytes>, InferError> {
    let mut data = body.into_data_stream();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| InferError::invalid(format!("cannot read the request body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            kept.extend_from_slice(&chunk);
        } else if seen > drain.max(limit) {
            break;
        }
    }
    Ok((seen <= limit).then(|| Bytes::from(kept)))
}

async fn chat_completions(State(state): State<AppState>, body: Body) -> ApiResult<Response> {
    let (model, mut request) = read_request(&state, body).await?;
    let messages = request.messages.take().ok_or_else(|| InferError::invalid("'messages' is required"))?;
    let messages = messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content.0 }).collect();
    let options = request.options()?;
    let prompt = model.chat_prompt(messages).await?;
    let generation = model.generate(prompt, &options).await?;
    let reply = Reply::new(Kind::Chat, model.name.clone());
    if request.stream {
        Ok(reply.stream(generation, request.include_usage()).into_response())
    } else {
        Ok(Json(reply.collect(generation).await?).into_response())
    }
}

async fn completions(State(state): State<AppState>, body: Body) -> ApiResult<Response> {
    let (model, mut request) = read_request(&state, body).await?;
    if request.echo {
        return Err(InferError::invalid("echo is not supported").into());
    }
    let options = request.options()?;
    let prompt = match request.prompt.take().ok_or_else(|| InferError::invalid("'prompt' is required"))? {
        Prompt::Text(text) => model.text_prompt(text).await?,
        Prompt::Tokens(tokens) => model.token_prompt(tokens)?,
    };
    let generation = model.generate(prompt, &options).await?;
    let reply = Reply::new(Kind::Completion, model.name.clone());
    if request.stream {
        Ok(reply.stream(generation, request.include_usage()).into_response())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<RequestBody, InferError> {
        parse(json.as_bytes())
    }

    #[test]
    fn unknown_fields_are_skipped_and_known_ones_typed() {
        let mut request = body(
            r#"{"model": "m", "tools": [{"deep": [[[1]]]}], "tool_choice": {"type": "json"},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"}],
                "stop": "END", "logprobs": false, "max_tokens": 5}"#,
        )
        .unwrap();
        let messages = request.messages.take().unwrap();
        assert_eq!((messages[0].role.as_str(), messages[0].content.0.as_str()), ("user", "ab"));
        let options = request.options().unwrap();
        assert_eq!(options.stop, vec!["END".to_string()]);
        assert_eq!(options.max_tokens, Some(5));
        assert_eq!(options.response_format, None);
        // response_format is read, then checked.
        let mut request = body(r#"{"response_format": {"type": "json_object"}}"#).unwrap();
        assert_eq!(request.options().unwrap().response_format, Some(ResponseFormat::JsonObject));
        let mut request = body(r#"{"response_format": {"type": "json"}}"#).unwrap();
        assert!(request.options().unwrap_err().message.contains("unknown type 'json'"));
        let null_content = body(r#"{"messages": [{"role": "assistant", "content": null}]}"#).unwrap();
        assert_eq!(null_content.messages.unwrap()[0].content.0, "");
    }

    #[test]
    fn prompts_are_text_one_text_or_tokens() {
        let prompt = |json: &str| body(&format!(r#"{{"prompt": {json}}}"#)).map(|b| b.prompt.unwrap());
        assert!(matches!(prompt(r#""hi""#), Ok(Prompt::Text(t)) if t == "hi"));
        assert!(matches!(prompt(r#"["hi"]"#), Ok(Prompt::Text(t)) if t == "hi"));
        assert!(matches!(prompt("[1, 2, 3]"), Ok(Prompt::Tokens(t)) if t == vec![1, 2, 3]));
        assert!(prompt(r#"["a", "b"]"#).unwrap_err().message.contains("batches are not supported"));
        assert!(prompt(r#"[1, "a"]"#).is_err());
        assert!(prompt("[4294967296]").is_err());
    }

    #[test]
    fn refusals_while_parsing() {
        let stops = serde_json::to_string(&vec!["s"; MAX_STOP_STRINGS + 1]).unwrap();
        let err = body(&format!(r#"{{"stop": {stops}}}"#)).unwrap_err();
        assert!(err.message.contains("at most 16 stop strings"), "{err}");
        let err = body(r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#)
            .unwrap_err();
        assert!(err.message.contains("'image_url' are not supported"), "{err}");
        assert!(body(r#"{"logprobs": 2}"#).unwrap().options().is_err());
        assert!(body(r#"{"logprobs": true}"#).unwrap().options().is_err());
        assert!(body(r#"{"logprobs": null}"#).unwrap().options().is_ok());
    }
}
