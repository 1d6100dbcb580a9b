//! What every frontend shares: the repository, the policy of what clients
//! may do, and whether the server is shutting down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::stream::BoxStream;

use crate::budget::Budget;
use crate::error::{ErrorKind, InferError, InferResult};
use crate::inference::{InferRequest, InferResponse};
use crate::model::Model;
use crate::policy::Policy;
use crate::repository::Repository;

/// Server-wide state handed to the gRPC and HTTP frontends.
pub(crate) struct ServerState {
    pub repository: Arc<Repository>,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// What clients may do beyond inference (load/unload, priority).
    policy: Policy,
    /// The in-flight bytes budget every request is counted against.
    pub budget: Arc<Budget>,
    shutting_down: AtomicBool,
}

impl ServerState {
    pub(crate) fn new(
        repository: Arc<Repository>,
        max_message_bytes: usize,
        policy: Policy,
        budget: Arc<Budget>,
    ) -> Self {
        ServerState { repository, max_message_bytes, policy, budget, shutting_down: AtomicBool::new(false) }
    }

    /// Ready: not shutting down, and every model loaded.
    pub(crate) fn ready(&self) -> bool {
        !self.is_shutting_down() && self.repository.all_ready()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The model version a request addresses, if it may take requests.
    pub(crate) fn model(&self, name: &str, version: &str) -> InferResult<Arc<Model>> {
        if self.is_shutting_down() {
            return Err(InferError::new(ErrorKind::Unavailable, "the server is shutting down"));
        }
        self.repository.get(name, version)
    }

    /// Whether a model serves: `Ok(false)` for a known model that does not
    /// (loading, unloaded, failed, shutting down), NOT_FOUND for a model or
    /// version this server does not know.
    pub(crate) fn model_ready(&self, name: &str, version: &str) -> InferResult<bool> {
        match self.model(name, version) {
            Ok(_) => Ok(true),
            Err(error) if error.kind == ErrorKind::NotFound && !self.repository.knows(name, version) => Err(error),
            Err(_) => Ok(false),
        }
    }

    /// Runs one request on the model it names.
    pub(crate) async fn infer(
        &self,
        name: &str,
        version: &str,
        mut request: InferRequest,
    ) -> InferResult<InferResponse> {
        let model = self.model(name, version)?;
        self.policy.apply_priority(&mut request);
        model.infer(request).await
    }

    /// Starts one request whose answers stream (one per generation step
    /// for an LLM, one for a tensor model).
    pub(crate) fn infer_stream(
        &self,
        name: &str,
        version: &str,
        mut request: InferRequest,
    ) -> InferResult<BoxStream<'static, InferResult<InferResponse>>> {
        let model = self.model(name, version)?;
        self.policy.apply_priority(&mut request);
        model.infer_stream(request)
    }

    /// Loads (or reloads) a model, if `--model-control-mode` allows it.
    pub(crate) async fn load(&self, name: &str) -> InferResult<()> {
        self.policy.check_model_control("load", name)?;
        self.repository.load(name).await
    }

    /// Unloads a model, if `--model-control-mode` allows it.
    pub(crate) async fn unload(&self, name: &str) -> InferResult<()> {
        self.policy.check_model_control("unload", name)?;
        self.repository.unload(name).await
    }
}
