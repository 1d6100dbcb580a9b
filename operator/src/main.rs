//! The `ferrite-operator` command line.

use std::net::SocketAddr;
use std::time::Duration;

use std::collections::BTreeMap;

use clap::{Args, Parser, Subcommand};
use ferrite_operator::activator::ActivatorOptions;
use ferrite_operator::crd::ModelCache;
use ferrite_operator::policy::{self, Policy};
use ferrite_operator::resources::network_policy::{self, MetricsScrapers};
use ferrite_operator::resources::ModelCacheConfig;
use ferrite_operator::run::{run, RunOptions};

/// ferrite operator: reconciles ModelDeployments into ferrite-server pods and
/// scales them on the depth of their request queues.
#[derive(Parser, Debug)]
#[command(name = "ferrite-operator", version)]
struct Cli {
    /// Log format.
    #[arg(long, env = "FERRITE_LOG_FORMAT", value_enum, default_value = "json", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator (leader election, controller, autoscaler).
    Run(Box<RunArgs>),
    /// Print the ModelDeployment CustomResourceDefinition as YAML.
    Crdgen,
    /// Hold the requests of ModelDeployments that have no ready pod and
    /// forward them once one is (scale from zero).
    #[command(name = ferrite_contract::activator::SUBCOMMAND)]
    Activator(ActivatorArgs),
}

/// Flags of `ferrite-operator activator`.
#[derive(Args, Debug)]
struct ActivatorArgs {
    /// Port of HTTP/1.1 and h2c requests (the server's HTTP port).
    #[arg(long, env = "FERRITE_ACTIVATOR_HTTP_PORT", default_value_t = ferrite_contract::ports::HTTP)]
    http_port: u16,
    /// Port of gRPC (h2c) requests.
    #[arg(long, env = "FERRITE_ACTIVATOR_GRPC_PORT", default_value_t = ferrite_contract::ports::GRPC)]
    grpc_port: u16,
    /// Port of /metrics, /healthz and /readyz.
    #[arg(long, env = "FERRITE_ACTIVATOR_METRICS_PORT", default_value_t = ferrite_contract::ports::METRICS)]
    metrics_port: u16,
    /// Address the three ports listen on.
    #[arg(long, env = "FERRITE_ACTIVATOR_HOST", default_value = "0.0.0.0")]
    host: std::net::IpAddr,
    /// Pods' port that HTTP requests are forwarded to.
    #[arg(long, env = "FERRITE_ACTIVATOR_POD_HTTP_PORT", default_value_t = ferrite_contract::ports::HTTP)]
    pod_http_port: u16,
    /// Pods' port that gRPC requests are forwarded to.
    #[arg(long, env = "FERRITE_ACTIVATOR_POD_GRPC_PORT", default_value_t = ferrite_contract::ports::GRPC)]
    pod_grpc_port: u16,
    /// Most requests held per ModelDeployment; more get HTTP 429 / gRPC
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "FERRITE_ACTIVATOR_MAX_HELD", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    max_held: u32,
    /// Longest hold in seconds; a shorter gRPC `grpc-timeout` wins. Past it:
    /// HTTP 504 / gRPC DEADLINE_EXCEEDED. At most a day.
    #[arg(long, env = "FERRITE_ACTIVATOR_HOLD_TIMEOUT_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    hold_timeout_seconds: u64,
    /// Watched namespace (repeatable, or comma-separated); none: all.
    #[arg(long = "namespace", env = "FERRITE_WATCH_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Seconds it keeps serving after SIGTERM, not ready, while the
    /// endpoints pointing at it are updated.
    #[arg(long, env = "FERRITE_ACTIVATOR_SHUTDOWN_DELAY_SECONDS", default_value_t = 5)]
    shutdown_delay_seconds: u64,
    /// Then, the longest wait for open requests (held ones included).
    #[arg(long, env = "FERRITE_ACTIVATOR_DRAIN_SECONDS", default_value_t = 45)]
    drain_seconds: u64,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// ferrite-server image for model pods (a ModelDeployment may override it).
    #[arg(long, env = "FERRITE_SERVER_IMAGE", default_value = concat!("ferrite-server:", env!("CARGO_PKG_VERSION")))]
    server_image: String,
    /// ferrite-server image for model pods on GPUs (executionProvider cuda or
    /// tensorrt): the CUDA build (a ModelDeployment's spec.image still wins).
    #[arg(
        long = ferrite_contract::operator::SERVER_CUDA_IMAGE.name(),
        env = ferrite_contract::operator::SERVER_CUDA_IMAGE_ENV,
        default_value = concat!("ferrite-server-cuda:", env!("CARGO_PKG_VERSION"))
    )]
    server_cuda_image: String,
    /// Pull policy of these images (Always, IfNotPresent, Never); empty leaves it to Kubernetes.
    #[arg(long, env = "FERRITE_SERVER_IMAGE_PULL_POLICY", default_value = "")]
    server_image_pull_policy: String,
    /// Watch only these namespaces (comma-separated); empty watches all.
    /// Namespaced watches need only Roles in these namespaces.
    #[arg(
        long,
        alias = "watch-namespace",
        env = "FERRITE_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    watch_namespaces: Vec<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    model_cache: ModelCacheArgs,
    /// Labels of the operator's own pods (`k=v,k2=v2`), which a
    /// ModelDeployment's NetworkPolicy lets reach the metrics port; empty:
    /// every pod of the operator's namespace.
    #[arg(long, env = "FERRITE_OPERATOR_POD_LABELS", default_value = "", value_parser = network_policy::parse_labels)]
    operator_pod_labels: Labels,
    /// Labels of Prometheus's namespace (`k=v,...`); with
    /// --prometheus-pod-labels, who else may scrape model pods when a
    /// NetworkPolicy guards them. Both empty: no Prometheus.
    #[arg(long, env = "FERRITE_PROMETHEUS_NAMESPACE_LABELS", default_value = "", value_parser = network_policy::parse_labels)]
    prometheus_namespace_labels: Labels,
    /// Labels of Prometheus's pods (`k=v,...`).
    #[arg(long, env = "FERRITE_PROMETHEUS_POD_LABELS", default_value = "", value_parser = network_policy::parse_labels)]
    prometheus_pod_labels: Labels,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "FERRITE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "FERRITE_LEASE_NAME", default_value = "ferrite-operator-leader")]
    lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's name in the Lease (the pod name); defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The activator's Service, `namespace/name`: ModelDeployments with
    /// `minReplicas: 0` scale to zero, their requests held by its pods.
    /// Without it they are kept at one replica.
    #[arg(long = ferrite_contract::activator::SERVICE.name(), env = "FERRITE_ACTIVATOR_SERVICE", value_parser = parse_service_ref)]
    activator_service: Option<(String, String)>,
}

/// `namespace/name`.
fn parse_service_ref(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{text:?} is not namespace/name")),
    }
}

type Labels = BTreeMap<String, String>;

/// The node model cache (docs/model-cache.md).
#[derive(Args, Debug)]
struct ModelCacheArgs {
    /// spec.model.cache of a ModelDeployment that does not set it: none
    /// (each pod downloads) or node (the node's cache).
    #[arg(long, env = "FERRITE_MODEL_CACHE_DEFAULT", default_value = "none")]
    model_cache_default: ModelCache,
    /// The node directory holding the cache (a hostPath on every node,
    /// existing and writable by uid 65532); empty: no cache.
    #[arg(long, env = "FERRITE_MODEL_CACHE_HOST_PATH", default_value = "")]
    model_cache_host_path: String,
    /// Most bytes each node's cache holds (e.g. 50Gi); least recently used
    /// entries no pod uses are evicted beyond it.
    #[arg(long, env = "FERRITE_MODEL_CACHE_MAX_BYTES", default_value = "50Gi", value_parser = parse_byte_count)]
    model_cache_max_bytes: u64,
}

impl ModelCacheArgs {
    fn into_config(self) -> ModelCacheConfig {
        ModelCacheConfig {
            default: self.model_cache_default,
            host_path: Some(self.model_cache_host_path).filter(|p| !p.trim().is_empty()),
            max_bytes: self.model_cache_max_bytes,
        }
    }
}

/// The operator policy: what a ModelDeployment may ask for. A
/// ModelDeployment outside it gets Ready=False, reason PolicyViolation, and
/// no pods.
#[derive(Args, Debug)]
struct PolicyArgs {
    /// Prefixes spec.image must start with (comma-separated); the
    /// repository of --server-image is always allowed. Empty: only that one.
    #[arg(long, env = "FERRITE_POLICY_ALLOWED_IMAGE_PREFIXES", value_delimiter = ',', default_value = "")]
    allowed_image_prefixes: Vec<String>,
    /// Environment names spec.env may not set (comma-separated; a trailing
    /// `*` matches any suffix), besides LD_*, ORT_* and FERRITE_*, which are
    /// always denied.
    #[arg(long, env = "FERRITE_POLICY_DENIED_ENV", value_delimiter = ',', default_value = "")]
    denied_env: Vec<String>,
    /// Service types spec.service.type may ask for (comma-separated).
    #[arg(long, env = "FERRITE_POLICY_ALLOWED_SERVICE_TYPES", value_delimiter = ',', default_value = "ClusterIP")]
    allowed_service_types: Vec<String>,
    /// Most replicas (spec.replicas, spec.autoscaling.maxReplicas).
    #[arg(long, env = "FERRITE_POLICY_MAX_REPLICAS", default_value_t = Policy::default().max_replicas)]
    max_replicas: i32,
    /// Largest spec.batching.maxBatchSize.
    #[arg(long, env = "FERRITE_POLICY_MAX_BATCH_SIZE", default_value_t = Policy::default().max_batch_size)]
    max_batch_size: i32,
    /// Largest spec.batching.maxQueueSize.
    #[arg(long, env = "FERRITE_POLICY_MAX_QUEUE_SIZE", default_value_t = Policy::default().max_queue_size)]
    max_queue_size: i32,
    /// Largest spec.runtime.instances.
    #[arg(long, env = "FERRITE_POLICY_MAX_INSTANCES", default_value_t = Policy::default().max_instances)]
    max_instances: i32,
    /// Most bytes a model download may write (e.g. 20Gi): the default and
    /// the maximum of spec.model.maxSize, and the model volume's size limit.
    #[arg(long, env = "FERRITE_POLICY_MODEL_MAX_BYTES", default_value = "20Gi", value_parser = parse_byte_count)]
    model_max_bytes: u64,
    /// Most files a model download may write: the default and the maximum
    /// of spec.model.maxFiles.
    #[arg(long, env = "FERRITE_POLICY_MODEL_MAX_FILES", default_value_t = Policy::default().model_max_files)]
    model_max_files: u64,
}

fn parse_byte_count(text: &str) -> Result<u64, String> {
    policy::parse_bytes(text).ok_or_else(|| format!("{text:?} is not a byte count (e.g. 512Mi, 20Gi)"))
}

/// The flags' list values without the empty entries an empty string gives.
fn non_empty(values: Vec<String>) -> Vec<String> {
    values.into_iter().map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect()
}

impl PolicyArgs {
    fn into_policy(self) -> Policy {
        Policy {
            allowed_image_prefixes: non_empty(self.allowed_image_prefixes),
            denied_env: non_empty(self.denied_env),
            allowed_service_types: non_empty(self.allowed_service_types),
            max_replicas: self.max_replicas,
            max_batch_size: self.max_batch_size,
            max_queue_size: self.max_queue_size,
            max_instances: self.max_instances,
            model_max_bytes: self.model_max_bytes,
            model_max_files: self.model_max_files,
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The identity this process holds the Lease under: the pod (or host) name and a
/// suffix unique to this process start, as client-go does. A container restarted
/// in the same pod after a crash must wait for the lease to expire like any
/// other replica, not resume a leadership whose state died with its predecessor.
fn lease_identity(pod_name: Option<String>) -> String {
    let name = pod_name.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "ferrite-operator".to_string())
    });
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{name}_{:08x}", nanos ^ std::process::id().rotate_left(16))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => {
            print!("{}", ferrite_operator::crd::crd_yaml()?);
            Ok(())
        }
        Command::Activator(args) => {
            init_logging(cli.log_format);
            let addr = |port| SocketAddr::new(args.host, port);
            ferrite_operator::activator::run(ActivatorOptions {
                http_addr: addr(args.http_port),
                grpc_addr: addr(args.grpc_port),
                metrics_addr: addr(args.metrics_port),
                pod_http_port: args.pod_http_port,
                pod_grpc_port: args.pod_grpc_port,
                max_held: args.max_held as usize,
                hold_timeout: Duration::from_secs(args.hold_timeout_seconds),
                namespaces: non_empty(args.namespaces),
                shutdown_delay: Duration::from_secs(args.shutdown_delay_seconds),
                drain_timeout: Duration::from_secs(args.drain_seconds),
            })
            .await
        }
        Command::Run(args) => {
            let args = *args;
            init_logging(cli.log_format);
            let identity = lease_identity(args.identity);
            run(RunOptions {
                server_image: args.server_image,
                server_cuda_image: args.server_cuda_image,
                server_image_pull_policy: Some(args.server_image_pull_policy).filter(|p| !p.is_empty()),
                watch_namespaces: non_empty(args.watch_namespaces),
                policy: args.policy.into_policy(),
                model_cache: args.model_cache.into_config(),
                scrapers: MetricsScrapers {
                    operator_namespace: args.lease_namespace.clone(),
                    operator_pod_labels: args.operator_pod_labels,
                    prometheus: (!args.prometheus_namespace_labels.is_empty()
                        || !args.prometheus_pod_labels.is_empty())
                    .then_some((args.prometheus_namespace_labels, args.prometheus_pod_labels)),
                    activator_namespace: args.activator_service.as_ref().map(|(ns, _)| ns.clone()),
                },
                metrics_addr: args.metrics_addr,
                lease_name: args.lease_name,
                lease_namespace: args.lease_namespace,
                identity,
                activator_service: args.activator_service,
            })
            .await
        }
    }
}
