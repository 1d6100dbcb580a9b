//! The one hand-written server left: a plain HTTP file server on 127.0.0.1
//! that can fail on purpose, for what no real storage server does on
//! demand: answer 503 once, cut a body short, send slowly. It records the
//! requests, `Range` and `Authorization` headers it saw. Its GET/HEAD of
//! `/bucket/key` is also enough for object_store's S3 client, which is how
//! the S3 client's own retry of a 503 is tested.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;

use super::sha256_hex;

/// What the stand-in serves.
#[derive(Default)]
pub struct Files {
    /// Request path -> content.
    pub files: HashMap<String, Bytes>,
    /// Paths whose first GET answers 503.
    pub flaky: Vec<String>,
    /// Paths whose first GET sends half the body, then drops the connection.
    pub cut: Vec<String>,
    /// Paths sent in ten parts, 250 ms apart.
    pub slow: Vec<String>,
    /// Paths whose GET sends a body that never ends (chunked, no
    /// `Content-Length`: 64 KiB parts of the file's content, over and over).
    pub endless: Vec<String>,
}

pub struct Server {
    pub base: String,
    pub port: u16,
    pub state: Arc<ServerState>,
}

pub struct ServerState {
    files: Mutex<Files>,
    /// "METHOD path" -> count.
    requests: Mutex<HashMap<String, usize>>,
    /// Range headers received, in order.
    pub ranges: Mutex<Vec<String>>,
    /// Authorization headers received, in order.
    pub authorizations: Mutex<Vec<String>>,
}

impl Server {
    pub async fn start(files: Files) -> Server {
        let state = Arc::new(ServerState {
            files: Mutex::new(files),
            requests: Mutex::new(HashMap::new()),
            ranges: Mutex::new(Vec::new()),
            authorizations: Mutex::new(Vec::new()),
        });
        let router = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Server { base: format!("http://127.0.0.1:{port}"), port, state }
    }

    /// How many `method` requests `path` received.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.state.requests.lock().unwrap().get(&format!("{method} {path}")).copied().unwrap_or(0)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

async fn handle(State(state): State<Arc<ServerState>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = percent_decode(uri.path());
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        state.authorizations.lock().unwrap().push(value.to_string());
    }
    let count = {
        let mut requests = state.requests.lock().unwrap();
        let entry = requests.entry(format!("{method} {path}")).or_default();
        *entry += 1;
        *entry
    };
    let (data, flaky, cut, slow, endless) = {
        let files = state.files.lock().unwrap();
        match files.files.get(&path) {
            Some(data) => (
                data.clone(),
                files.flaky.contains(&path),
                files.cut.contains(&path),
                files.slow.contains(&path),
                files.endless.contains(&path),
            ),
            None => return Response::builder().status(StatusCode::NOT_FOUND).body(Body::from("no such file")).unwrap(),
        }
    };
    if method != Method::GET && method != Method::HEAD {
        return Response::builder().status(StatusCode::METHOD_NOT_ALLOWED).body(Body::empty()).unwrap();
    }
    if method == Method::GET && flaky && count == 1 {
        return Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(Body::from("try again")).unwrap();
    }
    if method == Method::GET && endless {
        let part = data.slice(..data.len().min(64 * 1024));
        let stream = futures::stream::repeat_with(move || Ok::<Bytes, std::io::Error>(part.clone()));
        return Response::builder().status(StatusCode::OK).body(Body::from_stream(stream)).unwrap();
    }
    let len = data.len() as u64;
    let start = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(range) => {
            state.ranges.lock().unwrap().push(range.to_string());
            let start: u64 = range.strip_prefix("bytes=").and_then(|r| r.split('-').next()).unwrap().parse().unwrap();
            Some(start)
        }
        None => None,
    };
    let builder = Response::builder()
        .header(header::ETAG, format!("\"{}\"", &sha256_hex(&data)[..16]))
        .header(header::LAST_MODIFIED, "Mon, 01 Jan 2024 00:00:00 GMT")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    let (builder, body) = match start {
        Some(start) if start >= len => {
            return Response::builder().status(StatusCode::RANGE_NOT_SATISFIABLE).body(Body::empty()).unwrap()
        }
        Some(start) => (
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", len - 1)),
            data.slice(start as usize..),
        ),
        None => (builder.status(StatusCode::OK), data),
    };
    let builder = builder.header(header::CONTENT_LENGTH, body.len());
    if method == Method::HEAD {
        return builder.body(Body::empty()).unwrap();
    }
    if cut && count == 1 {
        // Announce the whole length, send half, then fail the body: the
        // client sees the connection end early.
        let half = body.slice(..body.len() / 2);
        let stream = futures::stream::iter(vec![
            Ok::<Bytes, std::io::Error>(half),
            Err(std::io::Error::other("connection cut by the test")),
        ]);
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    if slow {
        let step = body.len().div_ceil(10);
        let stream = futures::stream::unfold(0usize, move |at| {
            let body = body.clone();
            async move {
                if at >= body.len() {
                    return None;
                }
                if at > 0 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                let end = (at + step).min(body.len());
                Some((Ok::<Bytes, std::io::Error>(body.slice(at..end)), end))
            }
        });
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    builder.body(Body::from(body)).unwrap()
}

/// The stand-in with a model under several behaviours.
pub async fn http_server() -> (Server, Bytes) {
    let model = super::generate(super::MODEL_LEN, 7);
    let mut files = Files::default();
    files.files.insert("/models/model.onnx".into(), model.clone());
    files.files.insert("/models/flaky.onnx".into(), model.clone());
    files.flaky.push("/models/flaky.onnx".into());
    files.files.insert("/models/cut.onnx".into(), model.clone());
    files.cut.push("/models/cut.onnx".into());
    files.files.insert("/models/slow.onnx".into(), model.clone());
    files.slow.push("/models/slow.onnx".into());
    files.files.insert("/models/endless.onnx".into(), model.clone());
    files.endless.push("/models/endless.onnx".into());
    files.files.insert("/models/bundle.tar.gz".into(), Bytes::from_static(b"not really"));
    files.files.insert("/models/bundle.zip".into(), Bytes::from_static(b"PK"));
    (Server::start(files).await, model)
}
