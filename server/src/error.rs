//! The one error type every stage of the data path returns, with a short
//! label for metrics. Each frontend maps the kinds to its protocol's status
//! codes (`grpc::status`, `http::status`).

use std::fmt;

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Unknown model or version.
    NotFound,
    /// The request does not match the model, or is malformed.
    InvalidArgument,
    /// An LLM prompt and its completion do not fit the context (a kind of
    /// invalid argument that OpenAI's API names apart).
    ContextLengthExceeded,
    /// The model's queue is full.
    QueueFull,
    /// The request's deadline passed while it waited in the queue.
    DeadlineExceeded,
    /// The model exists but is not ready (loading, unloading, shutting down).
    Unavailable,
    /// The client went away before the request ran.
    Cancelled,
    /// The runtime failed to execute a valid request.
    Internal,
    /// The operation is turned off by the server's configuration (a flag
    /// names how to turn it on); no request or credential changes that.
    Disabled,
}

impl ErrorKind {
    /// Label used in `ferrite_requests_total{outcome=...}`.
    pub fn metric_label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidArgument | ErrorKind::ContextLengthExceeded => "invalid_argument",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
            ErrorKind::Disabled => "disabled",
        }
    }
}

/// A failed request: what kind of failure, and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferError {
    pub kind: ErrorKind,
    pub message: String,
}

impl InferError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for InferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for InferError {}

/// Shorthand for results of the data path.
pub(crate) type InferResult<T> = Result<T, InferError>;
