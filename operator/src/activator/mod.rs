//! `ferrite-operator activator`: holds the requests of ModelDeployments
//! that have no ready pod, and forwards them once one is.
//!
//! A scaled-to-zero model's Service points at the activator's pods (the
//! operator writes the EndpointSlice); the activator listens on the
//! server's ports so that the Service's ports are the same either way. It
//! learns which pods are ready by watching them itself. The operator's
//! autoscaler scrapes its held counts from `/metrics` and scales up.
//!
//! - [`route`] - which ModelDeployment a request is for (Host / `:authority`).
//! - [`view`] - ModelDeployments, Services and ready pods, watched.
//! - [`hold`] - the bounded per-ModelDeployment hold queue and the wait.
//! - [`deadline`] - `grpc-timeout`.
//! - [`proxy`] - forwarding to a pod, bodies streamed both ways.
//! - [`reply`] - the activator's own answers (errors in the client's dialect).
//! - [`handler`] - one request's way through these.
//! - [`serve`] - the proxy ports' accept loops.
//! - [`metrics`] - `/metrics`, `/healthz`, `/readyz`.

pub mod deadline;
pub mod handler;
pub mod hold;
pub mod metrics;
pub mod proxy;
pub mod reply;
pub mod route;
pub mod serve;
pub mod view;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::handler::Activator;
use self::hold::HoldQueue;
use self::metrics::ActivatorMetrics;
use self::proxy::Upstream;
use self::serve::Protocols;
use self::view::ClusterView;

/// Settings of `ferrite-operator activator`.
#[derive(Debug, Clone)]
pub struct ActivatorOptions {
    /// HTTP/1.1 + h2c listener (the server's HTTP port).
    pub http_addr: SocketAddr,
    /// h2c (gRPC) listener.
    pub grpc_addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    /// The pods' HTTP port, where HTTP requests go.
    pub pod_http_port: u16,
    /// The pods' gRPC port, where gRPC requests go.
    pub pod_grpc_port: u16,
    /// Most requests held per ModelDeployment; more are refused (429 /
    /// RESOURCE_EXHAUSTED).
    pub max_held: usize,
    /// Longest hold; a shorter `grpc-timeout` wins (504 / DEADLINE_EXCEEDED).
    pub hold_timeout: Duration,
    /// Watched namespaces; empty: all.
    pub namespaces: Vec<String>,
    /// After SIGTERM: time it keeps accepting (not ready) while the
    /// endpoints that point here are updated.
    pub shutdown_delay: Duration,
    /// Then: longest wait for open requests (held ones included).
    pub drain_timeout: Duration,
}

/// Runs with the in-cluster (or kubeconfig) client until SIGTERM or Ctrl-C.
pub async fn run(options: ActivatorOptions) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let signal = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    run_with(client, options, signal).await
}

/// Runs against `client` until `shutdown` completes, then stops gracefully.
pub async fn run_with(
    client: Client,
    options: ActivatorOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))
    };
    let http = bind(options.http_addr, "http").await?;
    let grpc = bind(options.grpc_addr, "grpc").await?;
    let telemetry = bind(options.metrics_addr, "metrics").await?;
    let metrics = ActivatorMetrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // The metrics outlive the proxy ports: held requests still count while
    // they drain.
    let (telemetry_stop, telemetry_stopped) = watch::channel(false);
    let telemetry = tokio::spawn(metrics::serve(telemetry, metrics.clone(), ready.clone(), stopped(telemetry_stopped)));

    let (view, watches) = ClusterView::start(&client, &options.namespaces);
    let activator = Arc::new(Activator {
        view: view.clone(),
        holds: HoldQueue::new(options.max_held, metrics.held.clone()),
        upstream: Upstream::new(),
        metrics: metrics.clone(),
        hold_timeout: options.hold_timeout,
    });
    tracing::info!(
        http = ?serve::bound(&http), grpc = ?serve::bound(&grpc), metrics = %options.metrics_addr,
        pod_http_port = options.pod_http_port, pod_grpc_port = options.pod_grpc_port,
        max_held = options.max_held, hold_timeout_s = options.hold_timeout.as_secs_f64(),
        namespaces = ?options.namespaces, "activator starting"
    );
    let servers = [
        tokio::spawn(serve::serve(
            http,
            Protocols::Http1AndH2c,
            activator.clone(),
            options.pod_http_port,
            stop_rx.clone(),
        )),
        tokio::spawn(serve::serve(grpc, Protocols::H2cOnly, activator.clone(), options.pod_grpc_port, stop_rx.clone())),
    ];
    tokio::pin!(shutdown);
    // Ready once the watches have listed: before that every request would
    // look like one for an unknown model.
    tokio::select! {
        synced = view.wait_until_ready() => {
            synced?;
            ready.store(true, Ordering::SeqCst);
            tracing::info!("watches synced; ready");
            (&mut shutdown).await;
        }
        _ = &mut shutdown => {}
    }
    ready.store(false, Ordering::SeqCst);
    tracing::info!(delay_s = options.shutdown_delay.as_secs_f64(), "shutting down: not ready, still serving");
    tokio::time::sleep(options.shutdown_delay).await;
    let _ = stop_tx.send(true);
    if tokio::time::timeout(options.drain_timeout, futures::future::join_all(servers)).await.is_err() {
        tracing::warn!("open requests did not finish within {:?}; exiting", options.drain_timeout);
    }
    for watch in watches {
        watch.abort();
    }
    let _ = telemetry_stop.send(true);
    let _ = telemetry.await;
    tracing::info!("stopped");
    Ok(())
}
