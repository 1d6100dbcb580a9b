//! Helpers shared by the test files: data, scratch directories, what a
//! fetch left behind, the HTTP stand-in (`stand_in`) and the real storage
//! servers (`servers`).
#![allow(dead_code)] // each test file uses part of it

pub mod servers;
pub mod stand_in;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferrite_fetch::{FetchOptions, TEMP_MARKER};
use sha2::{Digest, Sha256};

/// Size of the generated model: over 3 MiB, so that it arrives in parts.
pub const MODEL_LEN: usize = 3 * 1024 * 1024 + 12_345;

/// Deterministic pseudo-random bytes (xorshift).
pub fn generate(len: usize, seed: u64) -> Bytes {
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

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
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

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file under a directory, relative path -> content.
pub fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
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

pub fn assert_no_temporaries(root: &Path) {
    let leftovers: Vec<String> = tree(root).into_keys().filter(|k| k.contains(TEMP_MARKER)).collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

/// Options for tests: fast retries.
pub fn options(uri: &str, dest: &Path, name: &str) -> FetchOptions {
    let mut options = FetchOptions::new(uri, dest, name);
    options.retries = 3;
    options.initial_backoff = Duration::from_millis(20);
    options.idle_timeout = Duration::from_secs(10);
    options
}

/// The objects the storage tests upload: a model repository layout and
/// one stray object beside it.
pub fn repository_objects() -> BTreeMap<String, Bytes> {
    [
        ("resnet/1/model.onnx", generate(MODEL_LEN, 11)),
        ("resnet/ferrite.json", Bytes::from_static(br#"{"max_batch_size": 4}"#)),
        ("resnet/2/model.onnx", generate(4321, 12)),
        ("other/model.onnx", generate(100, 13)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The objects under `prefix/`, keyed by their path relative to it.
pub fn under(objects: &BTreeMap<String, Bytes>, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    objects.iter().filter_map(|(k, v)| Some((k.strip_prefix(&format!("{prefix}/"))?.to_string(), v.to_vec()))).collect()
}

/// A port nobody listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
