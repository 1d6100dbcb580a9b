//! Unpacking a model archive (`.tar`, `.tar.gz`, `.tgz`) that `fetch`
//! downloaded: how a model directory (an LLM's `model.onnx`, `tokenizer.json`,
//! `chat_template.jinja`, `llm.json`) travels over plain HTTP, which cannot
//! list a prefix.
//!
//! Only regular files and directories are unpacked, each to a path inside the
//! model directory (no absolute paths, no `..`, no links). Files go to a
//! staging directory first and are renamed into place once the whole archive
//! has been read: a broken archive leaves nothing half-written behind. Every
//! file and byte unpacked is counted against the fetch's caps
//! ([`crate::limits`]): a tar bomb stops at `--max-bytes` or `--max-files`.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::failure::Failure;
use crate::limits::Budget;

/// File names that mark a model version's directory: an archive whose root
/// holds one of them is unpacked into version `1/`.
const VERSION_MARKERS: [&str; 2] = ["model.onnx", "llm.json"];

/// Whether `name` (a URL path or key) names an archive `unpack` reads, and
/// whether it is gzip-compressed.
pub fn archive_kind(name: &str) -> Option<Compression> {
    let name = name.to_ascii_lowercase();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(Compression::Gzip)
    } else if name.ends_with(".tar") {
        Some(Compression::None)
    } else {
        None
    }
}

/// How the tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain `.tar`.
    None,
    /// `.tar.gz` or `.tgz`.
    Gzip,
}

/// Unpacks `archive` into `model_dir` and returns the files written.
///
/// Layout: a single top-level directory that wraps everything (as
/// `tar czf m.tgz mymodel/` makes) is stripped; then, if the root holds
/// `model.onnx` or `llm.json`, the files are one model version and go to
/// `model_dir/1/`, otherwise the root's layout (version directories,
/// `ferrite.json`) is kept as it is.
pub(crate) fn unpack(
    archive: &Path,
    compression: Compression,
    model_dir: &Path,
    budget: &Budget,
) -> Result<Vec<PathBuf>, Failure> {
    let staging = model_dir.join(".unpack-tmp");
    let _ = std::fs::remove_dir_all(&staging);
    let result = unpack_into(archive, compression, &staging, budget)
        .and_then(|()| place(&staging, model_dir).map_err(Failure::permanent));
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn unpack_into(archive: &Path, compression: Compression, staging: &Path, budget: &Budget) -> Result<(), Failure> {
    let file = File::open(archive).map_err(|e| format!("cannot open the archive: {e}"))?;
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(BufReader::new(file)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(BufReader::new(file))),
    };
    let mut tar = tar::Archive::new(reader);
    std::fs::create_dir_all(staging).map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
    let mut files = 0usize;
    for entry in tar.entries().map_err(|e| format!("not a tar archive: {e}"))? {
        let mut entry = entry.map_err(|e| format!("broken archive: {e}"))?;
        let path = entry.path().map_err(|e| format!("broken archive: {e}"))?.into_owned();
        let relative = safe_relative(&path)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue; // directories are made for the files inside them
        }
        if !kind.is_file() {
            return Err(
                format!("archive entry '{}' is not a regular file (links are not unpacked)", path.display()).into()
            );
        }
        budget.add_file()?;
        budget.check_announced(&format!("archive entry '{}' holds", path.display()), entry.size())?;
        let dest = staging.join(&relative);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut out = File::create(&dest).map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        copy_counted(&mut entry, &mut out, budget, &path, &dest)?;
        out.sync_all().map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        files += 1;
    }
    if files == 0 {
        return Err(Failure::permanent("the archive holds no files"));
    }
    Ok(())
}

/// Copies one entry, counting every block against `--max-bytes` before it
/// is written: the check of the announced size above trusts the headers.
fn copy_counted(
    entry: &mut impl Read,
    out: &mut File,
    budget: &Budget,
    path: &Path,
    dest: &Path,
) -> Result<(), Failure> {
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = entry.read(&mut buffer).map_err(|e| format!("broken archive at '{}': {e}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        budget.add_bytes(n as u64)?;
        out.write_all(&buffer[..n]).map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    }
}

/// `path` as a relative path of normal components, or an error naming it.
fn safe_relative(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => {
                return Err(format!("refusing archive entry '{}': it would leave the model directory", path.display()))
            }
        }
    }
    Ok(out)
}

/// Moves the unpacked files from `staging` into `model_dir` (see `unpack`).
fn place(staging: &Path, model_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut root = staging.to_path_buf();
    let top = children(&root)?;
    if let [only] = top.as_slice() {
        let is_version =
            only.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if only.is_dir() && !is_version {
            root = only.clone();
        }
    }
    let target = if VERSION_MARKERS.iter().any(|m| root.join(m).is_file()) {
        model_dir.join("1")
    } else {
        model_dir.to_path_buf()
    };
    let mut written = Vec::new();
    move_tree(&root, &target, &mut written)?;
    written.sort();
    Ok(written)
}

fn children(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    entries.map(|e| e.map(|e| e.path()).map_err(|e| format!("cannot read {}: {e}", dir.display()))).collect()
}

fn move_tree(from: &Path, to: &Path, written: &mut Vec<PathBuf>) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    for child in children(from)? {
        let dest = to.join(child.file_name().expect("a directory entry has a name"));
        if child.is_dir() {
            move_tree(&child, &dest, written)?;
        } else {
            std::fs::rename(&child, &dest).map_err(|e| format!("cannot move into {}: {e}", dest.display()))?;
            written.push(dest);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])], gzip: bool) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // set_path refuses '..'; write the raw name to test what a hostile archive can hold.
            header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        let raw = builder.into_inner().unwrap();
        if !gzip {
            return raw;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        gz.finish().unwrap()
    }

    /// A scratch directory for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn unpack_bytes(test: &str, bytes: &[u8], compression: Compression) -> (Scratch, Result<Vec<PathBuf>, String>) {
        unpack_capped(test, bytes, compression, &Budget::new(u64::MAX, u64::MAX))
    }

    fn unpack_capped(
        test: &str,
        bytes: &[u8],
        compression: Compression,
        budget: &Budget,
    ) -> (Scratch, Result<Vec<PathBuf>, String>) {
        let dir = Scratch(std::env::temp_dir().join(format!("ferrite-archive-{}-{test}", std::process::id())));
        let _ = std::fs::remove_dir_all(dir.path());
        std::fs::create_dir_all(dir.path()).unwrap();
        let archive = dir.path().join("m.tar");
        std::fs::write(&archive, bytes).unwrap();
        let model_dir = dir.path().join("models/llm");
        let result = unpack(&archive, compression, &model_dir, budget).map_err(|f| f.message);
        (dir, result)
    }

    #[test]
    fn kinds_by_name() {
        assert_eq!(archive_kind("/x/SmolLM2.TGZ"), Some(Compression::Gzip));
        assert_eq!(archive_kind("m.tar.gz"), Some(Compression::Gzip));
        assert_eq!(archive_kind("m.tar"), Some(Compression::None));
        assert_eq!(archive_kind("model.onnx"), None);
    }

    #[test]
    fn a_wrapped_model_directory_becomes_version_1() {
        let bytes = tar_of(&[("smollm2/llm.json", b"{}"), ("smollm2/model.onnx", b"onnx")], true);
        let (dir, result) = unpack_bytes("wrapped", &bytes, Compression::Gzip);
        let root = dir.path().join("models/llm");
        assert_eq!(result.unwrap(), vec![root.join("1/llm.json"), root.join("1/model.onnx")]);
        assert_eq!(std::fs::read(root.join("1/model.onnx")).unwrap(), b"onnx");
        assert!(!root.join(".unpack-tmp").exists());
    }

    #[test]
    fn a_repository_layout_is_kept() {
        let bytes = tar_of(&[("2/model.onnx", b"v2"), ("ferrite.json", b"{}")], false);
        let (dir, result) = unpack_bytes("repository", &bytes, Compression::None);
        let root = dir.path().join("models/llm");
        assert_eq!(result.unwrap(), vec![root.join("2/model.onnx"), root.join("ferrite.json")]);
    }

    #[test]
    fn escaping_paths_are_refused_and_nothing_is_left() {
        let bytes = tar_of(&[("ok.txt", b"fine"), ("../evil", b"x")], false);
        let (dir, result) = unpack_bytes("escaping", &bytes, Compression::None);
        assert!(result.unwrap_err().contains("would leave the model directory"));
        assert!(!dir.path().join("models/evil").exists());
        assert!(!dir.path().join("models/llm/ok.txt").exists());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let (_dir, result) = unpack_bytes("garbage", b"this is not gzip", Compression::Gzip);
        assert!(result.unwrap_err().contains("archive"));
    }

    #[test]
    fn a_tar_bomb_stops_at_max_bytes_and_leaves_nothing() {
        // 64 MiB of zeros in one entry: about 64 KiB of gzip.
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let size = 64 << 20;
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, "bomb/model.onnx", std::io::repeat(0).take(size)).unwrap();
        let bytes = builder.into_inner().unwrap().finish().unwrap();
        assert!(bytes.len() < 1 << 20, "{} bytes compressed", bytes.len());

        let budget = Budget::new(8 << 20, 100);
        let (dir, result) = unpack_capped("bomb", &bytes, Compression::Gzip, &budget);
        let error = result.unwrap_err();
        assert!(error.contains("--max-bytes (8388608 bytes)"), "{error}");
        assert!(tree_is_empty(&dir.path().join("models/llm")));
    }

    #[test]
    fn too_many_files_stop_at_max_files() {
        let names: Vec<String> = (0..50).map(|i| format!("f{i}.txt")).collect();
        let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
        let bytes = tar_of(&files, false);
        let budget = Budget::new(u64::MAX, 10);
        let (dir, result) = unpack_capped("many", &bytes, Compression::None, &budget);
        assert!(result.unwrap_err().contains("--max-files (10)"));
        assert!(tree_is_empty(&dir.path().join("models/llm")));
    }

    /// No regular file under `dir` (or no `dir`).
    fn tree_is_empty(dir: &Path) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else { return true };
        entries.flatten().all(|e| e.path().is_dir() && tree_is_empty(&e.path()))
    }
}
