//! The operator's own metrics and its `/metrics`, `/healthz` and `/readyz`
//! endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::health::Health;
use crate::leader::FenceCounters;

/// Metrics of reconciliation and leadership.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Reconciliations by result (`ok` or `error`).
    pub reconciliations: IntCounterVec,
    /// Reconcile errors by reason (the error's metric label).
    pub errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// 1 while this process holds the leader lease.
    pub leader: IntGauge,
    /// Leader-only writes by result: `sent`, or `refused` by the fence.
    pub leader_writes: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new("ferrite_operator_reconciliations_total", "Reconciliations of ModelDeployments by result"),
            &["result"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new("ferrite_operator_reconcile_errors_total", "Reconcile errors by reason"),
            &["reason"],
        )
        .expect("valid metric");
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new("ferrite_operator_reconcile_duration_seconds", "Time one reconciliation took")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .expect("valid metric");
        let leader =
            IntGauge::new("ferrite_operator_leader", "1 while this process is the leader").expect("valid metric");
        let leader_writes = IntCounterVec::new(
            Opts::new(
                "ferrite_operator_leader_writes_total",
                "Writes of the leader-only client: sent, or refused because the term had ended",
            ),
            &["result"],
        )
        .expect("valid metric");
        for metric in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(leader.clone()),
            Box::new(leader_writes.clone()),
        ] {
            registry.register(metric).expect("unique metric");
        }
        Metrics { registry, reconciliations, errors, reconcile_duration, leader, leader_writes }
    }

    /// The counters the leader-only client's fence writes into.
    pub fn fence_counters(&self) -> FenceCounters {
        FenceCounters {
            sent: self.leader_writes.with_label_values(&["sent"]),
            refused: self.leader_writes.with_label_values(&["refused"]),
        }
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding");
        String::from_utf8(out).expect("UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `/metrics`, `/healthz` (every registered loop makes progress, see
/// [`crate::health`]) and `/readyz` (it has reached the API server) until
/// `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route(
            "/healthz",
            get(move || async move {
                let stalled = health.stalled();
                if stalled.is_empty() {
                    (StatusCode::OK, "ok".to_string())
                } else {
                    tracing::error!(?stalled, "liveness check failed");
                    (StatusCode::SERVICE_UNAVAILABLE, stalled.join("\n"))
                }
            }),
        )
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
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn healthz_fails_while_a_loop_makes_no_progress() {
        let health = Health::new();
        let controller = health.register("controller", Duration::from_millis(200));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        let ready = Arc::new(AtomicBool::new(true));
        tokio::spawn(serve(listener, Metrics::new(), ready, health.clone(), std::future::pending()));
        let get = || async { reqwest::get(&url).await.unwrap() };

        assert_eq!(get().await.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stalled = get().await;
        assert_eq!(stalled.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = stalled.text().await.unwrap();
        assert!(body.starts_with("controller: no progress for"), "{body}");
        controller.beat();
        assert_eq!(get().await.status(), StatusCode::OK);
    }
}
