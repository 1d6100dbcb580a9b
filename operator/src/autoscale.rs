//! The built-in autoscaler: scrape each ready pod's queue depth, decide a
//! replica count (pure, in [`decide`]), write it through the Deployment's
//! scale subresource.
//!
//! The controller owns the loop, leader election and Events; this module
//! gives it one step at a time ([`scale_step`]), the write of the
//! autoscaler's status fields ([`write_status`]) and the per-object memory
//! both need ([`Recommendations`], [`StatusMemory`]). Every
//! `scrapeIntervalSeconds` the leader calls, for each autoscaled
//! ModelDeployment:
//!
//! ```text
//! let endpoints = pod_metrics_endpoints(&pods, METRICS_PORT);
//! if let Some(outcome) = scale_step(client, &md, &mut state, endpoints, &http, Instant::now()).await? {
//!     metrics.observe(&outcome);
//!     // status.queueDepth, and when `changed` status.lastScaleTime:
//!     write_status(&client, &md, &outcome, &mut memory, Utc::now()).await?;
//!     // when `changed`: an Event with `reason`.
//! }
//! ```
//!
//! One writer per field. The Deployment's `spec.replicas` belongs to the
//! autoscaler when `spec.autoscaling` is set: the reconciler leaves it out of
//! what it applies, or the two would undo each other. In the
//! ModelDeployment's status the autoscaler owns `queueDepth` and
//! `lastScaleTime` (typed server-side apply, field manager
//! [`FIELD_MANAGER`]), the reconciler everything else, `desiredReplicas`
//! included (see [`status`](self::status) for the table and why).

mod decide;
mod metrics;
mod scrape;
pub mod status;

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::crd::ModelDeployment;

pub use decide::{decide, Decision, DecisionInput, Direction, Observation, Recommendations, ScalePolicy};
pub use metrics::AutoscaleMetrics;
pub use scrape::{parse_load, scrape, PodLoad, ScrapeError, INFLIGHT, QUEUE_DEPTH};
pub use status::{write_status, AutoscalerStatus, StatusMemory};

/// Field manager of the autoscaler's writes (the Deployment's `/scale`, its
/// status fields), distinct from the reconciler's so `managedFields` shows
/// who set the replica count and the queue depth. (The API server records a
/// `/scale` write there only when some manager owned `spec.replicas`
/// before; a Deployment created with autoscaling has none, so there the
/// field shows no owner - and no conflict either.)
pub const FIELD_MANAGER: &str = "ferrite-operator-autoscaler";

/// Longest a scrape may take; shorter when the interval is shorter, so a
/// round finishes before the next one is due.
pub const MAX_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Pods scraped at once: enough for large Deployments in one round, few
/// enough not to open hundreds of sockets at the same moment.
const SCRAPE_CONCURRENCY: usize = 32;

/// What one [`scale_step`] did, for status, the Event and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleOutcome {
    /// Replicas of the Deployment before the step.
    pub old_replicas: u32,
    /// Replicas after the step (equal to `old_replicas` unless `changed`).
    pub new_replicas: u32,
    /// Whether the step wrote a new count to the scale subresource.
    pub changed: bool,
    /// Up, down or hold.
    pub direction: Direction,
    /// Why, in one line (the Event message).
    pub reason: String,
    /// Queued plus in-flight requests over the pods that answered; `None`
    /// when none did. With failed scrapes it is a lower bound.
    pub queue_depth: Option<u64>,
    /// Pods whose metrics were read.
    pub pods_scraped: u32,
    /// Pods whose scrape failed.
    pub pods_failed: u32,
}

/// The metrics URLs (`http://<podIP>:<port>/metrics`) of the pods worth
/// scraping: Ready (their queue is real load the Service sends to), with an
/// IP, and not terminating (a draining pod's queue is going away with it and
/// must not scale the rest up). Sorted and deduplicated, so rounds are
/// comparable.
pub fn pod_metrics_endpoints(pods: &[Pod], port: u16) -> Vec<String> {
    let mut urls: Vec<String> = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let ready = status.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
            ready.then(|| metrics_url(ip, port))
        })
        .collect();
    urls.sort();
    urls.dedup();
    urls
}

fn metrics_url(ip: &str, port: u16) -> String {
    let path = ferrite_contract::metrics::PATH;
    if ip.contains(':') {
        format!("http://[{ip}]:{port}{path}")
    } else {
        format!("http://{ip}:{port}{path}")
    }
}

/// The scrape timeout for an interval: `min(2s, interval)`.
pub fn scrape_timeout(interval: Duration) -> Duration {
    interval.min(MAX_SCRAPE_TIMEOUT)
}

/// Scrapes every endpoint concurrently and sums the load of `model`. Failed
/// pods are counted (and logged), never read as idle.
pub async fn observe_pods(http: &reqwest::Client, endpoints: &[String], model: &str, timeout: Duration) -> Observation {
    // Owned URLs and a boxed `Send` future per scrape: closures that return
    // futures borrowing their argument defeat the compiler's `Send` proof
    // when the caller is spawned.
    let results: Vec<(String, Result<PodLoad, ScrapeError>)> = stream::iter(endpoints.to_vec())
        .map(|url: String| -> futures::future::BoxFuture<'_, _> {
            Box::pin(async move {
                let result = scrape(http, &url, model, timeout).await;
                (url, result)
            })
        })
        .buffer_unordered(SCRAPE_CONCURRENCY)
        .collect()
        .await;
    let mut obs = Observation::default();
    for (url, result) in results {
        match result {
            Ok(load) => {
                obs.queued = obs.queued.saturating_add(load.queued);
                obs.inflight = obs.inflight.saturating_add(load.inflight);
                obs.pods_scraped += 1;
            }
            Err(error) => {
                tracing::warn!(%url, model, %error, "scraping pod metrics failed");
                obs.pods_failed += 1;
            }
        }
    }
    obs
}

/// One autoscaling step for one ModelDeployment: scrape `pod_endpoints`
/// (see [`pod_metrics_endpoints`]) and read the Deployment's scale at the
/// same time, [`decide`], record the recommendation in `state`, and when the
/// count changes, merge-patch `{"spec":{"replicas":N}}` into the
/// Deployment's scale subresource (the Deployment has the ModelDeployment's
/// name).
///
/// Returns `None` when there is nothing to scale: `spec.autoscaling` is
/// unset, or the Deployment does not exist yet. Errors are API failures; a
/// failed patch leaves `state` with the recommendation recorded (it describes
/// the load, whatever happened to the write), and the next step retries.
pub async fn scale_step(
    client: kube::Client,
    md: &ModelDeployment,
    state: &mut Recommendations,
    pod_endpoints: Vec<String>,
    http: &reqwest::Client,
    now: Instant,
) -> anyhow::Result<Option<ScaleOutcome>> {
    let Some(spec) = md.spec.autoscaling.as_ref() else {
        return Ok(None);
    };
    let name = md.name_any();
    let namespace = md.namespace().ok_or_else(|| anyhow::anyhow!("ModelDeployment {name} has no namespace"))?;
    let policy = ScalePolicy::from_spec(spec);
    let timeout = scrape_timeout(Duration::from_secs(spec.scrape_interval_seconds.max(1) as u64));
    let model = md.model_name();
    let deployments = Api::<Deployment>::namespaced(client, &namespace);

    let (observation, scale) =
        tokio::join!(observe_pods(http, &pod_endpoints, &model, timeout), deployments.get_scale(&name));
    let scale = match scale {
        Ok(scale) => scale,
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("reading the scale of Deployment {namespace}/{name}")))
        }
    };
    // The API server defaults a Deployment's replicas to 1; never absent in practice.
    let current = scale.spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as u32;

    // A fresh history (new leader, restart): wait a full scale-down window
    // before removing replicas someone chose before us.
    if state.is_empty() {
        state.seed(now, current);
    }
    let decision = decide(&DecisionInput {
        policy,
        current_replicas: current,
        history: state,
        observation: Some(observation),
        now,
    });
    if let Some(recommendation) = decision.record {
        state.record(now, recommendation, policy.longest_window());
    }

    if decision.changed {
        let patch = serde_json::json!({ "spec": { "replicas": decision.replicas } });
        deployments
            .patch_scale(
                &name,
                &PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| {
                anyhow::Error::new(e)
                    .context(format!("scaling Deployment {namespace}/{name} from {current} to {}", decision.replicas))
            })?;
        tracing::info!(%namespace, %name, from = current, to = decision.replicas, reason = %decision.reason, "scaled");
    } else {
        tracing::debug!(%namespace, %name, replicas = current, reason = %decision.reason, "holding");
    }

    Ok(Some(ScaleOutcome {
        old_replicas: current,
        new_replicas: decision.replicas,
        changed: decision.changed,
        direction: decision.direction,
        reason: decision.reason,
        queue_depth: (observation.pods_scraped > 0).then(|| observation.load()),
        pods_scraped: observation.pods_scraped,
        pods_failed: observation.pods_failed,
    }))
}

#[cfg(test)]
mod tests;
