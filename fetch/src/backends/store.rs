//! `s3://`, `gs://`, `az://`: object_store's clients, built from the URI.
//!
//! The client comes from the URL itself (the builder's `with_url`, which
//! takes the bucket or container from the host), on top of the settings
//! its cloud's environment variables give (`from_env`: `AWS_*`, `GOOGLE_*`,
//! `AZURE_*`), then `FetchOptions::store_options`. One generic function
//! does it for the three clouds ([`Builder`] is the little each needs).
//!
//! Not `object_store::parse_url_opts`: it cannot set the retry policy
//! (`--retries` and its backoff) and it drops setting names it does not
//! know, so a misspelt `aws_endpont` would go unnoticed; here an unknown
//! setting is an error.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path as StorePath;
use object_store::{BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, RetryConfig};
use url::Url;

use super::{Listed, Location, Opened};
use crate::failure::{error_chain, Failure};
use crate::uri::StoreKind;
use crate::FetchOptions;

/// What the generic [`build_with`] needs of a cloud's client builder.
trait Builder: Sized {
    type Key: FromStr;
    fn from_env() -> Self;
    fn with_url(self, url: &str) -> Self;
    fn with_retry(self, retry: RetryConfig) -> Self;
    fn with_config(self, key: Self::Key, value: &str) -> Self;
    fn client_key(key: ClientConfigKey) -> Self::Key;
    fn build(self) -> object_store::Result<Arc<dyn ObjectStore>>;
}

macro_rules! builder {
    ($builder:ty, $key:ty) => {
        impl Builder for $builder {
            type Key = $key;
            fn from_env() -> Self {
                <$builder>::from_env()
            }
            fn with_url(self, url: &str) -> Self {
                <$builder>::with_url(self, url)
            }
            fn with_retry(self, retry: RetryConfig) -> Self {
                <$builder>::with_retry(self, retry)
            }
            fn with_config(self, key: $key, value: &str) -> Self {
                <$builder>::with_config(self, key, value)
            }
            fn client_key(key: ClientConfigKey) -> $key {
                <$key>::Client(key)
            }
            fn build(self) -> object_store::Result<Arc<dyn ObjectStore>> {
                Ok(Arc::new(<$builder>::build(self)?))
            }
        }
    };
}

builder!(AmazonS3Builder, AmazonS3ConfigKey);
builder!(GoogleCloudStorageBuilder, GoogleConfigKey);
builder!(MicrosoftAzureBuilder, AzureConfigKey);

/// The client of the bucket or container `url` names (no credentials in
/// it: `uri::parse_source` removed them).
pub(super) fn build(kind: StoreKind, url: &Url, options: &FetchOptions) -> Result<Arc<dyn ObjectStore>, Failure> {
    match kind {
        StoreKind::S3 => build_with::<AmazonS3Builder>(kind, url, options),
        StoreKind::Gcs => build_with::<GoogleCloudStorageBuilder>(kind, url, options),
        StoreKind::Azure => build_with::<MicrosoftAzureBuilder>(kind, url, options),
    }
}

fn build_with<B: Builder>(kind: StoreKind, url: &Url, options: &FetchOptions) -> Result<Arc<dyn ObjectStore>, Failure> {
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: options.initial_backoff,
            max_backoff: Duration::from_secs(30),
            base: 2.0,
        },
        max_retries: options.retries as usize,
        retry_timeout: Duration::from_secs(5 * 60),
    };
    let mut builder = B::from_env().with_url(url.as_str()).with_retry(retry);
    // object_store limits a whole request to 30 s by default, too short for
    // a large model: idle connections are caught by `idle_timeout` instead.
    if std::env::var_os(format!("{}TIMEOUT", kind.env_prefix())).is_none() {
        builder = builder.with_config(B::client_key(ClientConfigKey::Timeout), "24h");
    }
    for (key, value) in &options.store_options {
        let parsed =
            key.parse().map_err(|_| Failure::permanent(format!("unknown {} store option '{key}'", kind.name())))?;
        builder = builder.with_config(parsed, value);
    }
    builder
        .build()
        .map_err(|e| Failure::permanent(format!("cannot configure the {} client: {}", kind.name(), error_chain(&e))))
}

pub(super) async fn size(store: &dyn ObjectStore, kind: StoreKind, path: &StorePath) -> Result<Option<u64>, Failure> {
    let meta = store.head(path).await.map_err(|e| credential_hint(kind, store_failure(e, false)))?;
    Ok(Some(meta.size))
}

pub(super) async fn open(
    store: &dyn ObjectStore,
    kind: StoreKind,
    path: &StorePath,
    offset: u64,
) -> Result<Opened, Failure> {
    let options = GetOptions { range: (offset > 0).then_some(GetRange::Offset(offset)), ..GetOptions::default() };
    // object_store has already retried the request itself.
    let result = store.get_opts(path, options).await.map_err(|e| credential_hint(kind, store_failure(e, false)))?;
    let start = result.range.start;
    let total = Some(result.meta.size);
    let body = result.into_stream().map_err(|e| store_failure(e, true)).boxed();
    Ok(Opened { start, total, body })
}

pub(super) async fn list(store: &dyn ObjectStore, kind: StoreKind, key: &str) -> Result<Vec<Listed>, Failure> {
    let prefix = (!key.is_empty())
        .then(|| StorePath::parse(key))
        .transpose()
        .map_err(|e| Failure::permanent(format!("invalid prefix: {e}")))?;
    let mut listing = store.list(prefix.as_ref());
    let mut found = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| credential_hint(kind, store_failure(e, false)))?;
        let full = meta.location.as_ref();
        let relative = if key.is_empty() {
            full
        } else {
            match full.strip_prefix(key).and_then(|r| r.strip_prefix('/')) {
                Some(relative) => relative,
                None => continue,
            }
        };
        if relative.is_empty() {
            continue; // a directory marker
        }
        let relative = relative.to_string();
        found.push(Listed { location: Location::Store(meta.location), relative, size: meta.size });
    }
    Ok(found)
}

fn store_failure(error: object_store::Error, transient: bool) -> Failure {
    use object_store::Error as E;
    match &error {
        E::NotFound { .. } => Failure::permanent(format!("not found: {}", error_chain(&error))),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            Failure::permanent(format!("access denied: {}", error_chain(&error)))
        }
        _ => Failure { message: error_chain(&error), transient, over_limit: false },
    }
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
    Failure { message: format!("{hint}: {}", failure.message), ..failure }
}
