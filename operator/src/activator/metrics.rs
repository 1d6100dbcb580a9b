//! The activator's metrics (names from `ferrite_contract::activator`) and
//! its `/metrics`, `/healthz` and `/readyz` endpoints.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use ferrite_contract::activator as names;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use super::route::ModelKey;

/// Everything the activator reports.
#[derive(Clone)]
pub struct ActivatorMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Requests held now, by ModelDeployment.
    pub held: IntGaugeVec,
    /// Requests received, by ModelDeployment (held or forwarded at once).
    pub requests: IntCounterVec,
    /// How long held requests waited, by ModelDeployment and outcome
    /// (`forwarded`, `timeout`, `gone`, `cancelled`).
    pub hold_seconds: HistogramVec,
    /// Requests answered by the activator itself, by reason (`unknown`,
    /// `full`, `timeout`, `unavailable`).
    pub refused: IntCounterVec,
}

impl ActivatorMetrics {
    /// Fresh metrics in their own registry.
    pub fn new() -> ActivatorMetrics {
        let labels = [names::NAMESPACE_LABEL, names::NAME_LABEL];
        let held = IntGaugeVec::new(
            Opts::new(names::HELD_REQUESTS, "Requests held until a pod of the ModelDeployment is ready"),
            &labels,
        )
        .expect("valid metric");
        let requests = IntCounterVec::new(
            Opts::new(names::REQUESTS, "Requests the activator received for a ModelDeployment"),
            &labels,
        )
        .expect("valid metric");
        let hold_seconds = HistogramVec::new(
            HistogramOpts::new("ferrite_activator_hold_duration_seconds", "Time held requests waited for a ready pod")
                .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]),
            &[names::NAMESPACE_LABEL, names::NAME_LABEL, "outcome"],
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            Opts::new("ferrite_activator_refused_total", "Requests the activator answered with an error, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        let registry = Registry::new();
        for metric in [
            Box::new(held.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests.clone()),
            Box::new(hold_seconds.clone()),
            Box::new(refused.clone()),
        ] {
            registry.register(metric).expect("unique metric");
        }
        ActivatorMetrics { registry, held, requests, hold_seconds, refused }
    }

    /// Counts a request for `key`.
    pub fn received(&self, key: &ModelKey) {
        self.requests.with_label_values(&[&key.namespace, &key.name]).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding");
        String::from_utf8(out).expect("UTF-8")
    }
}

impl Default for ActivatorMetrics {
    fn default() -> Self {
        ActivatorMetrics::new()
    }
}

/// Serves `/metrics`, `/healthz` (the process serves) and `/readyz` (the
/// watches have synced and it is not shutting down) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: ActivatorMetrics,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(ferrite_contract::metrics::PATH, get(move || async move { metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
