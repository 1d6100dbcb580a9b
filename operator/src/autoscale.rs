//! The built-in autoscaler: scrape the queue depth of each pod of the
//! Deployment, decide a replica count (pure, in [`decide`]), apply it as the
//! Deployment's `spec.replicas`.
//!
//! The controller owns the loop, leader election and Events; this module
//! gives it one step at a time ([`scale_step`]), the write of the
//! autoscaler's status fields ([`write_status`]) and the per-object memory
//! both need ([`Recommendations`], [`StatusMemory`]). Every
//! `scrapeIntervalSeconds` the leader calls, for each autoscaled
//! ModelDeployment:
//!
//! ```text
//! let targets = |uid: &str| pod_metrics_endpoints(&owned_pods(&pods, &replica_sets, uid), METRICS_PORT);
//! if let Some(outcome) = scale_step(client, &md, &mut state, targets, &http, Instant::now()).await? {
//!     metrics.observe(&outcome);
//!     // status.queueDepth, and when `changed` status.lastScaleTime:
//!     write_status(&client, &md, &outcome, &mut memory, Utc::now()).await?;
//!     // when `changed`: an Event with `reason`.
//! }
//! ```
//!
//! One writer per field. The Deployment's `spec.replicas` belongs to the
//! autoscaler when `spec.autoscaling` is set. It takes the field over by
//! server-side apply (field manager [`FIELD_MANAGER`]): at its first step
//! for a Deployment it applies the count it finds, so it co-owns the field
//! before the reconciler lets go of it, and the count never falls back to the
//! API server's default of 1 in between (see
//! [`resources::set_replicas`](crate::resources::set_replicas)). In the
//! ModelDeployment's status the autoscaler owns `queueDepth` and
//! `lastScaleTime` (typed server-side apply, field manager
//! [`FIELD_MANAGER`]), the reconciler everything else, `desiredReplicas`
//! included (see [`status`](self::status) for the table and why).

pub mod activator;
mod decide;
mod metrics;
mod scrape;
pub mod status;

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::crd::ModelDeployment;
use crate::resources::activation::{self, DRAIN_ANNOTATION, SERVICE_NAME_LABEL};

/// How long the Service must have pointed at the activator before the
/// replicas go to zero. The API shows the switch at once, but every node's
/// kube-proxy applies it on its own watch and sync: a few seconds, during
/// which a connection may still reach a pod. Three seconds covers a loaded
/// kube-proxy's sync on a small cluster; the pods' preStop sleep (5 s) and
/// drain cover what is in flight after that.
pub const DRAIN_WAIT: Duration = Duration::from_secs(3);

/// Scale-to-zero memory of one ModelDeployment, kept by the caller next to
/// its [`Recommendations`].
#[derive(Clone, Debug, Default)]
pub struct ZeroMemory {
    /// Since when the model has been idle.
    pub idleness: Idleness,
    /// When the Service was first seen in activator mode during a drain.
    pub settled_since: Option<Instant>,
    /// Whether the last step left the Deployment marked for a drain (the
    /// caller then steps every tick, not every scrape interval).
    pub draining: bool,
}

pub use activator::{observe_activator, parse_activator, ActivatorCounts, ActivatorSnapshot};
pub use decide::{decide, Decision, DecisionInput, Direction, Idleness, Observation, Recommendations, ScalePolicy};
pub use metrics::AutoscaleMetrics;
pub use scrape::{
    family_samples, fetch_metrics, parse_load, scrape, Labels, PodLoad, ScrapeError, INFLIGHT, QUEUE_DEPTH,
};
pub use status::{write_status, AutoscalerStatus, StatusMemory};

/// Field manager of the autoscaler's writes.
pub use crate::resources::AUTOSCALER_FIELD_MANAGER as FIELD_MANAGER;

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
    /// Whether the step wrote a new count to the Deployment.
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

impl ScaleOutcome {
    /// Whether the step took the model to zero replicas.
    pub fn to_zero(&self) -> bool {
        self.changed && self.new_replicas == 0
    }

    /// Whether the step scaled the model up from zero replicas.
    pub fn from_zero(&self) -> bool {
        self.changed && self.old_replicas == 0 && self.new_replicas > 0
    }
}

/// A pod to scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeTarget {
    /// `http://<podIP>:<port>/metrics`.
    pub url: String,
    /// Whether the pod is Ready. The load of an unready pod may only scale
    /// up, and its silence is not a failure (see [`decide`](mod@decide)).
    pub ready: bool,
}

/// The pods that belong to the Deployment with UID `deployment_uid`: those
/// whose controlling owner is a ReplicaSet whose controlling owner is that
/// Deployment (old ReplicaSets of a rollout included). The label alone
/// would also pick pods that someone else labelled alike, or the leftovers
/// of a Deployment of the same name that was deleted and created again.
pub fn owned_pods(pods: &[Pod], replica_sets: &[ReplicaSet], deployment_uid: &str) -> Vec<Pod> {
    let owned_sets: Vec<&str> = replica_sets
        .iter()
        .filter(|rs| controller_uid(&rs.metadata) == Some(deployment_uid))
        .filter_map(|rs| rs.metadata.uid.as_deref())
        .collect();
    pods.iter()
        .filter(|pod| controller_uid(&pod.metadata).is_some_and(|uid| owned_sets.contains(&uid)))
        .cloned()
        .collect()
}

/// The UID of the controlling owner, if any.
fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references.as_ref()?.iter().find(|o| o.controller == Some(true)).map(|o| o.uid.as_str())
}

/// The scrape targets among `pods`: Running (their queue is load the
/// Service sent them), with an IP, and not terminating (a draining pod's
/// queue is going away with it and must not scale the rest up); Ready or not
/// (see [`ScrapeTarget::ready`]). Sorted and deduplicated, so rounds are
/// comparable.
pub fn pod_metrics_endpoints(pods: &[Pod], port: u16) -> Vec<ScrapeTarget> {
    let mut targets: Vec<ScrapeTarget> = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let conditions = status.conditions.as_deref().unwrap_or_default();
            let ready = conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            let running = status.phase.as_deref() == Some("Running");
            let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
            (ready || running).then(|| ScrapeTarget { url: metrics_url(ip, port), ready })
        })
        .collect();
    // Of two pods at one address (a reused IP), the Ready one.
    targets.sort_by(|a, b| a.url.cmp(&b.url).then(b.ready.cmp(&a.ready)));
    targets.dedup_by(|later, kept| later.url == kept.url);
    targets
}

/// The HTTP client of the scrapes. It follows no redirect (a pod's answer
/// could otherwise send the operator to any address its network reaches)
/// and uses no proxy from the environment (pod IPs are reached directly).
pub fn scrape_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("a client without TLS settings builds")
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

/// Scrapes every target concurrently and sums the load of `model`. Failed
/// Ready pods are counted (and logged), never read as idle; unready pods
/// that do not answer are skipped.
pub async fn observe_pods(
    http: &reqwest::Client,
    targets: &[ScrapeTarget],
    model: &str,
    timeout: Duration,
) -> Observation {
    // Owned targets and a boxed `Send` future per scrape: closures that
    // return futures borrowing their argument defeat the compiler's `Send`
    // proof when the caller is spawned.
    let results: Vec<(ScrapeTarget, Result<PodLoad, ScrapeError>)> = stream::iter(targets.to_vec())
        .map(|target: ScrapeTarget| -> futures::future::BoxFuture<'_, _> {
            Box::pin(async move {
                let result = scrape(http, &target.url, model, timeout).await;
                (target, result)
            })
        })
        .buffer_unordered(SCRAPE_CONCURRENCY)
        .collect()
        .await;
    let mut obs = Observation::default();
    for (target, result) in results {
        match result {
            Ok(load) => {
                obs.queued = obs.queued.saturating_add(load.queued);
                obs.inflight = obs.inflight.saturating_add(load.inflight);
                obs.requests = obs.requests.saturating_add(load.requests);
                obs.pods_scraped += 1;
                obs.pods_unready += u32::from(!target.ready);
            }
            Err(error) if target.ready => {
                tracing::warn!(url = %target.url, model, %error, "scraping pod metrics failed");
                obs.pods_failed += 1;
            }
            Err(error) => tracing::debug!(url = %target.url, model, %error, "unready pod did not answer"),
        }
    }
    obs
}

/// One autoscaling step for one ModelDeployment (its Deployment has the
/// same name): read the Deployment, scrape the pods `targets` picks for its
/// UID (see [`owned_pods`], [`pod_metrics_endpoints`]), [`decide`], record
/// the recommendation in `state`, and when the count changes - or the
/// autoscaler does not own `spec.replicas` yet - apply
/// `{"spec":{"replicas":N}}` to the Deployment (server-side apply, field
/// manager [`FIELD_MANAGER`]).
///
/// The apply carries the `resourceVersion` of the Deployment the decision
/// was made on, so a write that raced another (a second leader, a user's
/// `kubectl scale`) fails with a conflict instead of overwriting it; the
/// step then reads the Deployment again and decides once more on the same
/// observation.
///
/// Returns `None` when there is nothing to scale: `spec.autoscaling` is
/// unset, or the Deployment does not exist yet. Errors are API failures; a
/// failed write leaves `state` with the recommendation recorded (it
/// describes the load, whatever happened to the write), and the next step
/// retries.
pub async fn scale_step(
    client: kube::Client,
    md: &ModelDeployment,
    state: &mut Recommendations,
    targets: impl FnOnce(&str) -> Vec<ScrapeTarget>,
    http: &reqwest::Client,
    now: Instant,
) -> anyhow::Result<Option<ScaleOutcome>> {
    scale_step_with_activator(client, md, state, &mut ZeroMemory::default(), None, targets, http, now).await
}

/// [`scale_step`] with scale to zero: `activator` is the latest scrape of
/// the activator pods (`None` when the operator has no activator, and then
/// `minReplicas: 0` is kept at 1), `zero` the model's memory across steps.
///
/// Going to zero takes several steps (one per tick): the step that finds the
/// model idle marks the Deployment ([`DRAIN_ANNOTATION`]), on which the
/// reconciler switches the Service to activator mode; the following steps
/// wait until the API shows the switch ([`activation::settled_in_activator_mode`])
/// and [`DRAIN_WAIT`] has passed since, decide again on fresh metrics (any
/// request meanwhile cancels: the mark is removed and the Service returns
/// to the pods), and only then apply zero replicas.
#[allow(clippy::too_many_arguments)]
pub async fn scale_step_with_activator(
    client: kube::Client,
    md: &ModelDeployment,
    state: &mut Recommendations,
    zero: &mut ZeroMemory,
    activator: Option<&ActivatorSnapshot>,
    targets: impl FnOnce(&str) -> Vec<ScrapeTarget>,
    http: &reqwest::Client,
    now: Instant,
) -> anyhow::Result<Option<ScaleOutcome>> {
    let Some(spec) = md.spec.autoscaling.as_ref() else {
        return Ok(None);
    };
    let name = md.name_any();
    let namespace = md.namespace().ok_or_else(|| anyhow::anyhow!("ModelDeployment {name} has no namespace"))?;
    let policy = ScalePolicy::from_spec(spec, activator.is_some());
    let timeout = scrape_timeout(Duration::from_secs(spec.scrape_interval_seconds.max(1) as u64));
    let model = md.model_name();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    let read = |what: kube::Error| anyhow::Error::new(what).context(format!("reading Deployment {namespace}/{name}"));

    let Some(mut deployment) = deployments.get_opt(&name).await.map_err(read)? else {
        return Ok(None);
    };
    let uid = deployment.metadata.uid.clone().unwrap_or_default();
    let mut observation = observe_pods(http, &targets(&uid), &model, timeout).await;
    observation.held = activator.map_or(0, |a| a.held(&namespace, &name));
    // Activity: the pods' counters and the activator's, known only when
    // every Ready pod and every activator pod was read.
    let counts = activator.and_then(|a| a.for_model(&namespace, &name));
    let requests =
        counts.filter(|_| observation.pods_failed == 0).map(|c| c.requests.saturating_add(observation.requests));
    let idle_for = zero.idleness.observe(now, requests, observation.load() > 0);

    // A fresh history (new leader, restart): wait a full scale-down window
    // before removing replicas someone chose before us.
    if state.is_empty() {
        state.seed(now, replicas_of(&deployment));
    }
    let mut attempts = 0;
    let (current, decision) = loop {
        attempts += 1;
        let current = replicas_of(&deployment);
        let mut decision = decide(&DecisionInput {
            policy,
            current_replicas: current,
            history: state,
            observation: Some(observation),
            now,
            idle_for,
        });
        let marked = deployment.annotations().get(DRAIN_ANNOTATION).cloned();
        let mut mark = None;
        if decision.replicas == 0 && current > 0 {
            let wait = match &marked {
                None => Some("switching the Service to the activator first".to_string()),
                Some(_) if !activation_settled(&client, md).await? => {
                    zero.settled_since = None;
                    Some("waiting for the Service to point at the activator".to_string())
                }
                Some(_) => {
                    let since = *zero.settled_since.get_or_insert(now);
                    let left = DRAIN_WAIT.saturating_sub(now.saturating_duration_since(since));
                    (!left.is_zero()).then(|| {
                        format!("the Service points at the activator; zero in {:.1}s (kube-proxy)", left.as_secs_f64())
                    })
                }
            };
            if let Some(wait) = wait {
                mark = Some(marked.clone().unwrap_or_else(|| chrono::Utc::now().to_rfc3339()));
                decision = Decision {
                    replicas: current,
                    changed: false,
                    direction: Direction::Hold,
                    record: None,
                    reason: format!("{}; {wait}", decision.reason),
                    ..decision
                };
            }
        }
        if mark.is_none() {
            zero.settled_since = None;
        }
        let owned = crate::resources::owns_replicas(&deployment.metadata, FIELD_MANAGER);
        if !decision.changed && owned && mark == marked {
            zero.draining = mark.is_some();
            break (current, decision);
        }
        match apply_replicas(&deployments, &deployment, decision.replicas, mark.as_deref()).await {
            Ok(()) => {
                zero.draining = mark.is_some();
                if mark.is_some() && marked.is_none() {
                    tracing::info!(%namespace, %name, reason = %decision.reason, "scale to zero: draining to the activator");
                } else if mark.is_none() && marked.is_some() && decision.replicas > 0 {
                    tracing::info!(%namespace, %name, reason = %decision.reason, "scale to zero cancelled: back to the pods");
                }
                break (current, decision);
            }
            Err(kube::Error::Api(status)) if status.code == 409 && attempts < 2 => {
                tracing::info!(%namespace, %name, "the Deployment changed since it was read; deciding again");
                deployment = deployments
                    .get_opt(&name)
                    .await
                    .map_err(read)?
                    .ok_or_else(|| anyhow::anyhow!("Deployment {namespace}/{name} was deleted while scaling it"))?;
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("scaling Deployment {namespace}/{name} from {current} to {}", decision.replicas)))
            }
        }
    };
    if let Some(recommendation) = decision.record {
        state.record(now, recommendation, policy.longest_window());
    }
    if decision.changed && (decision.replicas == 0 || current == 0) {
        // The line the cold-start breakdown looks for, with the Event.
        tracing::info!(%namespace, %name, from = current, to = decision.replicas, reason = %decision.reason,
            "{}", if current == 0 { "scaled up from zero" } else { "scaled to zero" });
    } else if decision.changed {
        tracing::info!(%namespace, %name, from = current, to = decision.replicas, reason = %decision.reason, "scaled");
    } else if zero.draining {
        tracing::info!(%namespace, %name, replicas = current, reason = %decision.reason, "draining to zero");
    } else {
        tracing::debug!(%namespace, %name, replicas = current, reason = %decision.reason, "holding");
    }

    Ok(Some(ScaleOutcome {
        old_replicas: current,
        new_replicas: decision.replicas,
        changed: decision.changed,
        direction: decision.direction,
        reason: decision.reason,
        queue_depth: (observation.pods_scraped > 0 || observation.held > 0).then(|| observation.load()),
        pods_scraped: observation.pods_scraped,
        pods_failed: observation.pods_failed,
    }))
}

/// Whether the model's Service is settled in activator mode (read now from
/// the API, not a cache: the wait before zero counts from what it shows).
async fn activation_settled(client: &kube::Client, md: &ModelDeployment) -> anyhow::Result<bool> {
    let namespace = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let service = Api::<Service>::namespaced(client.clone(), &namespace)
        .get_opt(&name)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("reading Service {namespace}/{name}")))?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &namespace)
        .list(&kube::api::ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name}")))
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("listing the EndpointSlices of {namespace}/{name}")))?;
    Ok(activation::settled_in_activator_mode(md, service.as_ref(), &slices.items))
}

/// The Deployment's replica count (the API server defaults it to 1; never
/// absent in practice).
fn replicas_of(deployment: &Deployment) -> u32 {
    deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as u32
}

/// Applies `replicas` as the autoscaler's field, with the drain mark when
/// `drain` (the autoscaler's too: an apply without it removes it), on the
/// condition that the Deployment is still at `read`'s resourceVersion.
async fn apply_replicas(
    deployments: &Api<Deployment>,
    read: &Deployment,
    replicas: u32,
    drain: Option<&str>,
) -> Result<(), kube::Error> {
    let mut metadata =
        serde_json::json!({ "name": read.name_any(), "resourceVersion": read.metadata.resource_version });
    if let Some(since) = drain {
        metadata["annotations"] = serde_json::json!({ DRAIN_ANNOTATION: since });
    }
    let patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": { "replicas": replicas },
    });
    deployments.patch(&read.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
