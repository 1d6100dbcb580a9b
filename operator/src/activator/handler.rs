//! One request's way through the activator: which ModelDeployment it is
//! for, forwarded at once when a pod is ready, otherwise held (bounded, up
//! to its deadline) until one is.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::HOST;
use axum::http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::deadline::{format_grpc_timeout, parse_grpc_timeout, GRPC_TIMEOUT};
use super::hold::{wait_ready, HoldQueue, Readiness, Released};
use super::metrics::ActivatorMetrics;
use super::proxy::Upstream;
use super::reply::{self, Dialect, Failure, ProxyBody};
use super::route::{self, ModelKey};
use super::view::ClusterView;

/// The activator's shared state.
pub struct Activator {
    /// The cluster as watched.
    pub view: Arc<ClusterView>,
    /// Held requests.
    pub holds: Arc<HoldQueue>,
    /// Clients to the pods.
    pub upstream: Upstream,
    /// What it reports.
    pub metrics: ActivatorMetrics,
    /// Longest hold (a shorter `grpc-timeout` wins).
    pub hold_timeout: Duration,
}

impl Activator {
    /// Answers `request`, which arrived from `client` on a port whose pods'
    /// counterpart is `pod_port`.
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        pod_port: u16,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let dialect = Dialect::of(&request);
        let key = match route::resolve(authority(&request).as_deref(), self.view.as_ref()) {
            Ok(key) => key,
            Err(error) => return self.refuse(dialect, Failure::NotFound, &error.to_string()),
        };
        self.metrics.received(&key);
        if self.view.model(&key).is_some_and(|md| md.spec.tls.is_some()) {
            // Its pods speak TLS, which a plain proxy can neither terminate
            // nor pass through; the CRD refuses minReplicas 0 with spec.tls.
            let message = format!("ModelDeployment {key} serves TLS (spec.tls), which the activator cannot proxy");
            return self.refuse(dialect, Failure::Unavailable, &message);
        }
        let arrived = Instant::now();
        let client_timeout =
            request.headers().get(GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let deadline = arrived + client_timeout.map_or(self.hold_timeout, |t| t.min(self.hold_timeout));
        let pods = match self.view.ready_pods(&key) {
            Readiness::Ready(pods) => pods,
            Readiness::Gone => {
                return self.refuse(dialect, Failure::NotFound, &format!("ModelDeployment {key} no longer exists"))
            }
            Readiness::Waiting => match self.hold(&key, dialect, arrived, deadline).await {
                Ok(pods) => pods,
                Err(response) => return response,
            },
        };
        // What is left of the client's deadline travels on.
        if let Some(timeout) = client_timeout {
            let left = format_grpc_timeout(timeout.saturating_sub(arrived.elapsed()));
            request.headers_mut().insert(GRPC_TIMEOUT, HeaderValue::from_str(&left).expect("ASCII"));
        }
        let more = || match self.view.ready_pods(&key) {
            Readiness::Ready(pods) => pods,
            _ => Vec::new(),
        };
        match self.upstream.forward(&key, request, &pods, more, pod_port, Some(client)).await {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(namespace = %key.namespace, name = %key.name, error = %error, "forwarding failed");
                self.refuse(dialect, Failure::Unavailable, &error.to_string())
            }
        }
    }

    /// Holds a request for `key` until a pod is ready (its IPs), the
    /// deadline passes or the ModelDeployment goes (the error response).
    async fn hold(
        &self,
        key: &ModelKey,
        dialect: Dialect,
        arrived: Instant,
        deadline: Instant,
    ) -> Result<Vec<IpAddr>, Response<ProxyBody>> {
        let place = match self.holds.try_hold(key) {
            Ok(place) => place,
            Err(full) => return Err(self.refuse(dialect, Failure::Exhausted, &full.to_string())),
        };
        let mut record = HoldRecord { activator: self, key, arrived, outcome: "cancelled" };
        tracing::info!(
            namespace = %key.namespace, name = %key.name, held = place.held_now(),
            limit_ms = deadline.saturating_duration_since(arrived).as_millis() as u64,
            "hold started: no ready pod"
        );
        let mut changes = self.view.changes();
        let released = wait_ready(|| self.view.ready_pods(key), &mut changes, deadline).await;
        drop(place);
        let waited = arrived.elapsed();
        match released {
            Released::Ready(pods) => {
                record.outcome = "forwarded";
                tracing::info!(
                    namespace = %key.namespace, name = %key.name, wait_ms = waited.as_millis() as u64,
                    ready_pods = pods.len(), "hold released: pod ready, forwarding"
                );
                Ok(pods)
            }
            Released::TimedOut => {
                record.outcome = "timeout";
                tracing::info!(namespace = %key.namespace, name = %key.name, wait_ms = waited.as_millis() as u64,
                    "hold released: deadline passed, no pod ready");
                let message =
                    format!("no pod of ModelDeployment {key} became ready within {:.1} s", waited.as_secs_f64());
                Err(self.refuse(dialect, Failure::Deadline, &message))
            }
            Released::Gone => {
                record.outcome = "gone";
                tracing::info!(namespace = %key.namespace, name = %key.name, wait_ms = waited.as_millis() as u64,
                    "hold released: ModelDeployment deleted");
                Err(self.refuse(dialect, Failure::NotFound, &format!("ModelDeployment {key} was deleted")))
            }
        }
    }

    fn refuse(&self, dialect: Dialect, failure: Failure, message: &str) -> Response<ProxyBody> {
        self.metrics.refused.with_label_values(&[failure.reason()]).inc();
        reply::error(dialect, failure, message)
    }
}

/// Observes a hold's duration by outcome when it ends, also when the client
/// gives up (the request's future is dropped mid-wait: `cancelled`).
struct HoldRecord<'a> {
    activator: &'a Activator,
    key: &'a ModelKey,
    arrived: Instant,
    outcome: &'static str,
}

impl Drop for HoldRecord<'_> {
    fn drop(&mut self) {
        let waited = self.arrived.elapsed();
        if self.outcome == "cancelled" {
            tracing::info!(namespace = %self.key.namespace, name = %self.key.name,
                wait_ms = waited.as_millis() as u64, "hold released: client went away");
        }
        self.activator
            .metrics
            .hold_seconds
            .with_label_values(&[&self.key.namespace, &self.key.name, self.outcome])
            .observe(waited.as_secs_f64());
    }
}

/// The host a request names: HTTP/2's `:authority` (in the URI), else the
/// Host header.
fn authority<B>(request: &Request<B>) -> Option<String> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str().to_string());
    }
    request.headers().get(HOST).and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_wins_over_the_host_header() {
        let h2 = Request::builder().uri("http://mlp.a:8001/x").header(HOST, "other").body(()).unwrap();
        assert_eq!(authority(&h2).as_deref(), Some("mlp.a:8001"));
        let h1 = Request::builder().uri("/v2/models/m/infer").header(HOST, "mlp.a.svc:8000").body(()).unwrap();
        assert_eq!(authority(&h1).as_deref(), Some("mlp.a.svc:8000"));
        assert_eq!(authority(&Request::builder().uri("/").body(()).unwrap()), None);
    }
}
