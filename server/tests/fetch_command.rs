//! `ferrite-server fetch`, the command the operator's init container runs:
//! flags and `FERRITE_*` variables, exit status, progress lines, and no
//! credentials in what it prints. What it downloads and how is tested in
//! the `ferrite-fetch` crate (fetch/tests), against real storage servers;
//! here a small HTTP server on 127.0.0.1 serves a model, a path whose first
//! GET answers 503, a path sent slowly, and 404 for anything else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;

const MODEL_LEN: usize = 3 * 1024 * 1024 + 12_345;

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

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ferrite-fetch-command-{}-{name}", std::process::id()));
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

struct Server {
    base: String,
    port: u16,
}

struct Served {
    model: Bytes,
    /// GET count per path.
    gets: Mutex<HashMap<String, usize>>,
}

async fn handle(State(served): State<Arc<Served>>, method: Method, uri: Uri) -> Response {
    let path = uri.path().to_string();
    let count = {
        let mut gets = served.gets.lock().unwrap();
        let entry = gets.entry(format!("{method} {path}")).or_default();
        *entry += 1;
        *entry
    };
    let body = served.model.clone();
    let ok = Response::builder().header(header::CONTENT_LENGTH, body.len());
    match path.as_str() {
        "/models/flaky.onnx" if method == Method::GET && count == 1 => {
            Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(Body::from("try again")).unwrap()
        }
        "/models/flaky.onnx" | "/models/slow.onnx" if method == Method::HEAD => ok.body(Body::empty()).unwrap(),
        "/models/flaky.onnx" => ok.body(Body::from(body)).unwrap(),
        "/models/slow.onnx" => {
            // Ten parts, 250 ms apart.
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
            ok.body(Body::from_stream(stream)).unwrap()
        }
        _ => Response::builder().status(StatusCode::NOT_FOUND).body(Body::from("no such file")).unwrap(),
    }
}

async fn http_server() -> (Server, Bytes) {
    let model = generate(MODEL_LEN, 7);
    let served = Arc::new(Served { model: model.clone(), gets: Mutex::new(HashMap::new()) });
    let router = axum::Router::new().fallback(handle).with_state(served);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (Server { base: format!("http://127.0.0.1:{port}"), port }, model)
}

#[test]
fn the_default_model_file_is_the_repository_s() {
    assert_eq!(ferrite_fetch::DEFAULT_MODEL_FILE, ferrite_server::repository::MODEL_FILE);
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_stops_at_max_bytes_and_refuses_a_zero_cap() {
    let (server, _) = http_server().await;
    let dest = TempDir::new("capped");
    // The credential-bearing URI comes from the environment, as from a Secret.
    let envs = vec![
        (
            "FERRITE_MODEL_URI",
            format!("http://bob:pa55word-xyz@127.0.0.1:{}/models/slow.onnx?sig=t0ken-abc", server.port),
        ),
        ("FERRITE_MODEL_DEST", dest.path().display().to_string()),
        ("FERRITE_MODEL_NAME", "capped".to_string()),
    ];
    let output =
        tokio::task::spawn_blocking(move || run_binary(&envs, &["--max-bytes", "1048576", "--max-files", "1"]))
            .await
            .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with(&format!("error: fetch http://127.0.0.1:{}/models/slow.onnx: ", server.port)), "{last}");
    assert!(last.contains(&format!("announces {MODEL_LEN} bytes, more than --max-bytes (1048576 bytes)")), "{last}");
    for secret in ["bob", "pa55word-xyz", "t0ken-abc"] {
        assert!(!stderr.contains(secret), "{secret} leaked: {stderr}");
    }
    assert!(!dest.path().join("capped/1/model.onnx").exists());

    let output = tokio::task::spawn_blocking(|| {
        run_binary(&[], &["--uri", "/nowhere", "--dest", "/tmp", "--model-name", "m", "--max-files", "0"])
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-files"), "{stderr}");
}
