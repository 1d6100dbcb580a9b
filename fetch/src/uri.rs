//! Model URIs: what a URI names ([`parse_source`]) and how it is shown in
//! messages without its credentials ([`redact_uri`], [`sanitize`]).
//!
//! Object-store URIs (`s3://`, `s3a://`, `gs://`, `az://`, `azure://`) are
//! classified by `object_store`'s own parser ([`ObjectStoreScheme::parse`]),
//! and the client is later built from the same URL (`backends::store`). Two
//! things stay ours: `http(s)://` URLs are always fetched with a plain GET
//! (object_store would read `https://<account>.blob.core.windows.net/...` or
//! `https://<bucket>.s3.amazonaws.com/...` as a bucket and drop a presigned
//! URL's query string, its signature), and the object key is read from the
//! whole URL path: `ObjectStoreScheme::parse` drops the first path segment of
//! `az://` URIs (it reads them as `az://account/container/path`) while its
//! Azure builder takes the container from the host, as we do.

use std::path::PathBuf;

use object_store::path::Path as StorePath;
use object_store::ObjectStoreScheme;
use url::Url;

/// The kind of object store a URI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Amazon S3 and S3-compatible servers (`s3://`, `s3a://`).
    S3,
    /// Google Cloud Storage (`gs://`).
    Gcs,
    /// Azure Blob Storage (`az://`, `azure://`).
    Azure,
}

impl StoreKind {
    /// The short name used in messages (`s3`, `gcs`, `azure`).
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::S3 => "s3",
            StoreKind::Gcs => "gcs",
            StoreKind::Azure => "azure",
        }
    }

    /// The prefix of the environment variables its client reads.
    pub fn env_prefix(self) -> &'static str {
        match self {
            StoreKind::S3 => "AWS_",
            StoreKind::Gcs => "GOOGLE_",
            StoreKind::Azure => "AZURE_",
        }
    }

    fn from_scheme(scheme: ObjectStoreScheme) -> Option<Self> {
        match scheme {
            ObjectStoreScheme::AmazonS3 => Some(StoreKind::S3),
            ObjectStoreScheme::GoogleCloudStorage => Some(StoreKind::Gcs),
            ObjectStoreScheme::MicrosoftAzure => Some(StoreKind::Azure),
            _ => None,
        }
    }
}

/// Where a model comes from, as parsed from its URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An `http(s)://` URL.
    Http {
        /// The URL as given (with its user info and query string, which the
        /// request needs).
        url: Url,
        /// Whether the path ends with `/` (refused: HTTP cannot list).
        prefix: bool,
    },
    /// An object (or, with `prefix`, every object under a key prefix) in a
    /// bucket or container.
    Store {
        /// Which cloud's client reads it.
        kind: StoreKind,
        /// The bucket or container (the URL's host).
        bucket: String,
        /// The key, without leading or trailing `/`, percent-decoded.
        key: String,
        /// Whether the URI names a prefix rather than one object.
        prefix: bool,
        /// `scheme://bucket/key` without user info, query or fragment: what
        /// the client is configured from.
        url: Url,
    },
    /// A local file or directory.
    Local {
        /// The path as given (`file://` URIs converted).
        path: PathBuf,
        /// Whether it names a directory (settled by `fetch` from the file
        /// system; here, whether it ends with `/`).
        prefix: bool,
    },
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
        "file" => {
            let path =
                url.to_file_path().map_err(|()| "a file:// URI must be file:///absolute/path (no host)".to_string())?;
            Ok(Source::Local { path, prefix: url.path().ends_with('/') })
        }
        "s3" | "s3a" | "gs" | "az" | "azure" => parse_store(&scheme, &url),
        other => Err(format!("unsupported URI scheme '{other}' (use http, https, s3, gs, az, file or pvc)")),
    }
}

fn parse_store(scheme: &str, url: &Url) -> Result<Source, String> {
    let is_azure = matches!(scheme, "az" | "azure");
    let bucket = url.host_str().unwrap_or_default().to_string();
    if bucket.is_empty() {
        let what = if is_azure { "container" } else { "bucket" };
        return Err(format!("no {what} in the URI (expected {scheme}://{what}/key)"));
    }
    if url.port().is_some() {
        return Err(format!("a {scheme}:// URI names a bucket, not a host:port"));
    }
    let kind = ObjectStoreScheme::parse(url)
        .ok()
        .and_then(|(scheme, _)| StoreKind::from_scheme(scheme))
        .ok_or_else(|| format!("object_store does not recognise {scheme}://{bucket}"))?;
    let key = StorePath::from_url_path(url.path()).map_err(|e| format!("invalid object key: {e}"))?;
    let key = key.as_ref().to_string();
    let prefix = key.is_empty() || url.path().ends_with('/');
    let mut clean = url.clone();
    let _ = clean.set_username("");
    let _ = clean.set_password(None);
    clean.set_query(None);
    clean.set_fragment(None);
    Ok(Source::Store { kind, bucket, key, prefix, url: clean })
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
/// appear, and user info and query strings of every URL in it. The result
/// is one line.
pub fn sanitize(message: &str, uri: &str) -> String {
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
    fn store_urls_carry_no_credentials() {
        let Source::Store { url, .. } = parse_source("s3://AKID:secret@models/k?x=y#z").unwrap() else { panic!() };
        assert_eq!(url.as_str(), "s3://models/k");
    }
}
