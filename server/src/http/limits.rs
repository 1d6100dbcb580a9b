//! What the HTTP port adds to every request: the in-flight bytes budget
//! (`crate::budget`) and the body read timeout, and how their failures
//! reach the client (429, 408).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::budget::{BoxError, Budget, Counted, Held};
use crate::error::{ErrorKind, InferError};
use crate::state::ServerState;

/// Counts each request against the budget until its response is sent, and
/// bounds the time its body may take (`axum::middleware::from_fn_with_state`).
pub(crate) async fn middleware(
    axum::extract::State((budget, body_timeout)): axum::extract::State<(Arc<Budget>, Duration)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let hold = Arc::new(budget.hold());
    // A declared length that does not fit now is refused before the body is
    // read. It is not reserved: only bytes received are held, so a client
    // that declares much and sends little (slowly) holds little.
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| !budget.has_room(length)) {
        return super::error_response(budget.refusal());
    }
    let counted = hold.clone();
    let refuse = |error: InferError| -> BoxError { Box::new(error) };
    let request = request.map(|body| axum::body::Body::new(Counted::new(body, counted, Some(body_timeout), refuse)));
    let response = next.run(request).await;
    response.map(|body| axum::body::Body::new(Held::new(body, hold)))
}

/// A request's body, read within the budget and the body timeout; a body
/// that cannot be read is answered by [`body_error`] before the handler runs.
pub(crate) struct ReadBody(pub(crate) Bytes);

impl FromRequest<Arc<ServerState>> for ReadBody {
    type Rejection = Response;

    async fn from_request(request: Request, state: &Arc<ServerState>) -> Result<Self, Response> {
        Bytes::from_request(request, state)
            .await
            .map(ReadBody)
            .map_err(|rejection| body_error(&rejection, state.max_message_bytes))
    }
}

/// Why a body could not be read: the budget (429) or the body timeout
/// (408, not the 504 of a deadline passed in the queue), both found in the
/// error's sources, or else a bad body (400).
fn body_error(rejection: &BytesRejection, limit: usize) -> Response {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if let Some(refused) = error.downcast_ref::<InferError>() {
            if refused.kind == ErrorKind::DeadlineExceeded {
                return (StatusCode::REQUEST_TIMEOUT, Json(json!({"error": refused.message}))).into_response();
            }
            return super::error_response(refused.clone());
        }
        source = error.source();
    }
    super::error_response(InferError::invalid(format!(
        "cannot read the request body (the limit is {limit} bytes): {rejection}"
    )))
}
