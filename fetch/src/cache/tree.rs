//! Whole-directory operations on entries: their size, making them
//! read-only once published and writable again to remove them.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Files of a published entry: nobody writes them again.
const FILE_MODE: u32 = 0o444;
/// Directories of a published entry.
const DIR_MODE: u32 = 0o555;

/// Bytes of the regular files under `dir` (symlinks not followed).
pub(crate) fn size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += size(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Files 0444, directories 0555, the root last (it must stay writable
/// while its children change).
pub(crate) fn make_read_only(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            make_read_only(&entry.path())?;
        } else if kind.is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(FILE_MODE))?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
}

/// Makes the root of an entry writable (to move it to another parent
/// directory: the move rewrites its `..`) or read-only again.
pub(crate) fn set_root_writable(dir: &Path, writable: bool) -> io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(if writable { 0o755 } else { DIR_MODE }))
}

/// Removes a tree made read-only by [`make_read_only`]: directories are
/// made writable first (a file's own mode does not matter to unlink).
pub(crate) fn remove(dir: &Path) -> io::Result<()> {
    fn writable(dir: &Path) -> io::Result<()> {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                writable(&entry.path())?;
            }
        }
        Ok(())
    }
    match writable(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    }
    std::fs::remove_dir_all(dir)
}
