//! LLMs over the Open Inference Protocol (gRPC ModelInfer and
//! ModelStreamInfer, and the KServe v2 REST infer endpoint).
//!
//! Names follow Triton's vLLM and TensorRT-LLM backends, so their clients
//! work unchanged:
//! - input `text_input` BYTES `[1]` (required): the prompt, as plain text
//!   (no chat template);
//! - optional inputs `stream` BOOL `[1]`, `max_tokens` INT32 `[1]`, and
//!   `sampling_parameters` BYTES `[1]` (a JSON object, as vLLM's backend takes);
//! - request parameters `max_tokens`, `temperature`, `top_p`, `top_k`,
//!   `seed`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`,
//!   `stop` (a string, or a JSON list as a string), `stream`;
//! - output `text_output` BYTES `[1]`: the generated text only (vLLM's
//!   `exclude_input_in_output: true`); response parameters `finish_reason`,
//!   `prompt_tokens`, `completion_tokens`, `cached_tokens` (prompt tokens
//!   taken from the prefix cache);
//! - request parameter `logprobs` (0 to 20 alternatives per token): each
//!   reply then has a `logprobs` parameter, a JSON list of its tokens'
//!   entries in OpenAI's chat shape.
//!
//! ModelStreamInfer streams by default: one response per engine step with
//! that step's new text, the last one carrying `triton_final_response: true`
//! (`stream: false` gives one response). Later settings win: the
//! `sampling_parameters` JSON, then the tensors, then the parameters.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use serde_json::Value;

use crate::backend::{Backend, BackendInfo};
use crate::config::ModelSettings;
use crate::error::{InferError, InferResult};
use crate::inference::{InferRequest, ParamValue, Parameters, Reply, ReplyStream};
use crate::llm::config::LlmConfig;
use crate::llm::logprobs::chat_entry;
use crate::llm::request::{Answer, Event, GenerateOptions, TokenLogprob};
use crate::llm::structured::ResponseFormat;
use crate::llm::{Generation, Llm};
use crate::runtime::{Signature, TensorSpec};
use crate::tensor::{DataType, Tensor, TensorData};

pub(crate) const TEXT_INPUT: &str = "text_input";
pub(crate) const TEXT_OUTPUT: &str = "text_output";
pub(crate) const STREAM: &str = "stream";
pub(crate) const MAX_TOKENS: &str = "max_tokens";
pub(crate) const SAMPLING_PARAMETERS: &str = "sampling_parameters";

/// The name of this backend in the model configuration.
pub(crate) const BACKEND_NAME: &str = "ferrite_llm";

/// How an LLM describes itself: the tensors above (every input but
/// `text_input` optional), answers streamed (decoupled, in Triton's
/// words), and the engine's limits.
pub(crate) fn backend_info(config: &LlmConfig, settings: &ModelSettings) -> BackendInfo {
    let parameters = [
        ("decoupled", "true".to_string()),
        ("context_length", config.context_length.to_string()),
        ("max_running_sequences", settings.max_batch_size.to_string()),
        ("max_waiting_sequences", settings.max_queue_size.to_string()),
    ];
    BackendInfo {
        name: BACKEND_NAME,
        signature: signature(),
        optional_inputs: vec![STREAM.into(), MAX_TOKENS.into(), SAMPLING_PARAMETERS.into()],
        max_batch_size: None,
        parameters: parameters.into_iter().map(|(key, value)| (key.to_string(), value)).collect::<BTreeMap<_, _>>(),
    }
}

/// The tensors an LLM takes and answers.
fn signature() -> Signature {
    let spec = |name: &str, datatype| TensorSpec { name: name.to_string(), datatype, shape: vec![1] };
    Signature {
        inputs: vec![
            spec(TEXT_INPUT, DataType::Bytes),
            spec(STREAM, DataType::Bool),
            spec(MAX_TOKENS, DataType::Int32),
            spec(SAMPLING_PARAMETERS, DataType::Bytes),
        ],
        outputs: vec![spec(TEXT_OUTPUT, DataType::Bytes)],
    }
}

/// A decoded LLM request.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct TextRequest {
    pub prompt: String,
    pub options: GenerateOptions,
    pub stream: Option<bool>,
}

/// Reads the prompt and the generation settings of a request.
pub(crate) fn decode(request: &InferRequest) -> InferResult<TextRequest> {
    let mut decoded = TextRequest::default();
    let mut prompt = None;
    for tensor in &request.inputs {
        match tensor.name.as_str() {
            TEXT_INPUT => prompt = Some(single_string(tensor)?),
            SAMPLING_PARAMETERS => {
                let text = single_string(tensor)?;
                let json: serde_json::Map<String, Value> = serde_json::from_str(&text).map_err(|e| {
                    InferError::invalid(format!("input '{SAMPLING_PARAMETERS}' must be a JSON object: {e}"))
                })?;
                for (key, value) in json {
                    let value = json_param(&value).ok_or_else(|| {
                        InferError::invalid(format!("'{SAMPLING_PARAMETERS}': '{key}' has an unsupported value"))
                    })?;
                    apply(&mut decoded, &key, &value)?;
                }
            }
            STREAM => {
                let value = single_scalar(tensor, DataType::Bool)?;
                decoded.stream = Some(value[0] != 0);
            }
            MAX_TOKENS => {
                let value = match tensor.datatype {
                    DataType::Int32 => single_scalar(tensor, DataType::Int32)
                        .map(|b| i32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as i64)?,
                    _ => single_scalar(tensor, DataType::Int64)
                        .map(|b| i64::from_le_bytes(b[..8].try_into().expect("8 bytes")))?,
                };
                apply(&mut decoded, MAX_TOKENS, &ParamValue::Int(value))?;
            }
            other => {
                return Err(InferError::invalid(format!(
                    "unexpected input '{other}': an LLM takes '{TEXT_INPUT}' (BYTES) and optionally '{STREAM}', \
                     '{MAX_TOKENS}', '{SAMPLING_PARAMETERS}'"
                )))
            }
        }
    }
    for (key, value) in &request.parameters {
        apply(&mut decoded, key, value)?;
    }
    decoded.prompt =
        prompt.ok_or_else(|| InferError::invalid(format!("missing input '{TEXT_INPUT}' (BYTES, shape [1])")))?;
    for name in &request.outputs {
        if name != TEXT_OUTPUT {
            return Err(InferError::invalid(format!("unknown output '{name}': an LLM has only '{TEXT_OUTPUT}'")));
        }
    }
    Ok(decoded)
}

/// Sets one named setting; unknown names are ignored (clients send their
/// own, such as `priority` or `triton_enable_empty_final_response`).
fn apply(request: &mut TextRequest, key: &str, value: &ParamValue) -> InferResult<()> {
    let options = &mut request.options;
    match key {
        "max_tokens" => options.max_tokens = Some(as_count(key, value)?),
        "top_k" => options.top_k = Some(as_count(key, value)?),
        "logprobs" => options.logprobs = Some(as_count(key, value)?),
        "seed" => options.seed = Some(as_int(key, value)? as u64),
        "temperature" => options.temperature = Some(as_float(key, value)?),
        "top_p" => options.top_p = Some(as_float(key, value)?),
        "repetition_penalty" => options.repetition_penalty = Some(as_float(key, value)?),
        "presence_penalty" => options.presence_penalty = Some(as_float(key, value)?),
        "frequency_penalty" => options.frequency_penalty = Some(as_float(key, value)?),
        "stream" => match value {
            ParamValue::Bool(b) => request.stream = Some(*b),
            _ => return Err(InferError::invalid("parameter 'stream' must be a boolean")),
        },
        "stop" => options.stop = as_strings(key, value)?,
        "ignore_eos" => match value {
            ParamValue::Bool(b) => options.ignore_eos = *b,
            _ => return Err(InferError::invalid("parameter 'ignore_eos' must be a boolean")),
        },
        // OpenAI's `response_format` object, written as a JSON string.
        "response_format" => match value {
            ParamValue::Str(text) => options.response_format = ResponseFormat::from_text(text)?,
            _ => return Err(InferError::invalid("parameter 'response_format' must be a string holding JSON")),
        },
        _ => {}
    }
    Ok(())
}

fn as_int(key: &str, value: &ParamValue) -> InferResult<i64> {
    match value {
        ParamValue::Int(v) => Ok(*v),
        _ => Err(InferError::invalid(format!("parameter '{key}' must be an integer"))),
    }
}

fn as_count(key: &str, value: &ParamValue) -> InferResult<usize> {
    usize::try_from(as_int(key, value)?)
        .map_err(|_| InferError::invalid(format!("parameter '{key}' must not be negative")))
}

fn as_float(key: &str, value: &ParamValue) -> InferResult<f32> {
    match value {
        ParamValue::Float(v) => Ok(*v as f32),
        ParamValue::Int(v) => Ok(*v as f32),
        _ => Err(InferError::invalid(format!("parameter '{key}' must be a number"))),
    }
}

/// `stop`: one string, or a JSON list of strings written as a string.
fn as_strings(key: &str, value: &ParamValue) -> InferResult<Vec<String>> {
    let ParamValue::Str(text) = value else {
        return Err(InferError::invalid(format!("parameter '{key}' must be a string")));
    };
    if text.starts_with('[') {
        if let Ok(list) = serde_json::from_str::<Vec<String>>(text) {
            return Ok(list);
        }
    }
    Ok(vec![text.clone()])
}

/// A JSON value as a parameter (lists of strings become a JSON string).
fn json_param(value: &Value) -> Option<ParamValue> {
    Some(match value {
        Value::Bool(b) => ParamValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => ParamValue::Int(i),
            None => ParamValue::Float(n.as_f64()?),
        },
        Value::String(s) => ParamValue::Str(s.clone()),
        // Lists (`stop`) and objects (`response_format`) travel as JSON text.
        Value::Array(_) | Value::Object(_) => ParamValue::Str(value.to_string()),
        _ => return None,
    })
}

/// The one element of a BYTES `[1]` tensor, as UTF-8.
fn single_string(tensor: &Tensor) -> InferResult<String> {
    let name = &tensor.name;
    if tensor.datatype != DataType::Bytes || tensor.element_count() != 1 {
        return Err(InferError::invalid(format!("input '{name}' must be BYTES with one element (shape [1])")));
    }
    let TensorData::Strings(items) = &tensor.data else {
        return Err(InferError::invalid(format!("input '{name}' must be BYTES")));
    };
    String::from_utf8(items[0].to_vec()).map_err(|_| InferError::invalid(format!("input '{name}' must be UTF-8")))
}

/// The raw bytes of a one-element tensor of `datatype`.
fn single_scalar(tensor: &Tensor, datatype: DataType) -> InferResult<Bytes> {
    let name = &tensor.name;
    match &tensor.data {
        TensorData::Raw(raw) if tensor.datatype == datatype && tensor.element_count() == 1 => Ok(raw.clone()),
        _ => Err(InferError::invalid(format!("input '{name}' must be {datatype} with one element (shape [1])"))),
    }
}

/// Starts generating for an OIP request (the prompt tokenized off the
/// async workers).
async fn start(llm: &Llm, request: &InferRequest) -> InferResult<(TextRequest, Generation)> {
    let mut decoded = decode(request)?;
    let prompt = llm.text_prompt(std::mem::take(&mut decoded.prompt)).await?;
    let generation = llm.generate(prompt, &decoded.options).await?;
    Ok((decoded, generation))
}

/// The replies of a started generation: one per engine step, or one in all
/// when the request sets `stream: false`.
pub(crate) fn replies(decoded: TextRequest, generation: Generation) -> ReplyStream {
    if decoded.stream == Some(false) {
        let once = async move { Ok(final_reply(generation.collect().await?, Some(true))) };
        return stream::once(once).boxed();
    }
    stream::unfold(Some(generation), |state| async move {
        let mut generation = state?;
        let item = match generation.next().await? {
            Event::Text { text, logprobs } => Ok(delta(text, &logprobs)),
            Event::Done { text, logprobs, finish_reason, usage } => {
                let answer = Answer { text, logprobs, finish_reason, usage };
                return Some((Ok(final_reply(answer, Some(true))), None));
            }
            Event::Error(error) => return Some((Err(error), None)),
        };
        Some((item, Some(generation)))
    })
    .boxed()
}

impl Backend for Llm {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// ModelInfer: generates the whole answer, returns it in one reply.
    fn infer(&self, request: InferRequest) -> BoxFuture<'_, InferResult<Reply>> {
        Box::pin(async move {
            let (_, generation) = start(self, &request).await?;
            Ok(final_reply(generation.collect().await?, None))
        })
    }

    /// ModelStreamInfer: one reply per engine step (unless the request
    /// sets `stream: false`). Errors before the first token, tokenizing
    /// included, are the stream's first item.
    fn infer_stream(self: Arc<Self>, request: InferRequest) -> InferResult<ReplyStream> {
        let started = async move { start(&self, &request).await };
        Ok(stream::once(started)
            .flat_map(|started| match started {
                Ok((decoded, generation)) => replies(decoded, generation),
                Err(error) => stream::once(futures::future::ready(Err(error))).boxed(),
            })
            .boxed())
    }

    fn close(&self) {
        Llm::close(self);
    }
}

/// A streamed piece of text.
fn delta(text: String, logprobs: &[TokenLogprob]) -> Reply {
    let mut parameters = Parameters::new();
    parameters.insert("triton_final_response".into(), ParamValue::Bool(false));
    add_logprobs(&mut parameters, logprobs);
    Reply { outputs: vec![text_tensor(text)], parameters }
}

/// The `logprobs` parameter: the entries as a JSON list (when asked for).
fn add_logprobs(parameters: &mut Parameters, logprobs: &[TokenLogprob]) {
    if !logprobs.is_empty() {
        let list = Value::Array(logprobs.iter().map(chat_entry).collect());
        parameters.insert("logprobs".into(), ParamValue::Str(list.to_string()));
    }
}

/// The final (or only) reply, with the finish reason and token counts.
pub(crate) fn final_reply(answer: Answer, final_flag: Option<bool>) -> Reply {
    let Answer { text, logprobs, finish_reason, usage } = answer;
    let mut parameters = Parameters::new();
    add_logprobs(&mut parameters, &logprobs);
    parameters.insert("finish_reason".into(), ParamValue::Str(finish_reason.as_str().into()));
    parameters.insert("prompt_tokens".into(), ParamValue::Int(usage.prompt_tokens as i64));
    parameters.insert("completion_tokens".into(), ParamValue::Int(usage.completion_tokens as i64));
    parameters.insert("cached_tokens".into(), ParamValue::Int(usage.cached_tokens as i64));
    if let Some(flag) = final_flag {
        parameters.insert("triton_final_response".into(), ParamValue::Bool(flag));
    }
    Reply { outputs: vec![text_tensor(text)], parameters }
}

fn text_tensor(text: String) -> Tensor {
    Tensor {
        name: TEXT_OUTPUT.to_string(),
        datatype: DataType::Bytes,
        shape: vec![1],
        data: TensorData::Strings(vec![Bytes::from(text)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_input(name: &str, text: &str) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::Bytes,
            shape: vec![1],
            data: TensorData::Strings(vec![Bytes::from(text.to_string())]),
        }
    }

    #[test]
    fn prompt_and_settings_from_inputs_and_parameters() {
        let mut request = InferRequest {
            inputs: vec![
                bytes_input(TEXT_INPUT, "Hello"),
                bytes_input(SAMPLING_PARAMETERS, r#"{"temperature": 0.5, "max_tokens": 9, "stop": ["a", "b"]}"#),
                Tensor {
                    name: STREAM.into(),
                    datatype: DataType::Bool,
                    shape: vec![1],
                    data: TensorData::Raw(Bytes::from_static(&[1])),
                },
            ],
            ..Default::default()
        };
        request.parameters.insert("max_tokens".into(), ParamValue::Int(12));
        request.parameters.insert("top_k".into(), ParamValue::Int(5));
        request.parameters.insert("stop".into(), ParamValue::Str("\n".into()));
        request.parameters.insert("priority".into(), ParamValue::Int(1));
        let decoded = decode(&request).unwrap();
        assert_eq!(decoded.prompt, "Hello");
        assert_eq!(decoded.stream, Some(true));
        assert_eq!(decoded.options.temperature, Some(0.5));
        assert_eq!(decoded.options.max_tokens, Some(12));
        assert_eq!(decoded.options.top_k, Some(5));
        assert_eq!(decoded.options.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let err = |request: InferRequest| decode(&request).unwrap_err().message;
        assert!(err(InferRequest::default()).contains("missing input 'text_input'"));
        let mut request = InferRequest { inputs: vec![bytes_input("prompt", "x")], ..Default::default() };
        assert!(err(request).contains("unexpected input 'prompt'"));
        request = InferRequest { inputs: vec![bytes_input(TEXT_INPUT, "x")], ..Default::default() };
        request.parameters.insert("max_tokens".into(), ParamValue::Str("many".into()));
        assert!(err(request).contains("'max_tokens' must be an integer"));
        let request = InferRequest {
            inputs: vec![bytes_input(TEXT_INPUT, "x"), bytes_input(SAMPLING_PARAMETERS, "nope")],
            ..Default::default()
        };
        assert!(err(request).contains("JSON object"));
        let request = InferRequest {
            inputs: vec![bytes_input(TEXT_INPUT, "x")],
            outputs: vec!["logits".into()],
            ..Default::default()
        };
        assert!(err(request).contains("unknown output 'logits'"));
    }
}
