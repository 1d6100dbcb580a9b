//! `ferrite-server fetch` against real servers: an HTTP server started on
//! 127.0.0.1 by each test serves generated files, a missing path, a path
//! that fails once with 503, a body cut short, and just enough of the S3,
//! GCS and Azure Blob object APIs (GET, HEAD, ranges, ListObjectsV2) for
//! `object_store`'s clients to download through it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use ferrite_server::fetch::{fetch, parse_source, redact_uri, FetchOptions, Source, StoreKind, TEMP_MARKER};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- helpers

/// Deterministic pseudo-random bytes (xorshift).
fn generate(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "ferrite-fetch-test-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file under a directory, relative path -> content.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                out.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

fn assert_no_temporaries(root: &Path) {
    let leftovers: Vec<String> = tree(root).into_keys().filter(|k| k.contains(TEMP_MARKER)).collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

/// Options for tests: fast retries.
fn options(uri: &str, dest: &Path, name: &str) -> FetchOptions {
    let mut options = FetchOptions::new(uri, dest, name);
    options.retries = 3;
    options.initial_backoff = Duration::from_millis(20);
    options.idle_timeout = Duration::from_secs(10);
    options
}

// ----------------------------------------------------------- test server

#[derive(Default)]
struct Files {
    /// Request path -> content.
    files: HashMap<String, Bytes>,
    /// Paths whose first GET answers 503.
    flaky: Vec<String>,
    /// Paths whose first GET sends half the body, then drops the connection.
    cut: Vec<String>,
    /// Paths sent in ten parts, 250 ms apart.
    slow: Vec<String>,
}

struct Server {
    base: String,
    port: u16,
    state: Arc<ServerState>,
}

struct ServerState {
    files: Mutex<Files>,
    /// "METHOD path" -> count.
    requests: Mutex<HashMap<String, usize>>,
    /// Range headers received, in order.
    ranges: Mutex<Vec<String>>,
    /// Authorization headers received, in order.
    authorizations: Mutex<Vec<String>>,
}

impl Server {
    async fn start(files: Files) -> Server {
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

    fn count(&self, method: &str, path: &str) -> usize {
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
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn etag(data: &[u8]) -> String {
    format!("\"{}\"", &sha256_hex(data)[..16])
}

const LAST_MODIFIED: &str = "Mon, 01 Jan 2024 00:00:00 GMT";

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
    let query: HashMap<String, String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();

    // S3 (and GCS XML) ListObjectsV2: GET /bucket?list-type=2&prefix=...
    if method == Method::GET && query.get("list-type").map(String::as_str) == Some("2") {
        let bucket = path.trim_matches('/');
        let prefix = query.get("prefix").cloned().unwrap_or_default();
        let files = state.files.lock().unwrap();
        let mut keys: Vec<(&String, &Bytes)> = files
            .files
            .iter()
            .filter(|(p, _)| p.strip_prefix(&format!("/{bucket}/")).is_some_and(|k| k.starts_with(&prefix)))
            .collect();
        keys.sort();
        let mut xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Name>{bucket}</Name><Prefix>{prefix}</Prefix><KeyCount>{}</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>",
            keys.len()
        );
        for (p, data) in keys {
            let key = &p[bucket.len() + 2..];
            xml.push_str(&format!(
                "<Contents><Key>{key}</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified><ETag>{}</ETag>\
                 <Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
                etag(data).replace('"', "&quot;"),
                data.len()
            ));
        }
        xml.push_str("</ListBucketResult>");
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/xml")
            .body(Body::from(xml))
            .unwrap();
    }

    let (data, flaky, cut, slow) = {
        let files = state.files.lock().unwrap();
        match files.files.get(&path) {
            Some(data) => {
                (data.clone(), files.flaky.contains(&path), files.cut.contains(&path), files.slow.contains(&path))
            }
            None => return Response::builder().status(StatusCode::NOT_FOUND).body(Body::from("no such file")).unwrap(),
        }
    };
    if method != Method::GET && method != Method::HEAD {
        return Response::builder().status(StatusCode::METHOD_NOT_ALLOWED).body(Body::empty()).unwrap();
    }
    if method == Method::GET && flaky && count == 1 {
        return Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(Body::from("try again")).unwrap();
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
        .header(header::ETAG, etag(&data))
        .header(header::LAST_MODIFIED, LAST_MODIFIED)
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

const MODEL_LEN: usize = 3 * 1024 * 1024 + 12_345;

async fn http_server() -> (Server, Bytes) {
    let model = generate(MODEL_LEN, 7);
    let mut files = Files::default();
    files.files.insert("/models/model.onnx".into(), model.clone());
    files.files.insert("/models/flaky.onnx".into(), model.clone());
    files.flaky.push("/models/flaky.onnx".into());
    files.files.insert("/models/cut.onnx".into(), model.clone());
    files.cut.push("/models/cut.onnx".into());
    files.files.insert("/models/slow.onnx".into(), model.clone());
    files.slow.push("/models/slow.onnx".into());
    files.files.insert("/models/bundle.tar.gz".into(), Bytes::from_static(b"not really"));
    files.files.insert("/models/bundle.zip".into(), Bytes::from_static(b"PK"));
    (Server::start(files).await, model)
}

/// A gzip tar of an LLM model directory wrapped in one top-level directory,
/// as `tar czf smollm2.tgz smollm2/` makes it.
fn llm_archive(files: &[(&str, &[u8])]) -> Bytes {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, format!("smollm2/{name}"), *data).unwrap();
    }
    Bytes::from(builder.into_inner().unwrap().finish().unwrap())
}

// ------------------------------------------------------------------ HTTP

#[tokio::test]
async fn http_download_is_byte_identical_and_atomic() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("http");
    let uri = format!("{}/models/model.onnx", server.base);
    let report = fetch(&options(&uri, dest.path(), "resnet")).await.unwrap();

    let target = dest.path().join("resnet/1/model.onnx");
    assert_eq!(report.files, vec![target.clone()]);
    assert_eq!(report.model_dir, dest.path().join("resnet"));
    assert_eq!((report.downloaded_files, report.skipped_files, report.bytes), (1, 0, MODEL_LEN as u64));
    assert!(std::fs::read(&target).unwrap() == model, "content differs");
    // The only file in the repository is the model: no temporary left.
    assert_eq!(tree(dest.path()).into_keys().collect::<Vec<_>>(), vec!["resnet/1/model.onnx"]);
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);
}

#[tokio::test]
async fn http_custom_model_file_name_and_sha256() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("http-name");
    let mut opts = options(&format!("{}/models/model.onnx", server.base), dest.path(), "m");
    opts.model_file = "other.onnx".into();
    opts.sha256 = Some(sha256_hex(&model).to_uppercase());
    fetch(&opts).await.unwrap();
    assert!(std::fs::read(dest.path().join("m/1/other.onnx")).unwrap() == model);
}

#[tokio::test]
async fn http_retries_after_503() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("flaky");
    let uri = format!("{}/models/flaky.onnx", server.base);
    let report = fetch(&options(&uri, dest.path(), "m")).await.unwrap();
    assert_eq!(report.downloaded_files, 1);
    assert_eq!(server.count("GET", "/models/flaky.onnx"), 2, "one 503, then the download");
    assert!(std::fs::read(dest.path().join("m/1/model.onnx")).unwrap() == model);
    assert_no_temporaries(dest.path());

    // With no retries allowed, the 503 is the answer.
    let (server, _) = http_server().await;
    let mut opts = options(&format!("{}/models/flaky.onnx", server.base), dest.path(), "n");
    opts.retries = 0;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("HTTP 503"), "{error}");
    assert!(!dest.path().join("n/1/model.onnx").exists());
    assert_no_temporaries(dest.path());
}

#[tokio::test]
async fn http_resumes_a_cut_download_with_a_range_request() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("cut");
    let uri = format!("{}/models/cut.onnx", server.base);
    fetch(&options(&uri, dest.path(), "m")).await.unwrap();
    assert!(std::fs::read(dest.path().join("m/1/model.onnx")).unwrap() == model, "content differs");
    assert_eq!(server.count("GET", "/models/cut.onnx"), 2);
    let ranges = server.state.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let resumed_at: u64 = ranges[0].trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(resumed_at > 0 && resumed_at < MODEL_LEN as u64, "{ranges:?}");
    assert_no_temporaries(dest.path());
}

#[tokio::test]
async fn http_404_fails_with_a_clear_message() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("404");
    let uri = format!("{}/models/missing.onnx", server.base);
    let error = fetch(&options(&uri, dest.path(), "m")).await.unwrap_err();
    let text = error.to_string();
    assert_eq!(text, format!("fetch {uri}: not found (HTTP 404)"));
    assert_eq!(server.count("GET", "/models/missing.onnx"), 1, "a 404 is not retried");
    assert!(tree(dest.path()).is_empty(), "{:?}", tree(dest.path()).keys());
}

#[tokio::test]
async fn sha256_mismatch_deletes_the_download_and_fails() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("sha");
    let uri = format!("{}/models/model.onnx", server.base);
    let mut opts = options(&uri, dest.path(), "m");
    let wrong = "0".repeat(64);
    opts.sha256 = Some(wrong.clone());
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("sha256 mismatch"), "{error}");
    assert!(error.contains(&wrong) && error.contains(&sha256_hex(&model)), "{error}");
    assert!(!dest.path().join("m/1/model.onnx").exists());
    assert_no_temporaries(dest.path());

    // A malformed hash is refused before anything is downloaded.
    opts.sha256 = Some("abc".into());
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("64 hex digits"), "{error}");
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);

    // A file that is present but has other content is replaced.
    std::fs::create_dir_all(dest.path().join("m/1")).unwrap();
    std::fs::write(dest.path().join("m/1/model.onnx"), vec![0u8; MODEL_LEN]).unwrap();
    opts.sha256 = Some(sha256_hex(&model));
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (1, 0));
    assert!(std::fs::read(dest.path().join("m/1/model.onnx")).unwrap() == model);
}

#[tokio::test]
async fn skips_a_file_that_is_already_present() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("skip");
    let uri = format!("{}/models/model.onnx", server.base);
    let opts = options(&uri, dest.path(), "m");
    fetch(&opts).await.unwrap();
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);

    // Same size: only a HEAD, no download.
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files, report.bytes), (0, 1, 0));
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);
    assert_eq!(server.count("HEAD", "/models/model.onnx"), 1);

    // With a hash, the hash decides and the source is not even asked.
    let mut with_hash = opts.clone();
    with_hash.sha256 = Some(sha256_hex(&model));
    let report = fetch(&with_hash).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (0, 1));
    assert_eq!(server.count("GET", "/models/model.onnx"), 1);

    // Another size: downloaded again.
    std::fs::write(dest.path().join("m/1/model.onnx"), b"short").unwrap();
    let report = fetch(&opts).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (1, 0));
    assert_eq!(server.count("GET", "/models/model.onnx"), 2);
    assert!(std::fs::read(dest.path().join("m/1/model.onnx")).unwrap() == model);

    // A temporary left by an interrupted earlier run is cleaned up.
    let stale = dest.path().join(format!("m/1/.model.onnx{TEMP_MARKER}1-0"));
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::remove_file(dest.path().join("m/1/model.onnx")).unwrap();
    fetch(&opts).await.unwrap();
    assert!(!stale.exists());
    assert_no_temporaries(dest.path());
}

#[tokio::test]
async fn credentials_in_the_url_never_appear_in_errors() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("creds");
    let secrets = ["hunter2secret", "X-Amz-Signature", "sigvalue123", "opaque-token"];
    // A 404 from a reachable server.
    let uri = format!(
        "http://admin:hunter2secret@127.0.0.1:{}/models/missing.onnx?X-Amz-Signature=sigvalue123#opaque-token",
        server.port
    );
    let error = fetch(&options(&uri, dest.path(), "m")).await.unwrap_err().to_string();
    assert!(error.contains("not found"), "{error}");
    assert!(error.contains(&format!("http://127.0.0.1:{}/models/missing.onnx", server.port)), "{error}");
    for secret in secrets.iter().chain(&["admin"]) {
        assert!(!error.contains(secret), "{secret} leaked: {error}");
    }
    // The user info went to the server as basic auth, not in the path.
    let authorizations = server.state.authorizations.lock().unwrap().clone();
    assert_eq!(authorizations, vec!["Basic YWRtaW46aHVudGVyMnNlY3JldA==".to_string()]);

    // A connection refused: the client's own error mentions the URL.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let uri = format!("https://admin:hunter2secret@127.0.0.1:{closed}/m.onnx?X-Amz-Signature=sigvalue123");
    let mut opts = options(&uri, dest.path(), "m");
    opts.retries = 1;
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("cannot connect"), "{error}");
    assert!(error.starts_with(&format!("fetch https://127.0.0.1:{closed}/m.onnx: ")), "{error}");
    for secret in secrets.iter().chain(&["admin"]) {
        assert!(!error.contains(secret), "{secret} leaked: {error}");
    }
    assert_eq!(redact_uri("s3://AKID:secretkey@bucket/k?x=y"), "s3://bucket/k");
}

#[tokio::test]
async fn an_http_archive_is_unpacked_into_version_1() {
    let weights = generate(300_000, 3);
    let files: [(&str, &[u8]); 3] = [("model.onnx", &weights), ("llm.json", b"{}"), ("tokenizer.json", b"{\"v\":1}")];
    let mut served = Files::default();
    served.files.insert("/llm/smollm2.tgz".into(), llm_archive(&files));
    let server = Server::start(served).await;
    let dest = TempDir::new("archive");
    let report = fetch(&options(&format!("{}/llm/smollm2.tgz", server.base), dest.path(), "chat")).await.unwrap();
    let expected: BTreeMap<String, Vec<u8>> =
        files.iter().map(|(name, data)| (format!("chat/1/{name}"), data.to_vec())).collect();
    assert_eq!(tree(dest.path()), expected);
    assert_eq!(report.files.len(), 3);
}

#[tokio::test]
async fn refuses_what_it_cannot_fetch() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("refuse");
    let cases = [
        (format!("{}/models/", server.base), "cannot be listed"),
        (format!("{}/models/bundle.tar.gz", server.base), "archive"),
        (format!("{}/models/bundle.zip", server.base), "zip archives are not unpacked"),
        ("pvc://models-claim/resnet/model.onnx".to_string(), "operator mounts the claim"),
        ("ftp://host/model.onnx".to_string(), "unsupported URI scheme 'ftp'"),
        ("".to_string(), "empty"),
    ];
    for (uri, expected) in cases {
        let error = fetch(&options(&uri, dest.path(), "m")).await.unwrap_err().to_string();
        assert!(error.contains(expected), "{uri}: {error}");
        assert!(!error.contains('\n'));
    }
    let error = fetch(&options(&format!("{}/models/model.onnx", server.base), dest.path(), "../evil"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("invalid model name"), "{error}");
    assert!(tree(dest.path()).is_empty());
    assert!(!dest.path().parent().unwrap().join("evil").exists());
}

// ----------------------------------------------------------------- local

#[tokio::test]
async fn copies_a_local_directory_prefix() {
    let source = TempDir::new("src");
    let files: BTreeMap<String, Vec<u8>> = [
        ("1/model.onnx", generate(2 * 1024 * 1024 + 3, 1).to_vec()),
        ("2/model.onnx", generate(1000, 2).to_vec()),
        ("ferrite.json", br#"{"max_batch_size": 8}"#.to_vec()),
        ("tokenizer/vocab.txt", b"a\nb\n".to_vec()),
        ("empty.bin", Vec::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (relative, data) in &files {
        let path = source.path().join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let dest = TempDir::new("dest");
    let uri = format!("file://{}/", source.path().display());
    let report = fetch(&options(&uri, dest.path(), "llm")).await.unwrap();
    assert_eq!(report.downloaded_files, files.len());
    assert_eq!(tree(&dest.path().join("llm")), files);

    // Again: everything is present.
    let report = fetch(&options(&uri, dest.path(), "llm")).await.unwrap();
    assert_eq!((report.downloaded_files, report.skipped_files), (0, files.len()));

    // A plain path to a directory is a prefix too; one to a file is a model.
    let plain = dest.path().join("plain");
    fetch(&options(&source.path().display().to_string(), &plain, "x")).await.unwrap();
    assert_eq!(tree(&plain.join("x")), files);
    let single = source.path().join("1/model.onnx");
    fetch(&options(&single.display().to_string(), &plain, "y")).await.unwrap();
    assert_eq!(std::fs::read(plain.join("y/1/model.onnx")).unwrap(), files["1/model.onnx"]);
    assert_no_temporaries(dest.path());

    // A prefix with a hash, an empty directory, a missing path.
    let mut opts = options(&uri, dest.path(), "z");
    opts.sha256 = Some("0".repeat(64));
    assert!(fetch(&opts).await.unwrap_err().to_string().contains("not to a prefix"));
    let empty = TempDir::new("empty");
    let error = fetch(&options(&format!("file://{}/", empty.path().display()), dest.path(), "z"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no objects under this prefix"), "{error}");
    let error = fetch(&options("/nonexistent/ferrite/model.onnx", dest.path(), "z")).await.unwrap_err().to_string();
    assert!(error.contains("cannot read /nonexistent/ferrite/model.onnx"), "{error}");
}

// ---------------------------------------------------------- the binary

fn run_binary(envs: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ferrite-server"));
    command.arg("fetch").args(args).env("RUST_LOG", "info").env_remove("FERRITE_MODEL_SHA256");
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_fetches_and_reports() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("binary");
    let envs = vec![
        ("FERRITE_MODEL_URI", format!("{}/models/flaky.onnx", server.base)),
        ("FERRITE_MODEL_DEST", dest.path().display().to_string()),
        ("FERRITE_MODEL_NAME", "resnet".to_string()),
    ];
    let output = tokio::task::spawn_blocking(move || run_binary(&envs, &[])).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("retrying"), "{stderr}");
    assert!(stderr.contains("fetched") && stderr.contains("MB/s"), "{stderr}");
    assert!(std::fs::read(dest.path().join("resnet/1/model.onnx")).unwrap() == model);

    // Present already: said so, exit 0.
    let envs = vec![("FERRITE_MODEL_NAME", "resnet".to_string())];
    let dest_arg = dest.path().display().to_string();
    let uri = format!("{}/models/flaky.onnx", server.base);
    let output =
        tokio::task::spawn_blocking(move || run_binary(&envs, &["--uri", &uri, "--dest", &dest_arg])).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("already present"), "{stderr}");

    // A failure: non-zero, one line naming the URI, no credentials.
    let uri = format!("http://bob:pa55word-xyz@127.0.0.1:{}/models/missing.onnx?token=t0ken-abc", server.port);
    let envs = vec![
        ("FERRITE_MODEL_URI", uri),
        ("FERRITE_MODEL_DEST", dest.path().display().to_string()),
        ("FERRITE_MODEL_NAME", "other".to_string()),
    ];
    let output = tokio::task::spawn_blocking(move || run_binary(&envs, &[])).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!("error: fetch http://127.0.0.1:{}/models/missing.onnx: not found (HTTP 404)", server.port)
    );
    for secret in ["bob", "pa55word-xyz", "t0ken-abc"] {
        assert!(!stderr.contains(secret), "{secret} leaked: {stderr}");
    }
    assert!(!dest.path().join("other").join("1").join("model.onnx").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reports_progress_at_most_once_a_second() {
    let (server, model) = http_server().await;
    let dest = TempDir::new("progress");
    let envs = vec![
        ("FERRITE_MODEL_URI", format!("{}/models/slow.onnx", server.base)),
        ("FERRITE_MODEL_DEST", dest.path().display().to_string()),
        ("FERRITE_MODEL_NAME", "slow".to_string()),
    ];
    let output = tokio::task::spawn_blocking(move || run_binary(&envs, &[])).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    assert!(output.status.success(), "{stderr}");
    // About 2.25 s of transfer: one or two progress lines, never one per part.
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains("fetching ")).collect();
    assert!((1..=3).contains(&progress.len()), "{stderr}");
    assert!(progress.iter().all(|l| l.contains(" of 3.2 MB (") && l.contains("MB/s")), "{stderr}");
    let done: Vec<&str> = stderr.lines().filter(|l| l.contains("fetched ")).collect();
    assert_eq!(done.len(), 1, "{stderr}");
    assert!(done[0].contains(&format!("{MODEL_LEN} bytes (3.2 MB) in ")) && done[0].contains("MB/s"), "{stderr}");
    assert!(std::fs::read(dest.path().join("slow/1/model.onnx")).unwrap() == model);
}

// ---------------------------------------------------- object stores

#[test]
fn parses_object_store_uris() {
    let store = |uri: &str| match parse_source(uri).unwrap() {
        Source::Store { kind, bucket, key, prefix } => (kind, bucket, key, prefix),
        other => panic!("{uri}: {other:?}"),
    };
    assert_eq!(
        store("s3://models/resnet50/1/model.onnx"),
        (StoreKind::S3, "models".into(), "resnet50/1/model.onnx".into(), false)
    );
    assert_eq!(store("s3a://models/resnet50/"), (StoreKind::S3, "models".into(), "resnet50".into(), true));
    assert_eq!(store("s3://models"), (StoreKind::S3, "models".into(), "".into(), true));
    assert_eq!(store("gs://bkt/a%20b/model.onnx"), (StoreKind::Gcs, "bkt".into(), "a b/model.onnx".into(), false));
    // object_store's own parser drops the first path segment of az:// URIs
    // (it reads them as az://account/container/path); ours keeps the key.
    assert_eq!(store("az://ctr/a/b/model.onnx"), (StoreKind::Azure, "ctr".into(), "a/b/model.onnx".into(), false));
    assert_eq!(store("azure://ctr/dir/"), (StoreKind::Azure, "ctr".into(), "dir".into(), true));
    assert!(parse_source("s3:///key").unwrap_err().contains("no bucket"));
    assert!(parse_source("az:///key").unwrap_err().contains("no container"));
    assert!(parse_source("pvc://claim/path").unwrap_err().contains("operator mounts"));
    assert_eq!(
        parse_source("file:///models/m.onnx").unwrap(),
        Source::Local { path: "/models/m.onnx".into(), prefix: false }
    );
    assert_eq!(parse_source("models/dir/").unwrap(), Source::Local { path: "models/dir/".into(), prefix: true });
    assert!(matches!(parse_source("https://h/p/m.onnx?sig=1").unwrap(), Source::Http { prefix: false, .. }));
}

/// Settings that point the S3 client at the test server.
fn s3_options(server: &Server) -> Vec<(String, String)> {
    [
        ("aws_endpoint", server.base.clone()),
        ("aws_allow_http", "true".into()),
        ("aws_region", "us-east-1".into()),
        ("aws_access_key_id", "AKIDTESTONLY".into()),
        ("aws_secret_access_key", "s3cr3t-test-key".into()),
        ("aws_virtual_hosted_style_request", "false".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn store_server() -> (Server, BTreeMap<String, Bytes>) {
    let objects: BTreeMap<String, Bytes> = [
        ("resnet/1/model.onnx", generate(MODEL_LEN, 11)),
        ("resnet/ferrite.json", Bytes::from_static(br#"{"max_batch_size": 4}"#)),
        ("resnet/2/model.onnx", generate(4321, 12)),
        ("other/model.onnx", generate(100, 13)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut files = Files::default();
    for (key, data) in &objects {
        files.files.insert(format!("/models/{key}"), data.clone());
    }
    files.files.insert("/models/flaky/model.onnx".into(), objects["resnet/1/model.onnx"].clone());
    files.flaky.push("/models/flaky/model.onnx".into());
    (Server::start(files).await, objects)
}

#[tokio::test]
async fn s3_download_through_a_local_endpoint() {
    let (server, objects) = store_server().await;
    let dest = TempDir::new("s3");
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "resnet");
    opts.store_options = s3_options(&server);
    let report = fetch(&opts).await.unwrap();
    assert_eq!(report.downloaded_files, 1);
    assert!(std::fs::read(dest.path().join("resnet/1/model.onnx")).unwrap() == objects["resnet/1/model.onnx"]);
    assert_eq!(server.count("GET", "/models/resnet/1/model.onnx"), 1, "path-style GET /bucket/key");

    // Again: a HEAD, no GET.
    let report = fetch(&opts).await.unwrap();
    assert_eq!(report.skipped_files, 1);
    assert_eq!(server.count("GET", "/models/resnet/1/model.onnx"), 1);

    // object_store retries the 503 itself.
    let mut flaky = options("s3://models/flaky/model.onnx", dest.path(), "flaky");
    flaky.store_options = s3_options(&server);
    fetch(&flaky).await.unwrap();
    assert_eq!(server.count("GET", "/models/flaky/model.onnx"), 2);

    // A prefix: ListObjectsV2, then every object under it.
    let mut prefix = options("s3://models/resnet/", dest.path(), "copy");
    prefix.store_options = s3_options(&server);
    let report = fetch(&prefix).await.unwrap();
    assert_eq!(report.downloaded_files, 3);
    let copied = tree(&dest.path().join("copy"));
    let expected: BTreeMap<String, Vec<u8>> =
        objects.iter().filter_map(|(k, v)| Some((k.strip_prefix("resnet/")?.to_string(), v.to_vec()))).collect();
    assert_eq!(copied, expected);
    assert_no_temporaries(dest.path());
}

#[tokio::test]
async fn s3_errors_are_reported_cleanly() {
    let (server, _) = store_server().await;
    let dest = TempDir::new("s3-errors");

    // Missing object.
    let mut opts = options("s3://models/resnet/9/model.onnx", dest.path(), "m");
    opts.store_options = s3_options(&server);
    let error = fetch(&opts).await.unwrap_err().to_string();
    eprintln!("{error}");
    assert!(error.starts_with("fetch s3://models/resnet/9/model.onnx: not found"), "{error}");
    assert!(!error.contains("s3cr3t-test-key") && !error.contains('\n'), "{error}");

    // An empty prefix.
    let mut opts = options("s3://models/nothing/", dest.path(), "m");
    opts.store_options = s3_options(&server);
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("no objects under this prefix"), "{error}");

    // No credentials: the client asks the instance metadata endpoint
    // (pointed at the test server, which has none) and gives up.
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "m");
    opts.retries = 1;
    opts.store_options = vec![
        ("aws_endpoint".into(), server.base.clone()),
        ("aws_allow_http".into(), "true".into()),
        ("aws_region".into(), "us-east-1".into()),
        ("aws_metadata_endpoint".into(), server.base.clone()),
    ];
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch s3://models/resnet/1/model.onnx: "), "{error}");
    eprintln!("{error}");
    assert!(error.contains("no usable AWS credentials"), "{error}");
    assert!(!error.contains('\n'), "{error}");

    // An endpoint nobody listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "m");
    opts.retries = 1;
    opts.store_options = s3_options(&server);
    opts.store_options[0].1 = format!("http://127.0.0.1:{closed}");
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.starts_with("fetch s3://models/resnet/1/model.onnx: "), "{error}");
    eprintln!("{error}");
    assert!(error.contains(&format!("127.0.0.1:{closed}")), "{error}");
    assert!(!error.contains("s3cr3t-test-key"), "{error}");

    // A setting object_store does not know.
    let mut opts = options("s3://models/resnet/1/model.onnx", dest.path(), "m");
    opts.store_options = vec![("aws_no_such_setting".into(), "1".into())];
    let error = fetch(&opts).await.unwrap_err().to_string();
    assert!(error.contains("unknown s3 store option 'aws_no_such_setting'"), "{error}");
    assert!(tree(dest.path()).is_empty(), "{:?}", tree(dest.path()).keys());
}

#[tokio::test]
async fn gcs_download_through_a_local_endpoint() {
    let (server, objects) = store_server().await;
    let dest = TempDir::new("gcs");
    // A service account "key" that points the client at the test server
    // and turns OAuth off, as fake-gcs-server setups do.
    let key = format!(
        r#"{{"gcs_base_url": "{}", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}}"#,
        server.base
    );
    let mut opts = options("gs://models/resnet/1/model.onnx", dest.path(), "resnet");
    opts.store_options = vec![("google_service_account_key".into(), key), ("allow_http".into(), "true".into())];
    fetch(&opts).await.unwrap();
    assert!(std::fs::read(dest.path().join("resnet/1/model.onnx")).unwrap() == objects["resnet/1/model.onnx"]);
    assert_eq!(server.count("GET", "/models/resnet/1/model.onnx"), 1);
}

#[tokio::test]
async fn azure_download_through_a_local_endpoint() {
    let (server, objects) = store_server().await;
    let dest = TempDir::new("azure");
    let mut opts = options("az://models/resnet/1/model.onnx", dest.path(), "resnet");
    opts.store_options = vec![
        ("azure_storage_account_name".into(), "devaccount".into()),
        ("azure_endpoint".into(), server.base.clone()),
        ("azure_skip_signature".into(), "true".into()),
        ("allow_http".into(), "true".into()),
    ];
    fetch(&opts).await.unwrap();
    assert!(std::fs::read(dest.path().join("resnet/1/model.onnx")).unwrap() == objects["resnet/1/model.onnx"]);
    assert_eq!(server.count("GET", "/models/resnet/1/model.onnx"), 1, "GET /container/key");

    // Without an account the client cannot be built: said plainly.
    let mut opts = options("az://models/resnet/1/model.onnx", dest.path(), "x");
    opts.store_options = vec![("azure_skip_signature".into(), "true".into())];
    if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none() && std::env::var_os("AZURE_ACCOUNT_NAME").is_none() {
        let error = fetch(&opts).await.unwrap_err().to_string();
        assert!(
            error.starts_with("fetch az://models/resnet/1/model.onnx: cannot configure the azure client"),
            "{error}"
        );
    }
}
