//! Starts the three listeners (gRPC, HTTP, metrics) over one shared state
//! and stops them gracefully: on SIGTERM or Ctrl-C health turns NOT_SERVING,
//! new requests are refused, and requests in flight finish within the grace
//! period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use ferrite_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::auth::{ApiKeys, GrpcAuthLayer};
use crate::config::ModelSettings;
use crate::grpc::InferenceService;
use crate::policy::Policy;
use crate::repository::{IndexState, ReadinessSink, Repository, Sources};
use crate::runtime::Runtime;
use crate::state::ServerState;
use crate::tls::{self, Alpn, TlsFiles};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where the gRPC API listens.
    pub grpc_addr: SocketAddr,
    /// Where the REST API (and OpenAI's) listens.
    pub http_addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    /// The models to serve.
    pub sources: Sources,
    /// Settings of models that bring none of their own.
    pub defaults: ModelSettings,
    /// Largest request message, in bytes.
    pub max_message_bytes: usize,
    /// Budget of the wire bytes of all requests in flight (see `budget`).
    pub max_inflight_bytes: usize,
    /// Connection limits of the gRPC and HTTP ports.
    pub limits: crate::transport::Limits,
    /// How long requests in flight may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// The ONNX Runtime shared library.
    pub onnxruntime: std::path::PathBuf,
    /// Settings of the GPU execution providers (device, memory, CUDA
    /// graphs, TensorRT caches) and whether a model may fall back to the CPU.
    pub providers: crate::runtime::ProviderConfig,
    /// Exit (with [`ModelLoadFailure`]) when a model fails to load at
    /// startup, instead of staying up and not ready: in Kubernetes the
    /// container's exit and its message tell the operator why.
    pub exit_on_load_failure: bool,
    /// What clients may do beyond inference (load/unload, priority).
    pub policy: Policy,
    /// TLS on the gRPC and HTTP ports; none: plaintext.
    pub tls: Option<TlsFiles>,
    /// API keys the gRPC and HTTP ports require; none: no key needed.
    pub api_key_file: Option<std::path::PathBuf>,
    /// Escalation settings for every LLM (an `escalation` object), over
    /// what their `ferrite.json` says.
    pub escalation_file: Option<std::path::PathBuf>,
}

/// A model failed to load at startup and `exit_on_load_failure` was set.
#[derive(Debug)]
pub struct ModelLoadFailure(pub String);

impl std::fmt::Display for ModelLoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "model load failed: {}", self.0)
    }
}

impl std::error::Error for ModelLoadFailure {}

/// Runs the server until SIGTERM or Ctrl-C, then drains it.
pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    // Installed before anything slow, so SIGTERM during model loading is a
    // clean shutdown too.
    let shutdown = shutdown_signal()?;
    tokio::pin!(shutdown);
    // Bad certificate or key files fail here, before anything is loaded.
    let tls = match &options.tls {
        Some(files) => Some((tls::server_config(files, Alpn::Grpc)?, tls::server_config(files, Alpn::Http)?)),
        None => None,
    };
    let api_keys = options.api_key_file.as_deref().map(ApiKeys::read).transpose()?.map(Arc::new);
    // Checked before anything loads: a bad file fails the start.
    let escalation = options.escalation_file.as_deref().map(crate::cascade::EscalationConfig::read).transpose()?;
    let runtime = Arc::new(Runtime::load(&options.onnxruntime)?.with_providers(options.providers.clone()));
    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = Box::new(HealthSink(health.clone()));
    let repository = Arc::new(
        Repository::new(runtime, options.sources.clone(), options.defaults, readiness).with_escalation(escalation),
    );
    let budget = crate::budget::Budget::new(options.max_inflight_bytes);
    let state =
        Arc::new(ServerState::new(repository.clone(), options.max_message_bytes, options.policy, budget.clone()));

    // Bind first, so that a port in use fails fast and probes can connect
    // (and see "not ready") while models load.
    let grpc_listener = bind(options.grpc_addr, "gRPC").await?;
    let http_listener = bind(options.http_addr, "HTTP").await?;
    let metrics_listener = bind(options.metrics_addr, "metrics").await?;
    tracing::info!(
        grpc = %options.grpc_addr,
        http = %options.http_addr,
        metrics = %options.metrics_addr,
        tls = tls.is_some(),
        mtls = options.tls.as_ref().is_some_and(|files| files.client_ca.is_some()),
        api_keys = api_keys.is_some(),
        model_control = options.policy.model_control.as_str(),
        "listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferrite_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferrite_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let inference = GrpcInferenceServiceServer::new(InferenceService::new(state.clone()))
        // tonic refuses larger messages itself (OUT_OF_RANGE); the layer
        // below reports that as INVALID_ARGUMENT like other bad input.
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let grpc = crate::transport::grpc_server(&options.limits)
        .layer(crate::grpc::limit::OversizeAsInvalidArgumentLayer)
        .layer(crate::grpc::limit::BudgetLayer { budget, body_timeout: options.limits.body_read_timeout })
        .layer(tonic::service::InterceptorLayer::new(crate::grpc::stamp_arrival))
        .layer(GrpcAuthLayer(api_keys.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference);
    let incoming = crate::transport::grpc_incoming(grpc_listener, options.limits);
    let grpc = match &tls {
        Some((grpc_tls, _)) => {
            tokio::spawn(grpc.serve_with_incoming_shutdown(tls::handshaken(incoming, grpc_tls.clone()), stopped()))
        }
        None => tokio::spawn(grpc.serve_with_incoming_shutdown(incoming, stopped())),
    };
    let mut api = crate::http::router(state.clone(), options.limits.body_read_timeout);
    if let Some(keys) = api_keys {
        api = api.layer(axum::middleware::from_fn_with_state(keys, crate::auth::require_http_key));
    }
    let http_tls = tls.as_ref().map(|(_, http_tls)| http_tls.clone());
    let http = tokio::spawn(crate::transport::serve_http(http_listener, api, options.limits, http_tls, stopped()));
    // Plain HTTP, no key: Prometheus, and the probes when TLS is on.
    let metrics = axum::serve(metrics_listener.tap_io(set_nodelay), crate::http::metrics_router(state.clone()))
        .with_graceful_shutdown(stopped());
    let metrics = tokio::spawn(async move { metrics.await });

    let loaded = tokio::select! {
        _ = repository.load_all() => true,
        _ = &mut shutdown => false,
    };
    if loaded {
        if repository.all_ready() {
            health.set_service_status("inference.GRPCInferenceService", ServingStatus::Serving).await;
            tracing::info!("ready");
        } else if options.exit_on_load_failure {
            let reasons: Vec<String> = repository
                .index()
                .into_iter()
                .filter(|entry| entry.state != IndexState::Ready)
                .map(|entry| format!("{}: {}", entry.name, entry.reason))
                .collect();
            return Err(ModelLoadFailure(reasons.join("; ")).into());
        } else {
            // "" is liveness (the process serves) and stays SERVING: a
            // restart would not load the model either. Readiness is each
            // model's service and "inference.GRPCInferenceService".
            tracing::warn!("not every model loaded; the server stays not ready (see the repository index)");
        }
        shutdown.await;
    }
    tracing::info!(grace_seconds = options.shutdown_grace.as_secs_f64(), "shutting down: draining requests");
    state.begin_shutdown();
    health.set_service_status("", ServingStatus::NotServing).await;
    health.set_service_status("inference.GRPCInferenceService", ServingStatus::NotServing).await;
    for model in repository.loaded(None) {
        health.set_service_status(model.name.clone(), ServingStatus::NotServing).await;
    }
    let _ = stop_tx.send(true);

    let drained = async {
        let (grpc, http, metrics) = tokio::join!(grpc, http, metrics);
        grpc??;
        http??;
        metrics??;
        anyhow::Ok(())
    };
    match tokio::time::timeout(options.shutdown_grace, drained).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("grace period over; requests still running are dropped"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Each model's readiness, published by the repository, as its gRPC health
/// service (named after the model).
struct HealthSink(HealthReporter);

impl ReadinessSink for HealthSink {
    fn publish<'a>(&'a self, model: &'a str, serving: bool) -> BoxFuture<'a, ()> {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        Box::pin(self.0.set_service_status(model, status))
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// Every accepted connection of the metrics port sends without Nagle's
/// delay, as the others do (see `transport`).
fn set_nodelay(connection: &mut tokio::net::TcpStream) {
    if let Err(error) = connection.set_nodelay(true) {
        tracing::warn!(%error, "cannot set TCP_NODELAY on an accepted connection");
    }
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes on
/// the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}
