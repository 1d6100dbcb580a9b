//! Tower layers of the gRPC port.
//!
//! [`OversizeAsInvalidArgumentLayer`] reports messages over the size limit
//! as INVALID_ARGUMENT: tonic refuses a message larger than
//! `max_decoding_message_size` before our handler runs, with OUT_OF_RANGE
//! in a trailers-only response. Bad input is INVALID_ARGUMENT everywhere
//! else in ferrite, so this layer rewrites exactly that status (and nothing
//! else) in the response headers.
//!
//! [`BudgetLayer`] counts every request against the in-flight bytes budget
//! (`crate::budget`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Request, Response};

use crate::budget::{BoxError, Budget, Counted, Held};
use crate::error::InferError;

/// The tower layer; add it to the tonic server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OversizeAsInvalidArgumentLayer;

impl<S> tower::Layer<S> for OversizeAsInvalidArgumentLayer {
    type Service = OversizeAsInvalidArgument<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OversizeAsInvalidArgument(inner)
    }
}

/// The service that `OversizeAsInvalidArgumentLayer` wraps around.
#[derive(Debug, Clone)]
pub(crate) struct OversizeAsInvalidArgument<S>(S);

impl<S, B, R> tower::Service<Request<B>> for OversizeAsInvalidArgument<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite_oversize(response.headers_mut());
            Ok(response)
        })
    }
}

/// Counts each request's body against the budget until its response is
/// sent (a refusal is RESOURCE_EXHAUSTED), and gives the message of a unary
/// inference call `body_timeout` to arrive (DEADLINE_EXCEEDED). A
/// ModelStreamInfer stream is left to its handler, which holds each
/// message's bytes (a stream may run for hours).
#[derive(Debug, Clone)]
pub(crate) struct BudgetLayer {
    pub budget: Arc<Budget>,
    pub body_timeout: Duration,
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = BudgetService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BudgetService { inner, limits: self.clone() }
    }
}

/// The service of [`BudgetLayer`].
#[derive(Debug, Clone)]
pub(crate) struct BudgetService<S> {
    inner: S,
    limits: BudgetLayer,
}

/// Paths of the inference service's methods, and its one stream.
const INFERENCE_SERVICE: &str = "/inference.GRPCInferenceService/";
const STREAM_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

impl<S, R> tower::Service<Request<tonic::body::Body>> for BudgetService<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<Held<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let hold = Arc::new(self.limits.budget.hold());
        let path = request.uri().path();
        let request = if path == STREAM_INFER_PATH {
            request
        } else {
            // Health and reflection streams may stay open: no timeout there.
            let timeout = path.starts_with(INFERENCE_SERVICE).then_some(self.limits.body_timeout);
            let refuse = |error: InferError| -> BoxError { Box::new(tonic::Status::from(error)) };
            let hold = hold.clone();
            request.map(|body| tonic::body::Body::new(Counted::new(body, hold, timeout, refuse)))
        };
        let response = self.inner.call(request);
        Box::pin(async move { Ok(response.await?.map(|body| Held::new(body, hold))) })
    }
}

const OUT_OF_RANGE: &str = "11";
const INVALID_ARGUMENT: &str = "3";

fn rewrite_oversize(headers: &mut HeaderMap) {
    let is_oversize = headers.get("grpc-status").is_some_and(|s| s == OUT_OF_RANGE)
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("length%20too%20large") || m.contains("length too large"));
    if !is_oversize {
        return;
    }
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or_default();
    // "found N bytes, the limit is: M bytes" stays in the message.
    let detail = message.split_once("found").map(|(_, rest)| rest).unwrap_or("");
    let rewritten = format!("the request message is too large for this server:{detail}").replace(' ', "%20");
    headers.insert("grpc-status", HeaderValue::from_static(INVALID_ARGUMENT));
    if let Ok(value) = HeaderValue::from_str(&rewritten) {
        headers.insert("grpc-message", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_oversize_out_of_range_is_rewritten() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static("11"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("Error,%20decoded%20message%20length%20too%20large:%20found%2010%20bytes"),
        );
        rewrite_oversize(&mut headers);
        assert_eq!(headers["grpc-status"], "3");
        assert!(headers["grpc-message"].to_str().unwrap().contains("too%20large"));

        let mut other = HeaderMap::new();
        other.insert("grpc-status", HeaderValue::from_static("11"));
        other.insert("grpc-message", HeaderValue::from_static("something%20else"));
        rewrite_oversize(&mut other);
        assert_eq!(other["grpc-status"], "11");
    }
}
