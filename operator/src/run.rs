//! The operator process: health and metrics endpoints, leader election on
//! a Lease, and - while leader - the controller and the autoscaler loop.
//! SIGTERM stops both and releases the lease so the other replica takes
//! over at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::autoscale::{self, AutoscaleMetrics, Direction, Recommendations, ScaleOutcome, StatusMemory};
use crate::crd::ModelDeployment;
use crate::network_policy::MetricsScrapers;
use crate::policy::Policy;
use crate::reconcile::{self, Context};
use crate::resources::{BuildConfig, INSTANCE_LABEL};
use crate::telemetry::{self, Metrics};

/// Settings of `ferrite-operator run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub server_image: String,
    pub server_image_pull_policy: Option<String>,
    /// Watch only these namespaces; empty for all.
    pub watch_namespaces: Vec<String>,
    /// What ModelDeployments may ask for.
    pub policy: Policy,
    /// Who may scrape model pods' metrics through their NetworkPolicies.
    pub scrapers: MetricsScrapers,
    pub metrics_addr: SocketAddr,
    pub lease_name: String,
    pub lease_namespace: String,
    /// This process's name in the lease (the pod name in a cluster).
    pub identity: String,
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Metrics::new();
    let autoscale_metrics = AutoscaleMetrics::new(&metrics.registry)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let ready = Arc::new(AtomicBool::new(false));
    let telemetry = tokio::spawn(telemetry::serve(options.metrics_addr, metrics.clone(), ready.clone(), stopped()));

    // Ready once the API server answers: a follower is a healthy replica too.
    client.apiserver_version().await?;
    ready.store(true, Ordering::SeqCst);

    let leases = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &options.lease_name)
        .with_namespace(&options.lease_namespace)
        .with_identity(&options.identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await?;
    let (mut leader, lease_task) = leases.watch().await;
    tracing::info!(identity = %options.identity, lease = %options.lease_name, "waiting for leadership");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let became_leader = tokio::select! {
        result = leader.wait_for(|is_leader| *is_leader) => result.is_ok(),
        _ = term.recv() => false,
        _ = interrupt.recv() => false,
    };
    if became_leader {
        tracing::info!(identity = %options.identity, "leading");
        metrics.leader.set(1);
        let config = BuildConfig {
            server_image: options.server_image.clone(),
            server_image_pull_policy: options.server_image_pull_policy.clone(),
            policy: options.policy.clone(),
            scrapers: options.scrapers.clone(),
        };
        let ctx = Arc::new(Context::new(client.clone(), config, metrics.clone(), &options.identity));
        let namespaces = options.watch_namespaces.clone();
        let controller = tokio::spawn({
            let (ctx, stopped) = (ctx.clone(), stopped());
            async move { reconcile::run(ctx, &namespaces, stopped).await }
        });
        // One autoscaler per watched namespace (namespaced watches), or one
        // for the cluster.
        let scopes: Vec<Option<String>> = if options.watch_namespaces.is_empty() {
            vec![None]
        } else {
            options.watch_namespaces.iter().cloned().map(Some).collect()
        };
        let autoscalers: Vec<_> = scopes
            .into_iter()
            .map(|ns| tokio::spawn(autoscale_loop(ctx.clone(), ns, autoscale_metrics.clone(), stopped())))
            .collect();
        let lost = tokio::select! {
            _ = leader.wait_for(|is_leader| !*is_leader) => true,
            _ = term.recv() => false,
            _ = interrupt.recv() => false,
        };
        if lost {
            tracing::error!("lost leadership; exiting so that a fresh process rejoins as follower");
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = controller.await;
            futures::future::join_all(autoscalers).await;
        })
        .await;
        metrics.leader.set(0);
        if lost {
            anyhow::bail!("lost leadership");
        }
    }
    let _ = stop_tx.send(true);
    // Dropping the receiver makes the lease task release the lease.
    drop(leader);
    let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    let _ = telemetry.await;
    tracing::info!("stopped");
    Ok(())
}

/// Per-ModelDeployment memory of the autoscaler.
struct Scaled {
    recommendations: Recommendations,
    status: StatusMemory,
    next_due: Instant,
}

/// Every second, runs an autoscaling step for each autoscaled
/// ModelDeployment whose scrape interval has passed.
async fn autoscale_loop(
    ctx: Arc<Context>,
    namespace: Option<String>,
    metrics: AutoscaleMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (mds, pods) = (
        cache::<ModelDeployment>(&ctx.client, namespace.as_deref(), None),
        cache::<Pod>(&ctx.client, namespace.as_deref(), Some(INSTANCE_LABEL)),
    );
    let http = reqwest::Client::new();
    let mut state: HashMap<ObjectRef<ModelDeployment>, Scaled> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = &mut shutdown => return,
        }
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
                status: StatusMemory::default(),
                next_due: now,
            });
            if now < entry.next_due {
                continue;
            }
            entry.next_due = now + Duration::from_secs(spec.scrape_interval_seconds.max(1) as u64);
            let own_pods: Vec<Pod> = pods
                .state()
                .iter()
                .filter(|p| p.namespace() == md.namespace() && p.labels().get(INSTANCE_LABEL) == Some(&md.name_any()))
                .map(|p| p.as_ref().clone())
                .collect();
            let endpoints = autoscale::pod_metrics_endpoints(&own_pods, ferrite_contract::ports::METRICS);
            match autoscale::scale_step(ctx.client.clone(), &md, &mut entry.recommendations, endpoints, &http, now)
                .await
            {
                Ok(Some(outcome)) => {
                    metrics.observe(&outcome);
                    record_outcome(&ctx, &md, &outcome, &mut entry.status).await;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(name = %md.name_any(), %error, "autoscaling step failed"),
            }
        }
    }
}

/// Writes the autoscaler's status fields (its own server-side apply, see
/// [`autoscale::status`]) and, on a change, an Event.
async fn record_outcome(ctx: &Context, md: &ModelDeployment, outcome: &ScaleOutcome, memory: &mut StatusMemory) {
    if let Err(error) = autoscale::write_status(&ctx.client, md, outcome, memory, chrono::Utc::now()).await {
        tracing::warn!(name = %md.name_any(), %error, "cannot write autoscaler status");
    }
    if outcome.changed {
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
