//! Building the objects a ModelDeployment owns: pure functions from the
//! resource (and the operator's settings) to a Deployment, a Service and,
//! with more than one replica, a PodDisruptionBudget. No API calls here.

use std::collections::BTreeMap;

use ferrite_contract::{fetch, ports, serve, CommandLine};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, Lifecycle, LifecycleHandler,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{Endpoints, ModelDeployment, RuntimeSpec};
use crate::policy::Policy;

pub mod access;
pub mod activation;
pub mod escalation;
pub mod model_cache;
pub mod network_policy;
mod replicas;

pub use model_cache::ModelCacheConfig;
pub use network_policy::MetricsScrapers;
pub use replicas::{owns_replicas, set_replicas};

/// Field manager of every object the reconciler applies (and of status).
pub const RECONCILER_FIELD_MANAGER: &str = "ferrite-operator";
/// Field manager of the autoscaler's writes (the Deployment's
/// `spec.replicas`, its status fields), distinct from the reconciler's so
/// `managedFields` shows who set the replica count and the queue depth.
pub const AUTOSCALER_FIELD_MANAGER: &str = "ferrite-operator-autoscaler";

/// The server's REST port (the contract's default, not passed as a flag).
pub const HTTP_PORT: i32 = ports::HTTP as i32;
/// The server's gRPC port, which the probes ask.
pub const GRPC_PORT: i32 = ports::GRPC as i32;
/// The server's metrics port, which the autoscaler scrapes.
pub const METRICS_PORT: i32 = ports::METRICS as i32;
/// Label on every owned object and pod: the owning ModelDeployment's name.
pub const INSTANCE_LABEL: &str = "ferrite.dev/model-deployment";
/// Where models live inside the pod.
const MODELS_DIR: &str = "/models";
/// The non-root user of the ferrite-server image.
const RUN_AS_USER: i64 = 65532;
/// Seconds the server gets to drain on SIGTERM; the pod gets a little more.
const DRAIN_SECONDS: i64 = 30;
/// Seconds a terminating pod keeps serving before SIGTERM, while endpoints
/// and kube-proxy stop sending it new connections.
const PRE_STOP_SLEEP_SECONDS: i64 = 5;
const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Resources of the fetch init container: it streams to disk, so little
/// memory; the limits keep a hostile archive from taking a node's CPU.
/// `[resource, request, limit]`.
const FETCH_RESOURCES: [[&str; 3]; 2] = [["cpu", "100m", "1"], ["memory", "64Mi", "512Mi"]];

/// Operator-wide settings the builders need.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Image of ferrite-server, used unless the resource names its own.
    pub server_image: String,
    /// Image of ferrite-server built with ONNX Runtime's CUDA provider, for
    /// resources whose execution provider runs on a GPU (unless they name
    /// their own image).
    pub server_cuda_image: String,
    /// Pull policy of these images, unless the resource sets one.
    pub server_image_pull_policy: Option<String>,
    /// What ModelDeployments may ask for; also the default download caps.
    pub policy: Policy,
    /// Who may scrape the metrics port through a ModelDeployment's NetworkPolicy.
    pub scrapers: MetricsScrapers,
    /// The node model cache (`--model-cache-*`).
    pub model_cache: ModelCacheConfig,
}

/// Labels that select a ModelDeployment's pods.
pub fn selector_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([(INSTANCE_LABEL.to_string(), md.name_any())])
}

/// The label selector as a string, for the scale subresource.
pub fn selector_string(md: &ModelDeployment) -> String {
    format!("{INSTANCE_LABEL}={}", md.name_any())
}

fn labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let mut labels = selector_labels(md);
    labels.insert("app.kubernetes.io/name".into(), "ferrite-server".into());
    labels.insert("app.kubernetes.io/instance".into(), md.name_any());
    labels.insert("app.kubernetes.io/managed-by".into(), "ferrite-operator".into());
    labels
}

fn metadata(md: &ModelDeployment, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(md.name_any()),
        namespace: md.namespace(),
        labels: Some(labels(md)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn owner(md: &ModelDeployment) -> OwnerReference {
    md.controller_owner_ref(&()).expect("a ModelDeployment from the API has a name and uid")
}

/// Replicas wanted. A fixed count comes from the spec. With autoscaling the
/// Deployment's own count is the autoscaler's decision (it writes the scale
/// subresource), kept within the bounds; before it has decided, the minimum.
pub fn desired_replicas(md: &ModelDeployment, deployment: Option<&Deployment>) -> i32 {
    match (&md.spec.autoscaling, md.spec.replicas) {
        (Some(auto), _) => {
            let current = deployment.and_then(|d| d.spec.as_ref()?.replicas);
            // A new scale-to-zero model starts with one replica: its first
            // load shows the spec works; idleness takes it to zero later.
            let start = auto.min_replicas.max(1);
            current.unwrap_or(start).clamp(auto.min_replicas, auto.max_replicas.max(auto.min_replicas))
        }
        (None, Some(replicas)) => replicas,
        (None, None) => 1,
    }
}

/// In-cluster addresses of the model's APIs.
pub fn endpoints(md: &ModelDeployment) -> Endpoints {
    let host = format!("{}.{}.svc", md.name_any(), md.namespace().unwrap_or_else(|| "default".into()));
    let scheme = if md.spec.tls.is_some() { "https" } else { "http" };
    Endpoints { grpc: format!("{host}:{GRPC_PORT}"), http: format!("{scheme}://{host}:{HTTP_PORT}") }
}

/// `pvc://<claim>/<path>`, split; `None` for URIs that are downloaded.
fn pvc_source(uri: Option<&str>) -> Option<(String, String)> {
    let rest = uri?.strip_prefix("pvc://")?;
    let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
    Some((claim.to_string(), path.trim_end_matches('/').to_string()))
}

fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..SecurityContext::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(read_only), ..VolumeMount::default() }
}

fn empty_dir(name: &str, size_limit: Option<u64>) -> Volume {
    let source = EmptyDirVolumeSource { size_limit: size_limit.map(|b| Quantity(b.to_string())), ..Default::default() };
    Volume { name: name.into(), empty_dir: Some(source), ..Volume::default() }
}

fn fetch_resources() -> ResourceRequirements {
    let pick =
        |column: usize| FETCH_RESOURCES.iter().map(|r| (r[0].to_string(), Quantity(r[column].to_string()))).collect();
    ResourceRequirements { requests: Some(pick(1)), limits: Some(pick(2)), ..Default::default() }
}

/// The server container's resources, with the GPU count as a limit.
fn server_resources(md: &ModelDeployment) -> Option<ResourceRequirements> {
    let mut resources = md.spec.resources.clone().unwrap_or_default();
    if let Some(gpus) = md.spec.gpus.filter(|&g| g > 0) {
        resources.limits.get_or_insert_with(BTreeMap::new).insert(GPU_RESOURCE.into(), Quantity(gpus.to_string()));
    }
    (resources != ResourceRequirements::default()).then_some(resources)
}

/// Where the TensorRT provider keeps its engines: under the pod's /tmp
/// (an emptyDir), so a container restart does not build them again.
pub const TRT_ENGINE_CACHE_DIR: &str = "/tmp/tensorrt-engines";

/// `ferrite-server serve ...`, from the contract's flags.
fn server_args(md: &ModelDeployment) -> Vec<String> {
    let spec = &md.spec;
    let args = CommandLine::new(serve::SUBCOMMAND)
        .value(serve::MODEL_REPOSITORY, MODELS_DIR)
        .switch(serve::EXIT_ON_LOAD_FAILURE)
        .value(serve::LOG_FORMAT, serve::LOG_FORMAT_JSON)
        .value(serve::MAX_BATCH_SIZE, spec.batching.max_batch_size.to_string())
        .value(serve::MAX_QUEUE_DELAY_US, spec.batching.max_queue_delay_microseconds.to_string())
        .value(serve::MAX_QUEUE_SIZE, spec.batching.max_queue_size.to_string())
        .value(serve::INSTANCES, spec.runtime.instances.to_string())
        .value(serve::INTRA_OP_THREADS, spec.runtime.intra_op_threads.to_string())
        .value(serve::EXECUTION_PROVIDER, spec.runtime.execution_provider.as_str())
        .value(serve::SHUTDOWN_GRACE_SECONDS, DRAIN_SECONDS.to_string());
    let args = gpu_args(&spec.runtime, args);
    escalation::server_args(md, access::server_args(md, args)).into_args()
}

/// The GPU provider's options (nothing for the CPU).
fn gpu_args(runtime: &RuntimeSpec, mut args: CommandLine) -> CommandLine {
    let provider = ferrite_contract::ExecutionProvider::from(runtime.execution_provider);
    if !provider.uses_gpu() {
        return args;
    }
    if runtime.allow_cpu_fallback {
        args = args.switch(serve::ALLOW_CPU_FALLBACK);
    }
    if let Some(bytes) = runtime.gpu_memory_limit_bytes.filter(|&b| b > 0) {
        args = args.value(serve::GPU_MEM_LIMIT_BYTES, bytes.to_string());
    }
    if runtime.cuda_graph {
        args = args.switch(serve::CUDA_GRAPH);
    }
    if provider == ferrite_contract::ExecutionProvider::Tensorrt {
        args = args.value(serve::TRT_ENGINE_CACHE_DIR, TRT_ENGINE_CACHE_DIR);
        if runtime.tensorrt_fp16 {
            args = args.switch(serve::TRT_FP16);
        }
    }
    args
}

/// `ferrite-server fetch ...` of the init container, from the contract's
/// flags. A URI from a Secret is not here: the container's environment
/// carries it ([`access::model_uri_env`]).
fn fetch_args(md: &ModelDeployment, policy: &Policy) -> CommandLine {
    let mut args = CommandLine::new(fetch::SUBCOMMAND);
    if let Some(uri) = &md.spec.model.uri {
        args = args.value(fetch::URI, uri.clone());
    }
    args = args
        .value(fetch::DEST, MODELS_DIR)
        .value(fetch::MODEL_NAME, md.model_name())
        .value(fetch::MAX_BYTES, policy.model_max_bytes(md).to_string())
        .value(fetch::MAX_FILES, policy.model_max_files(md).to_string());
    if let Some(sha256) = &md.spec.model.sha256 {
        args = args.value(fetch::SHA256, sha256.clone());
    }
    args
}

/// The server container's image: the resource's own, else the CUDA build for
/// a GPU execution provider (the CPU build has no CUDA provider and would
/// refuse the model), else the CPU build.
pub fn server_image(md: &ModelDeployment, config: &BuildConfig) -> String {
    match &md.spec.image {
        Some(image) => image.clone(),
        None if ferrite_contract::ExecutionProvider::from(md.spec.runtime.execution_provider).uses_gpu() => {
            config.server_cuda_image.clone()
        }
        None => config.server_image.clone(),
    }
}

/// The Deployment of ferrite-server pods.
pub fn deployment(md: &ModelDeployment, config: &BuildConfig) -> Deployment {
    let spec = &md.spec;
    let model = md.model_name();
    let image = server_image(md, config);
    let pull_policy = spec.image_pull_policy.clone().or_else(|| config.server_image_pull_policy.clone());

    let mut volumes = vec![empty_dir("tmp", None)];
    let mut init_containers = Vec::new();
    let models_mount = match pvc_source(spec.model.uri.as_deref()) {
        // A claim is mounted as the model's directory; nothing to download.
        Some((claim, path)) => {
            volumes.push(Volume {
                name: "models".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim,
                    read_only: Some(true),
                }),
                ..Volume::default()
            });
            VolumeMount {
                name: "models".into(),
                mount_path: format!("{MODELS_DIR}/{model}"),
                sub_path: (!path.is_empty()).then_some(path),
                read_only: Some(true),
                ..VolumeMount::default()
            }
        }
        None => {
            let env: Vec<_> = spec.env.iter().cloned().chain(access::model_uri_env(md)).collect();
            let fetch = Container {
                name: "fetch".into(),
                image: Some(image.clone()),
                image_pull_policy: pull_policy.clone(),
                args: Some(fetch_args(md, &config.policy).into_args()),
                env: (!env.is_empty()).then_some(env),
                resources: Some(fetch_resources()),
                volume_mounts: Some(vec![mount("models", MODELS_DIR, false), mount("tmp", "/tmp", false)]),
                security_context: Some(restricted_security_context()),
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                ..Container::default()
            };
            match model_cache::plan(md, &config.model_cache) {
                // The node's cache: fetch fills it, the server mounts its entry.
                Some(plan) => {
                    volumes.push(plan.volume());
                    init_containers.push(Container {
                        // The cache is shared by every namespace's pods on the
                        // node and this container may write all of it: it runs
                        // the operator's server image, never spec.image, whose
                        // code could otherwise replace other namespaces' entries.
                        image: Some(config.server_image.clone()),
                        image_pull_policy: config.server_image_pull_policy.clone(),
                        args: Some(plan.fetch_args(fetch_args(md, &config.policy)).into_args()),
                        volume_mounts: Some(vec![plan.fetch_mount(), mount("tmp", "/tmp", false)]),
                        ..fetch
                    });
                    plan.server_mount(MODELS_DIR)
                }
                None => {
                    // fetch stops at --max-bytes; the volume's limit backs it up
                    // (the kubelet evicts a pod whose emptyDir outgrows it).
                    volumes.push(empty_dir("models", Some(config.policy.model_max_bytes(md))));
                    init_containers.push(fetch);
                    mount("models", MODELS_DIR, true)
                }
            }
        }
    };

    let mut server_mounts = vec![models_mount, mount("tmp", "/tmp", false)];
    for (volume, mount) in access::server_volumes(md).into_iter().chain(escalation::server_volumes(md)) {
        volumes.push(volume);
        server_mounts.push(mount);
    }
    let (startup, readiness, liveness) = access::probes(md);
    let server = Container {
        name: "server".into(),
        image: Some(image),
        image_pull_policy: pull_policy,
        args: Some(server_args(md)),
        env: (!spec.env.is_empty()).then(|| spec.env.clone()),
        ports: Some(vec![port("http", HTTP_PORT), port("grpc", GRPC_PORT), port("metrics", METRICS_PORT)]),
        resources: server_resources(md),
        startup_probe: Some(startup),
        readiness_probe: Some(readiness),
        liveness_probe: Some(liveness),
        volume_mounts: Some(server_mounts),
        security_context: Some(restricted_security_context()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // A sleep hook needs no shell (the image has none).
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: PRE_STOP_SLEEP_SECONDS }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ..Container::default()
    };

    let placement = spec.placement.clone().unwrap_or_default();
    let mut tolerations = placement.tolerations.clone();
    if ferrite_contract::ExecutionProvider::from(spec.runtime.execution_provider).uses_gpu() {
        tolerations.push(Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        });
    }

    let pod = PodSpec {
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        containers: vec![server],
        volumes: Some(volumes),
        // The server never talks to the API server.
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(PRE_STOP_SLEEP_SECONDS + DRAIN_SECONDS + 10),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            fs_group: Some(RUN_AS_USER),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..PodSecurityContext::default()
        }),
        node_selector: (!placement.node_selector.is_empty()).then_some(placement.node_selector),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        affinity: placement.affinity,
        ..PodSpec::default()
    };

    Deployment {
        metadata: metadata(md, &owner(md)),
        spec: Some(DeploymentSpec {
            // With autoscaling the replica count belongs to the autoscaler;
            // the hand-over is `set_replicas`'s.
            replicas: md.spec.autoscaling.is_none().then(|| desired_replicas(md, None)),
            selector: LabelSelector { match_labels: Some(selector_labels(md)), ..LabelSelector::default() },
            // Surge one pod and keep every old one until the new is ready,
            // so a rollout never lowers serving capacity.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(md).into_iter().chain(escalation::template_label(md)).collect()),
                    annotations: escalation::template_annotations(md),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The Service: HTTP, gRPC and metrics ports.
pub fn service(md: &ModelDeployment) -> Service {
    let mut meta = metadata(md, &owner(md));
    if !md.spec.service.annotations.is_empty() {
        meta.annotations = Some(md.spec.service.annotations.clone());
    }
    let service_port = |name: &str, number: i32, app_protocol: Option<&str>| ServicePort {
        name: Some(name.into()),
        port: number,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        app_protocol: app_protocol.map(str::to_string),
        ..ServicePort::default()
    };
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: md.spec.service.type_.clone().or_else(|| Some("ClusterIP".into())),
            selector: Some(selector_labels(md)),
            ports: Some(vec![
                service_port("http", HTTP_PORT, Some(if md.spec.tls.is_some() { "https" } else { "http" })),
                service_port("grpc", GRPC_PORT, Some("grpc")),
                service_port("metrics", METRICS_PORT, Some("http")),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// A PodDisruptionBudget allowing one pod down at a time, when there may be
/// more than one replica (a fixed count above one, or autoscaling up to
/// more); `None` for a single replica, which a budget would only pin.
pub fn pod_disruption_budget(md: &ModelDeployment) -> Option<PodDisruptionBudget> {
    let several = match &md.spec.autoscaling {
        Some(auto) => auto.max_replicas > 1,
        None => md.spec.replicas.unwrap_or(1) > 1,
    };
    several.then(|| PodDisruptionBudget {
        metadata: metadata(md, &owner(md)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(md)), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        AuthSpec, AutoscalingSpec, ExecutionProvider, ModelCache, ModelDeploymentSpec, ModelSource, SecretKeyRef,
        TlsSpec, UriSource,
    };

    fn md(uri: &str) -> ModelDeployment {
        let spec: ModelDeploymentSpec = serde_json::from_value(serde_json::json!({"model": {"uri": uri}})).unwrap();
        let mut md = ModelDeployment::new("resnet", spec);
        md.metadata.namespace = Some("ml".into());
        md.metadata.uid = Some("uid-1".into());
        md
    }

    fn config() -> BuildConfig {
        BuildConfig {
            server_image: "ferrite-server:test".into(),
            server_cuda_image: "ferrite-server-cuda:test".into(),
            server_image_pull_policy: None,
            policy: Policy::default(),
            scrapers: MetricsScrapers::default(),
            model_cache: ModelCacheConfig::default(),
        }
    }

    /// A cache configured, used by the ModelDeployments that ask for it.
    fn cached_config() -> BuildConfig {
        BuildConfig {
            model_cache: ModelCacheConfig {
                default: ModelCache::None,
                host_path: Some("/var/lib/ferrite/model-cache".into()),
                max_bytes: 8 << 30,
            },
            ..config()
        }
    }

    #[test]
    fn a_node_cache_mounts_one_entry_read_only_and_fetches_with_the_operators_image() {
        let mut m = md("https://example.org/m.onnx");
        m.spec.model.cache = Some(ModelCache::Node);
        m.spec.model.sha256 = Some("c".repeat(64));
        // A user's image must not run with the shared cache mounted.
        m.spec.image = Some("registry.example/user/own:1".into());
        m.spec.image_pull_policy = Some("Always".into());
        let pod = pod(&deployment(&m, &cached_config()));
        let volumes = pod.volumes.clone().unwrap();
        assert!(volumes.iter().all(|v| v.name != "models"), "no per-pod model volume");
        let cache = volumes.iter().find(|v| v.name == model_cache::VOLUME).unwrap().host_path.clone().unwrap();
        assert_eq!((cache.path.as_str(), cache.type_.as_deref()), ("/var/lib/ferrite/model-cache", Some("Directory")));

        let fetch = &pod.init_containers.as_ref().unwrap()[0];
        assert_eq!(fetch.image.as_deref(), Some("ferrite-server:test"));
        assert_eq!(fetch.image_pull_policy, None, "the operator's pull policy, not the resource's");
        let fetch_cache = fetch.volume_mounts.iter().flatten().find(|v| v.name == model_cache::VOLUME).unwrap();
        assert_eq!((fetch_cache.read_only, fetch_cache.sub_path.as_deref()), (Some(false), None));
        assert_eq!(fetch.security_context, Some(restricted_security_context()));

        let server = &pod.containers[0];
        assert_eq!(server.image.as_deref(), Some("registry.example/user/own:1"), "the server runs the resource's");
        let mounts = server.volume_mounts.clone().unwrap();
        let entry = mounts.iter().find(|v| v.name == model_cache::VOLUME).unwrap();
        let key =
            ferrite_contract::fetch::entry_key("ml", "https://example.org/m.onnx", Some(&"c".repeat(64)), "resnet");
        assert_eq!(entry.sub_path.as_deref(), Some(format!("entries/{key}").as_str()));
        assert_eq!((entry.mount_path.as_str(), entry.read_only), (MODELS_DIR, Some(true)));
        assert_eq!(mounts.iter().filter(|v| v.mount_path == MODELS_DIR).count(), 1);

        // Without the cache the same resource fetches with its own image into an emptyDir.
        m.spec.model.cache = Some(ModelCache::None);
        let pod = super::tests::pod(&deployment(&m, &cached_config()));
        assert_eq!(pod.init_containers.unwrap()[0].image.as_deref(), Some("registry.example/user/own:1"));
        assert!(pod.volumes.unwrap().iter().all(|v| v.name != model_cache::VOLUME));
        // pvc:// never uses it.
        let mut claim = md("pvc://claim/m");
        claim.spec.model.cache = Some(ModelCache::Node);
        let pod = super::tests::pod(&deployment(&claim, &cached_config()));
        assert!(pod.volumes.unwrap().iter().all(|v| v.name != model_cache::VOLUME));
    }

    fn pod(d: &Deployment) -> PodSpec {
        d.spec.clone().unwrap().template.spec.unwrap()
    }

    #[test]
    fn deployment_fetches_then_serves_with_restricted_pods() {
        let d = deployment(&md("s3://bucket/resnet/model.onnx"), &config());
        assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].kind, "ModelDeployment");
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
        let pod = pod(&d);
        let fetch = &pod.init_containers.as_ref().unwrap()[0];
        assert!(fetch.args.as_ref().unwrap().windows(2).any(|w| w == ["--uri", "s3://bucket/resnet/model.onnx"]));
        let server = &pod.containers[0];
        assert_eq!(server.image.as_deref(), Some("ferrite-server:test"));
        let sc = server.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        let readiness = server.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
        assert_eq!((readiness.port, readiness.service.as_deref()), (GRPC_PORT, Some("resnet")));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let pre_stop = server.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, PRE_STOP_SLEEP_SECONDS);
    }

    #[test]
    fn downloads_are_capped_in_bytes_files_cpu_and_memory() {
        let mut m = md("s3://bucket/m.onnx");
        m.spec.model.max_size = Some("2Gi".into());
        m.spec.model.max_files = Some(50);
        let pod = pod(&deployment(&m, &config()));
        let fetch = &pod.init_containers.as_ref().unwrap()[0];
        let args = fetch.args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--max-bytes", &(2u64 << 30).to_string()]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--max-files", "50"]), "{args:?}");
        let volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == "models").unwrap();
        assert_eq!(volume.empty_dir.as_ref().unwrap().size_limit, Some(Quantity((2u64 << 30).to_string())));
        let resources = fetch.resources.clone().unwrap();
        assert_eq!(resources.limits.unwrap()["memory"], Quantity("512Mi".into()));
        assert_eq!(resources.requests.unwrap()["cpu"], Quantity("100m".into()));
        // Without a spec value, the operator's default.
        let pod = super::tests::pod(&deployment(&md("s3://bucket/m.onnx"), &config()));
        let args = pod.init_containers.unwrap()[0].args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--max-bytes", &Policy::default().model_max_bytes.to_string()]));
    }

    #[test]
    fn a_uri_from_a_secret_stays_out_of_the_pod_spec() {
        let mut m = md("s3://bucket/m.onnx");
        m.spec.model.uri = None;
        m.spec.model.uri_from =
            Some(UriSource { secret_key_ref: SecretKeyRef { name: "model-uri".into(), key: "uri".into() } });
        m.spec.env = vec![k8s_openapi::api::core::v1::EnvVar {
            name: "AWS_REGION".into(),
            value: Some("x".into()),
            value_from: None,
        }];
        let pod = pod(&deployment(&m, &config()));
        let fetch = &pod.init_containers.as_ref().unwrap()[0];
        assert!(!fetch.args.as_ref().unwrap().contains(&"--uri".to_string()));
        let env = fetch.env.clone().unwrap();
        let names: Vec<_> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["AWS_REGION", "FERRITE_MODEL_URI"]);
        assert!(
            pod.containers[0].env.iter().flatten().all(|e| e.name != "FERRITE_MODEL_URI"),
            "the server never sees it"
        );
    }

    #[test]
    fn pvc_models_are_mounted_not_fetched() {
        let d = deployment(&md("pvc://models-claim/resnet"), &config());
        let pod = pod(&d);
        assert!(pod.init_containers.is_none());
        let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "models").unwrap();
        assert_eq!(volume.persistent_volume_claim.unwrap().claim_name, "models-claim");
        let mount = pod.containers[0].volume_mounts.clone().unwrap().into_iter().find(|m| m.name == "models").unwrap();
        assert_eq!((mount.mount_path.as_str(), mount.sub_path.as_deref()), ("/models/resnet", Some("resnet")));
    }

    #[test]
    fn gpus_set_the_limit_toleration_and_provider() {
        let mut m = md("https://example.org/m.onnx");
        m.spec.gpus = Some(2);
        m.spec.runtime.execution_provider = ExecutionProvider::Cuda;
        let pod = pod(&deployment(&m, &config()));
        let limits = pod.containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits[GPU_RESOURCE], Quantity("2".into()));
        assert!(pod.tolerations.unwrap().iter().any(|t| t.key.as_deref() == Some(GPU_RESOURCE)));
        assert!(pod.containers[0].args.as_ref().unwrap().windows(2).any(|w| w == ["--execution-provider", "cuda"]));
    }

    #[test]
    fn gpu_providers_get_the_cuda_image_and_their_options() {
        let cpu = md("https://example.org/m.onnx");
        assert_eq!(pod(&deployment(&cpu, &config())).containers[0].image.as_deref(), Some("ferrite-server:test"));
        let args = pod(&deployment(&cpu, &config())).containers[0].args.clone().unwrap();
        assert!(!args.iter().any(|a| a.contains("fallback") || a.contains("gpu") || a.contains("trt")), "{args:?}");

        let mut cuda = md("https://example.org/m.onnx");
        cuda.spec.gpus = Some(1);
        cuda.spec.runtime.execution_provider = ExecutionProvider::Cuda;
        cuda.spec.runtime.allow_cpu_fallback = true;
        cuda.spec.runtime.gpu_memory_limit_bytes = Some(4 << 30);
        cuda.spec.runtime.cuda_graph = true;
        let pod_spec = pod(&deployment(&cuda, &config()));
        assert_eq!(pod_spec.containers[0].image.as_deref(), Some("ferrite-server-cuda:test"));
        // The download runs the same image: the node pulls one.
        let init = pod_spec.init_containers.clone().unwrap();
        assert!(init.iter().all(|c| c.image.as_deref() == Some("ferrite-server-cuda:test")), "{init:?}");
        let args = pod_spec.containers[0].args.clone().unwrap();
        for flag in [serve::ALLOW_CPU_FALLBACK, serve::CUDA_GRAPH] {
            assert!(args.contains(&flag.arg()), "{flag} missing: {args:?}");
        }
        assert!(args.windows(2).any(|w| w == [serve::GPU_MEM_LIMIT_BYTES.arg(), (4i64 << 30).to_string()]), "{args:?}");
        assert!(!args.contains(&serve::TRT_ENGINE_CACHE_DIR.arg()), "{args:?}");

        let mut trt = md("https://example.org/m.onnx");
        trt.spec.gpus = Some(1);
        trt.spec.runtime.execution_provider = ExecutionProvider::Tensorrt;
        trt.spec.runtime.tensorrt_fp16 = true;
        let pod_spec = pod(&deployment(&trt, &config()));
        assert_eq!(pod_spec.containers[0].image.as_deref(), Some("ferrite-server-cuda:test"));
        let args = pod_spec.containers[0].args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == [serve::TRT_ENGINE_CACHE_DIR.arg(), TRT_ENGINE_CACHE_DIR.to_string()]));
        assert!(args.contains(&serve::TRT_FP16.arg()) && !args.contains(&serve::ALLOW_CPU_FALLBACK.arg()), "{args:?}");
        assert!(TRT_ENGINE_CACHE_DIR.starts_with("/tmp/"), "the cache must live on the pod's writable /tmp");

        // A resource's own image wins over both.
        trt.spec.image = Some("registry.example/ferrite-server-cuda:custom".into());
        assert_eq!(server_image(&trt, &config()), "registry.example/ferrite-server-cuda:custom");
    }

    #[test]
    fn replicas_follow_the_autoscaler_within_bounds() {
        let mut m = md("https://example.org/m.onnx");
        m.spec.autoscaling = Some(AutoscalingSpec {
            min_replicas: 2,
            max_replicas: 5,
            target_queue_depth: 8,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 120,
            scrape_interval_seconds: 5,
            scale_to_zero_after_seconds: None,
        });
        assert_eq!(desired_replicas(&m, None), 2);
        let mut d = deployment(&m, &config());
        assert_eq!(d.spec.as_ref().unwrap().replicas, None, "the autoscaler owns replicas");
        d.spec.as_mut().unwrap().replicas = Some(4);
        assert_eq!(desired_replicas(&m, Some(&d)), 4);
        d.spec.as_mut().unwrap().replicas = Some(9);
        assert_eq!(desired_replicas(&m, Some(&d)), 5);
        assert!(pod_disruption_budget(&m).is_some());
    }

    #[test]
    fn single_replica_has_no_disruption_budget() {
        assert!(pod_disruption_budget(&md("https://example.org/m.onnx")).is_none());
        let mut m = md("https://example.org/m.onnx");
        m.spec.replicas = Some(3);
        assert_eq!(pod_disruption_budget(&m).unwrap().spec.unwrap().max_unavailable, Some(IntOrString::Int(1)));
    }

    /// Checks a container's command line against the contract: the
    /// subcommand, then only the contract's flags, each with a value if and
    /// only if it takes one. Returns `(flag, value)` pairs.
    fn contract_args<'a>(
        args: &'a [String],
        subcommand: &str,
        flags: &[ferrite_contract::Flag],
    ) -> Vec<(ferrite_contract::Flag, Option<&'a str>)> {
        assert_eq!(args.first().map(String::as_str), Some(subcommand), "{args:?}");
        let mut rest = args[1..].iter();
        let mut seen = Vec::new();
        while let Some(arg) = rest.next() {
            let flag = flags
                .iter()
                .copied()
                .find(|f| f.arg() == *arg)
                .unwrap_or_else(|| panic!("{arg} is not a flag of `{subcommand}` in ferrite-contract: {args:?}"));
            let value = flag.takes_value().then(|| rest.next().expect("a value after the flag").as_str());
            assert!(!value.is_some_and(|v| v.starts_with("--")), "{flag} without its value: {args:?}");
            seen.push((flag, value));
        }
        seen
    }

    /// The pods the operator builds use only what ferrite-contract defines;
    /// ferrite-server's own test (server/src/main.rs) checks its command line
    /// against the same contract, so neither side can drift alone.
    #[test]
    fn pods_follow_the_server_contract() {
        let mut gpu = md("s3://bucket/m.onnx");
        gpu.spec.model.sha256 = Some("0".repeat(64));
        gpu.spec.gpus = Some(1);
        gpu.spec.runtime.execution_provider = ExecutionProvider::Tensorrt;
        let mut secured = md("s3://bucket/m.onnx");
        secured.spec.model.uri = None;
        secured.spec.model.uri_from =
            Some(UriSource { secret_key_ref: SecretKeyRef { name: "s".into(), key: "k".into() } });
        secured.spec.tls = Some(TlsSpec { secret_name: "cert".into(), client_auth: true });
        secured.spec.auth =
            Some(AuthSpec { api_key_secret_ref: SecretKeyRef { name: "keys".into(), key: "keys".into() } });
        let mut escalating = md("s3://bucket/m/");
        escalating.spec.escalation = Some(
            serde_json::from_value(serde_json::json!({
                "target": {"url": "https://api.example.com/v1", "model": "big",
                           "apiKeySecretRef": {"name": "k", "key": "k"}},
                "mode": "shadow",
            }))
            .unwrap(),
        );
        let mut cached = md("s3://bucket/m.onnx");
        cached.spec.model.cache = Some(ModelCache::Node);
        for m in [md("https://example.org/m.onnx"), gpu, md("pvc://claim/m"), secured, escalating, cached] {
            let pod = pod(&deployment(&m, &cached_config()));
            let server = &pod.containers[0];
            let args = contract_args(server.args.as_deref().unwrap(), serve::SUBCOMMAND, serve::FLAGS);
            let value = |flag| args.iter().find(|(f, _)| *f == flag).and_then(|(_, v)| *v);
            let provider: ferrite_contract::ExecutionProvider =
                value(serve::EXECUTION_PROVIDER).unwrap().parse().unwrap();
            assert_eq!(provider, m.spec.runtime.execution_provider.into());
            assert_eq!(value(serve::MODEL_REPOSITORY), Some(MODELS_DIR));
            assert!(args.contains(&(serve::EXIT_ON_LOAD_FAILURE, None)), "status reads the load-failure exit code");
            for init in pod.init_containers.iter().flatten() {
                let args = contract_args(init.args.as_deref().unwrap(), fetch::SUBCOMMAND, fetch::FLAGS);
                assert_eq!(args.iter().any(|(f, _)| *f == fetch::SHA256), m.spec.model.sha256.is_some());
                assert_eq!(args.iter().any(|(f, _)| *f == fetch::URI), m.spec.model.uri.is_some());
                assert!(
                    args.iter().any(|(f, _)| *f == fetch::MAX_BYTES)
                        && args.iter().any(|(f, _)| *f == fetch::MAX_FILES)
                );
                // The cache's flags come together, --cache-dir where the cache is mounted.
                let value = |flag| args.iter().find(|(f, _)| *f == flag).and_then(|(_, v)| *v);
                let uses_cache = m.spec.model.cache == Some(ModelCache::Node);
                for flag in [fetch::CACHE_DIR, fetch::CACHE_SCOPE, fetch::CACHE_MAX_BYTES] {
                    assert_eq!(value(flag).is_some(), uses_cache, "{flag}");
                }
                if uses_cache {
                    let mounted = init.volume_mounts.iter().flatten().find(|v| v.name == model_cache::VOLUME);
                    assert_eq!(value(fetch::CACHE_DIR), mounted.map(|v| v.mount_path.as_str()));
                    assert_eq!(value(fetch::CACHE_SCOPE), Some("ml"));
                }
            }
            // No port flags: the server's default ports, which are the contract's.
            let container_ports: Vec<_> = server.ports.iter().flatten().map(|p| p.container_port).collect();
            assert_eq!(container_ports, [ports::HTTP, ports::GRPC, ports::METRICS].map(i32::from));
            // gRPC probes on the gRPC port, or with TLS plain HTTP on the metrics port.
            for probe in [&server.startup_probe, &server.readiness_probe, &server.liveness_probe] {
                let probe = probe.as_ref().unwrap();
                match (&probe.grpc, &probe.http_get) {
                    (Some(grpc), None) => assert_eq!(grpc.port, i32::from(ports::GRPC)),
                    (None, Some(get)) => {
                        assert!(m.spec.tls.is_some());
                        assert_eq!(get.port, IntOrString::Int(ports::METRICS.into()));
                    }
                    other => panic!("one probe kind: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn escalation_mounts_its_settings_and_key_and_rolls_the_pods_on_a_change() {
        let plain = deployment(&md("s3://bucket/m/"), &config());
        let template = |d: &Deployment| d.spec.clone().unwrap().template;
        assert_eq!(template(&plain).metadata.unwrap().annotations, None, "nothing added without escalation");

        let mut m = md("s3://bucket/m/");
        m.spec.escalation = Some(
            serde_json::from_value(serde_json::json!({
                "target": {"url": "https://api.example.com/v1", "model": "big",
                           "apiKeySecretRef": {"name": "hosted", "key": "token"}},
            }))
            .unwrap(),
        );
        let d = deployment(&m, &config());
        let meta = template(&d).metadata.unwrap();
        let hash = meta.annotations.unwrap()[escalation::HASH_ANNOTATION].clone();
        assert_eq!(meta.labels.unwrap().get(escalation::ESCALATES_TO_LABEL), None, "a URL target");
        let server = &pod(&d).containers[0];
        let args = server.args.clone().unwrap();
        assert!(
            args.windows(2).any(|w| w == ["--escalation-file", "/etc/ferrite/escalation/escalation.json"]),
            "{args:?}"
        );
        assert!(!args.iter().any(|a| a.contains("hosted") || a.contains("token")), "no secret on the command line");
        assert!(server.env.is_none(), "no secret in the environment");
        let mounts: Vec<_> =
            server.volume_mounts.iter().flatten().map(|m| (m.mount_path.as_str(), m.read_only)).collect();
        assert!(mounts.contains(&("/etc/ferrite/escalation", Some(true))), "{mounts:?}");
        assert!(mounts.contains(&("/var/run/secrets/ferrite/escalation", Some(true))), "{mounts:?}");
        assert_eq!(d.spec.as_ref().unwrap().selector.match_labels, Some(selector_labels(&m)), "selector unchanged");

        // Another setting: another hash, so the pods roll.
        m.spec.escalation.as_mut().unwrap().timeout_seconds = 5.0;
        let again = template(&deployment(&m, &config())).metadata.unwrap().annotations.unwrap();
        assert_ne!(again[escalation::HASH_ANNOTATION], hash);

        // A ModelDeployment target: its label, for the target's NetworkPolicy.
        m.spec.escalation =
            Some(serde_json::from_value(serde_json::json!({"target": {"modelDeployment": "macro"}})).unwrap());
        let labels = template(&deployment(&m, &config())).metadata.unwrap().labels.unwrap();
        assert_eq!(labels[escalation::ESCALATES_TO_LABEL], "macro");
    }

    #[test]
    fn tls_makes_the_http_port_and_endpoint_https() {
        let mut m = md("https://example.org/m.onnx");
        m.spec.tls = Some(TlsSpec { secret_name: "cert".into(), client_auth: false });
        let ports = service(&m).spec.unwrap().ports.unwrap();
        assert_eq!(ports[0].app_protocol.as_deref(), Some("https"));
        assert_eq!(ports[2].app_protocol.as_deref(), Some("http"), "metrics stay plain");
        assert_eq!(endpoints(&m).http, "https://resnet.ml.svc:8000");
    }

    #[test]
    fn service_exposes_three_named_ports() {
        let mut m = md("https://example.org/m.onnx");
        m.spec.model =
            ModelSource { uri: m.spec.model.uri.clone(), name: Some("r50".into()), ..ModelSource::default() };
        let s = service(&m);
        let ports: Vec<_> = s.spec.unwrap().ports.unwrap().into_iter().map(|p| (p.name.unwrap(), p.port)).collect();
        assert_eq!(ports, vec![("http".into(), 8000), ("grpc".into(), 8001), ("metrics".into(), 8002)]);
        assert_eq!(endpoints(&m).grpc, "resnet.ml.svc:8001");
    }
}
