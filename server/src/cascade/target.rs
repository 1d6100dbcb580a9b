//! The escalation target: an OpenAI-compatible server (another ferrite, vLLM,
//! llama-server, a hosted API). One pooled client per model (HTTP/1.1, or
//! HTTP/2 where TLS negotiates it; rustls), a time limit on the whole call,
//! retries on connect errors only (the request never reached the target, so
//! repeating it cannot run it twice). Answers, whole or streamed as
//! server-sent events, are turned back into the engine's [`Event`]s per
//! choice, so the frontends render them as they render the micro model's.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::cascade::config::Escalation;
use crate::cascade::{Forward, TextKind};
use crate::error::InferError;
use crate::llm::request::{Answer, Event, FinishReason, GenerateOptions, Usage};
use crate::llm::structured::ResponseFormat;

/// Tries after the first when the connection cannot be made.
const CONNECT_RETRIES: u32 = 2;
/// Wait before the first retry (doubled for the next).
const RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// Largest whole (non-streamed) answer read from the target.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// How a target call failed (metric label and `x-ferrite-fallback` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No answer within `timeoutSeconds`.
    Timeout,
    /// The connection could not be made (after the retries).
    Unreachable,
    /// An error status or an answer that cannot be read.
    Error,
}

impl FailureKind {
    /// The contract's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Error => "error",
        }
    }
}

/// A failed target call.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    /// Whether the target counts as down (connect error, timeout, 5xx).
    pub(crate) down: bool,
    /// What happened (no secrets: the key is never in it).
    pub(crate) message: String,
}

impl Failure {
    fn error(message: impl Into<String>) -> Failure {
        Failure { kind: FailureKind::Error, down: false, message: message.into() }
    }

    fn of(error: &reqwest::Error) -> Failure {
        let message = error_text(error);
        if error.is_timeout() {
            Failure { kind: FailureKind::Timeout, down: true, message }
        } else if error.is_connect() {
            Failure { kind: FailureKind::Unreachable, down: true, message }
        } else {
            Failure { kind: FailureKind::Error, down: true, message }
        }
    }
}

/// An error's text and causes, the URL replaced (it may carry credentials).
fn error_text(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<target>");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The target's answer to a call.
pub(crate) enum Remote {
    /// A whole answer: one per choice.
    Whole(Vec<Answer>),
    /// A stream being read by a task: each choice's events.
    Stream(Vec<UnboundedReceiver<Event>>),
}

/// The client of one model's target.
pub(crate) struct Target {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl Target {
    /// A pooled client for the settings' target.
    pub(crate) fn new(escalation: &Escalation) -> anyhow::Result<Target> {
        let timeout = escalation.config.timeout();
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the escalation client: {e}"))?;
        Ok(Target {
            client,
            url: escalation.url.clone(),
            model: escalation.target_model.clone(),
            api_key: escalation.api_key.clone(),
            timeout,
        })
    }

    /// The target's model name.
    pub(crate) fn model(&self) -> &str {
        &self.model
    }

    /// Sends the request and reads the answer: all of it, or (`stream`) its
    /// head, then the events through a task that ends when the stream does
    /// or every receiver is dropped. `on_end` gets the completion tokens
    /// served (or the failure) once the answer has been read.
    pub(crate) async fn call(
        &self,
        forward: &Forward,
        options: &GenerateOptions,
        n: usize,
        stream: bool,
        prompt_tokens: usize,
        on_end: impl FnOnce(Result<usize, Failure>) + Send + 'static,
    ) -> Result<Remote, Failure> {
        let (path, body) = request_body(forward, options, n, stream, &self.model)?;
        let deadline = Instant::now() + self.timeout;
        let response = self.send(path, &body, deadline).await?;
        let kind = forward.kind();
        if !stream {
            let left = deadline.saturating_duration_since(Instant::now());
            let bytes = match tokio::time::timeout(left, read_limited(response)).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(Failure {
                        kind: FailureKind::Timeout,
                        down: true,
                        message: "reading the answer timed out".into(),
                    })
                }
            };
            let answers = parse_answer(kind, &bytes, n, prompt_tokens).map_err(Failure::error)?;
            on_end(Ok(answers.iter().map(|a| a.usage.completion_tokens).sum()));
            return Ok(Remote::Whole(answers));
        }
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded_channel()).unzip();
        tokio::spawn(pump(response, kind, senders, prompt_tokens, deadline, on_end));
        Ok(Remote::Stream(receivers))
    }

    /// Posts `body` to `path`, retrying connect errors; a non-2xx status is
    /// a failure (5xx: the target is down).
    async fn send(&self, path: &str, body: &Value, deadline: Instant) -> Result<reqwest::Response, Failure> {
        let url = format!("{}{path}", self.url);
        let body = Bytes::from(serde_json::to_vec(body).map_err(|e| Failure::error(e.to_string()))?);
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure { kind: FailureKind::Timeout, down: true, message: "no time left".into() });
            }
            let mut request = self
                .client
                .post(&url)
                .timeout(left)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => {
                    let status = response.status();
                    let text = read_limited(response).await.unwrap_or_default();
                    let text = String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned();
                    return Err(Failure {
                        kind: FailureKind::Error,
                        down: status.is_server_error(),
                        message: format!("the target answered {status}: {text}"),
                    });
                }
                Err(error) if error.is_connect() && !error.is_timeout() && attempt < CONNECT_RETRIES => {
                    tokio::time::sleep(RETRY_BACKOFF * 2u32.pow(attempt)).await;
                    attempt += 1;
                }
                Err(error) => return Err(Failure::of(&error)),
            }
        }
    }
}

/// The body of a response, at most [`MAX_ANSWER_BYTES`].
async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| Failure::of(&e))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(Failure::error(format!("the target's answer is larger than {MAX_ANSWER_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The path under the base URL and the JSON body of the target request.
/// OpenAI requests go as they came, with the target's `model`, `stream` as
/// asked, and usage requested in streams; OIP text requests become
/// `/completions` requests with the same settings.
pub(crate) fn request_body(
    forward: &Forward,
    options: &GenerateOptions,
    n: usize,
    stream: bool,
    model: &str,
) -> Result<(&'static str, Value), Failure> {
    let mut body = match forward {
        Forward::OpenAi { body, .. } => serde_json::from_slice::<Map<String, Value>>(body)
            .map_err(|e| Failure::error(format!("the request body cannot be forwarded: {e}")))?,
        Forward::Oip { prompt } => {
            let mut body = Map::new();
            body.insert("prompt".into(), json!(prompt));
            body.insert("n".into(), json!(n));
            let mut put = |key: &str, value: Option<Value>| {
                if let Some(value) = value {
                    body.insert(key.into(), value);
                }
            };
            put("max_tokens", options.max_tokens.map(|v| json!(v)));
            put("temperature", options.temperature.map(|v| json!(v)));
            put("top_p", options.top_p.map(|v| json!(v)));
            put("seed", options.seed.map(|v| json!(v)));
            put("presence_penalty", options.presence_penalty.map(|v| json!(v)));
            put("frequency_penalty", options.frequency_penalty.map(|v| json!(v)));
            put("stop", (!options.stop.is_empty()).then(|| json!(options.stop)));
            put("response_format", options.response_format.as_ref().map(response_format_json));
            body
        }
    };
    body.insert("model".into(), json!(model));
    body.insert("stream".into(), json!(stream));
    if stream {
        body.insert("stream_options".into(), json!({"include_usage": true}));
    } else {
        body.remove("stream_options");
    }
    let path = match forward.kind() {
        TextKind::Chat => "/chat/completions",
        TextKind::Completion | TextKind::Oip => "/completions",
    };
    Ok((path, Value::Object(body)))
}

/// OpenAI's `response_format` object of a parsed format.
fn response_format_json(format: &ResponseFormat) -> Value {
    match format {
        ResponseFormat::JsonObject => json!({"type": "json_object"}),
        ResponseFormat::JsonSchema { name, schema } => {
            json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
        }
    }
}

/// A finish reason as the target names it (`stop`, `length`; others, such
/// as `content_filter`, end the answer as `stop`).
fn finish_reason(value: Option<&Value>) -> Option<FinishReason> {
    match value.and_then(Value::as_str)? {
        "length" => Some(FinishReason::Length),
        _ => Some(FinishReason::Stop),
    }
}

/// The usage of choice `index`: the prompt in every choice; the completion
/// tokens of all choices on the first (the target reports only their sum).
fn choice_usage(index: usize, prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage { prompt_tokens, completion_tokens: if index == 0 { completion_tokens } else { 0 }, cached_tokens: 0 }
}

/// Reads a whole answer (chat: `choices[].message.content`; completions:
/// `choices[].text`) into `n` answers, in `index` order.
pub(crate) fn parse_answer(kind: TextKind, body: &[u8], n: usize, prompt_hint: usize) -> Result<Vec<Answer>, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("the target's answer is not JSON: {e}"))?;
    let choices = value["choices"].as_array().ok_or("the target's answer has no 'choices'")?;
    let usage = &value["usage"];
    let prompt_tokens = usage["prompt_tokens"].as_u64().map_or(prompt_hint, |v| v as usize);
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
    let mut answers: Vec<Option<Answer>> = vec![None; n];
    for (position, choice) in choices.iter().enumerate() {
        let index = choice["index"].as_u64().map_or(position, |i| i as usize);
        let slot = answers.get_mut(index).ok_or_else(|| format!("the target answered choice {index} of {n}"))?;
        let text = match kind {
            TextKind::Chat => &choice["message"]["content"],
            TextKind::Completion | TextKind::Oip => &choice["text"],
        };
        let text = match text {
            Value::String(text) => text.clone(),
            Value::Null => String::new(),
            _ => return Err("the target's answer has a choice whose text is not a string".into()),
        };
        let finish_reason = finish_reason(choice.get("finish_reason")).unwrap_or(FinishReason::Stop);
        let usage = choice_usage(index, prompt_tokens, completion_tokens);
        *slot = Some(Answer { text, logprobs: Vec::new(), finish_reason, usage });
    }
    answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.ok_or_else(|| format!("the target's answer has no choice {i}")))
        .collect()
}

/// Splits a server-sent event stream into its `data` payloads (events end
/// with a blank line; only `data:` fields matter; `\r\n` or `\n`).
#[derive(Debug, Default)]
pub(crate) struct SseReader {
    buffer: Vec<u8>,
    data: String,
}

impl SseReader {
    /// Feeds bytes; returns the payloads of the events they completed.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(std::mem::take(&mut self.data));
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        events
    }

    /// Bytes not yet part of a whole line.
    pub(crate) fn pending(&self) -> usize {
        self.buffer.len() + self.data.len()
    }
}

/// What one streamed chunk says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Chunk {
    /// New text of a choice, and its finish reason if it ended.
    Choice { index: usize, text: String, finish: Option<FinishReason> },
    /// The usage of the whole request.
    Usage { prompt_tokens: usize, completion_tokens: usize },
    /// `[DONE]`.
    Done,
}

/// Reads one `data` payload of a streamed answer.
pub(crate) fn parse_chunk(kind: TextKind, data: &str) -> Result<Vec<Chunk>, String> {
    if data.trim() == "[DONE]" {
        return Ok(vec![Chunk::Done]);
    }
    let value: Value = serde_json::from_str(data).map_err(|e| format!("a streamed chunk is not JSON: {e}"))?;
    if let Some(error) = value.get("error") {
        let message = error["message"].as_str().unwrap_or("unknown error");
        return Err(format!("the target's stream failed: {message}"));
    }
    let mut chunks = Vec::new();
    for (position, choice) in value["choices"].as_array().map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
        let index = choice["index"].as_u64().map_or(position, |i| i as usize);
        let text = match kind {
            TextKind::Chat => choice["delta"]["content"].as_str(),
            TextKind::Completion | TextKind::Oip => choice["text"].as_str(),
        };
        chunks.push(Chunk::Choice {
            index,
            text: text.unwrap_or_default().to_string(),
            finish: finish_reason(choice.get("finish_reason")),
        });
    }
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        chunks.push(Chunk::Usage {
            prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0) as usize,
            completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0) as usize,
        });
    }
    Ok(chunks)
}

/// Per-choice state of a stream being turned into events.
pub(crate) struct StreamEvents {
    kind: TextKind,
    finish: Vec<Option<FinishReason>>,
    usage: Option<(usize, usize)>,
    pieces: usize,
    done: bool,
}

impl StreamEvents {
    /// For `n` choices of `kind`.
    pub(crate) fn new(kind: TextKind, n: usize) -> StreamEvents {
        StreamEvents { kind, finish: vec![None; n], usage: None, pieces: 0, done: false }
    }

    /// The events of one payload, by choice; an error ends the stream.
    pub(crate) fn data(&mut self, data: &str) -> Result<Vec<(usize, Event)>, String> {
        let mut events = Vec::new();
        for chunk in parse_chunk(self.kind, data)? {
            match chunk {
                Chunk::Choice { index, text, finish } => {
                    let slot =
                        self.finish.get_mut(index).ok_or_else(|| format!("the target streamed choice {index}"))?;
                    if !text.is_empty() {
                        self.pieces += 1;
                        events.push((index, Event::Text { text, logprobs: Vec::new() }));
                    }
                    if finish.is_some() {
                        *slot = finish;
                    }
                }
                Chunk::Usage { prompt_tokens, completion_tokens } => {
                    self.usage = Some((prompt_tokens, completion_tokens))
                }
                Chunk::Done => self.done = true,
            }
        }
        Ok(events)
    }

    /// Whether `[DONE]` came.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// The last events of each choice once the stream has ended: `Done`
    /// (with the usage, when the target sent it) if it finished, else an
    /// error. Also the completion tokens served.
    pub(crate) fn end(&self, prompt_hint: usize) -> (Vec<Event>, usize) {
        let (prompt_tokens, completion_tokens) = self.usage.unwrap_or((prompt_hint, self.pieces));
        let events = self
            .finish
            .iter()
            .enumerate()
            .map(|(index, finish)| match (finish, self.done) {
                (None, false) => Event::Error(InferError::new(
                    crate::error::ErrorKind::Unavailable,
                    "the escalation target's stream ended before the answer did",
                )),
                _ => Event::Done {
                    text: String::new(),
                    logprobs: Vec::new(),
                    finish_reason: finish.unwrap_or(FinishReason::Stop),
                    usage: choice_usage(index, prompt_tokens, completion_tokens),
                },
            })
            .collect();
        (events, completion_tokens)
    }
}

/// Reads a streamed answer into the choices' channels until it ends, fails,
/// runs past the deadline, or nobody listens any more.
async fn pump(
    mut response: reqwest::Response,
    kind: TextKind,
    senders: Vec<UnboundedSender<Event>>,
    prompt_tokens: usize,
    deadline: Instant,
    on_end: impl FnOnce(Result<usize, Failure>),
) {
    let mut reader = SseReader::default();
    let mut state = StreamEvents::new(kind, senders.len());
    let failure = loop {
        if senders.iter().all(UnboundedSender::is_closed) {
            // The client went away: dropping the response cancels the call.
            return;
        }
        let chunk = match tokio::time::timeout_at(deadline.into(), response.chunk()).await {
            Err(_) => {
                break Some(Failure { kind: FailureKind::Timeout, down: true, message: "the stream timed out".into() })
            }
            Ok(Err(error)) => break Some(Failure::of(&error)),
            Ok(Ok(None)) => break None,
            Ok(Ok(Some(chunk))) => chunk,
        };
        if reader.pending() + chunk.len() > MAX_ANSWER_BYTES {
            break Some(Failure::error("a streamed event is too large"));
        }
        let mut failed = None;
        for data in reader.feed(&chunk) {
            match state.data(&data) {
                Ok(events) => {
                    for (index, event) in events {
                        let _ = senders[index].send(event);
                    }
                }
                Err(message) => {
                    failed = Some(Failure::error(message));
                    break;
                }
            }
        }
        if failed.is_some() {
            break failed;
        }
        if state.is_done() {
            break None;
        }
    };
    match failure {
        None => {
            let (events, tokens) = state.end(prompt_tokens);
            for (sender, event) in senders.iter().zip(events) {
                let _ = sender.send(event);
            }
            on_end(Ok(tokens));
        }
        Some(failure) => {
            for sender in &senders {
                let error = InferError::new(
                    crate::error::ErrorKind::Unavailable,
                    format!("the escalation target failed mid-stream: {}", failure.message),
                );
                let _ = sender.send(Event::Error(error));
            }
            on_end(Err(failure));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_answers_of_both_endpoints() {
        let chat =
            br#"{"choices": [{"index": 1, "message": {"role": "assistant", "content": "b"}, "finish_reason": "length"},
                                    {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 5}}"#;
        let answers = parse_answer(TextKind::Chat, chat, 2, 0).unwrap();
        assert_eq!((answers[0].text.as_str(), answers[0].finish_reason), ("a", FinishReason::Stop));
        assert_eq!((answers[1].text.as_str(), answers[1].finish_reason), ("b", FinishReason::Length));
        assert_eq!((answers[0].usage.prompt_tokens, answers[0].usage.completion_tokens), (7, 5));
        assert_eq!(answers[1].usage.completion_tokens, 0, "the sum is on the first choice");
        let completion = br#"{"choices": [{"text": " Paris", "finish_reason": "content_filter"}]}"#;
        let answers = parse_answer(TextKind::Completion, completion, 1, 3).unwrap();
        assert_eq!((answers[0].text.as_str(), answers[0].usage.prompt_tokens), (" Paris", 3));
        assert_eq!(answers[0].finish_reason, FinishReason::Stop);
        assert!(parse_answer(TextKind::Chat, b"<html>", 1, 0).unwrap_err().contains("not JSON"));
        assert!(parse_answer(TextKind::Chat, br#"{"error": {}}"#, 1, 0).unwrap_err().contains("choices"));
        assert!(parse_answer(TextKind::Chat, br#"{"choices": []}"#, 1, 0).unwrap_err().contains("no choice 0"));
        assert!(parse_answer(TextKind::Oip, br#"{"choices": [{"index": 3, "text": ""}]}"#, 1, 0).is_err());
    }

    #[test]
    fn sse_events_split_across_reads() {
        let mut reader = SseReader::default();
        assert!(reader.feed(b"data: {\"a\"").is_empty());
        assert_eq!(reader.feed(b": 1}\r\n\r\n: comment\n\ndata: [DONE]\n"), vec!["{\"a\": 1}".to_string()]);
        assert_eq!(reader.feed(b"\n"), vec!["[DONE]".to_string()]);
        assert_eq!(reader.pending(), 0);
    }

    #[test]
    fn streamed_chunks_become_events_per_choice() {
        let mut state = StreamEvents::new(TextKind::Chat, 2);
        let events = state
            .data(
                r#"{"choices": [{"index": 1, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}"#,
            )
            .unwrap();
        assert!(events.is_empty(), "no text, no event");
        let events =
            state.data(r#"{"choices": [{"index": 1, "delta": {"content": "Hi"}, "finish_reason": null}]}"#).unwrap();
        assert_eq!(events, vec![(1, Event::Text { text: "Hi".into(), logprobs: vec![] })]);
        state.data(r#"{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}"#).unwrap();
        state.data(r#"{"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]}"#).unwrap();
        state.data(r#"{"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}"#).unwrap();
        state.data("[DONE]").unwrap();
        assert!(state.is_done());
        let (events, tokens) = state.end(0);
        assert_eq!(tokens, 9);
        assert!(
            matches!(&events[0], Event::Done { finish_reason: FinishReason::Length, usage, .. } if usage.completion_tokens == 9 && usage.prompt_tokens == 4)
        );
        assert!(
            matches!(&events[1], Event::Done { finish_reason: FinishReason::Stop, usage, .. } if usage.completion_tokens == 0)
        );
        // Completions stream `text`; a stream cut short ends in an error.
        let mut state = StreamEvents::new(TextKind::Completion, 1);
        let events = state.data(r#"{"choices": [{"index": 0, "text": " x", "finish_reason": null}]}"#).unwrap();
        assert_eq!(events, vec![(0, Event::Text { text: " x".into(), logprobs: vec![] })]);
        let (events, tokens) = state.end(2);
        assert!(matches!(&events[0], Event::Error(_)));
        assert_eq!(tokens, 1, "without usage: the pieces streamed");
        assert!(state.data(r#"{"error": {"message": "overloaded"}}"#).unwrap_err().contains("overloaded"));
        assert!(state.data("not json").is_err());
        assert!(state.data(r#"{"choices": [{"index": 5, "text": "x"}]}"#).is_err());
    }

    #[test]
    fn request_bodies() {
        let options = GenerateOptions::default();
        let forward = Forward::OpenAi {
            kind: TextKind::Chat,
            body: Bytes::from_static(
                br#"{"model": "micro", "messages": [], "stream_options": {"include_usage": false}}"#,
            ),
        };
        let (path, body) = request_body(&forward, &options, 1, false, "macro").unwrap();
        assert_eq!(path, "/chat/completions");
        assert_eq!(body, json!({"model": "macro", "messages": [], "stream": false}));
        let (_, body) = request_body(&forward, &options, 1, true, "macro").unwrap();
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        let options = GenerateOptions {
            max_tokens: Some(5),
            stop: vec!["\n".into()],
            response_format: Some(ResponseFormat::JsonObject),
            ..GenerateOptions::default()
        };
        let (path, body) = request_body(&Forward::Oip { prompt: "Hi".into() }, &options, 1, false, "macro").unwrap();
        assert_eq!(path, "/completions");
        assert_eq!(
            body,
            json!({"model": "macro", "prompt": "Hi", "n": 1, "max_tokens": 5, "stop": ["\n"],
                   "response_format": {"type": "json_object"}, "stream": false})
        );
    }
}
