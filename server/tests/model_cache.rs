//! The node model cache through the binary: `fetch --cache-dir` downloads
//! once and says hit or miss, and `serve` holds its entry's in-use lock
//! while it runs, so an eviction skips the entry until the process exits.
//! `serve` loads the demo model with ONNX Runtime (`ORT_DYLIB_PATH`, which
//! the Makefile sets).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferrite_fetch::cache::{entry_key, entry_sub_path, evict, CACHE_IN_USE_FILE};

const BINARY: &str = env!("CARGO_BIN_EXE_ferrite-server");
const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo.onnx");

/// A directory under the system temp dir, removed on drop (entries are
/// read-only: their directories are made writable first).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ferrite-model-cache-{}-{name}", std::process::id()));
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&path).status();
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
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
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !held_by_another(&in_use) {
        if let Some(status) = server.try_wait().unwrap() {
            panic!("ferrite-server serve exited ({status}) before holding {}", in_use.display());
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
