//! API keys (`--api-key-file`): with keys configured, every call on the
//! gRPC and HTTP ports must carry `authorization: Bearer <key>`, except
//! health (`grpc.health.v1`, ServerLive/ServerReady, `/v2/health/*`), which
//! probes and load balancers call without credentials. The metrics port
//! never asks.
//!
//! Keys are kept as SHA-256 digests and compared in constant time, so
//! neither a key's content nor its length shows in response times. No key
//! is ever logged.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// HTTP paths served without a key (health, for probes).
const OPEN_HTTP_PREFIX: &str = "/v2/health/";

/// The keys that open the server.
pub(crate) struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No `authorization` header, or not in the `Bearer <key>` form.
    Missing,
    /// A key that is not in the file.
    Invalid,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::Missing => "this server needs an API key: send the header 'authorization: Bearer <key>'",
            Refusal::Invalid => "invalid API key",
        }
    }
}

impl ApiKeys {
    /// Reads the key file: one key per line; blank lines and lines
    /// starting with `#` are ignored. A file without keys is an error (it
    /// would lock every client out).
    pub(crate) fn read(path: &Path) -> anyhow::Result<ApiKeys> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
        let keys = ApiKeys::parse(&text);
        anyhow::ensure!(!keys.digests.is_empty(), "--api-key-file {} holds no key", path.display());
        Ok(keys)
    }

    fn parse(text: &str) -> ApiKeys {
        let digests =
            text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')).map(digest).collect();
        ApiKeys { digests }
    }

    /// Checks an `authorization` header value.
    pub(crate) fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let key = authorization.and_then(bearer_token).ok_or(Refusal::Missing)?;
        let presented = digest(key);
        // Every key is compared: no early exit tells which one matched.
        let matched = self.digests.iter().fold(subtle::Choice::from(0), |found, known| found | known.ct_eq(&presented));
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }
}

fn digest(key: impl AsRef<[u8]>) -> [u8; 32] {
    Sha256::digest(key.as_ref()).into()
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 9110).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token.as_bytes())
}

/// axum middleware: 401 with `WWW-Authenticate: Bearer` unless the call is
/// to a health path or carries a valid key. Runs before the body is read.
pub(crate) async fn require_http_key(State(keys): State<Arc<ApiKeys>>, request: Request, next: Next) -> Response {
    if request.uri().path().starts_with(OPEN_HTTP_PREFIX) {
        return next.run(request).await;
    }
    match keys.check(request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)) {
        Ok(()) => next.run(request).await,
        Err(refusal) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(serde_json::json!({"error": refusal.message()})),
        )
            .into_response(),
    }
}

/// gRPC methods served without a key: health, for probes, and the
/// inference service's own liveness and readiness (as `/v2/health/*`).
const OPEN_GRPC_PATHS: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
];

/// tower layer of the gRPC server: UNAUTHENTICATED, before the message is
/// decoded, unless the call is to an open path or carries a valid key.
/// Without keys it lets everything through.
#[derive(Clone)]
pub(crate) struct GrpcAuthLayer(pub(crate) Option<Arc<ApiKeys>>);

impl<S> tower::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcAuth { keys: self.0.clone(), inner }
    }
}

/// The service that [`GrpcAuthLayer`] wraps around.
#[derive(Clone)]
pub(crate) struct GrpcAuth<S> {
    keys: Option<Arc<ApiKeys>>,
    inner: S,
}

impl<S, B, R> tower::Service<axum::http::Request<B>> for GrpcAuth<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = axum::http::Response<R>;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, std::future::Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        use futures::future::Either;
        let Some(keys) = &self.keys else { return Either::Left(self.inner.call(request)) };
        let path = request.uri().path();
        if OPEN_GRPC_PATHS.iter().any(|open| path.starts_with(open)) {
            return Either::Left(self.inner.call(request));
        }
        match keys.check(request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(refusal) => {
                Either::Right(std::future::ready(Ok(tonic::Status::unauthenticated(refusal.message()).into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_format() {
        let keys = ApiKeys::parse("# comment\n\n  first-key  \nsecond\n#not-a-key\n");
        assert_eq!(keys.digests.len(), 2);
        assert_eq!(keys.check(Some(b"Bearer first-key")), Ok(()));
        assert_eq!(keys.check(Some(b"bearer   second")), Ok(()));
        assert_eq!(keys.check(Some(b"Bearer #not-a-key")), Err(Refusal::Invalid));
        assert_eq!(keys.check(Some(b"Bearer first")), Err(Refusal::Invalid));
    }

    #[test]
    fn malformed_headers_are_missing_keys() {
        let keys = ApiKeys::parse("k");
        for bad in [&b""[..], b"k", b"Bearer", b"Bearer ", b"Basic k", b"Bearer \xff"] {
            assert_eq!(keys.check(Some(bad)), Err(Refusal::Missing), "{bad:?}");
        }
        assert_eq!(keys.check(None), Err(Refusal::Missing));
    }

    #[test]
    fn a_file_without_keys_is_refused() {
        let path = std::env::temp_dir().join(format!("ferrite-keys-{}", std::process::id()));
        std::fs::write(&path, "# only comments\n\n").unwrap();
        let error = ApiKeys::read(&path).err().expect("refused");
        std::fs::remove_file(&path).unwrap();
        assert!(error.to_string().contains("holds no key"), "{error}");
    }
}
