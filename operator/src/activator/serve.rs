//! The accept loop of a proxy port: HTTP/1.1 and h2c (or h2c only), each
//! connection in its own task, stopped gracefully (open requests, held ones
//! included, finish; the caller bounds the wait).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::handler::Activator;

/// Largest block of request headers (as ferrite-server allows).
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// HTTP/2 streams at once per connection: held gRPC calls are open streams,
/// and one client channel may hold many.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Which protocols a port speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocols {
    /// HTTP/1.1 and h2c (prior knowledge), told apart by the preface.
    Http1AndH2c,
    /// h2c only (gRPC).
    H2cOnly,
}

/// Serves `listener` until `stop` turns true, forwarding to `pod_port`,
/// then closes connections gracefully and waits for them.
pub async fn serve(
    listener: TcpListener,
    protocols: Protocols,
    activator: Arc<Activator>,
    pod_port: u16,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(MAX_HEADER_LIST_BYTES as usize);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = if protocols == Protocols::H2cOnly { builder.http2_only() } else { builder };
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, usually: wait instead of spinning.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small gRPC messages must not wait for Nagle.
        let _ = socket.set_nodelay(true);
        let (builder, activator, mut stop) = (builder.clone(), activator.clone(), stop.clone());
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let activator = activator.clone();
                async move { Ok::<_, Infallible>(activator.handle(request, pod_port, peer).await) }
            });
            let connection = builder.serve_connection(TokioIo::new(socket), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.wait_for(|stop| *stop) => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// The address a listener is bound to, for logs.
pub fn bound(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
