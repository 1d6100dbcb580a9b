//! text-embeddings-inference's API on the HTTP port, so TEI clients work
//! unchanged: `POST /embed`, `POST /rerank`, `POST /predict`, with TEI's
//! request and response shapes and its errors, `{"error", "error_type"}`:
//! 400 `empty` (no inputs), 413 `validation` (an input too long and
//! `truncate` false), 422 `validation` (a malformed request; 400 for JSON
//! that does not parse), 424 `backend` (the model failed, or is not of the
//! endpoint's kind, as TEI answers), 429 `overloaded` (queue full), 503
//! `unhealthy`.
//!
//! TEI serves one model; ferrite picks the one loaded encoder of the
//! endpoint's task, or the model named by the `model` query parameter or
//! the `x-ferrite-model` header when several are loaded.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;

use super::embeddings::encoder_model;
use super::limits::ReadBody;
use crate::encoder::config::{Side, Task};
use crate::encoder::tokenize::{Input, Truncation};
use crate::encoder::{EmbedOptions, EncodeRequest};
use crate::error::{ErrorKind, InferError};
use crate::model::Model;
use crate::state::ServerState;

type AppState = Arc<ServerState>;

/// The header that names the model when several encoders are loaded.
pub(crate) const MODEL_HEADER: &str = "x-ferrite-model";

/// Routes of the TEI API.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/embed", post(embed)).route("/rerank", post(rerank)).route("/predict", post(predict))
}

/// A TEI error: its status and `error_type`.
#[derive(Debug)]
struct TeiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl TeiError {
    fn empty(message: &str) -> TeiError {
        TeiError { status: StatusCode::BAD_REQUEST, kind: "empty", message: message.to_string() }
    }
}

impl From<InferError> for TeiError {
    fn from(error: InferError) -> TeiError {
        let (status, kind) = match error.kind {
            ErrorKind::ContextLengthExceeded => (StatusCode::PAYLOAD_TOO_LARGE, "validation"),
            ErrorKind::InvalidArgument => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            ErrorKind::QueueFull => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorKind::Internal => (StatusCode::FAILED_DEPENDENCY, "backend"),
            ErrorKind::DeadlineExceeded | ErrorKind::Cancelled | ErrorKind::Disabled => {
                (super::status(error.kind), "backend")
            }
        };
        TeiError { status, kind, message: error.message }
    }
}

impl IntoResponse for TeiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message, "error_type": self.kind}))).into_response()
    }
}

type TeiResult<T> = Result<T, TeiError>;

/// `?model=` on any TEI route.
#[derive(Debug, Default, Deserialize)]
struct Selector {
    model: Option<String>,
}

/// The model a TEI request goes to: the one named (query, then header),
/// or the only loaded encoder of `task`.
fn pick(state: &ServerState, selector: &Selector, headers: &HeaderMap, task: Task) -> TeiResult<Arc<Model>> {
    let named = selector.model.clone().or_else(|| headers.get(MODEL_HEADER)?.to_str().ok().map(str::to_string));
    if let Some(name) = named {
        return encoder_model(state, &name, task).map_err(|error| match error.kind {
            // TEI answers a model of another kind with 424.
            ErrorKind::InvalidArgument => {
                TeiError { status: StatusCode::FAILED_DEPENDENCY, kind: "backend", message: error.message }
            }
            _ => error.into(),
        });
    }
    let mut candidates: Vec<Arc<Model>> =
        state.repository.loaded(None).into_iter().filter(|m| m.encoder().is_some_and(|e| e.task() == task)).collect();
    // The highest version of each model (`loaded` lists them in order).
    candidates.reverse();
    candidates.dedup_by(|a, b| a.name == b.name);
    match candidates.len() {
        1 => {
            let model = candidates.pop().expect("one");
            state.model(&model.name, "").map_err(TeiError::from)
        }
        0 => Err(InferError::not_found(format!("no {} model is loaded on this server", task.as_str())).into()),
        _ => {
            let mut names: Vec<&str> = candidates.iter().map(|m| m.name.as_str()).collect();
            names.sort_unstable();
            Err(InferError::invalid(format!(
                "several {} models are loaded ({names:?}): name one with ?model= or the {MODEL_HEADER} header",
                task.as_str()
            ))
            .into())
        }
    }
}

/// Parses a body as axum's `Json` would answer: 400 for JSON that does
/// not parse, 422 for JSON of the wrong shape.
fn parse<T: DeserializeOwned>(body: &[u8]) -> TeiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        let status = if e.is_data() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::BAD_REQUEST };
        TeiError { status, kind: "validation", message: format!("invalid request body: {e}") }
    })
}

/// TEI's `truncation_direction`: `Right` or `Left` (any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Direction(Side);

impl<'de> Deserialize<'de> for Direction {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.to_ascii_lowercase().as_str() {
            "right" => Ok(Direction(Side::Right)),
            "left" => Ok(Direction(Side::Left)),
            _ => Err(de::Error::custom(format!("truncation_direction must be 'Right' or 'Left', not '{name}'"))),
        }
    }
}

/// `inputs` of /embed: a string or a list of strings.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(untagged)]
enum Texts {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct EmbedBody {
    inputs: Texts,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Option<Direction>,
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default)]
    prompt_name: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

fn yes() -> bool {
    true
}

fn truncation(model: &Model, truncate: Option<bool>, direction: Option<Direction>) -> Truncation {
    let encoder = model.encoder().expect("picked as an encoder");
    let default = encoder.default_truncation(truncate.unwrap_or(false));
    Truncation { side: direction.map_or(default.side, |d| d.0), ..default }
}

async fn embed(
    State(state): State<AppState>,
    Query(selector): Query<Selector>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    embed_answer(&state, &selector, &headers, &body).await.map(Json).into_response()
}

async fn embed_answer(
    state: &ServerState,
    selector: &Selector,
    headers: &HeaderMap,
    body: &[u8],
) -> TeiResult<Vec<Vec<f32>>> {
    let request: EmbedBody = parse(body)?;
    let texts = match request.inputs {
        Texts::One(text) => vec![text],
        Texts::Many(texts) => texts,
    };
    if texts.is_empty() {
        return Err(TeiError::empty("`inputs` cannot be empty"));
    }
    if request.prompt_name.is_some() {
        return Err(
            InferError::invalid("prompt_name is not supported: ferrite's encoders have no named prompts").into()
        );
    }
    let model = pick(state, selector, headers, Task::Embedding)?;
    let encoder = model.encoder().expect("picked as an encoder");
    let inputs = texts.into_iter().map(Input::Text).collect();
    let encode = EncodeRequest::new(inputs, truncation(&model, request.truncate, request.truncation_direction));
    let options = EmbedOptions { normalize: Some(request.normalize), dimensions: request.dimensions };
    let encoded = model.encode(encoder.embed(encode, options)).await?;
    Ok(encoded.rows)
}

#[derive(Debug, Deserialize)]
struct RerankBody {
    query: String,
    texts: Vec<String>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Option<Direction>,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
}

async fn rerank(
    State(state): State<AppState>,
    Query(selector): Query<Selector>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    rerank_answer(&state, &selector, &headers, &body).await.map(Json).into_response()
}

async fn rerank_answer(
    state: &ServerState,
    selector: &Selector,
    headers: &HeaderMap,
    body: &[u8],
) -> TeiResult<Vec<Rank>> {
    let request: RerankBody = parse(body)?;
    if request.texts.is_empty() {
        return Err(TeiError::empty("`texts` cannot be empty"));
    }
    let model = pick(state, selector, headers, Task::Rerank)?;
    let encoder = model.encoder().expect("picked as an encoder");
    let truncation = truncation(&model, request.truncate, request.truncation_direction);
    let texts = request.return_text.then(|| request.texts.clone());
    let (scores, _) =
        model.encode(encoder.rerank(&request.query, request.texts, truncation, request.raw_scores)).await?;
    ranks(&scores, texts)
}

/// One text's place in a rerank answer.
#[derive(Debug, Serialize)]
struct Rank {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    score: f32,
}

/// Ranks by score, best first (ties keep the texts' order).
fn ranks(scores: &[f32], texts: Option<Vec<String>>) -> TeiResult<Vec<Rank>> {
    if scores.iter().any(|s| s.is_nan()) {
        return Err(TeiError {
            status: StatusCode::FAILED_DEPENDENCY,
            kind: "backend",
            message: "score is NaN".into(),
        });
    }
    let mut texts = texts.map(|texts| texts.into_iter().map(Some).collect::<Vec<_>>());
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    Ok(order
        .into_iter()
        .map(|index| Rank { index, text: texts.as_mut().and_then(|t| t.get_mut(index)?.take()), score: scores[index] })
        .collect())
}

/// `inputs` of /predict: one input (a string, or a pair as a list of two
/// strings) or a batch (a list of lists of one or two strings).
#[derive(Debug, PartialEq)]
enum PredictInputs {
    One(Input),
    Batch(Vec<Input>),
}

impl<'de> Deserialize<'de> for PredictInputs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum First {
            Text(String),
            List(Vec<String>),
        }
        fn sequence<E: de::Error>(mut texts: Vec<String>) -> Result<Input, E> {
            match texts.len() {
                1 => Ok(Input::Text(texts.pop().expect("one"))),
                2 => {
                    let second = texts.pop().expect("two");
                    Ok(Input::Pair(texts.pop().expect("two"), second))
                }
                n => Err(E::custom(format!("an input is one string or a pair of strings, not {n} strings"))),
            }
        }
        struct PredictVisitor;
        impl<'de> Visitor<'de> for PredictVisitor {
            type Value = PredictInputs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a pair of strings, or a batch of lists of one or two strings")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<PredictInputs, E> {
                Ok(PredictInputs::One(Input::Text(text.to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PredictInputs, A::Error> {
                match seq.next_element::<First>()? {
                    None => Ok(PredictInputs::Batch(Vec::new())),
                    Some(First::Text(first)) => match seq.next_element::<String>()? {
                        None => Ok(PredictInputs::One(Input::Text(first))),
                        Some(second) => match seq.next_element::<String>()? {
                            None => Ok(PredictInputs::One(Input::Pair(first, second))),
                            Some(_) => Err(de::Error::custom("an input is one string or a pair of strings")),
                        },
                    },
                    Some(First::List(first)) => {
                        let mut batch = vec![sequence(first)?];
                        while let Some(texts) = seq.next_element::<Vec<String>>()? {
                            batch.push(sequence(texts)?);
                        }
                        Ok(PredictInputs::Batch(batch))
                    }
                }
            }
        }
        deserializer.deserialize_any(PredictVisitor)
    }
}

#[derive(Debug, Deserialize)]
struct PredictBody {
    inputs: PredictInputs,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Option<Direction>,
    #[serde(default)]
    raw_scores: bool,
}

async fn predict(
    State(state): State<AppState>,
    Query(selector): Query<Selector>,
    headers: HeaderMap,
    ReadBody(body): ReadBody,
) -> Response {
    predict_answer(&state, &selector, &headers, &body).await.map(Json).into_response()
}

async fn predict_answer(
    state: &ServerState,
    selector: &Selector,
    headers: &HeaderMap,
    body: &[u8],
) -> TeiResult<PredictResponse> {
    let request: PredictBody = parse(body)?;
    let (inputs, single) = match request.inputs {
        PredictInputs::One(input) => (vec![input], true),
        PredictInputs::Batch(inputs) => (inputs, false),
    };
    if inputs.is_empty() {
        return Err(TeiError::empty("`inputs` cannot be empty"));
    }
    let model = pick(state, selector, headers, Task::Classification)?;
    let encoder = model.encoder().expect("picked as an encoder");
    let encode = EncodeRequest::new(inputs, truncation(&model, request.truncate, request.truncation_direction));
    let encoded = model.encode(encoder.classify(encode, request.raw_scores)).await?;
    let mut predictions =
        encoded.rows.iter().map(|row| predictions(row, encoder.labels())).collect::<TeiResult<Vec<_>>>()?;
    Ok(if single {
        PredictResponse::One(predictions.pop().expect("one input"))
    } else {
        PredictResponse::Batch(predictions)
    })
}

/// One label's score.
#[derive(Debug, Serialize)]
struct Prediction {
    score: f32,
    label: String,
}

/// A /predict answer: one input's predictions, or a batch's.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum PredictResponse {
    One(Vec<Prediction>),
    Batch(Vec<Vec<Prediction>>),
}

/// One input's labels and scores, best first.
fn predictions(scores: &[f32], labels: &[String]) -> TeiResult<Vec<Prediction>> {
    if scores.iter().any(|s| s.is_nan()) {
        return Err(TeiError {
            status: StatusCode::FAILED_DEPENDENCY,
            kind: "backend",
            message: "score is NaN".into(),
        });
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    Ok(order
        .into_iter()
        .map(|i| Prediction { score: scores[i], label: labels.get(i).cloned().unwrap_or_else(|| format!("LABEL_{i}")) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predict_inputs(json: &str) -> Result<PredictInputs, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn predict_inputs_as_tei_reads_them() {
        let text = |s: &str| Input::Text(s.into());
        let pair = |a: &str, b: &str| Input::Pair(a.into(), b.into());
        assert_eq!(predict_inputs(r#""a""#).unwrap(), PredictInputs::One(text("a")));
        assert_eq!(predict_inputs(r#"["a"]"#).unwrap(), PredictInputs::One(text("a")));
        assert_eq!(predict_inputs(r#"["a", "b"]"#).unwrap(), PredictInputs::One(pair("a", "b")));
        assert_eq!(
            predict_inputs(r#"[["a"], ["b", "c"]]"#).unwrap(),
            PredictInputs::Batch(vec![text("a"), pair("b", "c")])
        );
        assert_eq!(predict_inputs("[]").unwrap(), PredictInputs::Batch(vec![]));
        assert!(predict_inputs(r#"["a", "b", "c"]"#).is_err());
        assert!(predict_inputs(r#"[["a", "b", "c"]]"#).is_err());
        assert!(predict_inputs("3").is_err());
    }

    #[test]
    fn ranks_and_predictions_are_sorted_best_first() {
        let texts = vec!["x".to_string(), "y".to_string(), "z".to_string()];
        let value = serde_json::to_value(ranks(&[0.1, 0.9, 0.5], Some(texts)).unwrap()).unwrap();
        assert_eq!(
            value,
            json!([{"index": 1, "score": 0.9f32, "text": "y"}, {"index": 2, "score": 0.5f32, "text": "z"},
                   {"index": 0, "score": 0.1f32, "text": "x"}])
        );
        assert!(serde_json::to_value(ranks(&[0.1], None).unwrap()).unwrap()[0].get("text").is_none());
        assert_eq!(ranks(&[f32::NAN], None).unwrap_err().status, StatusCode::FAILED_DEPENDENCY);
        let labels = vec!["NEGATIVE".to_string(), "POSITIVE".to_string()];
        assert_eq!(
            serde_json::to_value(predictions(&[0.25, 0.75], &labels).unwrap()).unwrap(),
            json!([{"score": 0.75, "label": "POSITIVE"}, {"score": 0.25, "label": "NEGATIVE"}])
        );
    }

    #[test]
    fn errors_have_tei_statuses() {
        let status = |kind| TeiError::from(InferError::new(kind, "x")).status.as_u16();
        assert_eq!(status(ErrorKind::ContextLengthExceeded), 413);
        assert_eq!(status(ErrorKind::InvalidArgument), 422);
        assert_eq!(status(ErrorKind::QueueFull), 429);
        assert_eq!(status(ErrorKind::Internal), 424);
        assert_eq!(status(ErrorKind::Unavailable), 503);
        assert_eq!(parse::<EmbedBody>(b"{").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(parse::<EmbedBody>(br#"{"inputs": 3}"#).unwrap_err().status, StatusCode::UNPROCESSABLE_ENTITY);
        let body: EmbedBody = parse(br#"{"inputs": "a", "truncation_direction": "Left"}"#).unwrap();
        assert!(body.normalize, "TEI normalizes by default");
        assert_eq!(body.truncation_direction, Some(Direction(Side::Left)));
    }
}
