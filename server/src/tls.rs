//! TLS (rustls, with the `ring` provider) on the gRPC and HTTP ports:
//! `--tls-cert` and `--tls-key`, and with `--tls-client-ca` mutual TLS
//! (a client must present a certificate that CA signed).
//!
//! [`handshaken`] turns any stream of accepted connections into TLS ones,
//! each handshake in its own task with a time limit, so a client that
//! stalls its handshake holds up nobody else; the gRPC port serves it,
//! the HTTP port the same through [`TlsListener`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest time a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// The PEM files that turn TLS on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (`tls.crt`).
    pub cert: PathBuf,
    /// Private key of the leaf certificate (`tls.key`).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (`ca.crt`); none:
    /// clients are not asked for a certificate.
    pub client_ca: Option<PathBuf>,
}

/// Which application protocols a port offers in ALPN.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Alpn {
    /// gRPC: HTTP/2 only (gRPC clients require `h2` to be negotiated).
    Grpc,
    /// The REST API: HTTP/2 or HTTP/1.1.
    Http,
}

/// The rustls configuration of one port, from the files. Fails with a
/// message naming the file that is missing or holds no usable PEM.
pub(crate) fn server_config(files: &TlsFiles, alpn: Alpn) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path)? {
                roots.add(cert).with_context(|| format!("--tls-client-ca {}: not a CA certificate", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("--tls-client-ca {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("--tls-key {}: no PEM private key", files.key.display()))?;
    let mut config = builder
        .with_single_cert(read_certs(&files.cert)?, key)
        .with_context(|| format!("--tls-cert {} with --tls-key {}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = match alpn {
        Alpn::Grpc => vec![b"h2".to_vec()],
        Alpn::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read PEM certificates from {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no PEM certificate", path.display());
    Ok(certs)
}

/// Runs the TLS handshake of one accepted connection, within
/// [`HANDSHAKE_TIMEOUT`]; `None` (logged at debug level) when it fails: a
/// plaintext client, an unknown CA, no client certificate.
pub(crate) async fn handshake<IO>(acceptor: &TlsAcceptor, connection: IO) -> Option<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(connection)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// The accepted connections of `connections` once their handshakes are
/// done, each handshake in its own task: one stalled client holds up nobody.
/// The tasks stop when the returned stream is dropped.
pub(crate) fn handshaken<S, IO>(
    connections: S,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = io::Result<TlsStream<IO>>>
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = TlsAcceptor::from(config);
    let (sender, accepted) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        tokio::pin!(connections);
        loop {
            let connection = tokio::select! {
                next = connections.next() => match next {
                    Some(Ok(connection)) => connection,
                    Some(Err(error)) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    None => return,
                },
                _ = sender.closed() => return,
            };
            let (acceptor, sender) = (acceptor.clone(), sender.clone());
            tokio::spawn(async move {
                if let Some(tls) = handshake(&acceptor, connection).await {
                    let _ = sender.send(tls).await;
                }
            });
        }
    });
    futures::stream::unfold(accepted, |mut accepted| async move {
        let connection = accepted.recv().await?;
        Some((Ok(connection), accepted))
    })
}
