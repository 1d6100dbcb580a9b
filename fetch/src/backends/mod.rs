//! Where bytes come from: a plain HTTP client (`http`), an object store
//! client built from the URI (`store`), or the local file system (`local`).
//! Each can tell an object's size, open it from an offset (to resume), and,
//! except HTTP, list a prefix.

mod http;
mod local;
mod store;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path as StorePath;
use object_store::ObjectStore;
use url::Url;

use crate::failure::Failure;
use crate::uri::{Source, StoreKind};
use crate::FetchOptions;

/// Where one file is read from.
#[derive(Debug, Clone)]
pub(crate) enum Location {
    Http(Url),
    Store(StorePath),
    Local(PathBuf),
}

/// A response body from an offset on.
pub(crate) struct Opened {
    /// Offset the body starts at: the one asked for, or 0 where the source
    /// ignored the range.
    pub(crate) start: u64,
    /// Size of the whole object, when the source says.
    pub(crate) total: Option<u64>,
    pub(crate) body: BoxStream<'static, Result<Bytes, Failure>>,
}

/// One object found under a prefix.
pub(crate) struct Listed {
    pub(crate) location: Location,
    /// Its path relative to the prefix, `/`-separated.
    pub(crate) relative: String,
    pub(crate) size: u64,
}

/// The client of one source.
pub(crate) enum Backend {
    Http(reqwest::Client),
    Store(Arc<dyn ObjectStore>, StoreKind),
    Local,
}

impl Backend {
    /// The client for `source`.
    pub(crate) fn new(source: &Source, options: &FetchOptions) -> Result<Self, Failure> {
        match source {
            Source::Http { .. } => Ok(Backend::Http(http::client()?)),
            Source::Store { kind, url, .. } => Ok(Backend::Store(store::build(*kind, url, options)?, *kind)),
            Source::Local { .. } => Ok(Backend::Local),
        }
    }

    /// Size of an object, or None where the source does not say.
    pub(crate) async fn size(&self, location: &Location) -> Result<Option<u64>, Failure> {
        match (self, location) {
            (Backend::Http(client), Location::Http(url)) => http::size(client, url).await,
            (Backend::Store(store, kind), Location::Store(path)) => store::size(store.as_ref(), *kind, path).await,
            (Backend::Local, Location::Local(path)) => local::size(path),
            _ => unreachable!("location of another backend"),
        }
    }

    /// The object's bytes from `offset` on.
    pub(crate) async fn open(&self, location: &Location, offset: u64) -> Result<Opened, Failure> {
        match (self, location) {
            (Backend::Http(client), Location::Http(url)) => http::open(client, url, offset).await,
            (Backend::Store(store, kind), Location::Store(path)) => {
                store::open(store.as_ref(), *kind, path, offset).await
            }
            (Backend::Local, Location::Local(path)) => local::open(path, offset),
            _ => unreachable!("location of another backend"),
        }
    }

    /// Every object under a prefix.
    pub(crate) async fn list(&self, source: &Source) -> Result<Vec<Listed>, Failure> {
        match (self, source) {
            (Backend::Store(store, kind), Source::Store { key, .. }) => store::list(store.as_ref(), *kind, key).await,
            (Backend::Local, Source::Local { path, .. }) => local::list(path).await,
            (Backend::Http(_), _) => Err(Failure::permanent(
                "an http(s) URL cannot be listed: name one file, or use s3://, gs://, az:// or a local path for a directory",
            )),
            _ => unreachable!("source of another backend"),
        }
    }
}
