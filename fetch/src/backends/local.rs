//! Local files and directories (`/path`, `file:///path`), read on blocking
//! threads in large chunks.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::stream::StreamExt;

use super::{Listed, Location, Opened};
use crate::failure::{io_failure, Failure};

const CHUNK: usize = 4 * 1024 * 1024;

pub(super) fn size(path: &Path) -> Result<Option<u64>, Failure> {
    let meta = std::fs::metadata(path).map_err(|e| io_failure("cannot read", path, e))?;
    Ok(Some(meta.len()))
}

pub(super) fn open(path: &Path, offset: u64) -> Result<Opened, Failure> {
    let mut file = std::fs::File::open(path).map_err(|e| io_failure("cannot open", path, e))?;
    let total = file.metadata().map_err(|e| io_failure("cannot read", path, e))?.len();
    file.seek(SeekFrom::Start(offset)).map_err(|e| io_failure("cannot read", path, e))?;
    let path = path.to_path_buf();
    let body = futures::stream::try_unfold(Some(file), move |file| {
        let path = path.clone();
        async move {
            let Some(mut file) = file else { return Ok(None) };
            let read = tokio::task::spawn_blocking(move || {
                let mut buffer = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < buffer.len() {
                    match file.read(&mut buffer[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buffer.truncate(filled);
                Ok((file, buffer))
            })
            .await
            .map_err(|e| Failure::permanent(format!("reader task failed: {e}")))?;
            let (file, buffer) = read.map_err(|e| io_failure("cannot read", &path, e))?;
            if buffer.is_empty() {
                Ok(None)
            } else {
                Ok(Some((Bytes::from(buffer), Some(file))))
            }
        }
    })
    .boxed();
    Ok(Opened { start: offset, total: Some(total), body })
}

pub(super) async fn list(root: &Path) -> Result<Vec<Listed>, Failure> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        walk(&root, &root, 0, &mut found)?;
        Ok(found)
    })
    .await
    .map_err(|e| Failure::permanent(format!("listing task failed: {e}")))?
}

/// Lists the files under a local directory, following symbolic links (to a
/// bounded depth, which also ends link cycles).
fn walk(root: &Path, dir: &Path, depth: usize, found: &mut Vec<Listed>) -> Result<(), Failure> {
    if depth > 32 {
        return Err(Failure::permanent(format!("{} is nested too deep (a link cycle?)", dir.display())));
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io_failure("cannot list", dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| io_failure("cannot list", dir, e))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path: PathBuf = entry.path();
        let meta = std::fs::metadata(&path).map_err(|e| io_failure("cannot read", &path, e))?;
        if meta.is_dir() {
            walk(root, &path, depth + 1, found)?;
        } else if meta.is_file() {
            let relative = path.strip_prefix(root).expect("under the root");
            let relative: Vec<String> =
                relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            found.push(Listed {
                location: Location::Local(path.clone()),
                relative: relative.join("/"),
                size: meta.len(),
            });
        }
    }
    Ok(())
}
