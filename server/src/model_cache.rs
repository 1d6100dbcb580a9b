//! The serving side of the node model cache (`ferrite-server fetch
//! --cache-dir`): a model directory mounted from a cache entry holds
//! `.ferrite-in-use` ([`CACHE_IN_USE_FILE`]), and the server holds a shared
//! `flock` on it for as long as it runs, so that a fetch's eviction on the
//! same node (which needs the exclusive lock) leaves the entry alone. The
//! lock goes with the process, however it exits.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use ferrite_contract::fetch::CACHE_IN_USE_FILE;
use rustix::fs::{flock, FlockOperation};

/// Shared locks on the in-use files of a repository's model directories;
/// released when dropped.
#[derive(Debug)]
pub struct InUseLocks {
    held: Vec<(PathBuf, File)>,
}

impl InUseLocks {
    /// The in-use files locked.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.held.iter().map(|(path, _)| path.as_path())
    }
}

/// Takes a shared lock on `<dir>/.ferrite-in-use` of every model directory
/// of `repository` that has one (none: nothing held). The files are opened
/// read-only: the entry's mount is. Waits while an eviction holds one (it
/// removes the entry then, and the model's load fails with a clear error).
pub fn hold_in_use_locks(repository: &Path) -> io::Result<InUseLocks> {
    let mut held = Vec::new();
    let listing = match std::fs::read_dir(repository) {
        Ok(listing) => listing,
        // No repository (single files, the demo model): nothing to hold.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => {
            return Ok(InUseLocks { held })
        }
        Err(e) => return Err(e),
    };
    for model in listing {
        let path = model?.path().join(CACHE_IN_USE_FILE);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        flock(&file, FlockOperation::LockShared)
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("cannot lock {}: {e}", path.display())))?;
        held.push((path, file));
    }
    Ok(InUseLocks { held })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflicts(path: &Path) -> bool {
        let file = File::open(path).unwrap();
        flock(&file, FlockOperation::NonBlockingLockExclusive).is_err()
    }

    #[test]
    fn model_directories_with_the_in_use_file_are_held_until_dropped() {
        let repo = std::env::temp_dir().join(format!("ferrite-in-use-{}", std::process::id()));
        std::fs::create_dir_all(repo.join("cached")).unwrap();
        std::fs::create_dir_all(repo.join("plain/1")).unwrap();
        std::fs::write(repo.join("readme"), b"not a model").unwrap();
        let in_use = repo.join("cached").join(CACHE_IN_USE_FILE);
        std::fs::write(&in_use, b"").unwrap();
        let locks = hold_in_use_locks(&repo).unwrap();
        assert_eq!(locks.paths().collect::<Vec<_>>(), [in_use.as_path()]);
        assert!(conflicts(&in_use), "an eviction's exclusive lock must fail while the server runs");
        // Another server on the same entry shares it.
        let second = hold_in_use_locks(&repo).unwrap();
        drop((locks, second));
        assert!(!conflicts(&in_use));
        assert_eq!(hold_in_use_locks(&repo.join("missing")).unwrap().paths().count(), 0);
        std::fs::remove_dir_all(&repo).unwrap();
    }
}
