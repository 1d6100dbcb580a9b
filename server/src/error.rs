//! The one error type every stage of the data path returns, with the status
//! it maps to on each protocol and a short label for metrics.

use std::fmt;

/// Why a request failed. Each kind maps to one gRPC code and one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Unknown model or version.
    NotFound,
    /// The request does not match the model, or is malformed.
    InvalidArgument,
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
}

impl ErrorKind {
    /// Label used in `ferrite_requests_total{outcome=...}`.
    pub fn metric_label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::QueueFull => tonic::Code::ResourceExhausted,
            ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Cancelled => tonic::Code::Cancelled,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status code.
    pub fn http_status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorKind::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            // nginx's "client closed request": nobody is left to read it.
            ErrorKind::Cancelled => StatusCode::from_u16(499).expect("valid status"),
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
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

impl From<InferError> for tonic::Status {
    fn from(err: InferError) -> Self {
        tonic::Status::new(err.kind.grpc_code(), err.message)
    }
}

/// Shorthand for results of the data path.
pub type InferResult<T> = Result<T, InferError>;
