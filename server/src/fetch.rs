//! `ferrite-server fetch`: downloads a model into a model repository before
//! the server starts. The operator runs it as an init container that writes
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
//!   unpacked instead (`crate::archive`): a model directory as one file, e.g.
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
//! Messages never contain credentials: user info, query strings and
//! fragments are removed from every URL they mention.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path as StorePath;
use object_store::{BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, RetryConfig};
use sha2::{Digest, Sha256};
use url::Url;

/// File name of the model inside `<model>/1/` when one object is fetched.
pub const DEFAULT_MODEL_FILE: &str = crate::repository::MODEL_FILE;

/// Suffix of the temporary files a download writes before renaming.
pub const TEMP_MARKER: &str = ".fetch-tmp-";

/// What to fetch and where.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Where the model is (see the module documentation for the schemes).
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
    /// `object_store` names them, e.g. `aws_endpoint`, `allow_http`.
    pub store_options: Vec<(String, String)>,
}

impl FetchOptions {
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

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The kind of object store a URI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    S3,
    Gcs,
    Azure,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::S3 => "s3",
            StoreKind::Gcs => "gcs",
            StoreKind::Azure => "azure",
        }
    }

    fn env_prefix(self) -> &'static str {
        match self {
            StoreKind::S3 => "AWS_",
            StoreKind::Gcs => "GOOGLE_",
            StoreKind::Azure => "AZURE_",
        }
    }
}

/// Where a model comes from, as parsed from its URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An `http(s)://` URL.
    Http { url: Url, prefix: bool },
    /// An object (or, with `prefix`, every object under a key prefix) in a
    /// bucket or container. `key` has no leading or trailing `/` and is
    /// percent-decoded.
    Store { kind: StoreKind, bucket: String, key: String, prefix: bool },
    /// A local file or directory.
    Local { path: PathBuf, prefix: bool },
}

impl Source {
    /// Whether the URI names a prefix (a directory) rather than one object.
    pub fn is_prefix(&self) -> bool {
        match self {
            Source::Http { prefix, .. } | Source::Store { prefix, .. } | Source::Local { prefix, .. } => *prefix,
        }
    }
}

/// Parses a model URI. The error is a message for the user.
pub fn parse_source(uri: &str) -> Result<Source, String> {
    let uri = uri.trim();
    if uri.is_empty() {
        return Err("the model URI is empty".into());
    }
    let Some((scheme, _)) = uri.split_once("://").filter(|(s, _)| is_scheme(s)) else {
        // No scheme: a local path.
        return Ok(Source::Local { path: PathBuf::from(uri), prefix: uri.ends_with('/') });
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme == "pvc" {
        return Err("pvc:// URIs are not fetched: the operator mounts the claim into the server pod \
                    directly; serve the mounted path instead"
            .into());
    }
    let url = Url::parse(uri).map_err(|e| format!("not a valid URI: {e}"))?;
    match scheme.as_str() {
        "http" | "https" => {
            if url.host_str().is_none() {
                return Err("the URL has no host".into());
            }
            let prefix = url.path().ends_with('/');
            Ok(Source::Http { url, prefix })
        }
        "s3" | "s3a" | "gs" | "az" | "azure" => {
            let kind = match scheme.as_str() {
                "s3" | "s3a" => StoreKind::S3,
                "gs" => StoreKind::Gcs,
                _ => StoreKind::Azure,
            };
            let bucket = url.host_str().unwrap_or_default().to_string();
            if bucket.is_empty() {
                let what = if kind == StoreKind::Azure { "container" } else { "bucket" };
                return Err(format!("no {what} in the URI (expected {scheme}://{what}/key)"));
            }
            if url.port().is_some() {
                return Err(format!("a {scheme}:// URI names a bucket, not a host:port"));
            }
            let key = StorePath::from_url_path(url.path()).map_err(|e| format!("invalid object key: {e}"))?;
            let key = key.as_ref().to_string();
            let prefix = key.is_empty() || url.path().ends_with('/');
            Ok(Source::Store { kind, bucket, key, prefix })
        }
        "file" => {
            let path =
                url.to_file_path().map_err(|()| "a file:// URI must be file:///absolute/path (no host)".to_string())?;
            Ok(Source::Local { path, prefix: url.path().ends_with('/') })
        }
        other => Err(format!("unsupported URI scheme '{other}' (use http, https, s3, gs, az, file or pvc)")),
    }
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A URI fit for messages: no user info, query string or fragment.
pub fn redact_uri(uri: &str) -> String {
    let uri = uri.trim();
    if let Some((scheme, _)) = uri.split_once("://").filter(|(s, _)| is_scheme(s)) {
        if let Ok(mut url) = Url::parse(uri) {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            return url.to_string();
        }
        // Unparseable: cut user info and anything after '?' or '#' by hand.
        let rest = &uri[scheme.len() + 3..];
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
        return format!("{scheme}://{host}{path}");
    }
    uri.split(['?', '#']).next().unwrap_or_default().to_string()
}

/// Removes credentials from a message: the secrets of `uri` wherever they
/// appear, and user info and query strings of every URL in it.
fn sanitize(message: &str, uri: &str) -> String {
    let mut text = message.replace(['\n', '\r'], " ");
    if let Ok(url) = Url::parse(uri.trim()) {
        let mut secrets: Vec<String> = Vec::new();
        if let Some(password) = url.password() {
            secrets.push(password.to_string());
            if let Ok(decoded) = percent_decode(password) {
                secrets.push(decoded);
            }
        }
        if let Some(query) = url.query() {
            secrets.push(query.to_string());
        }
        if let Some(fragment) = url.fragment() {
            secrets.push(fragment.to_string());
        }
        text = text.replace(uri.trim(), &redact_uri(uri));
        // Very short values would blank out ordinary words; URLs are
        // redacted below whatever their secrets.
        for secret in secrets.iter().filter(|s| s.len() >= 4) {
            text = text.replace(secret.as_str(), "***");
        }
    }
    redact_urls_in(&text)
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// Redacts every `scheme://...` token of a text.
fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = rest[..i]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map_or(i, |(j, _)| j);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | ']' | ','))
            .map_or(rest.len(), |j| i + j);
        out.push_str(&rest[..start]);
        let token = &rest[start..end];
        if start < i {
            out.push_str(&redact_uri(token));
        } else {
            out.push_str(token);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A failure inside a fetch, before the URI is attached.
#[derive(Debug)]
struct Failure {
    message: String,
    transient: bool,
}

impl Failure {
    fn permanent(message: impl Into<String>) -> Self {
        Failure { message: message.into(), transient: false }
    }

    fn transient(message: impl Into<String>) -> Self {
        Failure { message: message.into(), transient: true }
    }
}

/// An error and its sources on one line, without repeating a source that
/// the message above it already quotes.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

fn store_failure(error: object_store::Error, transient: bool) -> Failure {
    use object_store::Error as E;
    match &error {
        E::NotFound { .. } => Failure::permanent(format!("not found: {}", error_chain(&error))),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            Failure::permanent(format!("access denied: {}", error_chain(&error)))
        }
        _ => Failure { message: error_chain(&error), transient },
    }
}

fn http_failure(error: reqwest::Error) -> Failure {
    let error = error.without_url();
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "download interrupted"
    } else {
        "request failed"
    };
    // Network errors are worth another try; a bad request or a redirect
    // loop is not.
    let transient = !(error.is_builder() || error.is_redirect());
    Failure { message: format!("{what}: {}", error_chain(&error)), transient }
}

fn io_failure(what: &str, path: &Path, error: std::io::Error) -> Failure {
    Failure::permanent(format!("{what} {}: {error}", path.display()))
}

/// Where one file is read from.
#[derive(Debug, Clone)]
enum Location {
    Http(Url),
    Store(StorePath),
    Local(PathBuf),
}

/// A response body from `offset` on.
struct Opened {
    /// Offset the body starts at: `offset`, or 0 where the source ignored
    /// the range.
    start: u64,
    /// Size of the whole object, when the source says.
    total: Option<u64>,
    body: BoxStream<'static, Result<Bytes, Failure>>,
}

enum Backend {
    Http(reqwest::Client),
    Store(Arc<dyn ObjectStore>, StoreKind),
    Local,
}

/// Says what to set when the client failed while looking for credentials
/// (object_store falls back to the cloud's metadata service when none are
/// configured, and that fails outside the cloud).
fn credential_hint(kind: StoreKind, failure: Failure) -> Failure {
    let text = failure.message.to_ascii_lowercase();
    let hint = match kind {
        StoreKind::S3
            if text.contains("/latest/api/token")
                || text.contains("/latest/meta-data")
                || text.contains("credential") =>
        {
            "no usable AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
             AWS_WEB_IDENTITY_TOKEN_FILE, or AWS_SKIP_SIGNATURE=true for a public bucket)"
        }
        StoreKind::Gcs
            if text.contains("computemetadata") || text.contains("metadata") || text.contains("credential") =>
        {
            "no usable Google credentials (set GOOGLE_SERVICE_ACCOUNT or GOOGLE_APPLICATION_CREDENTIALS \
             to a key file, or GOOGLE_SKIP_SIGNATURE=true for a public bucket)"
        }
        StoreKind::Azure
            if text.contains("metadata/identity") || text.contains("oauth2") || text.contains("credential") =>
        {
            "no usable Azure credentials (set AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY, a client \
             secret or AZURE_FEDERATED_TOKEN_FILE, or AZURE_SKIP_SIGNATURE=true for a public container)"
        }
        _ => return failure,
    };
    Failure { message: format!("{hint}: {}", failure.message), transient: failure.transient }
}

const LOCAL_CHUNK: usize = 4 * 1024 * 1024;

impl Backend {
    fn new(source: &Source, options: &FetchOptions) -> Result<Self, Failure> {
        match source {
            Source::Http { .. } => {
                let client = reqwest::Client::builder()
                    .user_agent(concat!("ferrite-server/", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(Duration::from_secs(30))
                    .build()
                    .map_err(|e| Failure::permanent(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
                Ok(Backend::Http(client))
            }
            Source::Store { kind, bucket, .. } => Ok(Backend::Store(build_store_inner(*kind, bucket, options)?, *kind)),
            Source::Local { .. } => Ok(Backend::Local),
        }
    }

    /// Size of an object, or None where the source does not say.
    async fn size(&self, location: &Location) -> Result<Option<u64>, Failure> {
        match (self, location) {
            (Backend::Http(client), Location::Http(url)) => {
                let response = client.head(url.clone()).send().await.map_err(http_failure)?;
                if !response.status().is_success() {
                    return Ok(None);
                }
                Ok(response
                    .headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()))
            }
            (Backend::Store(store, kind), Location::Store(path)) => {
                let meta = store.head(path).await.map_err(|e| credential_hint(*kind, store_failure(e, false)))?;
                Ok(Some(meta.size))
            }
            (Backend::Local, Location::Local(path)) => {
                let meta = std::fs::metadata(path).map_err(|e| io_failure("cannot read", path, e))?;
                Ok(Some(meta.len()))
            }
            _ => unreachable!("location of another backend"),
        }
    }

    async fn open(&self, location: &Location, offset: u64) -> Result<Opened, Failure> {
        match (self, location) {
            (Backend::Http(client), Location::Http(url)) => open_http(client, url, offset).await,
            (Backend::Store(store, kind), Location::Store(path)) => {
                let options =
                    GetOptions { range: (offset > 0).then_some(GetRange::Offset(offset)), ..GetOptions::default() };
                // object_store has already retried the request itself.
                let result =
                    store.get_opts(path, options).await.map_err(|e| credential_hint(*kind, store_failure(e, false)))?;
                let start = result.range.start;
                let total = Some(result.meta.size);
                let body = result.into_stream().map_err(|e| store_failure(e, true)).boxed();
                Ok(Opened { start, total, body })
            }
            (Backend::Local, Location::Local(path)) => {
                let mut file = std::fs::File::open(path).map_err(|e| io_failure("cannot open", path, e))?;
                let total = file.metadata().map_err(|e| io_failure("cannot read", path, e))?.len();
                file.seek(SeekFrom::Start(offset)).map_err(|e| io_failure("cannot read", path, e))?;
                let path = path.clone();
                let body = futures::stream::try_unfold(Some(file), move |file| {
                    let path = path.clone();
                    async move {
                        let Some(mut file) = file else { return Ok(None) };
                        let read = tokio::task::spawn_blocking(move || {
                            let mut buffer = vec![0u8; LOCAL_CHUNK];
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
            _ => unreachable!("location of another backend"),
        }
    }

    /// Every object under a prefix: its location, its path relative to the
    /// prefix and its size.
    async fn list(&self, source: &Source) -> Result<Vec<(Location, String, u64)>, Failure> {
        match (self, source) {
            (Backend::Store(store, kind), Source::Store { key, .. }) => {
                let prefix = (!key.is_empty())
                    .then(|| StorePath::parse(key))
                    .transpose()
                    .map_err(|e| Failure::permanent(format!("invalid prefix: {e}")))?;
                let mut listing = store.list(prefix.as_ref());
                let mut found = Vec::new();
                while let Some(meta) = listing.next().await {
                    let meta = meta.map_err(|e| credential_hint(*kind, store_failure(e, false)))?;
                    let full = meta.location.as_ref();
                    let relative = if key.is_empty() {
                        full
                    } else {
                        match full.strip_prefix(key.as_str()).and_then(|r| r.strip_prefix('/')) {
                            Some(relative) => relative,
                            None => continue,
                        }
                    };
                    if relative.is_empty() {
                        continue; // a directory marker
                    }
                    let relative = relative.to_string();
                    found.push((Location::Store(meta.location), relative, meta.size));
                }
                Ok(found)
            }
            (Backend::Local, Source::Local { path, .. }) => {
                let root = path.clone();
                tokio::task::spawn_blocking(move || {
                    let mut found = Vec::new();
                    walk(&root, &root, 0, &mut found)?;
                    Ok(found)
                })
                .await
                .map_err(|e| Failure::permanent(format!("listing task failed: {e}")))?
            }
            (Backend::Http(_), _) => Err(Failure::permanent(
                "an http(s) URL cannot be listed: name one file, or use s3://, gs://, az:// or a local path for a directory",
            )),
            _ => unreachable!("source of another backend"),
        }
    }
}

/// Lists the files under a local directory, following symbolic links (to a
/// bounded depth, which also ends link cycles).
fn walk(root: &Path, dir: &Path, depth: usize, found: &mut Vec<(Location, String, u64)>) -> Result<(), Failure> {
    if depth > 32 {
        return Err(Failure::permanent(format!("{} is nested too deep (a link cycle?)", dir.display())));
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io_failure("cannot list", dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| io_failure("cannot list", dir, e))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|e| io_failure("cannot read", &path, e))?;
        if meta.is_dir() {
            walk(root, &path, depth + 1, found)?;
        } else if meta.is_file() {
            let relative = path.strip_prefix(root).expect("under the root");
            let relative: Vec<String> =
                relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            found.push((Location::Local(path.clone()), relative.join("/"), meta.len()));
        }
    }
    Ok(())
}

async fn open_http(client: &reqwest::Client, url: &Url, offset: u64) -> Result<Opened, Failure> {
    use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
    use reqwest::StatusCode;
    let mut request = client.get(url.clone());
    if offset > 0 {
        request = request.header(RANGE, format!("bytes={offset}-"));
    }
    let response = request.send().await.map_err(http_failure)?;
    let status = response.status();
    let header = |name| response.headers().get(name).and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok());
    let (start, total) = match status {
        StatusCode::OK => (0, header(CONTENT_LENGTH).and_then(|v| v.parse().ok())),
        StatusCode::PARTIAL_CONTENT => {
            // Content-Range: bytes START-END/TOTAL
            let range = header(CONTENT_RANGE).and_then(|v| v.strip_prefix("bytes "));
            let parsed = range.and_then(|r| {
                let (span, total) = r.split_once('/')?;
                let start: u64 = span.split_once('-')?.0.parse().ok()?;
                Some((start, total.parse().ok()))
            });
            match parsed {
                Some((start, total)) if start == offset => (start, total),
                _ => return Err(Failure::transient("the server answered a range request with an unexpected range")),
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(Failure::transient("the server refused to resume (HTTP 416); the object may have changed"))
        }
        StatusCode::NOT_FOUND | StatusCode::GONE => {
            return Err(Failure::permanent(format!("not found (HTTP {})", status.as_u16())))
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(Failure::permanent(format!("access denied (HTTP {})", status.as_u16())))
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT => {
            return Err(Failure::transient(format!("server error (HTTP {})", s.as_u16())))
        }
        s => return Err(Failure::permanent(format!("unexpected response (HTTP {s})"))),
    };
    let body = response.bytes_stream().map_err(http_failure).boxed();
    Ok(Opened { start, total, body })
}

/// Builds the client of a bucket or container: settings from the standard
/// environment variables, then `options.store_options`.
pub fn build_store(kind: StoreKind, bucket: &str, options: &FetchOptions) -> Result<Arc<dyn ObjectStore>, String> {
    build_store_inner(kind, bucket, options).map_err(|f| f.message)
}

fn build_store_inner(kind: StoreKind, bucket: &str, options: &FetchOptions) -> Result<Arc<dyn ObjectStore>, Failure> {
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: options.initial_backoff,
            max_backoff: Duration::from_secs(30),
            base: 2.0,
        },
        max_retries: options.retries as usize,
        retry_timeout: Duration::from_secs(5 * 60),
    };
    // object_store limits a whole request to 30 s by default, too short for
    // a large model: idle connections are caught by `idle_timeout` instead.
    let default_timeout = std::env::var_os(format!("{}TIMEOUT", kind.env_prefix())).is_none();
    let bad_key = |key: &str| Failure::permanent(format!("unknown {} store option '{key}'", kind.name()));
    let config_error = |e: object_store::Error| {
        Failure::permanent(format!("cannot configure the {} client: {}", kind.name(), error_chain(&e)))
    };
    let store: Arc<dyn ObjectStore> = match kind {
        StoreKind::S3 => {
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
            if default_timeout {
                builder = builder.with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "24h");
            }
            for (key, value) in &options.store_options {
                let parsed: AmazonS3ConfigKey = key.parse().map_err(|_| bad_key(key))?;
                builder = builder.with_config(parsed, value);
            }
            Arc::new(builder.build().map_err(config_error)?)
        }
        StoreKind::Gcs => {
            let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket).with_retry(retry);
            if default_timeout {
                builder = builder.with_config(GoogleConfigKey::Client(ClientConfigKey::Timeout), "24h");
            }
            for (key, value) in &options.store_options {
                let parsed: GoogleConfigKey = key.parse().map_err(|_| bad_key(key))?;
                builder = builder.with_config(parsed, value);
            }
            Arc::new(builder.build().map_err(config_error)?)
        }
        StoreKind::Azure => {
            let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(bucket).with_retry(retry);
            if default_timeout {
                builder = builder.with_config(AzureConfigKey::Client(ClientConfigKey::Timeout), "24h");
            }
            for (key, value) in &options.store_options {
                let parsed: AzureConfigKey = key.parse().map_err(|_| bad_key(key))?;
                builder = builder.with_config(parsed, value);
            }
            Arc::new(builder.build().map_err(config_error)?)
        }
    };
    Ok(store)
}

/// One file to fetch.
struct Item {
    location: Location,
    dest: PathBuf,
    /// Size announced by a listing.
    size: Option<u64>,
}

/// Fetches the model; see the module documentation.
pub async fn fetch(options: &FetchOptions) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let shown = redact_uri(&options.uri);
    let fail = |failure: Failure| FetchError { uri: shown.clone(), message: sanitize(&failure.message, &options.uri) };
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
        for (location, relative, size) in listed {
            let dest = relative_dest(&model_dir, &relative).map_err(|m| fail(Failure::permanent(m)))?;
            if !seen.insert(dest.clone()) {
                return Err(fail(Failure::permanent(format!("two objects map to {}", dest.display()))));
            }
            items.push(Item { location, dest, size: Some(size) });
        }
        items
    } else {
        let location = match &source {
            Source::Http { url, .. } => Location::Http(url.clone()),
            Source::Store { key, .. } => Location::Store(
                StorePath::parse(key).map_err(|e| fail(Failure::permanent(format!("invalid key: {e}"))))?,
            ),
            Source::Local { path, .. } => Location::Local(path.clone()),
        };
        let name = match &source {
            Source::Http { url, .. } => url.path().to_string(),
            Source::Store { key, .. } => key.clone(),
            Source::Local { path, .. } => path.to_string_lossy().into_owned(),
        }
        .to_ascii_lowercase();
        if name.ends_with(".zip") {
            return Err(fail(Failure::permanent(
                "zip archives are not unpacked: use .tar or .tar.gz, or point the URI at a prefix (ending with '/')",
            )));
        }
        archive = crate::archive::archive_kind(&name);
        let dest = match archive {
            Some(_) => model_dir.join(".archive.download"),
            None => model_dir.join("1").join(&options.model_file),
        };
        vec![Item { location, dest, size: None }]
    };

    let total = items.iter().map(|i| i.size).sum::<Option<u64>>();
    let progress = Progress::new(shown.clone(), total, options.progress_interval);
    let mut report = FetchReport {
        model_dir: model_dir.clone(),
        files: Vec::with_capacity(items.len()),
        downloaded_files: 0,
        skipped_files: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
    };
    for item in &items {
        match already_present(&backend, item, expected_sha.as_ref()).await.map_err(fail)? {
            Some(size) => {
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
                    download(&backend, item, options, expected_sha.as_ref(), &progress, &shown).await.map_err(fail)?;
                report.bytes += size;
                report.downloaded_files += 1;
            }
        }
        report.files.push(item.dest.clone());
    }
    if let (Some(compression), [item]) = (archive, items.as_slice()) {
        tracing::info!("unpacking the archive into {}", model_dir.display());
        let unpacked = crate::archive::unpack(&item.dest, compression, &model_dir);
        let _ = std::fs::remove_file(&item.dest);
        report.files = unpacked.map_err(|m| fail(Failure::permanent(m)))?;
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

/// The size of the destination file when it already holds the object.
async fn already_present(backend: &Backend, item: &Item, sha: Option<&[u8; 32]>) -> Result<Option<u64>, Failure> {
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
async fn download(
    backend: &Backend,
    item: &Item,
    options: &FetchOptions,
    sha: Option<&[u8; 32]>,
    progress: &Progress,
    shown: &str,
) -> Result<u64, Failure> {
    let dir = item.dest.parent().expect("a file under the model directory");
    let file_name = item.dest.file_name().expect("a file name").to_string_lossy().into_owned();
    std::fs::create_dir_all(dir).map_err(|e| io_failure("cannot create", dir, e))?;
    remove_stale_temporaries(dir, &file_name);
    let temp = dir.join(format!(".{file_name}{TEMP_MARKER}{}-{}", std::process::id(), next_temp_id()));
    let writer = Writer::spawn(temp.clone(), sha.is_some())?;

    let result = receive(backend, item, options, &writer, progress, shown).await;
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
                to_hex(expected),
                to_hex(&actual)
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
                written = 0;
            }
            if let Some(size) = opened.total {
                if total.is_some_and(|t| t != size) && written > 0 {
                    writer.truncate().await?;
                    progress.rewind(written);
                    written = 0;
                    return Err(Failure::transient("the object changed during the download"));
                }
                if total.is_none() {
                    progress.add_total(size);
                }
                total = Some(size);
            }
            loop {
                let next = tokio::time::timeout(options.idle_timeout, opened.body.next())
                    .await
                    .map_err(|_| Failure::transient(format!("no data for {} s", options.idle_timeout.as_secs_f64())))?;
                let Some(chunk) = next else { break };
                let chunk = chunk?;
                let n = chunk.len() as u64;
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
                return Err(Failure { message, transient: failure.transient });
            }
        }
    }
}

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

/// Progress lines, at most one per interval.
struct Progress {
    label: String,
    interval: Duration,
    started: Instant,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    total: Option<u64>,
    done: u64,
    last: Instant,
}

impl Progress {
    fn new(label: String, total: Option<u64>, interval: Duration) -> Self {
        let now = Instant::now();
        Progress { label, interval, started: now, state: Mutex::new(ProgressState { total, done: 0, last: now }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A file of this size was already present.
    fn skip(&self, size: u64) {
        let mut state = self.state();
        state.total = state.total.map(|t| t.saturating_sub(size));
    }

    /// The size of a file became known while the total was not.
    fn add_total(&self, size: u64) {
        let mut state = self.state();
        if state.done == 0 && state.total.is_none() {
            state.total = Some(size);
        }
    }

    fn rewind(&self, bytes: u64) {
        let mut state = self.state();
        state.done = state.done.saturating_sub(bytes);
    }

    fn add(&self, bytes: u64) {
        let mut state = self.state();
        state.done += bytes;
        let now = Instant::now();
        if now.duration_since(state.last) < self.interval {
            return;
        }
        state.last = now;
        let elapsed = now.duration_since(self.started);
        let rate = rate_mb_s(state.done, elapsed);
        match state.total {
            Some(total) if total > 0 => tracing::info!(
                "fetching {}: {:.1} of {:.1} MB ({:.0}%), {rate:.1} MB/s",
                self.label,
                state.done as f64 / 1e6,
                total as f64 / 1e6,
                100.0 * state.done as f64 / total as f64
            ),
            _ => tracing::info!("fetching {}: {:.1} MB, {rate:.1} MB/s", self.label, state.done as f64 / 1e6),
        }
    }
}

fn rate_mb_s(bytes: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        bytes as f64 / 1e6 / seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_user_info_and_queries() {
        assert_eq!(redact_uri("https://u:p@host/a/b?sig=1#f"), "https://host/a/b");
        assert_eq!(redact_uri("s3://key:secret@bucket/k"), "s3://bucket/k");
        assert_eq!(redact_uri("/local/path"), "/local/path");
        let message = "error sending request for url (http://x:y@h:1/p?token=abc) and https://q/r?s=t";
        let clean = redact_urls_in(message);
        assert!(!clean.contains("token") && !clean.contains("x:y") && !clean.contains("s=t"), "{clean}");
        let clean = sanitize("failed: hunter2 at top%2Fsecret", "https://me:hunter2@h/p?top%2Fsecret");
        assert!(!clean.contains("hunter2") && !clean.contains("secret"), "{clean}");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff(base, 1), base);
        assert_eq!(backoff(base, 3), base * 4);
        assert_eq!(backoff(base, 40), Duration::from_secs(30));
    }

    #[test]
    fn relative_paths_stay_inside() {
        let dir = Path::new("/m/x");
        assert_eq!(relative_dest(dir, "1/model.onnx").unwrap(), Path::new("/m/x/1/model.onnx"));
        assert!(relative_dest(dir, "../evil").is_err());
        assert!(relative_dest(dir, "a//b").is_err());
    }
}
