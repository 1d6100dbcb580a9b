//! Caps on what one fetch may write (`--max-bytes`, `--max-files`): a
//! hostile or broken source (an endless HTTP body, a tar bomb, a prefix of a
//! million objects) stops at the cap instead of filling the node's disk.
//!
//! Bytes count everything the fetch puts on disk at once: downloads (an
//! archive included) and unpacked archive contents, since both sit in the
//! model directory while an archive is unpacked; files already present from
//! an earlier attempt count too, so the cap bounds the model's whole size on
//! disk. Files count the model's files (downloaded, already present or
//! unpacked), not the archive they came in.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::failure::Failure;

/// Default `--max-bytes`: 20 GiB. It holds the largest models this server
/// runs on CPU (a 7B-parameter LLM in fp16 is about 14 GB) or an archive of a
/// ~10 GB model directory, counted twice while it is unpacked, and stays well
/// below the local disk of a typical node, which the model's emptyDir shares.
pub const DEFAULT_MAX_BYTES: u64 = 20 << 30;

/// Default `--max-files`: 10,000. A model directory holds a handful of files;
/// an ONNX model with one external-data file per tensor holds a few thousand
/// at most. The cap bounds the inodes and directory entries a source can
/// make.
pub const DEFAULT_MAX_FILES: u64 = 10_000;

/// What a fetch has written so far, against its caps. Shared by the
/// downloads and the unpacking of one fetch.
#[derive(Debug)]
pub(crate) struct Budget {
    max_bytes: u64,
    max_files: u64,
    bytes: AtomicU64,
    files: AtomicU64,
}

impl Budget {
    pub(crate) fn new(max_bytes: u64, max_files: u64) -> Self {
        Budget { max_bytes, max_files, bytes: AtomicU64::new(0), files: AtomicU64::new(0) }
    }

    /// Counts `n` more bytes; fails, counting nothing, when they would pass
    /// `--max-bytes`.
    pub(crate) fn add_bytes(&self, n: u64) -> Result<(), Failure> {
        let mut used = self.bytes.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(n);
            if next > self.max_bytes {
                return Err(Failure::over_limit(format!(
                    "the model is larger than --max-bytes ({} bytes): stopped after {used} bytes; \
                     what this fetch wrote was removed",
                    self.max_bytes
                )));
            }
            match self.bytes.compare_exchange_weak(used, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    /// Fails when `n` bytes that a source announced would pass the cap,
    /// before any of them is downloaded.
    pub(crate) fn check_announced(&self, what: &str, n: u64) -> Result<(), Failure> {
        let used = self.bytes.load(Ordering::Relaxed);
        if used.saturating_add(n) > self.max_bytes {
            return Err(Failure::over_limit(format!(
                "{what} {n} bytes, more than --max-bytes ({} bytes) allows{}",
                self.max_bytes,
                if used > 0 { format!(" after the {used} bytes already written") } else { String::new() }
            )));
        }
        Ok(())
    }

    /// Forgets `n` bytes counted before (a download that started over, an
    /// archive deleted after unpacking).
    pub(crate) fn remove_bytes(&self, n: u64) {
        let _ = self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(n)));
    }

    /// Counts one more file; fails when it would pass `--max-files`.
    pub(crate) fn add_file(&self) -> Result<(), Failure> {
        self.check_files(1)?;
        self.files.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Fails when `n` more files would pass `--max-files`.
    pub(crate) fn check_files(&self, n: u64) -> Result<(), Failure> {
        let used = self.files.load(Ordering::Relaxed);
        if used.saturating_add(n) > self.max_files {
            return Err(Failure::over_limit(format!(
                "the model has more files than --max-files ({}) allows; what this fetch wrote was removed",
                self.max_files
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_stop_at_the_cap_and_name_the_flag() {
        let budget = Budget::new(10, 2);
        budget.add_bytes(6).unwrap();
        let failure = budget.add_bytes(5).unwrap_err();
        assert!(failure.over_limit && !failure.transient);
        assert!(failure.message.contains("--max-bytes (10 bytes)"), "{}", failure.message);
        budget.add_bytes(4).unwrap(); // the refused 5 were not counted
        budget.remove_bytes(10);
        assert!(budget.check_announced("the source announces", 11).unwrap_err().message.contains("announces 11"));
        budget.add_bytes(u64::MAX).unwrap_err();
    }

    #[test]
    fn files_stop_at_the_cap() {
        let budget = Budget::new(10, 2);
        budget.add_file().unwrap();
        budget.check_files(1).unwrap();
        assert!(budget.check_files(2).unwrap_err().message.contains("--max-files (2)"));
        budget.add_file().unwrap();
        assert!(budget.add_file().is_err());
    }
}
