//! The controller: one reconcile function that runs a ModelDeployment
//! through validate -> build (pure, `resources`) -> server-side apply ->
//! status (`status`), with typed errors and Events for what changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
#[allow(deprecated)]
use k8s_openapi::api::core::v1::Endpoints as LegacyEndpoints;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::crd::{ModelDeployment, ModelDeploymentStatus};
use crate::escalation;
use crate::resources::activation::{
    self, ActivatorEndpoints, Mode, MANAGED_BY_CONTROLLER, MANAGED_BY_LABEL, SERVICE_NAME_LABEL,
};
use crate::resources::network_policy;
use crate::resources::{self, BuildConfig, INSTANCE_LABEL};
use crate::status;
use crate::telemetry::Metrics;

/// Field manager of every object the operator writes.
pub use crate::resources::RECONCILER_FIELD_MANAGER as FIELD_MANAGER;
/// How often a ModelDeployment is looked at even when nothing changed.
const RESYNC: Duration = Duration::from_secs(60);

/// Why a reconciliation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    // kube's errors are large; boxed so every Result stays small.
    #[error("applying {kind}: {source}")]
    Apply { kind: &'static str, source: Box<kube::Error> },
    #[error("deleting {kind}: {source}")]
    Delete { kind: &'static str, source: Box<kube::Error> },
    #[error("scaling the Deployment of a ModelDeployment outside the policy to zero: {0}")]
    HoldAtZero(Box<kube::Error>),
    #[error("reading {kind}: {source}")]
    Read { kind: &'static str, source: Box<kube::Error> },
    #[error("writing status: {0}")]
    Status(Box<kube::Error>),
}

impl Error {
    /// Label of `ferrite_operator_reconcile_errors_total{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::HoldAtZero(_) => "hold_at_zero",
            Error::Read { .. } => "read",
            Error::Status(_) => "status",
        }
    }
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub config: BuildConfig,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// The scrapes behind each escalating ModelDeployment's status.
    pub escalation: escalation::Memory,
    /// The client of those scrapes (no redirects, no proxy).
    pub http: reqwest::Client,
    /// The activator (`--activator-service`), when there is one.
    pub activator: Option<Activator>,
    /// This replica's name (the Events' reporting instance).
    pub identity: String,
}

/// The activator the operator was given: its Service, and a cache of that
/// Service's EndpointSlices (the activator pods).
#[derive(Clone)]
pub struct Activator {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// Its EndpointSlices, kept current by a watch.
    pub slices: Store<EndpointSlice>,
}

impl Activator {
    /// `namespace/name`.
    pub fn service(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The activator pods as the cache shows them now.
    pub fn endpoints(&self) -> ActivatorEndpoints {
        let slices = self.slices.state();
        ActivatorEndpoints::from_slices(slices.iter().map(|s| s.as_ref()))
    }
}

impl Context {
    pub fn new(client: Client, config: BuildConfig, metrics: Metrics, identity: &str) -> Context {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(identity.to_string()) };
        Context {
            identity: identity.to_string(),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
            escalation: escalation::Memory::default(),
            http: crate::autoscale::scrape_client(),
            activator: None,
        }
    }

    /// The context with an activator for scale-to-zero models.
    pub fn with_activator(mut self, activator: Option<Activator>) -> Context {
        self.activator = activator;
        self
    }

    /// What the status says of the activator.
    pub fn activator_state(&self) -> status::ActivatorState {
        match &self.activator {
            None => status::ActivatorState::Missing,
            Some(a) => status::ActivatorState::Configured {
                service: a.service(),
                ready_endpoints: a.endpoints().addresses.len(),
            },
        }
    }

    /// Publishes an Event of its own for a scale to or from zero: a new
    /// object every time, with its own `eventTime` (microseconds) and note.
    /// The [`Recorder`] folds repeats of a reason within six minutes into a
    /// series on the first Event, keeping the first note; the cold-start
    /// breakdown reads each transition's time.
    pub async fn unique_event(&self, md: &ModelDeployment, reason: &str, note: String) {
        use k8s_openapi::api::events::v1::Event as K8sEvent;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let now = k8s_openapi::jiff::Timestamp::now();
        let reference = md.object_ref(&());
        let event = K8sEvent {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("{}.{:x}", md.name_any(), now.as_nanosecond())),
                namespace: md.namespace(),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some("Scale".into()),
            reason: Some(reason.into()),
            note: Some(note),
            regarding: Some(reference),
            reporting_controller: Some(crate::resources::AUTOSCALER_FIELD_MANAGER.into()),
            reporting_instance: Some(self.identity.clone()),
            type_: Some("Normal".into()),
            ..Default::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &md.namespace().unwrap_or_default());
        if let Err(error) = api.create(&kube::api::PostParams::default(), &event).await {
            tracing::warn!(%error, "cannot publish event");
        }
    }

    /// Publishes an Event on a ModelDeployment; failures are only logged.
    pub async fn event(&self, md: &ModelDeployment, type_: EventType, reason: &str, note: String) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(error) = self.recorder.publish(&event, &md.object_ref(&())).await {
            tracing::warn!(%error, "cannot publish event");
        }
    }
}

/// Checks the spec beyond what the CRD's CEL rules can.
pub fn validate(md: &ModelDeployment) -> Result<(), Error> {
    if md.metadata.uid.is_none() || md.metadata.namespace.is_none() {
        return Err(Error::InvalidSpec("the ModelDeployment has no uid or namespace".into()));
    }
    if md.spec.model.uri.is_some() == md.spec.model.uri_from.is_some() {
        return Err(Error::InvalidSpec("spec.model needs exactly one of uri and uriFrom".into()));
    }
    if let Some(auto) = &md.spec.autoscaling {
        if auto.min_replicas > auto.max_replicas {
            return Err(Error::InvalidSpec("autoscaling.minReplicas exceeds maxReplicas".into()));
        }
    }
    Ok(())
}

async fn apply<K>(client: &Client, namespace: &str, object: &K, kind: &'static str) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&object.name_any(), &params, &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply { kind, source: Box::new(source) })
}

/// Brings the owned objects and the status of one ModelDeployment in line
/// with its spec.
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&md, &ctx).await;
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciliations.with_label_values(&[label]).inc();
    result
}

/// Removes the object of kind `K` named like the ModelDeployment, if the
/// ModelDeployment owns it (something else of that name is left alone).
async fn delete_owned<K>(client: &Client, md: &ModelDeployment, kind: &'static str) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    delete_owned_named::<K>(client, md, &md.name_any(), kind).await
}

/// Removes the object of kind `K` named `name`, if the ModelDeployment owns it.
async fn delete_owned_named<K>(
    client: &Client,
    md: &ModelDeployment,
    name: &str,
    kind: &'static str,
) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), &md.namespace().unwrap_or_default());
    let existing = api.get_opt(name).await.map_err(|source| Error::Read { kind, source: Box::new(source) })?;
    if existing.is_some_and(|o| o.owner_references().iter().any(|o| Some(&o.uid) == md.metadata.uid.as_ref())) {
        api.delete(name, &Default::default())
            .await
            .map_err(|source| Error::Delete { kind, source: Box::new(source) })?;
    }
    Ok(())
}

/// A ModelDeployment outside the policy gets no pods: nothing is built or
/// applied, and a Deployment it already has (from before an edit, or from
/// before the policy was tightened) is scaled to zero through the scale
/// subresource. Scaling rather than deleting keeps the last template that
/// passed and needs no delete right; the autoscaler skips such a
/// ModelDeployment, so nothing scales it up again until the spec is fixed.
async fn hold_at_zero(md: &ModelDeployment, ctx: &Context, violation: &crate::policy::Violation) -> Result<(), Error> {
    let namespace = md.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let zero = serde_json::json!({"spec": {"replicas": 0}});
    match deployments.patch_scale(&md.name_any(), &PatchParams::default(), &Patch::Merge(&zero)).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(Error::HoldAtZero(Box::new(e))),
    }
    let new_status = status::policy_violation(md, violation);
    announce_changes(md, &new_status, ctx).await;
    write_status(&ctx.client, md, &new_status).await
}

/// Warns (once per spec generation) about a download nothing authenticates:
/// `http://` without `sha256`.
async fn warn_unverified_download(md: &ModelDeployment, ctx: &Context) {
    let plain_http = md.spec.model.uri.as_deref().is_some_and(|uri| uri.starts_with("http://"));
    let new_generation = md.status.as_ref().and_then(|s| s.observed_generation) != md.metadata.generation;
    if plain_http && md.spec.model.sha256.is_none() && new_generation {
        let note = "spec.model.uri is plain http:// and spec.model.sha256 is not set: anyone on the path can \
                    change the model; set sha256 or use https://"
            .to_string();
        ctx.event(md, EventType::Warning, "UnverifiedModelDownload", note).await;
    }
}

async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> Result<Action, Error> {
    validate(md)?;
    let namespace = md.namespace().expect("validated");
    let name = md.name_any();

    if let Err(violation) = ctx.config.policy.check(md, &ctx.config.server_image) {
        hold_at_zero(md, ctx, &violation).await?;
        return Ok(Action::requeue(RESYNC));
    }
    warn_unverified_download(md, ctx).await;

    // Build (pure), then apply.
    let existing = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&name)
        .await
        .map_err(|source| Error::Read { kind: "Deployment", source: Box::new(source) })?;
    let mut deployment = resources::deployment(md, &ctx.config);
    resources::set_replicas(&mut deployment, md, existing.as_ref());
    let service = activation::service(md, Mode::Pods);
    let budget = resources::pod_disruption_budget(md);
    let network_policy = network_policy::network_policy(md, &ctx.config.scrapers);
    let escalation_settings = resources::escalation::config_map(md);
    // The settings first: the pods mount them.
    match &escalation_settings {
        Some(config_map) => {
            apply(&ctx.client, &namespace, config_map, "ConfigMap").await?;
        }
        None => {
            let name = resources::escalation::config_map_name(md);
            delete_owned_named::<ConfigMap>(&ctx.client, md, &name, "ConfigMap").await?
        }
    }
    let deployment = apply(&ctx.client, &namespace, &deployment, "Deployment").await?;
    let activator = ctx.activator.as_ref().map(Activator::endpoints);
    let activator_ready = activator.as_ref().is_some_and(|a| !a.addresses.is_empty());
    let mode = activation::wanted_mode(md, Some(&deployment), activator.is_some(), activator_ready);
    let switching = apply_service(ctx, md, &service, mode, activator.as_ref()).await?;
    match &budget {
        Some(budget) => {
            apply(&ctx.client, &namespace, budget, "PodDisruptionBudget").await?;
        }
        None => delete_owned::<PodDisruptionBudget>(&ctx.client, md, "PodDisruptionBudget").await?,
    }
    match &network_policy {
        Some(policy) => {
            apply(&ctx.client, &namespace, policy, "NetworkPolicy").await?;
        }
        None => delete_owned::<NetworkPolicy>(&ctx.client, md, "NetworkPolicy").await?,
    }

    // Status, from what the Deployment and its pods report.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pods = pods
        .list(&ListParams::default().labels(&format!("{INSTANCE_LABEL}={name}")))
        .await
        .map_err(|source| Error::Read { kind: "Pod", source: Box::new(source) })?
        .items;
    let mut new_status = status::compute(md, Some(&deployment), &pods);
    if let Some(mut condition) = status::scale_to_zero_condition(md, &ctx.activator_state()) {
        let previous = md.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        status::carry_transition_times(std::slice::from_mut(&mut condition), &previous);
        new_status.conditions.push(condition);
    }
    let escalating = escalation::active(md).is_some();
    if let Some(spec) = escalation::active(md) {
        let target_exists = match &spec.target.model_deployment {
            Some(target) => Some(model_deployment_exists(&ctx.client, &namespace, target).await?),
            None => None,
        };
        let observed = escalation::observe(&ctx.escalation, &ctx.http, md, &pods).await;
        escalation::apply(&mut new_status, md, &observed, target_exists);
    } else {
        ctx.escalation.forget(md);
    }
    announce_changes(md, &new_status, ctx).await;
    write_status(&ctx.client, md, &new_status).await?;

    // Look again soon while things are moving; an escalating deployment's
    // rate and target are read every scrape period.
    let settled = new_status.conditions.iter().any(|c| c.type_ == status::PROGRESSING && c.status == "False");
    let next = if switching {
        // The pods' slice is not there yet: look again soon (its watch
        // usually triggers a reconciliation first).
        Duration::from_secs(1)
    } else if !settled {
        Duration::from_secs(5)
    } else if escalating {
        escalation::SCRAPE_PERIOD
    } else {
        RESYNC
    };
    Ok(Action::requeue(next))
}

/// Applies the model's Service in `mode` (see [`activation`]), the
/// activator's EndpointSlice with it, and removes what the other mode left.
/// `service` is the pod-mode Service. Returns whether a switch to the pods is
/// still under way (the activator's slice stays until the EndpointSlice
/// controller lists a ready pod, so that new connections always have
/// somewhere to go).
async fn apply_service(
    ctx: &Context,
    md: &ModelDeployment,
    service: &Service,
    mode: Mode,
    activator: Option<&ActivatorEndpoints>,
) -> Result<bool, Error> {
    let namespace = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let list_slices = || async {
        slices
            .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name}")))
            .await
            .map(|l| l.items)
            .map_err(|source| Error::Read { kind: "EndpointSlice", source: Box::new(source) })
    };
    match (mode, activator) {
        (Mode::Activator, Some(activator)) => {
            // The activator's slice first, then the selector goes: no moment
            // without an endpoint. Then the controller's slices, which it
            // leaves behind for a Service without a selector.
            let slice = activation::activator_slice(md, activator);
            apply(&ctx.client, &namespace, &slice, "EndpointSlice").await?;
            let selectorless = activation::service(md, Mode::Activator);
            apply(&ctx.client, &namespace, &selectorless, "Service").await?;
            delete_legacy_endpoints(&ctx.client, &namespace, &name).await?;
            for stale in activation::stale_pod_slices(&list_slices().await?) {
                match slices.delete(&stale, &Default::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(source) => return Err(Error::Delete { kind: "EndpointSlice", source: Box::new(source) }),
                }
            }
            if md.status.as_ref().is_none_or(|s| s.ready_replicas > 0) {
                tracing::info!(namespace = %namespace, %name, activator = ?activator.addresses, "Service in activator mode");
            }
            Ok(false)
        }
        _ => {
            apply(&ctx.client, &namespace, service, "Service").await?;
            let ours = activation::slice_name(md);
            let present = slices
                .get_opt(&ours)
                .await
                .map_err(|source| Error::Read { kind: "EndpointSlice", source: Box::new(source) })?;
            let Some(_) = present else { return Ok(false) };
            if !activation::pods_listed(&list_slices().await?) {
                return Ok(true);
            }
            delete_owned_named::<EndpointSlice>(&ctx.client, md, &ours, "EndpointSlice").await?;
            tracing::info!(namespace = %namespace, %name, "Service back in pod mode: the activator's slice removed");
            Ok(false)
        }
    }
}

/// Deletes the v1 Endpoints the endpoints controller left for a Service
/// that lost its selector (the mirroring controller would copy its pod IPs
/// into a slice, and kube-proxy would send traffic there).
#[allow(deprecated)]
async fn delete_legacy_endpoints(client: &Client, namespace: &str, name: &str) -> Result<(), Error> {
    let api: Api<LegacyEndpoints> = Api::namespaced(client.clone(), namespace);
    let existing =
        api.get_opt(name).await.map_err(|source| Error::Read { kind: "Endpoints", source: Box::new(source) })?;
    let (key, value) = activation::LEGACY_ENDPOINTS_MANAGER;
    if existing.is_some_and(|e| e.labels().get(key).map(String::as_str) == Some(value)) {
        match api.delete(name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => return Err(Error::Delete { kind: "Endpoints", source: Box::new(source) }),
        }
    }
    Ok(())
}

/// Whether ModelDeployment `name` exists in `namespace` (a list by name:
/// the operator's rights on ModelDeployments are list and watch).
async fn model_deployment_exists(client: &Client, namespace: &str, name: &str) -> Result<bool, Error> {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!("metadata.name={name}"));
    let found = api
        .list_metadata(&params)
        .await
        .map_err(|source| Error::Read { kind: "ModelDeployment", source: Box::new(source) })?;
    Ok(!found.items.is_empty())
}

/// Writes the reconciler's status fields (server-side apply, field manager
/// [`FIELD_MANAGER`]): all but `queueDepth` and `lastScaleTime`, which are
/// the autoscaler's ([`crate::autoscale::status`] has who writes what). Those
/// two are cleared here, whatever the caller passed, and a `None` is left out
/// of the apply: sending them would take them over from the autoscaler, and
/// since this manager never sent them, leaving them out removes nothing.
pub async fn write_status(client: &Client, md: &ModelDeployment, status: &ModelDeploymentStatus) -> Result<(), Error> {
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &md.namespace().unwrap_or_default());
    let status = ModelDeploymentStatus { queue_depth: None, last_scale_time: None, ..status.clone() };
    let patch = serde_json::json!({
        "apiVersion": "ferrite.dev/v1alpha1",
        "kind": "ModelDeployment",
        "status": status,
    });
    api.patch_status(&md.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|e| Error::Status(Box::new(e)))?;
    Ok(())
}

/// Publishes an Event for every condition whose status or reason changed.
async fn announce_changes(md: &ModelDeployment, new: &ModelDeploymentStatus, ctx: &Context) {
    let old: Vec<Condition> = md.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    for condition in &new.conditions {
        let unchanged = old
            .iter()
            .any(|o| o.type_ == condition.type_ && o.status == condition.status && o.reason == condition.reason);
        if unchanged {
            continue;
        }
        let bad = (condition.type_ == status::READY && condition.status == "False")
            || (condition.type_ == status::DEGRADED && condition.status == "True")
            || (condition.type_ == escalation::TARGET_REACHABLE && condition.status == "False");
        let type_ = if bad { EventType::Warning } else { EventType::Normal };
        let note = format!("{} is {}: {}", condition.type_, condition.status, condition.message);
        ctx.event(md, type_, &condition.reason, note).await;
    }
}

/// Retry failed reconciliations with a short backoff; count the error.
pub fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %md.name_any(), namespace = ?md.namespace(), %error, "reconcile failed");
    ctx.metrics.errors.with_label_values(&[error.metric_label()]).inc();
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller until `shutdown` completes: one per namespace in
/// `namespaces` (each with namespaced watches, so that Roles in those
/// namespaces suffice), or one for the whole cluster when it is empty.
pub async fn run(
    ctx: Arc<Context>,
    namespaces: &[String],
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let scopes: Vec<Option<&str>> =
        if namespaces.is_empty() { vec![None] } else { namespaces.iter().map(|ns| Some(ns.as_str())).collect() };
    futures::future::join_all(scopes.into_iter().map(|ns| run_one(ctx.clone(), ns, shutdown.clone()))).await;
}

async fn run_one(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let client = &ctx.client;
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=ferrite-operator");
    let controller = Controller::new(api::<ModelDeployment>(client, namespace), watcher::Config::default());
    let mds = controller.store();
    // The activator's pods changed: every scale-to-zero model's slice lists them.
    let controller = match &ctx.activator {
        Some(activator) => {
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &activator.namespace);
            let config = watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", activator.name));
            controller.watches(api, config, move |_: EndpointSlice| {
                mds.state()
                    .iter()
                    .filter(|md| activation::scales_to_zero(md))
                    .map(|md| ObjectRef::from_obj(md.as_ref()))
                    .collect::<Vec<_>>()
            })
        }
        None => controller,
    };
    let pod_slices = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_CONTROLLER}"));
    controller
        .owns(api::<Deployment>(client, namespace), owned.clone())
        .owns(api::<EndpointSlice>(client, namespace), owned.clone())
        // The pods' slices of a model Service: a switch back to the pods
        // completes when the controller lists a ready one.
        .watches(api::<EndpointSlice>(client, namespace), pod_slices, |slice: EndpointSlice| {
            let name = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
            Some(ObjectRef::<ModelDeployment>::new(&name).within(&slice.namespace()?))
        })
        .owns(api::<Service>(client, namespace), owned.clone())
        .owns(api::<PodDisruptionBudget>(client, namespace), owned.clone())
        .owns(api::<NetworkPolicy>(client, namespace), owned.clone())
        .owns(api::<ConfigMap>(client, namespace), owned.clone())
        // Pod changes (crashes, image pulls) feed the status conditions.
        .watches(api::<Pod>(client, namespace), watcher::Config::default().labels(INSTANCE_LABEL), |pod: Pod| {
            let name = pod.labels().get(INSTANCE_LABEL)?.clone();
            Some(ObjectRef::<ModelDeployment>::new(&name).within(&pod.namespace()?))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile result");
            }
        })
        .await;
}
