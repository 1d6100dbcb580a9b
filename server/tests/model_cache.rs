//! The node model cache through the binary: `fetch --cache-dir` downloads
//! once and says hit or miss, and `serve` holds its entry's in-use lock
//! while it runs, so an eviction skips the entry until the process exits.
//! `serve` loads the demo model with ONNX Runtime (`ORT_DYLIB_PATH`, which
//! the Makefile sets).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;

use ferrite_fetch::cache::{entry_key, entry_sub_path, evict, CACHE_IN_USE_FILE};

const BINARY: &str = env!("CARGO_BIN_EXE_ferrite-server");
const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo.onnx");

/// A directory under the system temp dir, removed on drop (entries are
/// read-only: their directories are made writable first).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ferrite-model-cache-{}-{name}", std::process::id()));
        remove(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        remove(&self.0);
    }
}

fn remove(path: &Path) {
    if path.exists() {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(path).status();
        let _ = std::fs::remove_dir_all(path);
    }
}

fn fetch(cache: &Path, dest: &Path, extra: &[&str]) -> Output {
    Command::new(BINARY)
        .args(["fetch", "--uri", DEMO, "--model-name", "demo", "--cache-scope", "ml", "--cache-max-bytes", "1000000"])
        .arg("--dest")
        .arg(dest)
        .arg("--cache-dir")
        .arg(cache)
        .args(extra)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

#[test]
fn fetch_with_a_cache_downloads_once_and_writes_nothing_to_dest() {
    let dir = TempDir::new("fetch");
    let (cache, dest) = (dir.0.join("cache"), dir.0.join("dest"));
    let first = fetch(&cache, &dest, &[]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let size = std::fs::metadata(DEMO).unwrap().len();
    assert!(stderr.contains("model cache miss") && stderr.contains(&format!("downloaded {size} bytes in")), "{stderr}");
    let second = fetch(&cache, &dest, &[]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    let key = entry_key("ml", DEMO, None, "demo");
    assert!(stderr.contains("model cache hit") && stderr.contains(&key), "{stderr}");
    assert_eq!(
        std::fs::read(cache.join(entry_sub_path(&key)).join("demo/1/model.onnx")).unwrap(),
        std::fs::read(DEMO).unwrap()
    );
    assert!(!dest.exists() || std::fs::read_dir(&dest).unwrap().next().is_none(), "--dest is not written");

    // A cache needs its scope: clap refuses, naming the flag.
    let output = Command::new(BINARY)
        .args(["fetch", "--uri", DEMO, "--model-name", "demo", "--dest"])
        .arg(&dest)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--cache-scope"));
}

/// Serves one 1 MB model in ten parts 100 ms apart (about a second per
/// download) and counts the GETs.
async fn slow_server() -> (String, Arc<AtomicUsize>) {
    async fn handle(State(gets): State<Arc<AtomicUsize>>) -> Response {
        gets.fetch_add(1, Ordering::SeqCst);
        let body = Bytes::from(vec![7u8; 1 << 20]);
        let step = body.len() / 10;
        let stream = futures::stream::unfold(0usize, move |at| {
            let body = body.clone();
            async move {
                if at >= body.len() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let end = (at + step).min(body.len());
                Some((Ok::<Bytes, std::io::Error>(body.slice(at..end)), end))
            }
        });
        Response::builder().header("content-length", 1 << 20).body(Body::from_stream(stream)).unwrap()
    }
    let gets = Arc::new(AtomicUsize::new(0));
    let router = axum::Router::new().fallback(handle).with_state(gets.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://127.0.0.1:{port}/m.onnx"), gets)
}

/// Two pods starting at once on a node: two processes, one download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fetch_processes_at_once_download_once() {
    let (uri, gets) = slow_server().await;
    let dir = TempDir::new("race");
    let spawn = |dest: &str| {
        Command::new(BINARY)
            .args(["fetch", "--uri", &uri, "--model-name", "m", "--cache-scope", "ml"])
            .arg("--dest")
            .arg(dir.0.join(dest))
            .arg("--cache-dir")
            .arg(dir.0.join("cache"))
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a"), spawn("b"));
    let outputs = tokio::task::spawn_blocking(move || [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()])
        .await
        .unwrap();
    let logs: Vec<String> = outputs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    assert!(outputs.iter().all(|o| o.status.success()), "{logs:?}");
    assert_eq!(gets.load(Ordering::SeqCst), 1, "{logs:?}");
    let count = |needle: &str| logs.iter().filter(|l| l.contains(needle)).count();
    assert_eq!((count("model cache miss"), count("model cache hit")), (1, 1), "{logs:?}");
    assert_eq!(count("another pod is fetching"), 1, "the second waited for the first: {logs:?}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn held_by_another(in_use: &Path) -> bool {
    let file = std::fs::File::open(in_use).unwrap();
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
}

#[test]
fn a_serving_process_keeps_its_entry_from_eviction_until_it_exits() {
    let dir = TempDir::new("serve");
    let cache = dir.0.join("cache");
    let fetched = fetch(&cache, &dir.0.join("dest"), &[]);
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    let key = entry_key("ml", DEMO, None, "demo");
    let entry = cache.join(entry_sub_path(&key));
    let in_use = entry.join("demo").join(CACHE_IN_USE_FILE);

    let mut server = Command::new(BINARY)
        .arg("serve")
        .arg("--model-repository")
        .arg(&entry)
        .args(["--http-port", &free_port().to_string(), "--grpc-port", &free_port().to_string()])
        .args(["--metrics-port", &free_port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !held_by_another(&in_use) {
        if let Some(status) = server.try_wait().unwrap() {
            let mut log = String::new();
            std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut log).unwrap();
            panic!(
                "ferrite-server serve exited ({status}) before holding {} (ORT_DYLIB_PATH={:?}): {log}",
                in_use.display(),
                std::env::var("ORT_DYLIB_PATH").ok()
            );
        }
        assert!(Instant::now() < deadline, "the server never locked {}", in_use.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Over any bound and past any grace period, but in use: kept.
    let report = evict(&cache, 1, Duration::ZERO).unwrap();
    assert!(report.evicted.is_empty(), "{report:?}");
    assert!(in_use.exists());

    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(evict(&cache, 1, Duration::ZERO).unwrap().evicted, [key]);
    assert!(!entry.exists());
}
