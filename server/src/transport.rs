//! Connection-level limits of the gRPC and HTTP ports: how many connections
//! a port keeps open, how long a new connection may take to say what it
//! wants, HTTP/2 streams per connection and keepalive, and the HTTP accept
//! loop that applies them (axum's own `serve` has no such settings).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::metrics::METRICS;

/// Largest block of headers (HTTP/1, HTTP/2, gRPC metadata) a request may
/// send; hyper's defaults are ~400 KiB (HTTP/1) and 16 MiB (HTTP/2).
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// Limits on the connections of one port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections per port; more are closed as soon as accepted.
    pub max_connections: usize,
    /// HTTP/2 streams (requests) at once per connection.
    pub max_concurrent_streams: u32,
    /// Time a new connection has to send its first request's headers
    /// (HTTP/1), or the HTTP/2 connection preface.
    pub header_read_timeout: Duration,
    /// Time an HTTP request, or a unary gRPC inference call, has to send
    /// its whole body.
    pub body_read_timeout: Duration,
    /// Idle time after which the server pings an HTTP/2 connection.
    pub keepalive_interval: Duration,
    /// Time a ping may wait for its answer before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_concurrent_streams: 128,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// The HTTP/2 connection preface, in bytes.
const HTTP2_PREFACE: usize = 24;

/// The bytes an HTTP/2 client sends first: the preface and the 9-byte
/// header of its SETTINGS frame.
const HTTP2_OPENING: usize = HTTP2_PREFACE + 9;

/// Accepts connections up to `max_connections`; one over it is closed at
/// once (the client sees the connection reset, not a hang).
struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    limits: Limits,
    port: &'static str,
}

impl Acceptor {
    fn new(listener: TcpListener, limits: Limits, port: &'static str) -> Self {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        Acceptor { listener, slots, limits, port }
    }

    async fn accept(&self, opening: usize) -> io::Result<Limited> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                METRICS.connections_refused.with_label_values(&[self.port]).inc();
                drop(stream);
                continue;
            };
            // Without it a small response waits for the client's delayed
            // ACK: grpc-go clients saw ~40 ms per call.
            if let Err(error) = stream.set_nodelay(true) {
                tracing::warn!(%error, "cannot set TCP_NODELAY on an accepted connection");
            }
            return Ok(Limited::new(stream, slot, opening, self.limits.header_read_timeout, self.port));
        }
    }
}

/// An accepted connection: holds its slot until closed, and fails its reads
/// if its first `opening` bytes do not arrive within the timeout.
pub(crate) struct Limited {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    opening: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    port: &'static str,
}

impl Limited {
    fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        opening: usize,
        timeout: Duration,
        port: &'static str,
    ) -> Self {
        METRICS.connections.with_label_values(&[port]).inc();
        Limited { stream, _slot: slot, opening, deadline: Some(Box::pin(tokio::time::sleep(timeout))), port }
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        METRICS.connections.with_label_values(&[self.port]).dec();
    }
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if this.deadline.is_some() {
                    this.opening = this.opening.saturating_sub(buf.filled().len() - before);
                    if this.opening == 0 {
                        this.deadline = None;
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let expired = this.deadline.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not open its connection in time (--header-read-timeout-seconds)",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The gRPC port's connections, for tonic's `serve_with_incoming_shutdown`.
pub(crate) fn grpc_incoming(listener: TcpListener, limits: Limits) -> impl Stream<Item = io::Result<Limited>> {
    let acceptor = Arc::new(Acceptor::new(listener, limits, "grpc"));
    futures::stream::unfold(acceptor, |acceptor| async move {
        let connection = acceptor.accept(HTTP2_OPENING).await;
        Some((connection, acceptor))
    })
}

/// The gRPC server with this port's HTTP/2 limits.
pub(crate) fn grpc_server(limits: &Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
}

/// Serves `router` on `listener` (HTTP/1.1 and HTTP/2; over TLS when `tls`
/// is set, each handshake in its connection's task) under `limits` until
/// `stop` completes, then lets open connections finish their
/// requests (the caller bounds that wait).
pub(crate) async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's default lets one connection's headers take ~400 KiB.
        .max_buf_size(MAX_HEADER_LIST_BYTES as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let acceptor = Acceptor::new(listener, limits, "http");
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let connection = tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            // hyper's timer watches HTTP/1 headers, but not the HTTP/2
            // preface it reads to tell the two apart: the preface's length
            // is what a new connection must send in time (an HTTP/1.1
            // request line and its Host header are longer).
            connection = acceptor.accept(HTTP2_PREFACE) => connection,
        };
        let connection = match connection {
            Ok(connection) => connection,
            Err(error) => {
                // Out of file descriptors, usually: wait instead of spinning.
                tracing::warn!(%error, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let (builder, closed, tls) = (builder.clone(), closed.clone(), tls.clone());
        connections.spawn(async move {
            match tls {
                None => serve_connection(&builder, connection, service, closed).await,
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    if let Some(connection) = crate::tls::handshake(&acceptor, connection).await {
                        serve_connection(&builder, connection, service, closed).await
                    }
                }
            }
        });
    }
    drop(acceptor);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection until it ends, or until `closed` says the server
/// stops: then its requests in flight finish and it closes.
async fn serve_connection<IO>(
    builder: &auto::Builder<TokioExecutor>,
    connection: IO,
    service: TowerToHyperService<axum::Router>,
    mut closed: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = builder.serve_connection(TokioIo::new(connection), service);
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => return,
        _ = closed.wait_for(|closing| *closing) => {}
    }
    served.as_mut().graceful_shutdown();
    let _ = served.await;
}
