//! Forwarding to a ready pod: request and response bodies stream through
//! (gRPC streaming, SSE), HTTP/1.1 goes out as HTTP/1.1 and HTTP/2 (gRPC)
//! as h2c; pods are picked round robin, and a pod that refuses the
//! connection is replaced by another ready pod once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::header::{HeaderName, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use axum::http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::reply::ProxyBody;
use super::route::ModelKey;

/// How long a connection to a pod may take before the next pod is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The HTTP clients to pods and the round-robin cursors.
pub struct Upstream {
    http1: Client<HttpConnector, ReplayableBody>,
    http2: Client<HttpConnector, ReplayableBody>,
    cursors: Mutex<HashMap<ModelKey, usize>>,
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach a ready pod of ModelDeployment {key}: {detail}")]
pub struct ForwardError {
    /// The ModelDeployment.
    pub key: ModelKey,
    /// What failed, pod by pod.
    pub detail: String,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream::new()
    }
}

impl Upstream {
    /// Clients with pooled connections.
    pub fn new() -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let builder = || {
            let mut builder = Client::builder(TokioExecutor::new());
            builder.pool_timer(TokioTimer::new()).pool_idle_timeout(Duration::from_secs(30)).timer(TokioTimer::new());
            builder
        };
        let http1 = builder().build(connector.clone());
        let http2 = builder().http2_only(true).build(connector);
        Upstream { http1, http2, cursors: Mutex::new(HashMap::new()) }
    }

    /// The next of `pods` for `key`, round robin.
    pub fn pick(&self, key: &ModelKey, pods: &[IpAddr]) -> Option<IpAddr> {
        if pods.is_empty() {
            return None;
        }
        let mut cursors = self.cursors.lock().expect("cursors");
        let cursor = cursors.entry(key.clone()).or_insert(0);
        let pod = pods[*cursor % pods.len()];
        *cursor = cursor.wrapping_add(1);
        Some(pod)
    }

    /// Sends `request` to a pod of `pods` on `port`. When the connection is
    /// refused (a stale pod), tries one other pod that `more_pods` (the
    /// view now) offers.
    pub async fn forward(
        &self,
        key: &ModelKey,
        request: Request<Incoming>,
        pods: &[IpAddr],
        more_pods: impl FnOnce() -> Vec<IpAddr>,
        port: u16,
        client: Option<SocketAddr>,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        let (parts, body) = request.into_parts();
        let body = Arc::new(Mutex::new(Some(body)));
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        if let Some(client) = client {
            append_forwarded_for(&mut headers, client.ip());
        }
        let http2 = parts.version == Version::HTTP_2;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let first =
            self.pick(key, pods).ok_or_else(|| ForwardError { key: key.clone(), detail: "no ready pod".into() })?;
        let mut failures = Vec::new();
        let mut target = Some(first);
        let mut more_pods = Some(more_pods);
        while let Some(pod) = target.take() {
            let address = SocketAddr::new(pod, port);
            let uri: Uri = format!("http://{address}{path}").parse().map_err(|error| ForwardError {
                key: key.clone(),
                detail: format!("bad request target {path:?}: {error}"),
            })?;
            let started = Arc::new(AtomicBool::new(false));
            let mut upstream = Request::builder()
                .method(parts.method.clone())
                .uri(uri)
                .version(if http2 { Version::HTTP_2 } else { Version::HTTP_11 })
                .body(ReplayableBody { inner: body.clone(), started: started.clone() })
                .expect("a request from valid parts");
            *upstream.headers_mut() = headers.clone();
            if http2 {
                // The :authority comes from the URI.
                upstream.headers_mut().remove(HOST);
            }
            let client = if http2 { &self.http2 } else { &self.http1 };
            match client.request(upstream).await {
                Ok(response) => return Ok(into_proxy_response(response)),
                Err(error) => {
                    failures.push(format!("{address}: {}", error_chain(&error)));
                    // A refused connection never read the body: another
                    // pod can have the request, once.
                    if error.is_connect() && !started.load(Ordering::SeqCst) {
                        if let Some(more) = more_pods.take() {
                            let others: Vec<IpAddr> = more().into_iter().filter(|p| *p != pod).collect();
                            target = self.pick(key, &others);
                            if let Some(next) = target {
                                tracing::warn!(%key, failed = %address, retry = %next, "pod refused the connection; trying another ready pod");
                            }
                        }
                    }
                }
            }
        }
        Err(ForwardError { key: key.clone(), detail: failures.join("; ") })
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The pod's response, its body streamed through.
fn into_proxy_response(response: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
}

/// Removes the headers that describe one connection, not the message
/// (RFC 9110 7.6.1), keeping `te: trailers`, which gRPC needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if name != TE {
            headers.remove(name);
        }
    }
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    let trailers_only = headers.get_all(TE).iter().all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(TE);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", value);
    }
}

/// A request body that one attempt may take and, when that attempt failed
/// before reading any of it (the connection was refused), the next attempt
/// takes again.
pub struct ReplayableBody {
    inner: Arc<Mutex<Option<Incoming>>>,
    started: Arc<AtomicBool>,
}

impl Body for ReplayableBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.started.store(true, Ordering::SeqCst);
        let mut inner = self.inner.lock().expect("body");
        match inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.lock().expect("body").as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.lock().expect("body").as_ref().map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_picked_round_robin_per_model() {
        let upstream = Upstream::new();
        let pods: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"].iter().map(|p| p.parse().unwrap()).collect();
        let (a, b) = (ModelKey::new("ns", "a"), ModelKey::new("ns", "b"));
        let picked: Vec<IpAddr> = (0..4).map(|_| upstream.pick(&a, &pods).unwrap()).collect();
        assert_eq!(picked, [pods[0], pods[1], pods[2], pods[0]]);
        assert_eq!(upstream.pick(&b, &pods), Some(pods[0]), "another model has its own cursor");
        assert_eq!(upstream.pick(&a, &[]), None);
    }

    #[test]
    fn connection_headers_are_dropped_and_te_trailers_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert("authorization", HeaderValue::from_static("Bearer k"));
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["authorization", "te"]);
        headers.insert(TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut headers);
        assert!(!headers.contains_key(TE));
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let mut headers = HeaderMap::new();
        append_forwarded_for(&mut headers, "10.1.1.1".parse().unwrap());
        append_forwarded_for(&mut headers, "10.1.1.2".parse().unwrap());
        assert_eq!(headers["x-forwarded-for"], "10.1.1.1, 10.1.1.2");
    }
}
