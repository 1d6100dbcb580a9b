//! The operator process: health and metrics endpoints, leader election on
//! a Lease ([`crate::leader`]), and - while leader - the controller and the
//! autoscaler loop, whose writes all go through a client fenced by the
//! leadership. When the term ends (no renewal before the deadline, or
//! another holder), both stop at once and the process exits with an error so
//! that a fresh one rejoins as follower. SIGTERM stops both and releases the
//! lease so the other replica takes over at once.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::autoscale::{
    self, ActivatorSnapshot, AutoscaleMetrics, Direction, Recommendations, ScaleOutcome, StatusMemory, ZeroMemory,
};
use crate::crd::ModelDeployment;
use crate::health::{Health, Heartbeat};
use crate::leader::{fenced_client, Election, FenceLayer, LeaseConfig};
use crate::policy::Policy;
use crate::reconcile::{self, Context};
use crate::resources::activation;
use crate::resources::network_policy::MetricsScrapers;
use crate::resources::{BuildConfig, INSTANCE_LABEL};
use crate::telemetry::{self, Metrics};

/// Longest one autoscaling step for one ModelDeployment may take (a scrape
/// round is at most 2 s; the rest is API calls): a hung API call must not
/// stop the loop.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Liveness limits (see [`crate::health`]): the election attempts every 2 s
/// and bounds each attempt by 10 s; the autoscaler ticks every second and
/// bounds each step; the controller reconciles every ModelDeployment at
/// least once a minute.
const ELECTION_STALL: Duration = Duration::from_secs(30);
const AUTOSCALER_STALL: Duration = Duration::from_secs(60);
const CONTROLLER_STALL: Duration = Duration::from_secs(180);

/// Settings of `ferrite-operator run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub server_image: String,
    /// The server image for GPU ModelDeployments (`--server-cuda-image`).
    pub server_cuda_image: String,
    pub server_image_pull_policy: Option<String>,
    /// Watch only these namespaces; empty for all.
    pub watch_namespaces: Vec<String>,
    /// What ModelDeployments may ask for.
    pub policy: Policy,
    /// Who may scrape model pods' metrics through their NetworkPolicies.
    pub scrapers: MetricsScrapers,
    /// The node model cache.
    pub model_cache: crate::resources::ModelCacheConfig,
    pub metrics_addr: SocketAddr,
    pub lease_name: String,
    pub lease_namespace: String,
    /// This process's name in the lease (the pod name in a cluster).
    pub identity: String,
    /// The activator's Service (`--activator-service`, `namespace/name`):
    /// scale to zero needs it.
    pub activator_service: Option<(String, String)>,
}

/// Runs until SIGTERM or Ctrl-C; an error when leadership was lost.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = kube::Config::infer().await?;
    let listener = tokio::net::TcpListener::bind(options.metrics_addr).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let signal = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    let lease = LeaseConfig::new(&options.lease_name, &options.lease_namespace, &options.identity);
    run_with(config, &options, lease, listener, Metrics::new(), signal).await
}

/// One operator replica against the API server of `config`, serving its
/// endpoints on `listener`, until `shutdown` completes (then it stops,
/// releases the lease and returns `Ok`) or its leadership ends (then it stops
/// at once and returns an error). The process entry point is [`run`]; tests
/// run several replicas in one process.
pub async fn run_with(
    config: kube::Config,
    options: &RunOptions,
    lease: LeaseConfig,
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let autoscale_metrics = AutoscaleMetrics::new(&metrics.registry)?;
    let health = Health::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let ready = Arc::new(AtomicBool::new(false));
    let telemetry = tokio::spawn(telemetry::serve(listener, metrics.clone(), ready.clone(), health.clone(), stopped()));

    // The election has a client of its own: the fenced one below refuses
    // writes exactly when the election has no term to show.
    let election_client = Client::try_from(config.clone())?;
    // Ready once the API server answers: a follower is a healthy replica too.
    election_client.apiserver_version().await?;
    ready.store(true, Ordering::SeqCst);
    let identity = lease.identity.clone();
    tracing::info!(%identity, lease = %lease.name, "waiting for leadership");
    let (election, mut leadership) =
        Election::start(election_client, lease, health.register("leader election", ELECTION_STALL));

    tokio::pin!(shutdown);
    let became_leader = tokio::select! {
        _ = leadership.acquired() => true,
        _ = &mut shutdown => false,
    };
    let mut lost = false;
    if became_leader {
        tracing::info!(%identity, "leading");
        metrics.leader.set(1);
        let client = fenced_client(config, &FenceLayer::new(leadership.clone(), metrics.fence_counters()))?;
        let build = BuildConfig {
            server_image: options.server_image.clone(),
            server_cuda_image: options.server_cuda_image.clone(),
            server_image_pull_policy: options.server_image_pull_policy.clone(),
            policy: options.policy.clone(),
            scrapers: options.scrapers.clone(),
            model_cache: options.model_cache.clone(),
        };
        let activator = options.activator_service.as_ref().map(|(namespace, name)| reconcile::Activator {
            namespace: namespace.clone(),
            name: name.clone(),
            slices: cache::<EndpointSlice>(
                &client,
                Some(namespace),
                Some(&format!("{}={name}", activation::SERVICE_NAME_LABEL)),
            ),
        });
        let ctx = Arc::new(Context::new(client.clone(), build, metrics.clone(), &identity).with_activator(activator));
        let namespaces = options.watch_namespaces.clone();
        let controller = tokio::spawn({
            let (ctx, stopped) = (ctx.clone(), stopped());
            async move { reconcile::run(ctx, &namespaces, stopped).await }
        });
        // One cache and one autoscaler per watched namespace (namespaced
        // watches need no cluster-wide rights), or one for the cluster.
        let scopes: Vec<Option<String>> = if options.watch_namespaces.is_empty() {
            vec![None]
        } else {
            options.watch_namespaces.iter().cloned().map(Some).collect()
        };
        let caches: Vec<_> =
            scopes.iter().map(|ns| (ns.clone(), cache::<ModelDeployment>(&client, ns.as_deref(), None))).collect();
        let watchdog = tokio::spawn(watch_controller(
            metrics.clone(),
            caches.iter().map(|(_, mds)| mds.clone()).collect(),
            health.register("controller", CONTROLLER_STALL),
            stopped(),
        ));
        let autoscalers: Vec<_> = caches
            .into_iter()
            .map(|(namespace, mds)| {
                tokio::spawn(autoscale_loop(
                    ctx.clone(),
                    namespace,
                    mds,
                    autoscale_metrics.clone(),
                    health.register("autoscaler", AUTOSCALER_STALL),
                    stopped(),
                ))
            })
            .collect();
        lost = tokio::select! {
            _ = leadership.lost() => true,
            _ = &mut shutdown => false,
        };
        if lost {
            // The fence already refuses every write; this stops the loops.
            metrics.leader.set(0);
            tracing::error!(%identity, "lost leadership; exiting so that a fresh process rejoins as follower");
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = controller.await;
            futures::future::join_all(autoscalers).await;
            let _ = watchdog.await;
        })
        .await;
        metrics.leader.set(0);
    }
    let _ = stop_tx.send(true);
    // Gives the lease up when still holding it.
    election.stop().await;
    let _ = telemetry.await;
    tracing::info!(%identity, "stopped");
    if lost {
        anyhow::bail!("lost leadership");
    }
    Ok(())
}

/// Beats the controller's heartbeat while it makes progress: a
/// reconciliation finished since the last look (each ModelDeployment is
/// reconciled at least once a minute), or there is nothing to reconcile.
async fn watch_controller(
    metrics: Metrics,
    mds: Vec<Store<ModelDeployment>>,
    heartbeat: Heartbeat,
    shutdown: impl Future<Output = ()>,
) {
    let finished = || {
        metrics.reconciliations.with_label_values(&["ok"]).get()
            + metrics.reconciliations.with_label_values(&["error"]).get()
    };
    let mut last = finished();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut shutdown => return,
        }
        let now = finished();
        if now != last || mds.iter().all(|store| store.state().is_empty()) {
            heartbeat.beat();
            last = now;
        }
    }
}

/// Per-ModelDeployment memory of the autoscaler.
struct Scaled {
    recommendations: Recommendations,
    zero: ZeroMemory,
    status: StatusMemory,
    next_due: Instant,
}

/// Longest scrape of the activator pods: the loop ticks every second.
const ACTIVATOR_SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);

/// Every second, scrapes the activator pods once (all models at once, so a
/// held request is seen within about a second) and runs an autoscaling step
/// for each autoscaled ModelDeployment whose scrape interval has passed, or
/// that has requests held, or that is being drained to zero.
async fn autoscale_loop(
    ctx: Arc<Context>,
    namespace: Option<String>,
    mds: Store<ModelDeployment>,
    metrics: AutoscaleMetrics,
    heartbeat: Heartbeat,
    shutdown: impl Future<Output = ()>,
) {
    let pods = cache::<Pod>(&ctx.client, namespace.as_deref(), Some(INSTANCE_LABEL));
    let replica_sets = cache::<ReplicaSet>(&ctx.client, namespace.as_deref(), Some(INSTANCE_LABEL));
    let http = autoscale::scrape_client();
    let mut state: HashMap<ObjectRef<ModelDeployment>, Scaled> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = &mut shutdown => return,
        }
        heartbeat.beat();
        let activator: Option<ActivatorSnapshot> = match &ctx.activator {
            Some(activator) => {
                let urls = activator.endpoints().metrics_urls();
                Some(autoscale::observe_activator(&http, &urls, ACTIVATOR_SCRAPE_TIMEOUT).await)
            }
            None => None,
        };
        let now = Instant::now();
        let current = mds.state();
        state.retain(|key, _| current.iter().any(|md| &ObjectRef::from_obj(md.as_ref()) == key));
        for md in current {
            let Some(spec) = md.spec.autoscaling.as_ref() else { continue };
            // Held at zero by the reconciler until its spec passes the policy.
            if ctx.config.policy.check(&md, &ctx.config.server_image).is_err() {
                continue;
            }
            let key = ObjectRef::from_obj(md.as_ref());
            let entry = state.entry(key).or_insert_with(|| Scaled {
                recommendations: Recommendations::new(),
                zero: ZeroMemory::default(),
                status: StatusMemory::default(),
                next_due: now,
            });
            let held = activator.as_ref().map_or(0, |a| a.held(&md.namespace().unwrap_or_default(), &md.name_any()));
            let urgent = spec.scales_to_zero() && (held > 0 || entry.zero.draining);
            if now < entry.next_due && !urgent {
                continue;
            }
            entry.next_due = now + Duration::from_secs(spec.scrape_interval_seconds.max(1) as u64);
            let same_namespace = |meta_ns: Option<String>| meta_ns == md.namespace();
            let own_pods: Vec<Pod> =
                pods.state().iter().filter(|p| same_namespace(p.namespace())).map(|p| p.as_ref().clone()).collect();
            let own_sets: Vec<ReplicaSet> = replica_sets
                .state()
                .iter()
                .filter(|rs| same_namespace(rs.namespace()))
                .map(|rs| rs.as_ref().clone())
                .collect();
            let targets = |uid: &str| {
                autoscale::pod_metrics_endpoints(
                    &autoscale::owned_pods(&own_pods, &own_sets, uid),
                    ferrite_contract::ports::METRICS,
                )
            };
            let step = autoscale::scale_step_with_activator(
                ctx.client.clone(),
                &md,
                &mut entry.recommendations,
                &mut entry.zero,
                activator.as_ref(),
                targets,
                &http,
                now,
            );
            match tokio::time::timeout(STEP_TIMEOUT, step).await {
                Ok(Ok(Some(outcome))) => {
                    metrics.observe(&outcome);
                    record_outcome(&ctx, &md, &outcome, &mut entry.status).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(name = %md.name_any(), error = format!("{error:#}"), "autoscaling step failed")
                }
                Err(_) => tracing::warn!(name = %md.name_any(), "autoscaling step timed out after {STEP_TIMEOUT:?}"),
            }
            heartbeat.beat();
        }
    }
}

/// Writes the autoscaler's status fields (its own server-side apply, see
/// [`autoscale::status`]) and, on a change, an Event.
async fn record_outcome(ctx: &Context, md: &ModelDeployment, outcome: &ScaleOutcome, memory: &mut StatusMemory) {
    if let Err(error) = autoscale::write_status(&ctx.client, md, outcome, memory, chrono::Utc::now()).await {
        tracing::warn!(name = %md.name_any(), %error, "cannot write autoscaler status");
    }
    if outcome.to_zero() || outcome.from_zero() {
        // Not the Ready condition's reasons (ScaledToZero, ScalingFromZero),
        // which the reconciler announces when the status follows.
        let reason = if outcome.to_zero() { "ScaledDownToZero" } else { "ScaledUpFromZero" };
        ctx.unique_event(md, reason, outcome.reason.clone()).await;
    } else if outcome.changed {
        let reason = match outcome.direction {
            Direction::Up => "ScaledUp",
            Direction::Down => "ScaledDown",
            Direction::Hold => "ScaleHeld",
        };
        ctx.event(md, EventType::Normal, reason, outcome.reason.clone()).await;
    }
}

/// A reflector-backed cache of `K`, kept current in the background.
fn cache<K>(client: &Client, namespace: Option<&str>, label: Option<&str>) -> Store<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let config = match label {
        Some(label) => watcher::Config::default().labels(label),
        None => watcher::Config::default(),
    };
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff().touched_objects();
    tokio::spawn(async move {
        stream.for_each(|_| async {}).await;
    });
    reader
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_controller_heartbeat_needs_reconciliations_only_when_there_is_work() {
        let metrics = Metrics::new();
        let health = Health::new();
        let limit = Duration::from_millis(1500);
        let (mds, mut writer) = reflector::store::<ModelDeployment>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(watch_controller(metrics.clone(), vec![mds], health.register("controller", limit), async {
            let _ = stopped.await;
        }));

        // Nothing to reconcile: no reconciliation needed to stay healthy.
        tokio::time::sleep(limit + Duration::from_secs(1)).await;
        assert!(health.stalled().is_empty(), "{:?}", health.stalled());

        // A ModelDeployment and no reconciliation: stalled.
        let md: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "ns"}, "spec": {"model": {"uri": "s3://b/m"}},
        }))
        .unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(md));
        tokio::time::sleep(limit + Duration::from_secs(1)).await;
        assert_eq!(health.stalled().len(), 1);

        // A reconciliation finishes (even in error): progress.
        metrics.reconciliations.with_label_values(&["error"]).inc();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(health.stalled().is_empty(), "{:?}", health.stalled());
        let _ = stop.send(());
    }
}
