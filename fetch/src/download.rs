//! Downloading one file into place: a temporary file beside the target,
//! written by a blocking thread that hashes as it goes, retries with
//! exponential backoff that resume from the bytes already written, checks
//! of size and SHA-256, then sync and rename.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::StreamExt;
use sha2::{Digest, Sha256};

use crate::backends::{Backend, Location};
use crate::failure::{io_failure, Failure};
use crate::limits::Budget;
use crate::progress::Progress;
use crate::uri::sanitize;
use crate::{FetchOptions, TEMP_MARKER};

/// One file to fetch.
pub(crate) struct Item {
    pub(crate) location: Location,
    pub(crate) dest: PathBuf,
    /// Size announced by a listing.
    pub(crate) size: Option<u64>,
}

/// The size of the destination file when it already holds the object.
pub(crate) async fn already_present(
    backend: &Backend,
    item: &Item,
    sha: Option<&[u8; 32]>,
) -> Result<Option<u64>, Failure> {
    let Ok(meta) = std::fs::metadata(&item.dest) else { return Ok(None) };
    if !meta.is_file() {
        return Ok(None);
    }
    let local = meta.len();
    if let Some(expected) = sha {
        // The hash decides: a file with the expected content is complete.
        let path = item.dest.clone();
        let actual = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| Failure::permanent(format!("hashing task failed: {e}")))?
            .map_err(|e| io_failure("cannot read", &item.dest, e))?;
        return Ok((&actual == expected).then_some(local));
    }
    let remote = match item.size {
        Some(size) => Some(size),
        // Not known: ask. A failure here only means downloading again.
        None => backend.size(&item.location).await.ok().flatten(),
    };
    Ok((remote == Some(local)).then_some(local))
}

fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1024 * 1024];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hasher.finalize().into())
}

/// Downloads one file into place; returns its size.
pub(crate) async fn download(
    backend: &Backend,
    item: &Item,
    options: &FetchOptions,
    sha: Option<&[u8; 32]>,
    progress: &Progress,
    budget: &Budget,
    shown: &str,
) -> Result<u64, Failure> {
    let dir = item.dest.parent().expect("a file under the model directory");
    let file_name = item.dest.file_name().expect("a file name").to_string_lossy().into_owned();
    std::fs::create_dir_all(dir).map_err(|e| io_failure("cannot create", dir, e))?;
    remove_stale_temporaries(dir, &file_name);
    let temp = dir.join(format!(".{file_name}{TEMP_MARKER}{}-{}", std::process::id(), next_temp_id()));
    let writer = Writer::spawn(temp.clone(), sha.is_some())?;

    let result = receive(backend, item, options, &writer, progress, budget, shown).await;
    let finished = writer.finish().await;
    let (size, digest) = match (result, finished) {
        (Ok(expected), Ok((size, digest))) => {
            if let Some(expected) = expected.filter(|&e| e != size) {
                let _ = std::fs::remove_file(&temp);
                return Err(Failure::permanent(format!("size mismatch: expected {expected} bytes, wrote {size}")));
            }
            (size, digest)
        }
        (Err(failure), _) | (Ok(_), Err(failure)) => {
            let _ = std::fs::remove_file(&temp);
            return Err(failure);
        }
    };
    if let (Some(expected), Some(actual)) = (sha, digest) {
        if &actual != expected {
            let _ = std::fs::remove_file(&temp);
            return Err(Failure::permanent(format!(
                "sha256 mismatch: expected {}, got {}; the download was deleted",
                crate::to_hex(expected),
                crate::to_hex(&actual)
            )));
        }
    }
    if let Err(e) = std::fs::rename(&temp, &item.dest) {
        let _ = std::fs::remove_file(&temp);
        return Err(io_failure("cannot move the download to", &item.dest, e));
    }
    // Make the rename itself durable.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(size)
}

fn next_temp_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Removes temporary files an interrupted earlier fetch left for this file.
fn remove_stale_temporaries(dir: &Path, file_name: &str) {
    let prefix = format!(".{file_name}{TEMP_MARKER}");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Streams one file into the writer, with retries; returns the size the
/// source announced, if it did.
async fn receive(
    backend: &Backend,
    item: &Item,
    options: &FetchOptions,
    writer: &Writer,
    progress: &Progress,
    budget: &Budget,
    shown: &str,
) -> Result<Option<u64>, Failure> {
    let mut written: u64 = 0;
    let mut total = item.size;
    let mut attempt: u32 = 0;
    loop {
        let outcome: Result<(), Failure> = async {
            let mut opened = backend.open(&item.location, written).await?;
            if opened.start != written {
                // The source ignored the range: start over.
                writer.truncate().await?;
                progress.rewind(written);
                budget.remove_bytes(written);
                written = 0;
            }
            if let Some(size) = opened.total {
                if total.is_some_and(|t| t != size) && written > 0 {
                    writer.truncate().await?;
                    progress.rewind(written);
                    budget.remove_bytes(written);
                    written = 0;
                    return Err(Failure::transient("the object changed during the download"));
                }
                if total.is_none() {
                    progress.add_total(size);
                }
                budget.check_announced("the source announces", size.saturating_sub(written))?;
                total = Some(size);
            }
            loop {
                let next = tokio::time::timeout(options.idle_timeout, opened.body.next())
                    .await
                    .map_err(|_| Failure::transient(format!("no data for {} s", options.idle_timeout.as_secs_f64())))?;
                let Some(chunk) = next else { break };
                let chunk = chunk?;
                let n = chunk.len() as u64;
                // Counted before it is written: an endless body stops here.
                budget.add_bytes(n)?;
                writer.write(chunk).await?;
                written += n;
                progress.add(n);
            }
            match total {
                Some(t) if written < t => {
                    Err(Failure::transient(format!("the connection closed after {written} of {t} bytes")))
                }
                Some(t) if written > t => Err(Failure::permanent(format!("received {written} bytes, expected {t}"))),
                _ => Ok(()),
            }
        }
        .await;
        match outcome {
            Ok(()) => return Ok(total),
            Err(failure) if failure.transient && attempt < options.retries => {
                attempt += 1;
                let backoff = backoff(options.initial_backoff, attempt);
                tracing::warn!(
                    "fetch {shown}: {}; retrying in {:.1} s (retry {attempt} of {}){}",
                    sanitize(&failure.message, &options.uri),
                    backoff.as_secs_f64(),
                    options.retries,
                    if written > 0 { format!(", resuming at byte {written}") } else { String::new() }
                );
                tokio::time::sleep(backoff).await;
            }
            Err(failure) => {
                let message = if attempt > 0 {
                    format!("{} (after {attempt} retries)", failure.message)
                } else {
                    failure.message
                };
                return Err(Failure { message, ..failure });
            }
        }
    }
}

/// The wait before retry `attempt` (1-based): doubling, at most 30 s.
fn backoff(initial: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    initial.saturating_mul(factor).min(Duration::from_secs(30))
}

enum WriteMessage {
    Data(Bytes),
    Truncate,
}

/// Writes a file on a blocking thread, hashing as it goes; the channel
/// bounds the memory held to a few chunks.
struct Writer {
    sender: tokio::sync::mpsc::Sender<WriteMessage>,
    task: tokio::task::JoinHandle<std::io::Result<(u64, Option<[u8; 32]>)>>,
    /// The error that stopped the writer, for the sender to report.
    error: Arc<Mutex<Option<String>>>,
    path: PathBuf,
}

impl Writer {
    fn spawn(path: PathBuf, hash: bool) -> Result<Self, Failure> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_failure("cannot create", &path, e))?;
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<WriteMessage>(16);
        let error = Arc::new(Mutex::new(None));
        let task_error = error.clone();
        let task = tokio::task::spawn_blocking(move || {
            let run = || -> std::io::Result<(u64, Option<[u8; 32]>)> {
                let mut file = file;
                let mut hasher = hash.then(Sha256::new);
                let mut size = 0u64;
                while let Some(message) = receiver.blocking_recv() {
                    match message {
                        WriteMessage::Data(chunk) => {
                            file.write_all(&chunk)?;
                            if let Some(hasher) = hasher.as_mut() {
                                hasher.update(&chunk);
                            }
                            size += chunk.len() as u64;
                        }
                        WriteMessage::Truncate => {
                            file.set_len(0)?;
                            file.seek(SeekFrom::Start(0))?;
                            hasher = hash.then(Sha256::new);
                            size = 0;
                        }
                    }
                }
                file.flush()?;
                file.sync_all()?;
                let written = file.metadata()?.len();
                if written != size {
                    return Err(std::io::Error::other(format!("file holds {written} bytes, {size} were written")));
                }
                Ok((size, hasher.map(|h| h.finalize().into())))
            };
            let result = run();
            if let Err(e) = &result {
                *task_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            result
        });
        Ok(Writer { sender, task, error, path })
    }

    async fn send(&self, message: WriteMessage) -> Result<(), Failure> {
        if self.sender.send(message).await.is_err() {
            let error = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return Err(Failure::permanent(format!(
                "cannot write {}: {}",
                self.path.display(),
                error.unwrap_or_else(|| "the writer stopped".into())
            )));
        }
        Ok(())
    }

    async fn write(&self, chunk: Bytes) -> Result<(), Failure> {
        self.send(WriteMessage::Data(chunk)).await
    }

    async fn truncate(&self) -> Result<(), Failure> {
        self.send(WriteMessage::Truncate).await
    }

    async fn finish(self) -> Result<(u64, Option<[u8; 32]>), Failure> {
        let Writer { sender, task, path, .. } = self;
        drop(sender);
        task.await
            .map_err(|e| Failure::permanent(format!("writer task failed: {e}")))?
            .map_err(|e| io_failure("cannot write", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 3), base * 4);
        assert_eq!(backoff(base, 40), Duration::from_secs(30));
    }
}
