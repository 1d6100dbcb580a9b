//! Requests and answers in protocol-neutral form: what the frontends
//! (`grpc`, `http`) build from their messages and what every backend
//! answers. Nothing here knows a protocol or a backend.

use std::collections::BTreeMap;
use std::time::Instant;

use futures::stream::BoxStream;

use crate::error::InferResult;
use crate::tensor::Tensor;

/// Queue priority: high-priority requests always leave the queue first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Ahead of every normal request.
    High,
    /// The default.
    #[default]
    Normal,
}

/// An inference request.
#[derive(Debug, Default)]
pub struct InferRequest {
    /// The client's request id, echoed in the answer.
    pub id: String,
    /// Input tensors, in any order.
    pub inputs: Vec<Tensor>,
    /// Outputs to return, in order; empty means every output.
    pub outputs: Vec<String>,
    /// Queue priority.
    pub priority: Priority,
    /// Latest time the request may start running.
    pub deadline: Option<Instant>,
    /// Request parameters (the protocol's `parameters` map): read by LLMs
    /// (`max_tokens`, `temperature`, ...); tensor models use only
    /// `priority` and `timeout`, which arrive decoded above.
    pub parameters: Parameters,
}

/// A request or response parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
}

/// Named parameters of a request or response.
pub(crate) type Parameters = BTreeMap<String, ParamValue>;

/// What a backend answers to one request (or one step of a streamed one).
#[derive(Debug, Default)]
pub(crate) struct Reply {
    /// Output tensors, in the order requested.
    pub outputs: Vec<Tensor>,
    /// Response parameters (LLMs: `finish_reason`, token counts, and
    /// `triton_final_response` when streaming).
    pub parameters: Parameters,
}

/// The answer to an [`InferRequest`]: a [`Reply`] with the model and
/// request it belongs to.
#[derive(Debug)]
pub struct InferResponse {
    /// The model's name.
    pub model_name: String,
    /// The version that answered.
    pub model_version: String,
    /// The request's id.
    pub id: String,
    /// Output tensors, in the order requested.
    pub outputs: Vec<Tensor>,
    /// Response parameters.
    pub parameters: Parameters,
}

/// Replies to one request, answered step by step (LLMs stream one per
/// generation step; other backends answer once).
pub(crate) type ReplyStream = BoxStream<'static, InferResult<Reply>>;
