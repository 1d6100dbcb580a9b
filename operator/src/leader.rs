//! Leader election on a `coordination.k8s.io/v1` Lease, and the fence that
//! keeps a leader that can no longer prove its leadership from writing.
//!
//! The algorithm is client-go's `leaderelection`:
//!
//! - Every `retry_period` each candidate reads the Lease. A holder other
//!   than itself counts as alive until `lease_duration` has passed on the
//!   candidate's own clock since the Lease last changed (its
//!   `resourceVersion`): no wall clock of another host is trusted. An empty
//!   or expired Lease is taken with an update that carries the
//!   `resourceVersion` just read, so of two candidates only one succeeds.
//! - The leader renews the same way. A renewal that starts at `T` and
//!   succeeds makes it the leader until `T + renew_deadline`; a follower
//!   cannot take the Lease before `T + lease_duration`, later than that. The
//!   difference (5 s by default) absorbs clock-rate differences and a write
//!   already on the wire.
//! - When no renewal succeeds before that deadline, the leadership ends by
//!   the clock alone: [`Leadership::valid_until`] returns `None` from that
//!   instant, whatever the election task is doing (it may be stuck on a
//!   connection that never answers).
//!
//! Every leader-only write goes through a client built with [`FenceLayer`]:
//! each mutating request is checked right before it is sent, and refused
//! without a term; a request that is sent is cut off when the term ends.
//!
//! Why not `kube-lease-manager` (used before): it reports only "leader or
//! not", and on a failed renewal it logs and keeps reporting "leader", so a
//! leader cut off from the API server went on writing beside its successor;
//! it also reads the holder's expiry from the holder's wall clock.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use kube::client::Body;
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::health::Heartbeat;

/// Timings of the election (client-go's defaults for controllers).
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Name of the Lease.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This candidate's identity (unique per process).
    pub identity: String,
    /// How long followers wait after the last change of the Lease before
    /// taking it (written into the Lease as `leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// How long after the start of its last successful renewal the leader
    /// keeps writing. Shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// Time between two attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// A configuration with the default timings: 15 s, 10 s, 2 s.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>, identity: impl Into<String>) -> LeaseConfig {
        LeaseConfig {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// This process's leadership as the writers see it: the end of the current
/// term, if any. Cheap to clone; every clone sees the same term.
#[derive(Clone, Debug)]
pub struct Leadership(watch::Receiver<Option<Instant>>);

impl Leadership {
    /// A leadership fixed to `until` (for tests and tools).
    pub fn until(until: Option<Instant>) -> (watch::Sender<Option<Instant>>, Leadership) {
        let (tx, rx) = watch::channel(until);
        (tx, Leadership(rx))
    }

    /// The end of the current term, when this process leads now.
    pub fn valid_until(&self) -> Option<Instant> {
        (*self.0.borrow()).filter(|until| Instant::now() < *until)
    }

    /// Whether this process leads now.
    pub fn is_leading(&self) -> bool {
        self.valid_until().is_some()
    }

    /// Waits until this process leads.
    pub async fn acquired(&mut self) {
        loop {
            if self.is_leading() {
                return;
            }
            if self.0.changed().await.is_err() {
                // The election stopped; never leading now.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until the current term ends: the deadline passes without a
    /// renewal, another candidate holds the Lease, or the election stops.
    pub async fn lost(&mut self) {
        loop {
            let Some(until) = self.valid_until() else { return };
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                changed = self.0.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The running election; [`Election::stop`] ends it and gives the Lease up.
pub struct Election {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Election {
    /// Starts competing for the Lease with `client` (a client of its own,
    /// not fenced). `heartbeat` is beaten after every attempt.
    pub fn start(client: Client, config: LeaseConfig, heartbeat: Heartbeat) -> (Election, Leadership) {
        let (term_tx, leadership) = Leadership::until(None);
        let (stop, stop_rx) = watch::channel(false);
        let candidate = Candidate { api: Api::namespaced(client, &config.namespace), config, observed: None };
        let task = tokio::spawn(candidate.run(term_tx, stop_rx, heartbeat));
        (Election { stop, task }, leadership)
    }

    /// Stops competing and, when this process still leads, releases the
    /// Lease so that another candidate takes it at once.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The last version of the Lease a candidate saw, and when it saw it change.
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

struct Candidate {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

impl Candidate {
    async fn run(
        mut self,
        term: watch::Sender<Option<Instant>>,
        mut stop: watch::Receiver<bool>,
        heartbeat: Heartbeat,
    ) {
        loop {
            let started = Instant::now();
            // The attempt may hang on a dead connection; bound it so the loop
            // (and its heartbeat) keeps going.
            match tokio::time::timeout(self.config.renew_deadline, self.try_acquire_or_renew(started)).await {
                Ok(Ok(true)) => {
                    let until = started + self.config.renew_deadline;
                    if term.borrow().is_none_or(|old| old <= started) {
                        tracing::info!(identity = %self.config.identity, "acquired the lease");
                    }
                    term.send_replace(Some(until));
                }
                Ok(Ok(false)) => {
                    if term.send_replace(None).is_some_and(|old| old > started) {
                        tracing::error!(identity = %self.config.identity, "another candidate holds the lease");
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(identity = %self.config.identity, %error, "cannot read or renew the lease")
                }
                Err(_) => tracing::warn!(identity = %self.config.identity, "lease request timed out"),
            }
            heartbeat.beat();
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry_period) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        let leading = term.borrow().is_some_and(|until| Instant::now() < until);
        term.send_replace(None);
        if leading {
            match tokio::time::timeout(self.config.retry_period, self.release()).await {
                Ok(Ok(())) => tracing::info!(identity = %self.config.identity, "released the lease"),
                Ok(Err(error)) => tracing::warn!(%error, "cannot release the lease"),
                Err(_) => tracing::warn!("releasing the lease timed out"),
            }
        }
    }

    /// One round: `Ok(true)` when this candidate holds the Lease now.
    async fn try_acquire_or_renew(&mut self, now: Instant) -> Result<bool, kube::Error> {
        let me = &self.config.identity;
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: kube::api::ObjectMeta { name: Some(self.config.name.clone()), ..Default::default() },
                spec: Some(self.record(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let version = lease.metadata.resource_version.clone();
        if self.observed.as_ref().is_none_or(|o| o.resource_version != version) {
            self.observed = Some(Observed { resource_version: version, at: now });
        }
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        if let Some(holder) = holder {
            let duration = spec
                .lease_duration_seconds
                .filter(|&s| s > 0)
                .map_or(self.config.lease_duration, |s| Duration::from_secs(s as u64));
            let observed_at = self.observed.as_ref().map_or(now, |o| o.at);
            if holder != me && now < observed_at + duration {
                return Ok(false);
            }
        }
        lease.spec = Some(self.record(Some(&spec)));
        // `replace` sends the resourceVersion read above: a concurrent
        // writer makes this fail with 409 instead of both winning.
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                self.observed = Some(Observed { resource_version: written.metadata.resource_version, at: now });
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The Lease spec that says "held by me from now"; `old` is the current
    /// spec, whose acquire time and transition count carry over on renewal.
    fn record(&self, old: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let me = &self.config.identity;
        let renewing = old.is_some_and(|o| o.holder_identity.as_ref() == Some(me));
        let transitions = old.and_then(|o| o.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(me.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
            acquire_time: if renewing { old.and_then(|o| o.acquire_time.clone()) } else { Some(now.clone()) },
            renew_time: Some(now),
            lease_transitions: Some(if renewing || old.is_none() { transitions } else { transitions + 1 }),
            ..LeaseSpec::default()
        }
    }

    /// Empties the holder (as client-go does on a clean exit) so a follower
    /// takes the Lease at its next attempt instead of waiting it out.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else { return Ok(()) };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_ref() != Some(&self.config.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        self.api.replace(&self.config.name, &PostParams::default(), &lease).await.map(|_| ())
    }
}

/// Counts of the writes a fenced client sent and refused.
#[derive(Clone, Debug)]
pub struct FenceCounters {
    /// Mutating requests sent while leading.
    pub sent: prometheus::IntCounter,
    /// Mutating requests refused: no term, or the term ended in flight.
    pub refused: prometheus::IntCounter,
}

/// A tower layer for the kube client of the leader-only work (controller,
/// autoscaler, Events): requests other than GET, HEAD and OPTIONS go out
/// only while [`Leadership::valid_until`] is in the future, checked when the
/// request leaves the client's queue, and are abandoned (the connection is
/// dropped) if the term ends before the answer comes.
#[derive(Clone)]
pub struct FenceLayer {
    leadership: Leadership,
    counters: FenceCounters,
}

impl FenceLayer {
    /// A layer that checks `leadership` and counts into `counters`.
    pub fn new(leadership: Leadership, counters: FenceCounters) -> FenceLayer {
        FenceLayer { leadership, counters }
    }
}

impl<S> tower::Layer<S> for FenceLayer {
    type Service = Fenced<S>;

    fn layer(&self, inner: S) -> Fenced<S> {
        Fenced { inner, layer: self.clone() }
    }
}

/// The service of [`FenceLayer`].
#[derive(Clone)]
pub struct Fenced<S> {
    inner: S,
    layer: FenceLayer,
}

/// Why a fenced client refused a write.
#[derive(Debug, thiserror::Error)]
#[error("not the leader: {0}")]
pub struct NotLeader(&'static str);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<Request<Body>> for Fenced<S>
where
    S: tower::Service<Request<Body>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
            let response = self.inner.call(request);
            return Box::pin(async move { response.await.map_err(Into::into) });
        }
        let Some(until) = self.layer.leadership.valid_until() else {
            self.layer.counters.refused.inc();
            tracing::warn!(method = %request.method(), uri = %request.uri(), "write refused: not the leader");
            return Box::pin(std::future::ready(Err(NotLeader("no current term").into())));
        };
        self.layer.counters.sent.inc();
        let response = self.inner.call(request);
        let refused = self.layer.counters.refused.clone();
        Box::pin(async move {
            match tokio::time::timeout_at(until, response).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => {
                    refused.inc();
                    Err(NotLeader("the term ended before the API server answered").into())
                }
            }
        })
    }
}

/// Builds the fenced client for leader-only work from `config`.
pub fn fenced_client(config: kube::Config, layer: &FenceLayer) -> Result<Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(layer).build())
}

#[cfg(test)]
mod tests;
