//! The `ModelDeployment` custom resource (`ferrite.dev/v1alpha1`): what a
//! user writes, and the status the operator reports.
//!
//! Every field has a description (shown by `kubectl explain`) and defaults
//! live in the schema. Cross-field rules are CEL `x-kubernetes-validations`,
//! so the API server refuses a bad spec with a clear message and no webhook
//! is needed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

mod escalation;
pub use escalation::{ConfidenceSignal, EscalationMode, EscalationSpec, EscalationStatus, EscalationTarget, Pricing};

/// A model served by ferrite-server pods, scaled on the depth of their
/// request queues.
// Each `printcolumn(...)` repeats the same keys, which clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ferrite.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "mdep",
    category = "ferrite",
    namespaced,
    status = "ModelDeploymentStatus",
    doc = "A model served by ferrite-server pods over the Open Inference Protocol, scaled on queue depth.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why Ready is what it is: ModelServing, ScaledToZero (idle, requests held by the activator), ScalingFromZero, or a problem"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Ready replicas"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas"),
    printcolumn(
        name = "Queue",
        type_ = "integer",
        json_path = ".status.queueDepth",
        description = "Queued plus in-flight requests"
    ),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoints.grpc"),
    printcolumn(
        name = "Escalated",
        type_ = "number",
        json_path = ".status.escalation.rate",
        description = "Fraction of requests escalated over spec.escalation.windowSeconds",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[kube(validation = Rule::new("!has(self.spec.escalation) || !has(self.spec.escalation.target.modelDeployment) || self.spec.escalation.target.modelDeployment != self.metadata.name").message("spec.escalation.target.modelDeployment must name another ModelDeployment, not this one"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || self.autoscaling.minReplicas != 0 || !has(self.tls)").message("spec.autoscaling.minReplicas 0 (scale to zero) cannot be combined with spec.tls: while the model is at zero its requests go through the activator, which proxies plain HTTP and h2c and cannot terminate the pods' TLS"))]
#[x_kube(validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("spec.replicas and spec.autoscaling are exclusive: set a fixed replica count or autoscaling, not both"))]
#[x_kube(validation = Rule::new("!has(self.gpus) || self.gpus == 0 || self.runtime.executionProvider != 'cpu'").message("spec.gpus needs spec.runtime.executionProvider cuda or tensorrt"))]
#[x_kube(validation = Rule::new("self.runtime.executionProvider == 'cpu' || (has(self.gpus) && self.gpus > 0)").message("executionProvider cuda or tensorrt needs spec.gpus of 1 or more"))]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Where the model comes from.
    pub model: ModelSource,
    /// How ONNX Runtime runs the model.
    #[serde(default)]
    pub runtime: RuntimeSpec,
    /// Dynamic batching and the request queue.
    #[serde(default)]
    pub batching: BatchingSpec,
    /// CPU and memory for the server container (requests and limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// GPUs per replica (`nvidia.com/gpu`); needs executionProvider cuda or tensorrt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.gpus must not be negative"))]
    pub gpus: Option<i32>,
    /// A fixed number of replicas. Exclusive with `autoscaling`; also the
    /// target of the scale subresource for users who run an HPA or KEDA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.replicas must not be negative"))]
    pub replicas: Option<i32>,
    /// Built-in autoscaling on queue depth. Exclusive with `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Where the pods may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// The ferrite-server image; defaults to the operator's own setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy of the server and fetch containers (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']").message("spec.imagePullPolicy must be Always, IfNotPresent or Never"))]
    pub image_pull_policy: Option<String>,
    /// Extra environment variables of the server container (and of the
    /// fetch container, for object-store credentials).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// The Service in front of the pods.
    #[serde(default)]
    pub service: ServiceOptions,
    /// TLS on the gRPC and HTTP ports, from a cert-manager-style Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// API keys for inference calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// A NetworkPolicy owned by the ModelDeployment; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,
    /// Micro -> macro escalation (LLM models only): requests the model
    /// should not answer go to a bigger one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<EscalationSpec>,
}

/// Where the model comes from.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.uri) != has(self.uriFrom)").message("set exactly one of spec.model.uri and spec.model.uriFrom"))]
pub struct ModelSource {
    /// Model location: `http(s)://`, `s3://`, `gs://`, `az://` (downloaded by
    /// an init container), or `pvc://<claim>/<path>` (mounted read-only). A
    /// URI ending in `/` is a directory: `<version>/model.onnx`, an optional
    /// `ferrite.json`, or an LLM model directory. It lands in the pod spec, so
    /// it must carry no credentials: use `uriFrom` for those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^(https?|s3|gs|az|pvc)://.+')").message("spec.model.uri must start with http://, https://, s3://, gs://, az:// or pvc://"))]
    #[x_kube(validation = Rule::new("!self.matches('^[a-z0-9]+://[^/?#]*@') && !self.contains('?')").message("spec.model.uri must not carry credentials (user:password@ or a query string such as a presigned URL): put the URI in a Secret and reference it with spec.model.uriFrom"))]
    pub uri: Option<String>,
    /// The model's URI from a Secret key, for URIs that carry credentials
    /// (presigned URLs, `user:password@`). The fetch init container reads it
    /// from an environment variable; it never appears in the pod spec. Not
    /// for `pvc://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_from: Option<UriSource>,
    /// Name clients use for the model; defaults to the ModelDeployment's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z0-9][a-zA-Z0-9_.-]*$')").message("spec.model.name may hold letters, digits, '_', '.' and '-'"))]
    pub name: Option<String>,
    /// Expected SHA-256 of a single-file model, checked after download.
    /// Without it an `http://` download gets a Warning event (nothing
    /// authenticates what arrives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("spec.model.sha256 must be 64 lowercase hex digits"))]
    pub sha256: Option<String>,
    /// Most bytes the download may write (archive and unpacked files
    /// together), e.g. `2Gi`; also the size limit of the model volume.
    /// Defaults to the operator's `--model-max-bytes`, which is also the most
    /// it may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[1-9][0-9]*(Ki|Mi|Gi|Ti|k|M|G|T)?$')").message("spec.model.maxSize must be a whole number of bytes with an optional suffix Ki, Mi, Gi, Ti, k, M, G or T (e.g. 2Gi)"))]
    pub max_size: Option<String>,
    /// Most files the download may write. Defaults to the operator's
    /// `--model-max-files`, which is also the most it may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.model.maxFiles must be at least 1"))]
    pub max_files: Option<i64>,
    /// Where the pods keep the downloaded model: `node` shares one copy per
    /// node (a directory of the node, see docs/model-cache.md: a second pod
    /// on the node starts without downloading), `none` downloads it into
    /// each pod. Defaults to the operator's `--model-cache-default` (chart
    /// value `modelCache.default`). Ignored for `pvc://` (mounted, never
    /// downloaded), when the operator has no cache directory
    /// (`--model-cache-host-path`), and with `uriFrom` (the entry's name
    /// depends on the URI, which stays in the Secret).
    /// A model with a `sha256` shares its entry with every namespace that
    /// names the same content; without one, only within this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ModelCache>,
}

/// Where the pods keep the downloaded model (`spec.model.cache`).
#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelCache {
    // Plain comments: documented variants would make a `oneOf` schema.
    // In each pod's own volume: every pod downloads it.
    #[default]
    None,
    // In the node's model cache, shared by the pods of the node.
    Node,
}

impl std::str::FromStr for ModelCache {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(ModelCache::None),
            "node" => Ok(ModelCache::Node),
            other => Err(format!("model cache '{other}': expected none or node")),
        }
    }
}

/// Where a value comes from (like an environment variable's `valueFrom`).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UriSource {
    /// A key of a Secret in the ModelDeployment's namespace.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret in the ModelDeployment's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && size(self) <= 253").message("a Secret name must be a DNS subdomain"))]
    pub name: String,
    /// The key within the Secret.
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$') && size(self) <= 253").message("a Secret key may hold letters, digits, '-', '_' and '.'"))]
    pub key: String,
}

/// TLS of the server's gRPC and HTTP ports.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A Secret in the ModelDeployment's namespace with `tls.crt` and
    /// `tls.key` (and `ca.crt` for `clientAuth`), as cert-manager writes
    /// them. Mounted as files; the server reloads nothing, so a renewed
    /// certificate takes a rollout (or a pod restart).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && size(self) <= 253").message("spec.tls.secretName must be a DNS subdomain"))]
    pub secret_name: String,
    /// Require client certificates signed by the Secret's `ca.crt` (mutual TLS).
    #[serde(default)]
    pub client_auth: bool,
}

/// Who may call the model.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// A Secret key holding API keys, one per line: inference calls then need
    /// `authorization: Bearer <key>` (health and metrics stay open).
    pub api_key_secret_ref: SecretKeyRef,
}

/// A NetworkPolicy in front of the pods: who may reach the model ports and
/// the metrics port. Enforced only where the cluster's network plugin
/// enforces NetworkPolicies.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Who may reach the HTTP and gRPC ports. Each peer selects namespaces
    /// and/or pods (both: those pods in those namespaces). Empty: pods of
    /// the ModelDeployment's own namespace only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<NetworkPeer>,
    /// Who else may reach the metrics port, besides the operator and the
    /// Prometheus the operator is configured with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_from: Vec<NetworkPeer>,
}

/// Namespaces and/or pods allowed in (a NetworkPolicy peer without ipBlock).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.namespaceSelector) || has(self.podSelector)").message("a network peer needs namespaceSelector, podSelector or both"))]
pub struct NetworkPeer {
    /// Namespaces by label (`{}`: every namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods by label, in the selected namespaces (or, alone, in the
    /// ModelDeployment's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// ONNX Runtime execution provider.
#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    Cuda,
    Tensorrt,
}

impl ExecutionProvider {
    /// The name `ferrite-server --execution-provider` takes (the contract's).
    pub fn as_str(self) -> &'static str {
        ferrite_contract::ExecutionProvider::from(self).as_str()
    }
}

/// The resource's providers are the server's: each converts to the contract's
/// (exhaustive both ways, so a provider added on one side does not compile
/// until the other has it; a test checks the names agree).
impl From<ExecutionProvider> for ferrite_contract::ExecutionProvider {
    fn from(provider: ExecutionProvider) -> Self {
        match provider {
            ExecutionProvider::Cpu => ferrite_contract::ExecutionProvider::Cpu,
            ExecutionProvider::Cuda => ferrite_contract::ExecutionProvider::Cuda,
            ExecutionProvider::Tensorrt => ferrite_contract::ExecutionProvider::Tensorrt,
        }
    }
}

impl From<ferrite_contract::ExecutionProvider> for ExecutionProvider {
    fn from(provider: ferrite_contract::ExecutionProvider) -> Self {
        match provider {
            ferrite_contract::ExecutionProvider::Cpu => ExecutionProvider::Cpu,
            ferrite_contract::ExecutionProvider::Cuda => ExecutionProvider::Cuda,
            ferrite_contract::ExecutionProvider::Tensorrt => ExecutionProvider::Tensorrt,
        }
    }
}

/// How ONNX Runtime runs the model.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// cpu, cuda or tensorrt. cuda and tensorrt need `gpus`.
    #[serde(default)]
    pub execution_provider: ExecutionProvider,
    /// Threads per ONNX Runtime session; 0 derives them from the CPU limit.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.runtime.intraOpThreads must not be negative"))]
    pub intra_op_threads: i32,
    /// ONNX Runtime sessions per replica, each on its own thread.
    #[serde(default = "default_instances")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.runtime.instances must be at least 1"))]
    pub instances: i32,
    /// GPU providers: when the provider cannot start (no GPU, no driver),
    /// run the model on the CPU with a warning instead of failing the pod;
    /// the model's config and `ferrite_model_info{provider}` then say `cpu`.
    #[serde(default)]
    pub allow_cpu_fallback: bool,
    /// GPU providers: most bytes of device memory ONNX Runtime's arena may
    /// take (`gpu_mem_limit`); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.runtime.gpuMemoryLimitBytes must not be negative"))]
    pub gpu_memory_limit_bytes: Option<i64>,
    /// GPU providers: capture the model's kernel launches once as a CUDA
    /// graph and replay it (models whose inputs have static shapes only).
    #[serde(default)]
    pub cuda_graph: bool,
    /// tensorrt: allow FP16 kernels (engines are cached in the pod's /tmp).
    #[serde(default)]
    pub tensorrt_fp16: bool,
}

fn default_instances() -> i32 {
    1
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        RuntimeSpec {
            execution_provider: ExecutionProvider::Cpu,
            intra_op_threads: 0,
            instances: default_instances(),
            allow_cpu_fallback: false,
            gpu_memory_limit_bytes: None,
            cuda_graph: false,
            tensorrt_fp16: false,
        }
    }
}

/// Dynamic batching and the request queue of each replica.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Largest batch the dynamic batcher forms; 1 turns batching off.
    #[serde(default = "default_max_batch_size")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.batching.maxBatchSize must be at least 1"))]
    pub max_batch_size: i32,
    /// Longest time the batcher may hold a request to grow a batch.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.batching.maxQueueDelayMicroseconds must not be negative"))]
    pub max_queue_delay_microseconds: i64,
    /// Requests that may wait per replica before new ones are refused.
    #[serde(default = "default_max_queue_size")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.batching.maxQueueSize must be at least 1"))]
    pub max_queue_size: i32,
}

fn default_max_batch_size() -> i32 {
    32
}
fn default_max_queue_size() -> i32 {
    1024
}

impl Default for BatchingSpec {
    fn default() -> Self {
        BatchingSpec {
            max_batch_size: default_max_batch_size(),
            max_queue_delay_microseconds: 0,
            max_queue_size: default_max_queue_size(),
        }
    }
}

/// Built-in autoscaling: `ceil((queued + in-flight) / targetQueueDepth)`
/// replicas, within `minReplicas..maxReplicas`; with `minReplicas: 0`, zero
/// after `scaleToZeroAfterSeconds` without a request (see
/// docs/scale-to-zero.md).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("spec.autoscaling.minReplicas must not exceed maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.scaleToZeroAfterSeconds) || self.minReplicas == 0").message("spec.autoscaling.scaleToZeroAfterSeconds needs minReplicas 0: it is the idle time before scaling to zero, which only minReplicas 0 allows"))]
pub struct AutoscalingSpec {
    /// Fewest replicas. 0 scales the model to zero once it has been idle for
    /// `scaleToZeroAfterSeconds`; its requests are then held by the
    /// activator, and the first one scales it up again (needs the chart's
    /// activator; not with `spec.tls`).
    #[serde(default = "default_min_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.autoscaling.minReplicas must not be negative (0 scales to zero when idle)"))]
    pub min_replicas: i32,
    /// Most replicas.
    #[x_kube(validation = Rule::new("self >= 1").message("spec.autoscaling.maxReplicas must be at least 1"))]
    pub max_replicas: i32,
    /// Queued plus in-flight requests one replica should carry.
    #[serde(default = "default_target_queue_depth")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.autoscaling.targetQueueDepth must be at least 1"))]
    pub target_queue_depth: i32,
    /// Seconds a higher replica count must be wanted before scaling up (0: at once).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.autoscaling.scaleUpStabilizationSeconds must not be negative"))]
    pub scale_up_stabilization_seconds: i32,
    /// Seconds a lower replica count must be wanted before scaling down.
    #[serde(default = "default_scale_down_stabilization")]
    #[x_kube(validation = Rule::new("self >= 0").message("spec.autoscaling.scaleDownStabilizationSeconds must not be negative"))]
    pub scale_down_stabilization_seconds: i32,
    /// Seconds between scrapes of the pods' metrics.
    #[serde(default = "default_scrape_interval")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 300").message("spec.autoscaling.scrapeIntervalSeconds must be between 1 and 300"))]
    pub scrape_interval_seconds: i32,
    /// With `minReplicas: 0`: seconds without any request (no new request
    /// on the pods or the activator, nothing queued or in flight) before the
    /// model scales to zero. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.autoscaling.scaleToZeroAfterSeconds must be at least 1"))]
    pub scale_to_zero_after_seconds: Option<i32>,
}

/// `scaleToZeroAfterSeconds` when `minReplicas` is 0 and it is not set.
pub const DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS: i32 = 300;

impl AutoscalingSpec {
    /// Whether the spec asks for scale to zero (`minReplicas: 0`).
    pub fn scales_to_zero(&self) -> bool {
        self.min_replicas == 0
    }

    /// The idle time before scaling to zero, when the spec asks for it.
    pub fn scale_to_zero_after(&self) -> Option<std::time::Duration> {
        self.scales_to_zero().then(|| {
            let seconds = self.scale_to_zero_after_seconds.unwrap_or(DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS).max(1);
            std::time::Duration::from_secs(seconds as u64)
        })
    }
}

fn default_min_replicas() -> i32 {
    1
}
fn default_target_queue_depth() -> i32 {
    8
}
fn default_scale_down_stabilization() -> i32 {
    120
}
fn default_scrape_interval() -> i32 {
    5
}

/// Where the pods may run.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node labels the pods require.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate (GPU pods also tolerate `nvidia.com/gpu`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// The Service in front of the pods.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceOptions {
    /// ClusterIP (default), NodePort or LoadBalancer.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['ClusterIP', 'NodePort', 'LoadBalancer']").message("spec.service.type must be ClusterIP, NodePort or LoadBalancer"))]
    pub type_: Option<String>,
    /// Annotations of the Service (for load balancers, meshes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What the operator observed.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the current Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Pods ready to serve.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas wanted: the fixed count or the autoscaler's decision.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Queued plus in-flight requests over all ready pods, at the last scrape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i64>,
    /// When the autoscaler last changed the replica count (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// Label selector of the pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// In-cluster addresses of the model's APIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// Escalations over the last window, with `spec.escalation` (mode
    /// cascade or shadow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<EscalationStatus>,
    /// Ready, Progressing and Degraded, with reasons; with `spec.escalation`
    /// also EscalationTargetReachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// In-cluster addresses of the model's APIs.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// Open Inference Protocol over gRPC, `host:port`.
    pub grpc: String,
    /// KServe v2 REST, `http://host:port`.
    pub http: String,
}

impl ModelDeployment {
    /// Name clients use for the model.
    pub fn model_name(&self) -> String {
        self.spec.model.name.clone().unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }
}

/// The CRD as `ferrite-operator crdgen` prints it (`manifests/crd.yaml`),
/// with every object's keys sorted: the text must not depend on whether
/// serde_json's `preserve_order` is on, which a workspace build turns on
/// for every crate when one dependency asks for it (llguidance does).
///
/// Plain words that YAML 1.1 reads as booleans (`off`, `on`, `yes`, `no`,
/// `y`, `n`) are quoted: serde_yaml writes YAML 1.2 and leaves them bare,
/// but kubectl and Helm read YAML 1.1, and would turn the enum value `off`
/// of `spec.escalation.mode` into `false`.
pub fn crd_yaml() -> anyhow::Result<String> {
    use kube::CustomResourceExt;
    let mut value = serde_json::to_value(ModelDeployment::crd())?;
    value.sort_all_objects();
    Ok(quote_yaml11_booleans(&serde_yaml::to_string(&value)?))
}

/// Quotes list items and mapping values that are exactly a YAML 1.1 boolean
/// word (see [`crd_yaml`]); lines inside block scalars (descriptions) are
/// left alone.
fn quote_yaml11_booleans(text: &str) -> String {
    const WORDS: &[&str] = &["y", "n", "yes", "no", "on", "off"];
    let mut out = String::with_capacity(text.len());
    // The indentation of the block scalar being read, if any.
    let mut block: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if block.is_some_and(|b| indent > b || line.trim().is_empty()) {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        block = None;
        let trimmed = line.trim_end();
        let (head, word) = match trimmed.rsplit_once(": ") {
            Some((key, word)) => (format!("{key}: "), word),
            _ => match trimmed.trim_start().strip_prefix("- ") {
                Some(word) => (format!("{}- ", &trimmed[..indent]), word),
                None => (String::new(), ""),
            },
        };
        if WORDS.contains(&word.to_ascii_lowercase().as_str()) {
            out.push_str(&format!("{head}'{word}'\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
        if trimmed.ends_with('|') || trimmed.ends_with("|-") || trimmed.ends_with('>') || trimmed.ends_with(">-") {
            block = Some(indent);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_11_booleans_are_quoted_outside_block_scalars() {
        let text = "enum:\n- cascade\n- off\nmode: on\ndescription: |-\n  - off\n  no\nx: offline\n";
        assert_eq!(
            quote_yaml11_booleans(text),
            "enum:\n- cascade\n- 'off'\nmode: 'on'\ndescription: |-\n  - off\n  no\nx: offline\n"
        );
        let crd = crd_yaml().unwrap();
        assert!(crd.contains("- 'off'"), "the mode enum");
        // The same document as before, for a YAML 1.2 reader.
        let reread: serde_json::Value = serde_yaml::from_str(&crd).unwrap();
        let mut value = serde_json::to_value(<ModelDeployment as kube::CustomResourceExt>::crd()).unwrap();
        value.sort_all_objects();
        assert_eq!(reread, value);
    }

    /// The resource spells each provider as the server's command line does,
    /// and its schema allows exactly the contract's providers.
    #[test]
    fn execution_providers_are_the_contracts() {
        for provider in ferrite_contract::ExecutionProvider::ALL {
            let ours = ExecutionProvider::from(provider);
            assert_eq!(serde_json::to_value(ours).unwrap(), provider.as_str());
            assert_eq!(serde_json::from_value::<ExecutionProvider>(provider.as_str().into()).unwrap(), ours);
            assert_eq!(ours.as_str(), provider.as_str());
        }
        let schema = serde_json::to_value(schemars::schema_for!(ExecutionProvider)).unwrap();
        let names: Vec<&str> = ferrite_contract::ExecutionProvider::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(schema["enum"], serde_json::json!(names), "{schema}");
    }
}
