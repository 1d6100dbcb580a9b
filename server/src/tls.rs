//! TLS (rustls, with the `ring` provider) on the gRPC and HTTP ports:
//! `--tls-cert` and `--tls-key`, and with `--tls-client-ca` mutual TLS
//! (a client must present a certificate that CA signed).
//!
//! One listener serves both ports: it accepts TCP connections, sets
//! TCP_NODELAY, and runs each TLS handshake in its own task with a time
//! limit, so a client that stalls its handshake holds up nobody else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
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

/// Connections on a TLS port, handshakes done.
pub(crate) struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener`; stops when the `TlsListener` is dropped.
    pub(crate) fn new(listener: TcpListener, config: Arc<ServerConfig>) -> anyhow::Result<TlsListener> {
        let local_addr = listener.local_addr()?;
        let (sender, accepted) = mpsc::channel(ACCEPTED_BACKLOG);
        tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), sender));
        Ok(TlsListener { accepted, local_addr })
    }

    /// The connections as tonic takes them.
    pub(crate) fn into_stream(self) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
        futures::stream::unfold(self.accepted, |mut accepted| async move {
            let (connection, _) = accepted.recv().await?;
            Some((Ok(connection), accepted))
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop ended (it never does while we hold the receiver).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    sender: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = sender.closed() => return,
        };
        // As on the plaintext ports (see server::set_nodelay).
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY on an accepted connection");
        }
        let (acceptor, sender) = (acceptor.clone(), sender.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = sender.send((tls, peer)).await;
                }
                // A plaintext client, a wrong CA, no client certificate: the
                // client sees the TLS alert; one debug line here.
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
