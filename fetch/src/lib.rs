//! ferrite-fetch: what `ferrite-server fetch` runs. It downloads a model
//! into a model repository before the server starts. The operator runs it as an init container that writes
//! into a volume shared with the server container, which then runs
//! `serve --model-repository DIR`.
//!
//! # Sources
//!
//! | URI | read with |
//! | --- | --- |
//! | `http://host/path`, `https://host/path` | a plain HTTP GET (query strings, e.g. presigned URLs, and `user:password@` basic auth are honoured) |
//! | `s3://bucket/key` (`s3a://`) | `object_store`'s S3 client, configured from `AWS_*` (e.g. `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`) |
//! | `gs://bucket/key` | `object_store`'s GCS client, configured from `GOOGLE_*` (e.g. `GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_APPLICATION_CREDENTIALS`) |
//! | `az://container/key`, `azure://container/key` | `object_store`'s Azure Blob client, configured from `AZURE_*` (e.g. `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`) |
//! | `file:///path`, `/path`, `relative/path` | the local filesystem |
//! | `pvc://claim/path` | nothing: the operator mounts the claim into the server pod directly, so `fetch` refuses it |
//!
//! # Layout written
//!
//! Into `DEST/<model-name>/`, the layout of a model repository:
//!
//! - A URI that names one object (it does not end with `/`) is written to
//!   `DEST/<model-name>/1/<model-file>` (`model.onnx` by default), whatever
//!   the object is called: URLs without a file name (presigned, `?id=...`)
//!   work. An archive (`.tar`, `.tar.gz`, `.tgz`; `.zip` is refused) is
//!   unpacked instead ([`archive`]): a model directory as one file, e.g.
//!   an LLM's over plain HTTP. Its files land in `DEST/<model-name>/1/` when
//!   its root holds `model.onnx` or `llm.json`, else in its own layout; one
//!   wrapping top-level directory is stripped. It is downloaded each time.
//! - A URI that ends with `/` names a prefix (a directory): every object
//!   under it is copied to `DEST/<model-name>/<path relative to the prefix>`,
//!   so a prefix that holds `1/model.onnx` and `ferrite.json` (or any other
//!   directory layout) is reproduced as it is. A bucket or container with no
//!   key (`s3://bucket`, `s3://bucket/`) is a prefix. A local directory is a
//!   prefix with or without the trailing `/`. An empty prefix is an error.
//!   HTTP cannot list, so an `http(s)://` URI ending with `/` is refused.
//!   Files already in the destination that the source lacks are left alone.
//!
//! With a node cache (`--cache-dir`, [`cache`]) the model is written into
//! the cache's entry instead (the same layout, under `entries/<key>/`),
//! once per node, and `DEST` is not written.
//!
//! # Robustness
//!
//! Each file is streamed (never held in memory) into a temporary file in its
//! destination directory (`.<name>.fetch-tmp-*`), its byte count checked
//! against the size the source announced, optionally its SHA-256
//! (`--sha256`, single objects only), then synced and renamed into place: a
//! reader never sees a partial file. Transient failures (connection errors,
//! HTTP 408/429/5xx, a body cut short, no data for `idle_timeout`) are
//! retried with exponential backoff, resuming from the bytes already written
//! where the source supports ranges. A destination file that already has the
//! source's size (and the given SHA-256) is not downloaded again.
//!
//! # Caps
//!
//! A fetch writes at most `max_bytes` bytes (`--max-bytes`, default 20 GiB)
//! and `max_files` files (`--max-files`, default 10,000): downloads and
//! unpacked archive contents together ([`limits`]). A source that announces
//! more (a listing, a `Content-Length`, a tar header) fails before the
//! download; one that sends more (an endless body, a tar bomb) stops at the
//! cap. Either way the fetch fails, naming the flag, and removes what it
//! wrote.
//!
//! Messages never contain credentials: user info, query strings and
//! fragments are removed from every URL they mention.

//!
//! # Modules
//!
//! | module | concern |
//! | --- | --- |
//! | [`uri`] | what a URI names; redaction of credentials in messages |
//! | `backends` | reading: HTTP, object stores (built from the URI by `object_store`), local files |
//! | `download` | one file into place: retries, resume, the writer thread, hashing |
//! | [`archive`] | unpacking `.tar` / `.tar.gz` model directories |
//! | [`cache`] | the node's model cache (`--cache-dir`): entries, locks, eviction |
//! | [`limits`] | the byte and file caps |
//! | `progress` | the progress lines |
//!
//! # Why a crate of its own
//!
//! The cloud clients (object_store's S3, GCS and Azure, reqwest, their TLS and
//! credential code) are needed by the init container only, never by a
//! serving process. Cargo has no per-binary dependencies, so `ferrite-server`
//! depends on this crate through its default feature `fetch`, and only its
//! binary (`main.rs`) uses it: no module of the `ferrite_server` library
//! touches it, and `cargo build -p ferrite-server --lib --no-default-features`
//! (or a dependent that turns default features off) compiles no cloud SDK.
//! The `fetch` subcommand stays in the `ferrite-server` binary because the
//! operator's init container runs `ferrite-server fetch` from the server
//! image; a second binary would need a second image entry and an operator
//! change for no gain at run time.

#![warn(missing_docs)]

pub mod archive;
mod backends;
pub mod cache;
mod download;
mod failure;
pub mod limits;
mod progress;
pub mod uri;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use object_store::path::Path as StorePath;

use crate::backends::{Backend, Location};
use crate::download::{already_present, download, Item};
use crate::failure::{io_failure, Failure};
use crate::limits::Budget;
pub use crate::limits::{DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES};
use crate::progress::{rate_mb_s, Progress};
pub use crate::uri::{parse_source, redact_uri, Source, StoreKind};

/// File name of the model inside `<model>/1/` when one object is fetched:
/// the server's `repository::MODEL_FILE`.
pub const DEFAULT_MODEL_FILE: &str = "model.onnx";

/// Suffix of the temporary files a download writes before renaming.
pub const TEMP_MARKER: &str = ".fetch-tmp-";

/// What to fetch and where. Its `Debug` shows the URI without credentials.
#[derive(Clone)]
pub struct FetchOptions {
    /// Where the model is (see the crate documentation for the schemes).
    pub uri: String,
    /// The model repository to write into.
    pub dest: PathBuf,
    /// The directory under `dest` that receives the model.
    pub model_name: String,
    /// File name of a single fetched object inside `<model>/1/`.
    pub model_file: String,
    /// Expected SHA-256 of a single object, in hex.
    pub sha256: Option<String>,
    /// Retries of a transient failure, per file (0: none).
    pub retries: u32,
    /// First backoff between retries; it doubles each time, up to 30 s.
    pub initial_backoff: Duration,
    /// A download that receives no data for this long is retried.
    pub idle_timeout: Duration,
    /// Least time between two progress lines.
    pub progress_interval: Duration,
    /// Settings for the object store client, applied after those read from
    /// the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`); keys as
    /// `object_store` names them, e.g. `aws_endpoint`, `allow_http`. An
    /// unknown key is an error.
    pub store_options: Vec<(String, String)>,
    /// Most bytes the fetch may write, downloads and unpacked archive
    /// contents together ([`limits`]).
    pub max_bytes: u64,
    /// Most files the fetch may write (downloaded, present or unpacked).
    pub max_files: u64,
}

impl std::fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchOptions")
            .field("uri", &redact_uri(&self.uri))
            .field("dest", &self.dest)
            .field("model_name", &self.model_name)
            .field("model_file", &self.model_file)
            .field("sha256", &self.sha256)
            .field("retries", &self.retries)
            .field("initial_backoff", &self.initial_backoff)
            .field("idle_timeout", &self.idle_timeout)
            .field("progress_interval", &self.progress_interval)
            .field("store_options", &self.store_options.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("max_bytes", &self.max_bytes)
            .field("max_files", &self.max_files)
            .finish()
    }
}

impl FetchOptions {
    /// Options with the defaults of `ferrite-server fetch`: 5 retries from
    /// 0.5 s, a 120 s idle timeout, a progress line a second, the default
    /// caps ([`DEFAULT_MAX_BYTES`], [`DEFAULT_MAX_FILES`]).
    pub fn new(uri: impl Into<String>, dest: impl Into<PathBuf>, model_name: impl Into<String>) -> Self {
        FetchOptions {
            uri: uri.into(),
            dest: dest.into(),
            model_name: model_name.into(),
            model_file: DEFAULT_MODEL_FILE.to_string(),
            sha256: None,
            retries: 5,
            initial_backoff: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(120),
            progress_interval: Duration::from_secs(1),
            store_options: Vec::new(),
            max_bytes: DEFAULT_MAX_BYTES,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    /// `dest/<model-name>`.
    pub model_dir: PathBuf,
    /// Every file of the model, downloaded or already present.
    pub files: Vec<PathBuf>,
    /// Files downloaded.
    pub downloaded_files: usize,
    /// Files already present with the right size (and hash), not downloaded.
    pub skipped_files: usize,
    /// Bytes downloaded (skipped files not counted).
    pub bytes: u64,
    /// Time the whole fetch took.
    pub elapsed: Duration,
}

/// A failed fetch: one line naming the URI (credentials removed).
#[derive(Debug, thiserror::Error)]
#[error("fetch {uri}: {message}")]
pub struct FetchError {
    uri: String,
    message: String,
}

impl FetchError {
    /// The URI, without user info, query string or fragment.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// What went wrong, one line, credentials removed.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Fetches the model; see the crate documentation.
pub async fn fetch(options: &FetchOptions) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let shown = redact_uri(&options.uri);
    let fail =
        |failure: Failure| FetchError { uri: shown.clone(), message: uri::sanitize(&failure.message, &options.uri) };
    check_name("model name", &options.model_name).map_err(|m| fail(Failure::permanent(m)))?;
    check_name("model file", &options.model_file).map_err(|m| fail(Failure::permanent(m)))?;
    let expected_sha =
        options.sha256.as_deref().map(parse_sha256).transpose().map_err(|m| fail(Failure::permanent(m)))?;
    let mut source = parse_source(&options.uri).map_err(|m| fail(Failure::permanent(m)))?;
    if let Source::Local { path, prefix } = &mut source {
        match std::fs::metadata(&path) {
            Ok(meta) => *prefix = meta.is_dir(),
            Err(e) => return Err(fail(io_failure("cannot read", path, e))),
        }
    }
    let model_dir = options.dest.join(&options.model_name);
    let backend = Backend::new(&source, options).map_err(fail)?;

    let mut archive = None;
    let items = if source.is_prefix() {
        if expected_sha.is_some() {
            return Err(fail(Failure::permanent("--sha256 applies to one file, not to a prefix")));
        }
        let listed = backend.list(&source).await.map_err(fail)?;
        if listed.is_empty() {
            return Err(fail(Failure::permanent("no objects under this prefix")));
        }
        let mut seen = BTreeSet::new();
        let mut items = Vec::with_capacity(listed.len());
        for listed in listed {
            let dest = relative_dest(&model_dir, &listed.relative).map_err(|m| fail(Failure::permanent(m)))?;
            if !seen.insert(dest.clone()) {
                return Err(fail(Failure::permanent(format!("two objects map to {}", dest.display()))));
            }
            items.push(Item { location: listed.location, dest, size: Some(listed.size) });
        }
        items
    } else {
        let (location, name) = match &source {
            Source::Http { url, .. } => (Location::Http(url.clone()), url.path().to_string()),
            Source::Store { key, .. } => (
                Location::Store(
                    StorePath::parse(key).map_err(|e| fail(Failure::permanent(format!("invalid key: {e}"))))?,
                ),
                key.clone(),
            ),
            Source::Local { path, .. } => (Location::Local(path.clone()), path.to_string_lossy().into_owned()),
        };
        let name = name.to_ascii_lowercase();
        if name.ends_with(".zip") {
            return Err(fail(Failure::permanent(
                "zip archives are not unpacked: use .tar or .tar.gz, or point the URI at a prefix (ending with '/')",
            )));
        }
        archive = archive::archive_kind(&name);
        let dest = match archive {
            Some(_) => model_dir.join(".archive.download"),
            None => model_dir.join("1").join(&options.model_file),
        };
        vec![Item { location, dest, size: None }]
    };

    let total = items.iter().map(|i| i.size).sum::<Option<u64>>();
    let budget = Budget::new(options.max_bytes, options.max_files);
    if source.is_prefix() {
        // A listing says how much is coming: refuse before downloading.
        budget.check_files(items.len() as u64).map_err(fail)?;
        budget.check_announced("the objects under this prefix hold", total.unwrap_or(0)).map_err(fail)?;
    }
    let progress = Progress::new(shown.clone(), total, options.progress_interval);
    let mut report = FetchReport {
        model_dir: model_dir.clone(),
        files: Vec::with_capacity(items.len()),
        downloaded_files: 0,
        skipped_files: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
    };
    // Files this run put in place: removed again when a cap stops it.
    let mut written = Vec::new();
    let outcome = async {
        for item in &items {
            if archive.is_none() {
                budget.add_file()?;
            }
            match already_present(&backend, item, expected_sha.as_ref()).await? {
                Some(size) => {
                    budget.add_bytes(size)?;
                    tracing::info!(
                        "{} is already present ({size} bytes{}): not downloading it again",
                        item.dest.display(),
                        if expected_sha.is_some() { ", sha256 matches" } else { "" }
                    );
                    progress.skip(size);
                    report.skipped_files += 1;
                }
                None => {
                    let size =
                        download(&backend, item, options, expected_sha.as_ref(), &progress, &budget, &shown).await?;
                    written.push(item.dest.clone());
                    report.bytes += size;
                    report.downloaded_files += 1;
                }
            }
            report.files.push(item.dest.clone());
        }
        if let (Some(compression), [item]) = (archive, items.as_slice()) {
            tracing::info!("unpacking the archive into {}", model_dir.display());
            let unpacked = archive::unpack(&item.dest, compression, &model_dir, &budget);
            let _ = std::fs::remove_file(&item.dest);
            report.files = unpacked?;
        }
        Ok::<(), Failure>(())
    }
    .await;
    if let Err(failure) = outcome {
        if failure.over_limit {
            for path in &written {
                let _ = std::fs::remove_file(path);
            }
        }
        return Err(fail(failure));
    }
    report.elapsed = started.elapsed();
    let seconds = report.elapsed.as_secs_f64();
    tracing::info!(
        "fetched {shown} into {}: {} file(s) downloaded, {} already present; {} bytes ({:.1} MB) in {seconds:.2} s, {:.1} MB/s",
        model_dir.display(),
        report.downloaded_files,
        report.skipped_files,
        report.bytes,
        report.bytes as f64 / 1e6,
        rate_mb_s(report.bytes, report.elapsed),
    );
    Ok(report)
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(format!("invalid {what} '{name}': it must be a plain file name"));
    }
    Ok(())
}

fn parse_sha256(hex: &str) -> Result<[u8; 32], String> {
    let hex = hex.trim();
    let invalid = || format!("--sha256 must be 64 hex digits, got '{hex}'");
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(invalid());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
    }
    Ok(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `model_dir/relative`, refusing paths that would leave `model_dir`.
fn relative_dest(model_dir: &Path, relative: &str) -> Result<PathBuf, String> {
    let mut dest = model_dir.to_path_buf();
    for part in relative.split('/') {
        if part.is_empty() || part == "." || part == ".." || part.contains(['\\', '\0']) {
            return Err(format!("refusing object path '{relative}': it would leave the model directory"));
        }
        dest.push(part);
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_inside() {
        let dir = Path::new("/m/x");
        assert_eq!(relative_dest(dir, "1/model.onnx").unwrap(), Path::new("/m/x/1/model.onnx"));
        assert!(relative_dest(dir, "../evil").is_err());
        assert!(relative_dest(dir, "a//b").is_err());
    }

    #[test]
    fn debug_output_carries_no_credentials() {
        let mut options = FetchOptions::new("https://bob:hunter2@h/m.onnx?sig=s3cret", "/m", "x");
        options.store_options.push(("aws_secret_access_key".into(), "wJalr-secret".into()));
        let shown = format!("{options:?}");
        assert!(shown.contains("https://h/m.onnx"), "{shown}");
        for secret in ["bob", "hunter2", "s3cret", "wJalr-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn sha256_must_be_64_hex_digits() {
        assert_eq!(to_hex(&parse_sha256(&"aB".repeat(32)).unwrap()), "ab".repeat(32));
        assert!(parse_sha256("abc").unwrap_err().contains("64 hex digits"));
        assert!(check_name("model name", "../x").is_err());
    }
}
