//! Least-recently-used eviction, bounded by `--cache-max-bytes`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ferrite_contract::fetch::CACHE_IN_USE_FILE;

use super::lock::{try_exclusive, KeyLock};
use super::{tree, Layout};

/// Entries used more recently than this are never evicted. A pod takes its
/// in-use lock only when its server starts, after the init container that
/// found (or downloaded) the entry has exited and the kubelet has set up the
/// mounts: in between it holds no lock, and evicting its entry then would
/// leave its server an empty mount. Ten minutes covers that gap (image pull,
/// scheduling the main container) with room to spare.
pub const RECENT_USE_GRACE: Duration = Duration::from_secs(600);

/// What one eviction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Keys removed, least recently used first.
    pub evicted: Vec<String>,
    /// Bytes the cached entries hold afterwards (entries bigger than the
    /// whole bound not counted: they are never kept past their use).
    pub remaining_bytes: u64,
}

struct Entry {
    key: String,
    path: PathBuf,
    bytes: u64,
    last_used: SystemTime,
}

/// Removes least recently used entries until the entries fit in
/// `max_bytes`, and every entry bigger than `max_bytes` (kept only while
/// used), skipping those in use (a server holds the shared lock on an
/// in-use file), those a fetch holds the key lock of, and those used in the
/// last [`RECENT_USE_GRACE`] (`grace`, shorter in tests). Also removes the
/// temporary directories of fetches that died.
pub fn evict(cache_dir: &Path, max_bytes: u64, grace: Duration) -> io::Result<Eviction> {
    let layout = Layout::new(cache_dir);
    let now = SystemTime::now();
    let mut entries = Vec::new();
    let listing = match std::fs::read_dir(&layout.entries) {
        Ok(listing) => listing,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Eviction::default()),
        Err(e) => return Err(e),
    };
    for item in listing {
        let item = item?;
        let Ok(key) = item.file_name().into_string() else { continue };
        if !item.file_type()?.is_dir() {
            continue;
        }
        let path = item.path();
        let bytes = tree::size(&path).unwrap_or(0);
        let Ok(last_used) = layout.last_used(&key).or_else(|_| item.metadata()?.modified()) else {
            continue; // gone meanwhile
        };
        entries.push(Entry { key, path, bytes, last_used });
    }
    clean_temporaries(&layout);
    entries.sort_by_key(|e| e.last_used);
    // Too big to cache: go first, whatever their age, and do not count.
    let mut total: u64 = entries.iter().filter(|e| e.bytes <= max_bytes).map(|e| e.bytes).sum();
    let mut report = Eviction::default();
    for entry in entries {
        let oversized = entry.bytes > max_bytes;
        if !oversized && total <= max_bytes {
            continue;
        }
        if now.duration_since(entry.last_used).unwrap_or_default() < grace {
            continue;
        }
        // A fetch holds the key: it is reading or writing this entry.
        let Some(_key_lock) = KeyLock::try_acquire(&layout.lock_file(&entry.key))? else { continue };
        // Held until the entry is gone, so no server starts using it meanwhile.
        // Gone meanwhile: another fetch's eviction took it.
        let in_use = match lock_in_use_files(&entry.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            other => other?,
        };
        let Some(_in_use) = in_use else {
            tracing::info!("model cache: not evicting {} ({} bytes): in use", entry.key, entry.bytes);
            continue;
        };
        let doomed = layout.temporary(&format!("evict-{}", entry.key));
        // A rename first: readers see the whole entry or none of it (its
        // root made writable: see `tree::set_root_writable`).
        match tree::set_root_writable(&entry.path, true).and_then(|()| std::fs::rename(&entry.path, &doomed)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            other => other?,
        }
        tree::remove(&doomed)?;
        tracing::info!("model cache: evicted {} ({} bytes, least recently used)", entry.key, entry.bytes);
        if !oversized {
            total -= entry.bytes;
        }
        report.evicted.push(entry.key);
    }
    report.remaining_bytes = total;
    Ok(report)
}

/// Exclusive locks on every in-use file of the entry (one per model
/// directory), or `None` if a server holds one.
fn lock_in_use_files(entry: &Path) -> io::Result<Option<Vec<File>>> {
    let mut held = Vec::new();
    for model in std::fs::read_dir(entry)? {
        let in_use = model?.path().join(CACHE_IN_USE_FILE);
        let file = match File::open(&in_use) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => continue,
            Err(e) => return Err(e),
        };
        if !try_exclusive(&file)? {
            return Ok(None);
        }
        held.push(file);
    }
    Ok(Some(held))
}

/// Temporary directories (`tmp/<key>.*`) whose key no fetch holds: left by
/// a fetch that was killed.
fn clean_temporaries(layout: &Layout) {
    let Ok(listing) = std::fs::read_dir(&layout.tmp) else { return };
    for item in listing.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let key = name.strip_prefix("evict-").unwrap_or(&name);
        let key = key.split('.').next().unwrap_or_default();
        if let Ok(Some(_lock)) = KeyLock::try_acquire(&layout.lock_file(key)) {
            if tree::remove(&item.path()).is_ok() {
                tracing::info!("model cache: removed {name}, left by a fetch that stopped");
            }
        }
    }
}
