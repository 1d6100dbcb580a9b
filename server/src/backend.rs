//! The one seam between a [`Model`](crate::model::Model) and what runs its
//! requests. Today: tensor models (`tensor_model`: validation, queue,
//! dynamic batcher, ONNX Runtime), LLMs (`llm`: tokenizer, generation
//! engine) and encoders (`encoder`: tokenizer, batching by token count,
//! pooling). Frontends never see a backend; they call `Model`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};

use crate::error::InferResult;
use crate::inference::{InferRequest, Reply, ReplyStream};
use crate::runtime::Signature;

/// What a backend tells about itself, fixed once it is loaded.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// The backend's name in the model configuration (`onnxruntime`,
    /// `ferrite_llm`, `ferrite_encoder`).
    pub name: &'static str,
    /// The tensors requests give and answers carry.
    pub signature: Signature,
    /// Inputs a request may leave out.
    pub optional_inputs: Vec<String>,
    /// Largest batch the backend joins requests into; `None` when shapes
    /// pass through as they are.
    pub max_batch_size: Option<usize>,
    /// Further settings worth describing (LLMs: the engine's limits).
    pub parameters: BTreeMap<String, String>,
}

/// Runs the requests of one model version.
pub(crate) trait Backend: Send + Sync + 'static {
    /// The backend's description.
    fn info(&self) -> &BackendInfo;

    /// Runs one request to its whole answer.
    fn infer(&self, request: InferRequest) -> BoxFuture<'_, InferResult<Reply>>;

    /// Runs one request, answering in as many replies as it takes. Errors
    /// found before it starts are returned here; later ones end the stream.
    /// By default: [`Backend::infer`]'s one reply.
    fn infer_stream(self: Arc<Self>, request: InferRequest) -> InferResult<ReplyStream> {
        Ok(stream::once(async move { self.infer(request).await }).boxed())
    }

    /// Stops accepting requests; those already admitted still finish.
    fn close(&self);
}
