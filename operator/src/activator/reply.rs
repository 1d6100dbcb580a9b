//! Answers the activator gives itself: errors in the shape the client
//! speaks - gRPC trailers-only responses (HTTP 200, `grpc-status`,
//! `grpc-message`) that tritonclient and grpcurl read, OpenAI's error object
//! on `/v1/` paths, and KServe's `{"error": message}` elsewhere.

use axum::http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Errors of bodies passed through.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the activator sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// What went wrong, with its HTTP status and gRPC code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The request names no ModelDeployment that is watched.
    NotFound,
    /// The hold queue is full.
    Exhausted,
    /// The deadline passed while held.
    Deadline,
    /// No pod could take the request.
    Unavailable,
}

impl Failure {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Failure::NotFound => StatusCode::NOT_FOUND,
            Failure::Exhausted => StatusCode::TOO_MANY_REQUESTS,
            Failure::Deadline => StatusCode::GATEWAY_TIMEOUT,
            Failure::Unavailable => StatusCode::BAD_GATEWAY,
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(self) -> u8 {
        match self {
            Failure::NotFound => 5,
            Failure::Exhausted => 8,
            Failure::Deadline => 4,
            Failure::Unavailable => 14,
        }
    }

    /// The metric label of `ferrite_activator_refused_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::NotFound => "unknown",
            Failure::Exhausted => "full",
            Failure::Deadline => "timeout",
            Failure::Unavailable => "unavailable",
        }
    }

    /// OpenAI's error `type`.
    fn openai_type(self) -> &'static str {
        match self {
            Failure::NotFound => "not_found_error",
            Failure::Exhausted => "rate_limit_error",
            Failure::Deadline => "timeout_error",
            Failure::Unavailable => "server_error",
        }
    }
}

/// How the client speaks, which decides the shape of an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `content-type: application/grpc...`.
    Grpc,
    /// An OpenAI path (`/v1/...`).
    OpenAi,
    /// Anything else (KServe v2 REST).
    Rest,
}

impl Dialect {
    /// The dialect of `request`.
    pub fn of<B>(request: &Request<B>) -> Dialect {
        let grpc = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if grpc {
            Dialect::Grpc
        } else if request.uri().path().starts_with("/v1/") {
            Dialect::OpenAi
        } else {
            Dialect::Rest
        }
    }
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// The error response for `failure`, in `dialect`.
pub fn error(dialect: Dialect, failure: Failure, message: &str) -> Response<ProxyBody> {
    let mut response = match dialect {
        Dialect::Grpc => {
            let mut response = Response::new(full(Bytes::new()));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(u16::from(failure.grpc_code())));
            headers.insert(
                "grpc-message",
                HeaderValue::from_str(&percent_encode(message)).expect("percent-encoded text is a header value"),
            );
            return response;
        }
        Dialect::OpenAi => {
            let body = serde_json::json!({"error": {
                "message": message, "type": failure.openai_type(), "param": null, "code": null,
            }});
            Response::new(full(body.to_string()))
        }
        Dialect::Rest => Response::new(full(serde_json::json!({ "error": message }).to_string())),
    };
    *response.status_mut() = failure.status();
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if failure == Failure::Exhausted {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// gRPC's `grpc-message` encoding: percent-encode everything outside
/// printable ASCII, and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(content_type: Option<&str>, path: &str) -> Request<()> {
        let mut builder = Request::builder().uri(path);
        if let Some(ct) = content_type {
            builder = builder.header(CONTENT_TYPE, ct);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_dialect_follows_content_type_then_path() {
        assert_eq!(Dialect::of(&request(Some("application/grpc+proto"), "/v1/x")), Dialect::Grpc);
        assert_eq!(Dialect::of(&request(Some("application/json"), "/v1/chat/completions")), Dialect::OpenAi);
        assert_eq!(Dialect::of(&request(None, "/v2/models/m/infer")), Dialect::Rest);
    }

    #[tokio::test]
    async fn grpc_errors_are_trailers_only_with_an_encoded_message() {
        let response = error(Dialect::Grpc, Failure::Deadline, "held 5 s: 100% gone\n");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "4");
        assert_eq!(response.headers()["grpc-message"], "held 5 s: 100%25 gone%0A");
        assert!(response.into_body().collect().await.unwrap().to_bytes().is_empty());
    }

    #[tokio::test]
    async fn http_errors_have_their_status_and_shape() {
        let rest = error(Dialect::Rest, Failure::Exhausted, "full");
        assert_eq!(rest.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(rest.headers()[RETRY_AFTER], "1");
        let body = rest.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap(), serde_json::json!({"error": "full"}));
        let openai = error(Dialect::OpenAi, Failure::NotFound, "no such model");
        assert_eq!(openai.status(), StatusCode::NOT_FOUND);
        let body: serde_json::Value =
            serde_json::from_slice(&openai.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["error"]["message"], "no such model");
        assert_eq!(error(Dialect::Rest, Failure::Unavailable, "x").status(), StatusCode::BAD_GATEWAY);
        assert_eq!(error(Dialect::Rest, Failure::Deadline, "x").status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
