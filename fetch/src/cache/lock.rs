//! `flock(2)` locks of the cache: one per key (a fetch downloading or
//! reading an entry, an eviction removing it) and the in-use file a serving
//! pod holds shared.

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

/// An exclusive lock on a key's lock file, released on drop (or when the
/// process exits, however it exits).
#[derive(Debug)]
pub(crate) struct KeyLock {
    pub(crate) file: File,
}

impl KeyLock {
    /// Opens (creating) the lock file; does not lock yet.
    fn open(path: &Path) -> io::Result<File> {
        File::options().read(true).write(true).create(true).truncate(false).open(path)
    }

    /// Waits for the lock.
    pub(crate) fn acquire(path: &Path) -> io::Result<KeyLock> {
        let file = Self::open(path)?;
        flock(&file, FlockOperation::LockExclusive)?;
        Ok(KeyLock { file })
    }

    /// The lock if nobody holds it, else `None`.
    pub(crate) fn try_acquire(path: &Path) -> io::Result<Option<KeyLock>> {
        let file = Self::open(path)?;
        Ok(try_exclusive(&file)?.then_some(KeyLock { file }))
    }
}

/// Takes an exclusive lock without waiting: `false` while another holds it.
pub(crate) fn try_exclusive(file: &File) -> io::Result<bool> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Takes a shared lock on `path` (opened read-only: a serving pod's mount is
/// read-only), waiting while an eviction holds it exclusively. Kept until
/// the file is dropped or the process exits.
pub fn hold_shared(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    flock(&file, FlockOperation::LockShared)?;
    Ok(file)
}
