//! Encoders over the Open Inference Protocol (gRPC ModelInfer and the
//! KServe v2 REST infer endpoint):
//! - embedding: BYTES `text_input` `[N]` -> FP32 `embedding` `[N, D]`;
//! - classification: BYTES `text_input` `[N]` -> FP32 `scores` `[N, L]`
//!   (probabilities; the labels are the model configuration's `labels`
//!   parameter, a JSON list);
//! - rerank: BYTES `query` `[1]` and `text_input` `[N]` -> FP32 `scores` `[N]`.
//!
//! Request parameters: `truncate` (bool; inputs longer than `max_length`
//! are refused without it), `truncation_direction` (`right`, `left`),
//! `normalize` (bool) and `dimensions` (int) for embeddings, `raw_scores`
//! (bool: logits instead of probabilities). The reply's parameter
//! `prompt_tokens` counts the tokens.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::config::{EncoderConfig, Side, Task};
use super::queue::Limits;
use super::tokenize::{Input, Truncation};
use super::{EmbedOptions, EncodeRequest, Encoder};
use crate::backend::{Backend, BackendInfo};
use crate::error::{InferError, InferResult};
use crate::inference::{InferRequest, ParamValue, Reply};
use crate::runtime::{Signature, TensorSpec};
use crate::tensor::{DataType, Tensor, TensorData};

/// Input: the texts.
pub(crate) const TEXT_INPUT: &str = "text_input";
/// Input of a reranker: the query.
pub(crate) const QUERY: &str = "query";
/// Output of an embedding model.
pub(crate) const EMBEDDING: &str = "embedding";
/// Output of a classifier or reranker.
pub(crate) const SCORES: &str = "scores";

/// The name of this backend in the model configuration.
pub(crate) const BACKEND_NAME: &str = "ferrite_encoder";

/// How an encoder describes itself: its tensors and settings.
pub(crate) fn backend_info(config: &EncoderConfig, width: usize, limits: &Limits) -> BackendInfo {
    let spec = |name: &str, datatype, shape: Vec<i64>| TensorSpec { name: name.to_string(), datatype, shape };
    let texts = spec(TEXT_INPUT, DataType::Bytes, vec![-1]);
    let signature = match config.task {
        Task::Embedding => {
            Signature { inputs: vec![texts], outputs: vec![spec(EMBEDDING, DataType::Fp32, vec![-1, width as i64])] }
        }
        Task::Classification => {
            Signature { inputs: vec![texts], outputs: vec![spec(SCORES, DataType::Fp32, vec![-1, width as i64])] }
        }
        Task::Rerank => Signature {
            inputs: vec![spec(QUERY, DataType::Bytes, vec![1]), texts],
            outputs: vec![spec(SCORES, DataType::Fp32, vec![-1])],
        },
    };
    let mut parameters = BTreeMap::from([
        ("task".to_string(), config.task.as_str().to_string()),
        ("max_length".to_string(), config.max_length.to_string()),
        ("max_batch_tokens".to_string(), limits.max_batch_tokens.to_string()),
        ("max_batch_inputs".to_string(), limits.max_batch_inputs.to_string()),
    ]);
    match config.task {
        Task::Embedding => {
            let pooling = format!("{:?}", config.pooling()).to_lowercase();
            parameters.insert("pooling".into(), pooling);
            parameters.insert("normalize".into(), config.normalize.to_string());
            let mut dimensions = config.dimensions.clone();
            dimensions.push(width);
            dimensions.sort_unstable();
            dimensions.dedup();
            parameters.insert("dimensions".into(), serde_json::to_string(&dimensions).unwrap_or_default());
        }
        Task::Classification => {
            parameters.insert("labels".into(), serde_json::to_string(&config.labels).unwrap_or_default());
        }
        Task::Rerank => {}
    }
    BackendInfo { name: BACKEND_NAME, signature, optional_inputs: Vec::new(), max_batch_size: None, parameters }
}

impl Backend for Encoder {
    fn info(&self) -> &BackendInfo {
        Encoder::info(self)
    }

    fn infer(&self, request: InferRequest) -> BoxFuture<'_, InferResult<Reply>> {
        Box::pin(async move {
            let decoded = decode(&request, self.task())?;
            let truncation =
                Truncation { truncate: decoded.truncate, side: decoded.side.unwrap_or(self.config.truncation_side) };
            let count = decoded.texts.len() as i64;
            let (tensor, tokens) = match self.task() {
                Task::Embedding => {
                    let options = EmbedOptions { normalize: decoded.normalize, dimensions: decoded.dimensions };
                    let inputs = decoded.texts.into_iter().map(Input::Text).collect();
                    let request =
                        EncodeRequest { inputs, truncation, priority: request.priority, deadline: request.deadline };
                    let encoded = self.embed(request, options).await?;
                    let width = encoded.rows.first().map_or(0, Vec::len) as i64;
                    (fp32(EMBEDDING, vec![count, width], &encoded.rows), encoded.tokens)
                }
                Task::Classification => {
                    let inputs = decoded.texts.into_iter().map(Input::Text).collect();
                    let request =
                        EncodeRequest { inputs, truncation, priority: request.priority, deadline: request.deadline };
                    let encoded = self.classify(request, decoded.raw_scores).await?;
                    (fp32(SCORES, vec![count, self.width() as i64], &encoded.rows), encoded.tokens)
                }
                Task::Rerank => {
                    let query = decoded.query.unwrap_or_default();
                    let (scores, tokens) = self.rerank(&query, decoded.texts, truncation, decoded.raw_scores).await?;
                    (fp32(SCORES, vec![count], &[scores]), tokens)
                }
            };
            let parameters = BTreeMap::from([("prompt_tokens".to_string(), ParamValue::Int(tokens as i64))]);
            Ok(Reply { outputs: vec![tensor], parameters })
        })
    }

    fn close(&self) {
        Encoder::close(self);
    }
}

/// An FP32 tensor of the rows, joined.
fn fp32(name: &str, shape: Vec<i64>, rows: &[Vec<f32>]) -> Tensor {
    let raw: Vec<u8> = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    Tensor { name: name.to_string(), datatype: DataType::Fp32, shape, data: TensorData::Raw(Bytes::from(raw)) }
}

/// A decoded encoder request.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Decoded {
    pub texts: Vec<String>,
    pub query: Option<String>,
    pub truncate: bool,
    pub side: Option<Side>,
    pub normalize: Option<bool>,
    pub dimensions: Option<usize>,
    pub raw_scores: bool,
}

/// Reads the texts (and a reranker's query) and the parameters of a request.
pub(crate) fn decode(request: &InferRequest, task: Task) -> InferResult<Decoded> {
    let mut decoded = Decoded::default();
    for tensor in &request.inputs {
        match tensor.name.as_str() {
            TEXT_INPUT => decoded.texts = strings(tensor)?,
            QUERY if task == Task::Rerank => {
                let mut query = strings(tensor)?;
                if query.len() != 1 {
                    return Err(InferError::invalid(format!(
                        "input '{QUERY}' must hold one text, not {}",
                        query.len()
                    )));
                }
                decoded.query = query.pop();
            }
            other => {
                let expected = match task {
                    Task::Rerank => format!("'{QUERY}' and '{TEXT_INPUT}' (BYTES)"),
                    Task::Embedding | Task::Classification => format!("'{TEXT_INPUT}' (BYTES)"),
                };
                return Err(InferError::invalid(format!("unexpected input '{other}': this model takes {expected}")));
            }
        }
    }
    if !request.inputs.iter().any(|t| t.name == TEXT_INPUT) {
        return Err(InferError::invalid(format!("missing input '{TEXT_INPUT}' (BYTES, one text per element)")));
    }
    if task == Task::Rerank && decoded.query.is_none() {
        return Err(InferError::invalid(format!("missing input '{QUERY}' (BYTES, shape [1])")));
    }
    let output = if task == Task::Embedding { EMBEDDING } else { SCORES };
    if let Some(other) = request.outputs.iter().find(|name| *name != output) {
        return Err(InferError::invalid(format!("unknown output '{other}': this model has only '{output}'")));
    }
    for (key, value) in &request.parameters {
        let flag = || match value {
            ParamValue::Bool(b) => Ok(*b),
            _ => Err(InferError::invalid(format!("parameter '{key}' must be a boolean"))),
        };
        match key.as_str() {
            "truncate" => decoded.truncate = flag()?,
            "raw_scores" => decoded.raw_scores = flag()?,
            "normalize" => decoded.normalize = Some(flag()?),
            "dimensions" => match value {
                ParamValue::Int(d) if *d > 0 => decoded.dimensions = Some(*d as usize),
                _ => return Err(InferError::invalid("parameter 'dimensions' must be a positive integer")),
            },
            "truncation_direction" => {
                decoded.side = Some(match value {
                    ParamValue::Str(s) if s.eq_ignore_ascii_case("right") => Side::Right,
                    ParamValue::Str(s) if s.eq_ignore_ascii_case("left") => Side::Left,
                    _ => return Err(InferError::invalid("parameter 'truncation_direction' must be 'right' or 'left'")),
                })
            }
            // Others (priority, timeout, clients' own) are not the encoder's.
            _ => {}
        }
    }
    Ok(decoded)
}

/// The elements of a BYTES tensor as UTF-8 texts.
fn strings(tensor: &Tensor) -> InferResult<Vec<String>> {
    let TensorData::Strings(items) = &tensor.data else {
        return Err(InferError::invalid(format!(
            "input '{}' must be BYTES (UTF-8 text), not {}",
            tensor.name, tensor.datatype
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            String::from_utf8(item.to_vec())
                .map_err(|_| InferError::invalid(format!("input '{}': element {i} is not UTF-8", tensor.name)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(name: &str, items: &[&str]) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::Bytes,
            shape: vec![items.len() as i64],
            data: TensorData::Strings(items.iter().map(|s| Bytes::from(s.to_string())).collect()),
        }
    }

    fn request(inputs: Vec<Tensor>, parameters: &[(&str, ParamValue)]) -> InferRequest {
        InferRequest {
            inputs,
            parameters: parameters.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn texts_query_and_parameters_are_read() {
        let r = request(
            vec![bytes(TEXT_INPUT, &["a", "b"])],
            &[
                ("truncate", ParamValue::Bool(true)),
                ("dimensions", ParamValue::Int(128)),
                ("priority", ParamValue::Int(1)),
            ],
        );
        let d = decode(&r, Task::Embedding).unwrap();
        assert_eq!(d.texts, vec!["a", "b"]);
        assert!(d.truncate);
        assert_eq!(d.dimensions, Some(128));
        let r = request(vec![bytes(QUERY, &["q"]), bytes(TEXT_INPUT, &["t"])], &[]);
        assert_eq!(decode(&r, Task::Rerank).unwrap().query.as_deref(), Some("q"));
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let err = |r: InferRequest, task| decode(&r, task).unwrap_err().message;
        assert!(err(request(vec![], &[]), Task::Embedding).contains("missing input 'text_input'"));
        assert!(err(request(vec![bytes(TEXT_INPUT, &["t"])], &[]), Task::Rerank).contains("missing input 'query'"));
        assert!(err(request(vec![bytes(QUERY, &["q"]), bytes(TEXT_INPUT, &["t"])], &[]), Task::Embedding)
            .contains("unexpected input 'query'"));
        assert!(err(request(vec![bytes(QUERY, &["a", "b"]), bytes(TEXT_INPUT, &["t"])], &[]), Task::Rerank)
            .contains("one text"));
        let mut not_text = bytes(TEXT_INPUT, &["x"]);
        not_text.data = TensorData::Strings(vec![Bytes::from_static(&[0xff])]);
        assert!(err(request(vec![not_text], &[]), Task::Embedding).contains("not UTF-8"));
        let fp = Tensor {
            name: TEXT_INPUT.into(),
            datatype: DataType::Fp32,
            shape: vec![1],
            data: TensorData::Raw(Bytes::from(vec![0u8; 4])),
        };
        assert!(err(request(vec![fp], &[]), Task::Embedding).contains("must be BYTES"));
        assert!(err(request(vec![bytes(TEXT_INPUT, &["t"])], &[("truncate", ParamValue::Int(1))]), Task::Embedding)
            .contains("'truncate' must be a boolean"));
        assert!(err(request(vec![bytes(TEXT_INPUT, &["t"])], &[("dimensions", ParamValue::Int(0))]), Task::Embedding)
            .contains("positive"));
        let mut r = request(vec![bytes(TEXT_INPUT, &["t"])], &[]);
        r.outputs = vec!["scores".into()];
        assert!(err(r, Task::Embedding).contains("unknown output 'scores'"));
    }
}
