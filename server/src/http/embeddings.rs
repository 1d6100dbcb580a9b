//! OpenAI's embeddings API on the HTTP port: `POST /v1/embeddings`.
//!
//! `input` is a string, a list of strings, a list of token ids or a list of
//! lists of token ids; `encoding_format` `float` (default) or `base64`
//! (little-endian f32 bytes, as OpenAI's SDK decodes them); `dimensions`
//! where the model allows it (docs/encoders.md). Inputs longer than the
//! model takes are refused (400, `context_length_exceeded`), as OpenAI does.
//! Errors have OpenAI's shape (`http::openai::OpenAiError`).

use std::fmt;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::limits::ReadBody;
use super::openai::OpenAiError;
use crate::encoder::config::Task;
use crate::encoder::tokenize::Input;
use crate::encoder::{EmbedOptions, EncodeRequest, Encoded};
use crate::error::InferError;
use crate::model::Model;
use crate::state::ServerState;

type AppState = Arc<ServerState>;

/// Routes of the embeddings API.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/embeddings", post(embeddings))
}

/// The encoder model `name`: NOT_FOUND when no such model is loaded,
/// INVALID_ARGUMENT when it is not an encoder of `task`.
pub(crate) fn encoder_model(state: &ServerState, name: &str, task: Task) -> Result<Arc<Model>, InferError> {
    let model = state.model(name, "")?;
    match model.encoder() {
        Some(encoder) if encoder.task() == task => Ok(model),
        Some(encoder) => Err(InferError::invalid(format!(
            "model '{name}' is {} model, not {} model",
            encoder.task().with_article(),
            task.with_article()
        ))),
        None => {
            let hint = if model.generates_text() { "; it is a language model: use /v1/chat/completions" } else { "" };
            Err(InferError::invalid(format!(
                "model '{name}' is not {} model (it takes no text){hint}",
                task.with_article()
            )))
        }
    }
}

/// A request body; unknown fields are skipped.
#[derive(Debug, Deserialize)]
struct RequestBody {
    model: String,
    input: Inputs,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<i64>,
    /// Accepted and not used (OpenAI's abuse monitoring).
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// `input`: texts or token id lists.
#[derive(Debug, PartialEq)]
struct Inputs(Vec<Input>);

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// One element of a list input: its kind says what the list is.
        enum Element {
            Text(String),
            Token(u32),
            Tokens(Vec<u32>),
        }
        impl<'de> Deserialize<'de> for Element {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct ElementVisitor;
                impl<'de> Visitor<'de> for ElementVisitor {
                    type Value = Element;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string, a token id or a list of token ids")
                    }
                    fn visit_str<E: de::Error>(self, text: &str) -> Result<Element, E> {
                        Ok(Element::Text(text.to_owned()))
                    }
                    fn visit_string<E: de::Error>(self, text: String) -> Result<Element, E> {
                        Ok(Element::Text(text))
                    }
                    fn visit_u64<E: de::Error>(self, id: u64) -> Result<Element, E> {
                        u32::try_from(id).map(Element::Token).map_err(|_| E::custom("token ids are below 2^32"))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                        let mut ids = Vec::new();
                        while let Some(id) = seq.next_element::<u32>()? {
                            ids.push(id);
                        }
                        Ok(Element::Tokens(ids))
                    }
                }
                deserializer.deserialize_any(ElementVisitor)
            }
        }
        struct InputsVisitor;
        impl<'de> Visitor<'de> for InputsVisitor {
            type Value = Inputs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a list of strings, a list of token ids or a list of lists of token ids")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Inputs, E> {
                Ok(Inputs(vec![Input::Text(text.to_owned())]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inputs, A::Error> {
                let mut inputs = Vec::new();
                let mut ids = Vec::new();
                while let Some(element) = seq.next_element::<Element>()? {
                    let mixed = match element {
                        Element::Text(text) => {
                            inputs.push(Input::Text(text));
                            !ids.is_empty()
                        }
                        Element::Tokens(list) => {
                            inputs.push(Input::Ids(list));
                            !ids.is_empty()
                        }
                        Element::Token(id) => {
                            ids.push(id);
                            !inputs.is_empty()
                        }
                    };
                    if mixed {
                        return Err(de::Error::custom("input mixes token ids with texts or lists"));
                    }
                }
                if !ids.is_empty() {
                    inputs.push(Input::Ids(ids));
                }
                if inputs.is_empty() {
                    return Err(de::Error::custom("input must not be empty"));
                }
                Ok(Inputs(inputs))
            }
        }
        deserializer.deserialize_any(InputsVisitor)
    }
}

/// How embeddings are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Float,
    Base64,
}

fn format(name: Option<&str>) -> Result<Format, InferError> {
    match name {
        None | Some("float") => Ok(Format::Float),
        Some("base64") => Ok(Format::Base64),
        Some(other) => Err(InferError::invalid(format!("encoding_format must be 'float' or 'base64', not '{other}'"))),
    }
}

async fn embeddings(State(state): State<AppState>, ReadBody(body): ReadBody) -> Response {
    match answer(&state, &body).await {
        Ok(response) => Json(response).into_response(),
        Err(error) => OpenAiError::from(error).into_response(),
    }
}

async fn answer(state: &ServerState, body: &[u8]) -> Result<EmbeddingsResponse, InferError> {
    let request: RequestBody =
        serde_json::from_slice(body).map_err(|e| InferError::invalid(format!("invalid request body: {e}")))?;
    let format = format(request.encoding_format.as_deref())?;
    let dimensions = match request.dimensions {
        None => None,
        Some(d) if d > 0 => Some(d as usize),
        Some(d) => return Err(InferError::invalid(format!("dimensions must be a positive integer, not {d}"))),
    };
    let model = encoder_model(state, &request.model, Task::Embedding)?;
    let encoder = model.encoder().expect("checked to be an encoder");
    let encode = EncodeRequest::new(request.input.0, encoder.default_truncation(false));
    let encoded = model.encode(encoder.embed(encode, EmbedOptions { normalize: None, dimensions })).await?;
    Ok(response(&model.name, encoded, format))
}

/// The answer, typed: f32 values are written in their shortest form.
#[derive(Debug, Serialize)]
struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: String,
    usage: Usage,
}

#[derive(Debug, Serialize)]
struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: Embedding,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Embedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

fn response(model: &str, encoded: Encoded, format: Format) -> EmbeddingsResponse {
    let data = encoded
        .rows
        .into_iter()
        .enumerate()
        .map(|(index, row)| {
            let embedding = match format {
                Format::Float => Embedding::Float(row),
                Format::Base64 => Embedding::Base64(base64_floats(&row)),
            };
            EmbeddingObject { object: "embedding", index, embedding }
        })
        .collect();
    EmbeddingsResponse {
        object: "list",
        data,
        model: model.to_string(),
        usage: Usage { prompt_tokens: encoded.tokens, total_tokens: encoded.tokens },
    }
}

/// The floats as little-endian bytes in standard base64 (what OpenAI's
/// SDKs decode with `np.frombuffer(..., dtype="float32")`).
pub(crate) fn base64_floats(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inputs(json: &str) -> Result<Vec<Input>, String> {
        serde_json::from_str::<Inputs>(json).map(|i| i.0).map_err(|e| e.to_string())
    }

    #[test]
    fn every_input_shape_openai_takes() {
        assert_eq!(inputs(r#""hi""#).unwrap(), vec![Input::Text("hi".into())]);
        assert_eq!(inputs(r#"["a", "b"]"#).unwrap(), vec![Input::Text("a".into()), Input::Text("b".into())]);
        assert_eq!(inputs("[1, 2, 3]").unwrap(), vec![Input::Ids(vec![1, 2, 3])]);
        assert_eq!(inputs("[[1, 2], [3]]").unwrap(), vec![Input::Ids(vec![1, 2]), Input::Ids(vec![3])]);
        assert!(inputs("[]").unwrap_err().contains("must not be empty"));
        assert!(inputs(r#"["a", 1]"#).unwrap_err().contains("mixes"));
        assert!(inputs(r#"[1, "a"]"#).unwrap_err().contains("mixes"));
        assert!(inputs("42").is_err());
        assert!(inputs("[-1]").is_err());
        assert!(inputs(r#"[{"text": "a"}]"#).is_err());
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(base64_floats(&[1.0]), "AACAPw==");
        assert_eq!(base64_floats(&[]), "");
        let encoded = base64_floats(&[0.5, -2.0]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
        let back: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(back, vec![0.5, -2.0]);
    }

    #[test]
    fn formats_and_response_shape() {
        assert_eq!(format(None).unwrap(), Format::Float);
        assert_eq!(format(Some("base64")).unwrap(), Format::Base64);
        assert!(format(Some("int8")).unwrap_err().message.contains("'float' or 'base64'"));
        let value = response("m", Encoded { rows: vec![vec![0.5, 0.25]], tokens: 7 }, Format::Float);
        assert_eq!(
            serde_json::to_value(value).unwrap(),
            json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
                   "model": "m", "usage": {"prompt_tokens": 7, "total_tokens": 7}})
        );
        // Shortest f32 text, not the f64 expansion.
        let text =
            serde_json::to_string(&response("m", Encoded { rows: vec![vec![0.1]], tokens: 1 }, Format::Float)).unwrap();
        assert!(text.contains("[0.1]"), "{text}");
        let base64 =
            serde_json::to_value(response("m", Encoded { rows: vec![vec![1.0]], tokens: 1 }, Format::Base64)).unwrap();
        assert_eq!(base64["data"][0]["embedding"], "AACAPw==");
    }
}
