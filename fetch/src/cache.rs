//! The node's model cache: `ferrite-server fetch --cache-dir DIR` (a
//! hostPath shared by the pods of a node) downloads a model once per node
//! and serves the next pods from disk.
//!
//! # Layout
//!
//! ```text
//! DIR/entries/<key>/                 an entry: a model repository, read-only
//!     <model-name>/1/model.onnx      (files 0444, directories 0555)
//!     <model-name>/.ferrite-in-use   the file a serving pod holds a shared flock on
//! DIR/locks/<key>.lock               the key's exclusive flock; its mtime is the last use
//! DIR/tmp/<key>.<pid>.<nanos>/       a download in progress
//! ```
//!
//! The key is [`entry_key`]: shared across namespaces for a model with a
//! SHA-256, private to the namespace (`--cache-scope`) otherwise. The
//! operator computes the same key and mounts `entries/<key>` (and nothing
//! else of the cache) read-only at the server's model repository: with a
//! cache, the fetch writes nothing to `--dest`.
//!
//! # Steps of a fetch
//!
//! 1. Take the key's exclusive lock, waiting while another fetch holds it:
//!    two pods starting at once on a node download once.
//! 2. A published entry (its in-use file exists: it is written last) is a
//!    hit: touch its last-use time, done.
//! 3. Else download into `tmp/`, verified as any fetch is (sizes, the
//!    SHA-256 when given), add the in-use file, make it read-only and
//!    rename it to `entries/<key>`: a reader never sees a partial entry, and
//!    a failed download (a wrong SHA-256) is never published.
//! 4. Release the key, then evict ([`evict()`]) least recently used entries
//!    beyond `--cache-max-bytes`. An entry bigger than the whole bound is
//!    still served from the cache (the server mounts only entries) but is
//!    never kept: it is the first evicted once no pod uses it.

mod evict;
mod lock;
mod tree;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use ferrite_contract::fetch::{entry_key, entry_sub_path, CACHE_ENTRIES_DIR, CACHE_IN_USE_FILE};

pub use self::evict::{evict, Eviction, RECENT_USE_GRACE};
pub use self::lock::hold_shared;
use self::lock::KeyLock;
use crate::{fetch, redact_uri, FetchError, FetchOptions, FetchReport};

/// Where the cache is and how big it may grow.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The cache's root directory (`--cache-dir`).
    pub dir: PathBuf,
    /// Most bytes the entries may hold (`--cache-max-bytes`).
    pub max_bytes: u64,
    /// Who shares entries fetched without a SHA-256 (`--cache-scope`, the
    /// namespace).
    pub scope: String,
    /// Entries used more recently are not evicted ([`RECENT_USE_GRACE`]).
    pub grace: Duration,
}

impl CacheOptions {
    /// Options with the default grace period.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64, scope: impl Into<String>) -> Self {
        CacheOptions { dir: dir.into(), max_bytes, scope: scope.into(), grace: RECENT_USE_GRACE }
    }
}

/// Whether the model was in the cache.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Found: nothing downloaded.
    Hit,
    /// Downloaded and published.
    Miss(FetchReport),
}

/// What a cached fetch did.
#[derive(Debug, Clone)]
pub struct CachedFetch {
    /// The entry's key ([`entry_key`]).
    pub key: String,
    /// `DIR/entries/<key>`: the model repository holding the model.
    pub entry: PathBuf,
    /// Hit or miss.
    pub outcome: Outcome,
    /// What the eviction after a download did (`None` on a hit, or when it
    /// failed: logged as a warning, the model is served all the same).
    pub eviction: Option<Eviction>,
}

/// The cache's paths.
pub(crate) struct Layout {
    pub(crate) entries: PathBuf,
    pub(crate) locks: PathBuf,
    pub(crate) tmp: PathBuf,
}

impl Layout {
    pub(crate) fn new(dir: &Path) -> Self {
        Layout { entries: dir.join(CACHE_ENTRIES_DIR), locks: dir.join("locks"), tmp: dir.join("tmp") }
    }

    fn create(&self) -> io::Result<()> {
        for dir in [&self.entries, &self.locks, &self.tmp] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    pub(crate) fn lock_file(&self, key: &str) -> PathBuf {
        self.locks.join(format!("{key}.lock"))
    }

    /// A fresh path under `tmp/` named after the key.
    pub(crate) fn temporary(&self, key: &str) -> PathBuf {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        self.tmp.join(format!("{key}.{}.{nanos}", std::process::id()))
    }

    /// The last use of a key: its lock file's modification time.
    pub(crate) fn last_used(&self, key: &str) -> io::Result<SystemTime> {
        std::fs::metadata(self.lock_file(key))?.modified()
    }
}

/// Fetches the model through the node cache; see the module documentation.
/// `options.dest` is not written.
pub async fn fetch_cached(options: &FetchOptions, cache: &CacheOptions) -> Result<CachedFetch, FetchError> {
    let started = Instant::now();
    let error = |message: String| FetchError { uri: redact_uri(&options.uri), message };
    if cache.scope.is_empty() || cache.max_bytes == 0 {
        return Err(error("the model cache needs a scope (--cache-scope) and a size (--cache-max-bytes)".into()));
    }
    let key = entry_key(&cache.scope, &options.uri, options.sha256.as_deref(), &options.model_name);
    let layout = Layout::new(&cache.dir);
    let entry = layout.entries.join(&key);
    let io_error = |what: &str, e: io::Error| error(format!("model cache {}: {what}: {e}", cache.dir.display()));
    layout.create().map_err(|e| io_error("cannot create its directories", e))?;

    let lock_path = layout.lock_file(&key);
    let key_lock = match KeyLock::try_acquire(&lock_path).map_err(|e| io_error("cannot open a lock", e))? {
        Some(lock) => lock,
        None => {
            tracing::info!("model cache: another pod is fetching {key}; waiting for it");
            let path = lock_path.clone();
            tokio::task::spawn_blocking(move || KeyLock::acquire(&path))
                .await
                .map_err(|e| error(format!("model cache: waiting for the lock: {e}")))?
                .map_err(|e| io_error("cannot lock", e))?
        }
    };
    let touch = |lock: &KeyLock| lock.file.set_modified(SystemTime::now());

    if entry.join(&options.model_name).join(CACHE_IN_USE_FILE).is_file() {
        touch(&key_lock).map_err(|e| io_error("cannot record the use", e))?;
        tracing::info!(
            "model cache hit: {key} ({}) in {:.2} s, nothing downloaded",
            entry.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(CachedFetch { key, entry, outcome: Outcome::Hit, eviction: None });
    }

    let staging = layout.temporary(&key);
    let mut staged = options.clone();
    staged.dest = staging.clone();
    let report = match fetch(&staged).await {
        Ok(report) => report,
        Err(e) => {
            let _ = tree::remove(&staging);
            return Err(e);
        }
    };
    let published = publish(&staging, &entry, &options.model_name);
    if let Err(e) = published {
        let _ = tree::remove(&staging);
        return Err(io_error("cannot publish the entry", e));
    }
    touch(&key_lock).map_err(|e| io_error("cannot record the use", e))?;
    drop(key_lock);
    tracing::info!(
        "model cache miss: {key}: downloaded {} bytes in {:.2} s into {}",
        report.bytes,
        report.elapsed.as_secs_f64(),
        entry.display()
    );
    if report.bytes > cache.max_bytes {
        tracing::warn!(
            "model cache: the model ({} bytes) is bigger than the whole cache (--cache-max-bytes {}): \
             it is served from the node directory but not kept once no pod uses it",
            report.bytes,
            cache.max_bytes
        );
    }
    // The model is in place: a failed eviction must not fail the pod.
    let eviction = match evict(&cache.dir, cache.max_bytes, cache.grace) {
        Ok(eviction) => Some(eviction),
        Err(e) => {
            tracing::warn!("model cache {}: cannot evict old entries: {e}", cache.dir.display());
            None
        }
    };
    Ok(CachedFetch { key, entry, outcome: Outcome::Miss(report), eviction })
}

/// Adds the in-use file, makes the staged repository read-only and renames
/// it into place (replacing an unpublished leftover: a directory without
/// the in-use file, e.g. one a kubelet created for a mount).
fn publish(staging: &Path, entry: &Path, model_name: &str) -> io::Result<()> {
    let in_use = staging.join(model_name).join(CACHE_IN_USE_FILE);
    std::fs::File::create(&in_use)?.sync_all()?;
    tree::make_read_only(staging)?;
    if entry.exists() {
        tree::remove(entry)?;
    }
    // Moving a directory to another parent rewrites its `..`, which needs
    // write permission on it (root skips the check, a pod's uid does not):
    // the root stays writable until it is in place.
    tree::set_root_writable(staging, true)?;
    std::fs::rename(staging, entry)?;
    tree::set_root_writable(entry, false)?;
    if let Some(parent) = entry.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}
