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
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::cascade::{Escalate, Forward, Route, TextKind, TextRequest, ESCALATE};
use crate::encoder::config::Task;
use crate::error::{ErrorKind, InferError};
use crate::llm::logprobs::{chat_entry, finite, MAX_TOP_LOGPROBS};
use crate::llm::request::{Event, FinishReason, GenerateOptions, TokenLogprob, Usage};
use crate::llm::structured::ResponseFormat;
use crate::llm::template::ChatMessage;
use crate::llm::{Generation, MAX_STOP_STRINGS};
use crate::model::Model;
use crate::model::Routed;
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
    n: Option<i64>,
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Chat: a flag; completions: how many alternatives per token.
    logprobs: Option<Logprobs>,
    /// Chat: how many alternatives per token.
    top_logprobs: Option<i64>,
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
    /// The generation options of each choice and how many choices (`n`).
    /// Values out of range are refused with the field's name.
    fn options(&mut self, kind: Kind) -> Result<(GenerateOptions, usize), InferError> {
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
            Some(n) => return Err(InferError::invalid(format!("n must be between 1 and {MAX_CHOICES}, not {n}"))),
        };
        let options = GenerateOptions {
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
            logprobs: self.top_logprobs(kind)?,
        };
        Ok((options, n))
    }

    /// Alternatives per token when log-probabilities are asked for. Chat:
    /// `logprobs` is a flag and `top_logprobs` (0 to 20) the count;
    /// completions: `logprobs` is the count (0 to 5).
    fn top_logprobs(&self, kind: Kind) -> Result<Option<usize>, InferError> {
        match kind {
            Kind::Chat => {
                let asked = match self.logprobs {
                    None | Some(Logprobs::Flag(false)) => false,
                    Some(Logprobs::Flag(true)) => true,
                    Some(Logprobs::Count(_)) => {
                        return Err(InferError::invalid(
                            "logprobs must be a boolean in chat completions (top_logprobs sets the alternatives)",
                        ))
                    }
                };
                match self.top_logprobs {
                    None => Ok(asked.then_some(0)),
                    Some(top) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&top) => Err(InferError::invalid(format!(
                        "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {top}"
                    ))),
                    Some(top) if top > 0 && !asked => {
                        Err(InferError::invalid("top_logprobs requires logprobs to be true"))
                    }
                    Some(top) => Ok(asked.then_some(top as usize)),
                }
            }
            Kind::Completion => match self.logprobs {
                None | Some(Logprobs::Flag(false)) => Ok(None),
                Some(Logprobs::Count(top)) if (0..=MAX_COMPLETION_LOGPROBS as i64).contains(&top) => {
                    Ok(Some(top as usize))
                }
                Some(Logprobs::Count(top)) => Err(InferError::invalid(format!(
                    "logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS} in completions, not {top}"
                ))),
                Some(Logprobs::Flag(true)) => Err(InferError::invalid(format!(
                    "logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS} in completions"
                ))),
            },
        }
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: usize = 16;
/// Most alternatives per token in completions' `logprobs` (OpenAI's bound).
const MAX_COMPLETION_LOGPROBS: usize = 5;

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

/// `logprobs`: a flag (chat) or a count (completions).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Logprobs {
    Flag(bool),
    Count(i64),
}

impl<'de> Deserialize<'de> for Logprobs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LogprobsVisitor;
        impl<'de> Visitor<'de> for LogprobsVisitor {
            type Value = Logprobs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a boolean or a count")
            }
            fn visit_bool<E: de::Error>(self, asked: bool) -> Result<Logprobs, E> {
                Ok(Logprobs::Flag(asked))
            }
            fn visit_u64<E: de::Error>(self, count: u64) -> Result<Logprobs, E> {
                Ok(Logprobs::Count(i64::try_from(count).unwrap_or(i64::MAX)))
            }
            fn visit_i64<E: de::Error>(self, count: i64) -> Result<Logprobs, E> {
                Ok(Logprobs::Count(count))
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
async fn read_request(state: &ServerState, body: Body) -> Result<(Arc<Model>, RequestBody, Bytes), InferError> {
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
    Ok((model, parse(&bytes)?, bytes))
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

async fn chat_completions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let escalate = forced_side(&headers)?;
    let (model, mut request, bytes) = read_request(&state, body).await?;
    let messages = request.messages.take().ok_or_else(|| InferError::invalid("'messages' is required"))?;
    let messages = messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content.0 }).collect();
    let (options, n) = request.options(Kind::Chat)?;
    let prompt = model.chat_prompt(messages).await?;
    let forward = Forward::OpenAi { kind: TextKind::Chat, body: bytes };
    let routed = generate(&model, prompt, options.clone(), n, request.stream, forward, escalate).await?;
    let reply = Reply::new(Kind::Chat, model.name.clone(), options.logprobs.is_some());
    respond(reply, routed, &request).await
}

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let escalate = forced_side(&headers)?;
    let (model, mut request, bytes) = read_request(&state, body).await?;
    if request.echo {
        return Err(InferError::invalid("echo is not supported").into());
    }
    let (options, n) = request.options(Kind::Completion)?;
    let prompt = match request.prompt.take().ok_or_else(|| InferError::invalid("'prompt' is required"))? {
        Prompt::Text(text) => model.text_prompt(text).await?,
        Prompt::Tokens(tokens) => model.token_prompt(tokens)?,
    };
    let forward = Forward::OpenAi { kind: TextKind::Completion, body: bytes };
    let routed = generate(&model, prompt, options.clone(), n, request.stream, forward, escalate).await?;
    let reply = Reply::new(Kind::Completion, model.name.clone(), options.logprobs.is_some());
    respond(reply, routed, &request).await
}

/// The side the `x-ferrite-escalate` header forces (checked on every
/// request; models without escalation settings ignore it).
fn forced_side(headers: &HeaderMap) -> Result<Option<Escalate>, InferError> {
    match headers.get(ESCALATE) {
        None => Ok(None),
        Some(value) => Escalate::parse(Some(value.to_str().unwrap_or("<not text>"))),
    }
}

/// Starts the `n` choices of a request (through the model's cascade, if
/// it has one). Without a cascade the request body is not kept.
async fn generate(
    model: &Model,
    prompt: Vec<u32>,
    options: GenerateOptions,
    n: usize,
    stream: bool,
    forward: Forward,
    escalate: Option<Escalate>,
) -> Result<Routed, InferError> {
    model.generate_text(TextRequest { prompt, options, n, stream, forward, escalate }).await
}

/// The reply, streamed or whole, with the route's headers.
async fn respond(reply: Reply, routed: Routed, request: &RequestBody) -> ApiResult<Response> {
    let Routed { generations, route } = routed;
    let mut response = if request.stream {
        reply.stream(generations, request.include_usage()).into_response()
    } else {
        Json(reply.collect(generations).await?).into_response()
    };
    if let Some(route) = route {
        add_route_headers(response.headers_mut(), &route);
    }
    Ok(response)
}

/// `x-ferrite-served-by` and the rest of the route, as response headers.
fn add_route_headers(headers: &mut HeaderMap, route: &Route) {
    for (name, value) in route.fields() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
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
    /// Log-probabilities were asked for.
    logprobs: bool,
}

/// Character offsets of tokens in a completion's text (completions'
/// `text_offset`), fed token by token: a token that starts inside a
/// character (byte-level tokens can) gets that character's offset.
#[derive(Debug, Clone, Default)]
struct TextOffsets {
    /// Characters complete so far.
    chars: usize,
    /// Bytes of an unfinished character.
    tail: Vec<u8>,
}

impl TextOffsets {
    /// The offset of a token of `bytes`, which then counts as read.
    fn next(&mut self, bytes: &[u8]) -> usize {
        let offset = self.chars;
        self.tail.extend_from_slice(bytes);
        let mut rest = &self.tail[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.chars += text.chars().count();
                    rest = &[];
                    break;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    self.chars += std::str::from_utf8(valid).map(|t| t.chars().count()).unwrap_or(0);
                    match error.error_len() {
                        // Invalid bytes: one replacement character, as the text shows them.
                        Some(bad) => {
                            self.chars += 1;
                            rest = &after[bad..];
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.tail = rest.to_vec();
        offset
    }
}

impl Reply {
    fn new(kind: Kind, model: String, logprobs: bool) -> Reply {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        let id = format!(
            "{prefix}-{:016x}",
            crate::llm::sampling::Rng::new(crate::llm::sampling::Rng::fresh_seed()).next_u64()
        );
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Reply { kind, id, model, created, logprobs }
    }

    fn usage(usage: &Usage) -> Value {
        json!({
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens(),
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        })
    }

    /// The usage of a request's choices: the prompt once, every choice's
    /// completion tokens.
    fn add_usage(total: &mut Option<Usage>, usage: Usage) {
        *total = Some(match total.take() {
            None => usage,
            Some(sum) => Usage { completion_tokens: sum.completion_tokens + usage.completion_tokens, ..sum },
        });
    }

    /// The `logprobs` of a choice (or of a chunk of one): `null` unless
    /// asked for; chat: `{content: [...]}`; completions: `{tokens,
    /// token_logprobs, top_logprobs, text_offset}`.
    fn logprobs_json(&self, entries: &[TokenLogprob], offsets: &mut TextOffsets) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => json!({"content": entries.iter().map(chat_entry).collect::<Vec<_>>(), "refusal": null}),
            Kind::Completion => {
                let top = |entry: &TokenLogprob| {
                    // The alternatives and, as OpenAI does, always the sampled token.
                    let mut map = serde_json::Map::new();
                    for alternative in &entry.top {
                        map.entry(alternative.token.text.clone()).or_insert(json!(finite(alternative.logprob)));
                    }
                    map.entry(entry.token.text.clone()).or_insert(json!(finite(entry.logprob)));
                    Value::Object(map)
                };
                json!({
                    "tokens": entries.iter().map(|e| e.token.text.as_str()).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(|e| finite(e.logprob)).collect::<Vec<_>>(),
                    "top_logprobs": entries.iter().map(top).collect::<Vec<_>>(),
                    "text_offset": entries.iter().map(|e| offsets.next(&e.token.bytes)).collect::<Vec<_>>(),
                })
            }
        }
    }

    /// Waits for every choice's whole answer.
    async fn collect(&self, generations: Vec<Generation>) -> Result<Value, InferError> {
        let answers = futures::future::try_join_all(generations.into_iter().map(Generation::collect)).await?;
        let mut usage = None;
        let choices: Vec<Value> = answers
            .into_iter()
            .enumerate()
            .map(|(index, answer)| {
                Self::add_usage(&mut usage, answer.usage);
                let logprobs = self.logprobs_json(&answer.logprobs, &mut TextOffsets::default());
                let finish = answer.finish_reason.as_str();
                match self.kind {
                    Kind::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": answer.text},
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                    Kind::Completion => {
                        json!({"index": index, "text": answer.text, "logprobs": logprobs, "finish_reason": finish})
                    }
                }
            })
            .collect();
        Ok(json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": Self::usage(&usage.unwrap_or_default()),
        }))
    }

    /// One streamed chunk of choice `index`: new text (or the role, for
    /// the first chat chunk) with its log-probabilities, or the finish
    /// reason.
    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        finish: Option<FinishReason>,
        logprobs: Value,
    ) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(text) = text {
                    delta["content"] = json!(text);
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.envelope(vec![choice])
    }

    /// A chunk around `choices`.
    fn envelope(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The answer as server-sent events, ending with `data: [DONE]`: the
    /// choices' chunks interleaved as they come (each with its `index`),
    /// then, when usage is asked for, a chunk with no choices and the
    /// usage of them all.
    fn stream(
        self,
        generations: Vec<Generation>,
        include_usage: bool,
    ) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
        let data = move |mut value: Value| {
            if include_usage && value.get("usage").is_none() {
                value["usage"] = Value::Null;
            }
            SseEvent::default().data(value.to_string())
        };
        let n = generations.len();
        let first: Vec<SseEvent> = match self.kind {
            Kind::Chat => (0..n).map(|i| data(self.chunk(i, Some(""), true, None, Value::Null))).collect(),
            Kind::Completion => Vec::new(),
        };
        let merged = stream::select_all(generations.into_iter().enumerate().map(|(index, generation)| {
            stream::unfold(generation, move |mut generation| async move {
                generation.next().await.map(|event| ((index, event), generation))
            })
            .boxed()
        }));
        let state = StreamState { reply: self, merged, offsets: vec![TextOffsets::default(); n], usage: None };
        let events = stream::unfold(Some(state), move |state| async move {
            let mut state = state?;
            let Some((index, event)) = state.merged.next().await else {
                // Every choice has finished.
                let mut events = Vec::new();
                if include_usage {
                    let mut chunk = state.reply.envelope(Vec::new());
                    chunk["usage"] = Reply::usage(&state.usage.unwrap_or_default());
                    events.push(data(chunk));
                }
                events.push(SseEvent::default().data("[DONE]"));
                return Some((events, None));
            };
            let reply = &state.reply;
            let events = match event {
                Event::Text { text, logprobs } => {
                    let logprobs = reply.logprobs_json(&logprobs, &mut state.offsets[index]);
                    vec![data(reply.chunk(index, Some(&text), false, None, logprobs))]
                }
                Event::Done { text, logprobs, finish_reason, usage } => {
                    let mut events = Vec::new();
                    if !text.is_empty() || !logprobs.is_empty() {
                        let logprobs = reply.logprobs_json(&logprobs, &mut state.offsets[index]);
                        events.push(data(reply.chunk(index, Some(&text), false, None, logprobs)));
                    }
                    let text = (reply.kind == Kind::Completion).then_some("");
                    events.push(data(reply.chunk(index, text, false, Some(finish_reason), Value::Null)));
                    Reply::add_usage(&mut state.usage, usage);
                    events
                }
                Event::Error(error) => {
                    // The other choices are dropped with the state: cancelled.
                    let error = SseEvent::default().data(OpenAiError(error).body().to_string());
                    let events = vec![error, SseEvent::default().data("[DONE]")];
                    return Some((events, None));
                }
            };
            Some((events, Some(state)))
        })
        .flat_map(stream::iter);
        let all = stream::iter(first).chain(events).map(Ok);
        Sse::new(all).keep_alive(KeepAlive::default())
    }
}

/// A stream's progress over its choices.
struct StreamState {
    reply: Reply,
    merged: stream::SelectAll<stream::BoxStream<'static, (usize, Event)>>,
    offsets: Vec<TextOffsets>,
    usage: Option<Usage>,
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    // Language and embedding models: what this API serves.
    let mut names: Vec<String> = state
        .repository
        .loaded(None)
        .iter()
        .filter(|m| m.generates_text() || m.encoder().is_some_and(|e| e.task() == Task::Embedding))
        .map(|m| m.name.clone())
        .collect();
    names.dedup();
    Json(json!({"object": "list", "data": names.iter().map(|n| model_object(n)).collect::<Vec<_>>()}))
}

async fn get_model(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    if llm_model(&state, &name).is_err() {
        super::embeddings::encoder_model(&state, &name, Task::Embedding)
            .map_err(|_| InferError::not_found(format!("model '{name}' is not a language or embedding model")))?;
    }
    Ok(Json(model_object(&name)))
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "ferrite"})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::request::{TokenText, TopLogprob};

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
        let (options, n) = request.options(Kind::Chat).unwrap();
        assert_eq!(n, 1);
        assert_eq!(options.logprobs, None);
        assert_eq!(options.stop, vec!["END".to_string()]);
        assert_eq!(options.max_tokens, Some(5));
        assert_eq!(options.response_format, None);
        // response_format is read, then checked.
        let mut request = body(r#"{"response_format": {"type": "json_object"}}"#).unwrap();
        assert_eq!(request.options(Kind::Chat).unwrap().0.response_format, Some(ResponseFormat::JsonObject));
        let mut request = body(r#"{"response_format": {"type": "json"}}"#).unwrap();
        assert!(request.options(Kind::Chat).unwrap_err().message.contains("unknown type 'json'"));
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
    }

    #[test]
    fn logprobs_and_n_are_checked_per_endpoint() {
        let chat = |json: &str| body(json).unwrap().options(Kind::Chat).map(|(o, n)| (o.logprobs, n));
        let completion = |json: &str| body(json).unwrap().options(Kind::Completion).map(|(o, n)| (o.logprobs, n));
        let message = |result: Result<(Option<usize>, usize), InferError>| result.unwrap_err().message;
        assert_eq!(chat(r#"{"logprobs": null}"#), Ok((None, 1)));
        assert_eq!(chat(r#"{"logprobs": false, "top_logprobs": 0}"#), Ok((None, 1)));
        assert_eq!(chat(r#"{"logprobs": true}"#), Ok((Some(0), 1)));
        assert_eq!(chat(r#"{"logprobs": true, "top_logprobs": 20, "n": 16}"#), Ok((Some(20), 16)));
        assert!(message(chat(r#"{"logprobs": true, "top_logprobs": 21}"#)).contains("top_logprobs"));
        assert!(message(chat(r#"{"logprobs": true, "top_logprobs": -1}"#)).contains("top_logprobs"));
        assert!(message(chat(r#"{"top_logprobs": 3}"#)).contains("requires logprobs"));
        assert!(message(chat(r#"{"logprobs": 2}"#)).contains("logprobs must be a boolean"));
        assert_eq!(completion(r#"{"logprobs": 0}"#), Ok((Some(0), 1)));
        assert_eq!(completion(r#"{"logprobs": 5}"#), Ok((Some(5), 1)));
        assert_eq!(completion(r#"{"logprobs": false}"#), Ok((None, 1)));
        assert!(message(completion(r#"{"logprobs": 6}"#)).contains("logprobs must be between 0 and 5"));
        assert!(message(completion(r#"{"logprobs": -1}"#)).contains("logprobs"));
        assert!(message(completion(r#"{"logprobs": true}"#)).contains("logprobs must be an integer"));
        assert!(message(chat(r#"{"n": 0}"#)).contains("n must be between 1 and 16"));
        assert!(message(chat(r#"{"n": 17}"#)).contains("n must be between 1 and 16"));
        assert!(message(completion(r#"{"n": -3}"#)).contains("n must be"));
    }

    fn entry(text: &str, logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
        let token = |text: &str| TokenText { id: 0, bytes: text.as_bytes().to_vec(), text: text.to_string() };
        TokenLogprob {
            token: token(text),
            logprob,
            top: top.iter().map(|&(t, logprob)| TopLogprob { token: token(t), logprob }).collect(),
        }
    }

    #[test]
    fn logprobs_in_openai_shapes() {
        let entries = [entry(" Paris", -0.5, &[(" Paris", -0.5), (" Lyon", -1.5)]), entry("!", -3.0, &[(".", -0.1)])];
        let completion = Reply::new(Kind::Completion, "m".into(), true);
        let value = completion.logprobs_json(&entries, &mut TextOffsets::default());
        assert_eq!(value["tokens"], json!([" Paris", "!"]));
        assert_eq!(value["token_logprobs"], json!([-0.5, -3.0]));
        assert_eq!(value["text_offset"], json!([0, 6]));
        // The sampled token is in the dictionary even when it is not an alternative.
        assert_eq!(value["top_logprobs"], json!([{" Paris": -0.5, " Lyon": -1.5}, {".": -0.1f32, "!": -3.0}]));
        let chat = Reply::new(Kind::Chat, "m".into(), true);
        let value = chat.logprobs_json(&entries[1..], &mut TextOffsets::default());
        assert_eq!(
            value,
            json!({"content": [{"token": "!", "logprob": -3.0, "bytes": [33],
                                "top_logprobs": [{"token": ".", "logprob": -0.1f32, "bytes": [46]}]}],
                   "refusal": null})
        );
        let minus_infinity = [entry("x", f32::NEG_INFINITY, &[])];
        assert_eq!(chat.logprobs_json(&minus_infinity, &mut TextOffsets::default())["content"][0]["logprob"], -9999.0);
        assert_eq!(
            Reply::new(Kind::Chat, "m".into(), false).logprobs_json(&entries, &mut TextOffsets::default()),
            Value::Null
        );
    }

    #[test]
    fn text_offsets_count_characters() {
        let mut offsets = TextOffsets::default();
        // "a", " caf", then "é" split over two tokens, then "!".
        let tokens: [&[u8]; 5] = [b"a", b" caf", &[0xC3], &[0xA9], b"!"];
        let got: Vec<usize> = tokens.iter().map(|t| offsets.next(t)).collect();
        assert_eq!(got, vec![0, 1, 5, 5, 6]);
        assert_eq!(offsets.next(b""), 7);
        // An invalid byte counts as one replacement character.
        let mut offsets = TextOffsets::default();
        assert_eq!(offsets.next(&[0xFF, b'x']), 0);
        assert_eq!(offsets.next(b"y"), 2);
    }
}
