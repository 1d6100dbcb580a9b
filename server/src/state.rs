//! What every frontend shares: the repository and whether the server is
//! shutting down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::budget::Budget;
use crate::error::{ErrorKind, InferError, InferResult};
use crate::inference::{InferRequest, InferResponse};
use crate::model::Model;
use crate::repository::Repository;

/// Server-wide state handed to the gRPC and HTTP frontends.
pub(crate) struct ServerState {
    pub repository: Arc<Repository>,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// The in-flight bytes budget every request is counted against.
    pub budget: Arc<Budget>,
    shutting_down: AtomicBool,
}

impl ServerState {
    pub(crate) fn new(repository: Arc<Repository>, max_message_bytes: usize, budget: Arc<Budget>) -> Self {
        ServerState { repository, max_message_bytes, budget, shutting_down: AtomicBool::new(false) }
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

    /// Runs one request on the model it names.
    pub(crate) async fn infer(&self, name: &str, version: &str, request: InferRequest) -> InferResult<InferResponse> {
        let model = self.model(name, version)?;
        model.infer(request).await
    }
}
