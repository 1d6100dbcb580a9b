//! The contract between `ferrite-operator` and `ferrite-server`: everything
//! the operator relies on when it runs the server in a pod, in one place.
//!
//! - [`ports`]: where the server listens by default (the operator does not
//!   pass port flags; its container ports, probes, Service and metrics
//!   scrapes use these numbers).
//! - [`serve`] and [`fetch`]: the subcommands and [`Flag`]s the operator
//!   puts on the server's and the init container's command lines.
//! - [`metrics`]: the metric families and label the autoscaler reads.
//! - [`exit`]: exit statuses the operator turns into status conditions.
//! - [`ExecutionProvider`]: the provider names of `--execution-provider`.
//!
//! The server's command line is declared with these names, and tests on both
//! sides check against them: the server's (`ferrite-server`'s `main.rs`) that
//! every flag here is an argument of its subcommand with the same arity, the
//! operator's (`resources.rs`) that the pods it builds use only flags from
//! here. A change on one side that the other does not follow fails a test,
//! not a pod.

#![warn(missing_docs)]

mod cache_key;

use std::fmt;
use std::str::FromStr;

/// A long command-line flag of `ferrite-server`: its name, and whether a
/// value follows it (`--max-batch-size 32`) or not (`--exit-on-load-failure`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flag {
    name: &'static str,
    takes_value: bool,
}

impl Flag {
    /// A flag followed by one value.
    pub const fn value(name: &'static str) -> Flag {
        Flag { name, takes_value: true }
    }

    /// A flag that stands alone (a boolean switch).
    pub const fn switch(name: &'static str) -> Flag {
        Flag { name, takes_value: false }
    }

    /// The name without dashes, as clap's `#[arg(long = ...)]` takes it:
    /// `max-batch-size`.
    pub const fn name(self) -> &'static str {
        self.name
    }

    /// Whether a value follows the flag on the command line.
    pub const fn takes_value(self) -> bool {
        self.takes_value
    }

    /// The flag as written on a command line: `--max-batch-size`.
    pub fn arg(self) -> String {
        format!("--{}", self.name)
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--{}", self.name)
    }
}

/// A `ferrite-server` command line under construction: a subcommand, then
/// flags. Each flag is checked against its arity, so a value cannot be
/// forgotten or added by mistake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    args: Vec<String>,
}

impl CommandLine {
    /// `ferrite-server <subcommand>` (without the program name, as a
    /// container's `args`).
    pub fn new(subcommand: &str) -> CommandLine {
        CommandLine { args: vec![subcommand.to_string()] }
    }

    /// Appends `--flag value`.
    ///
    /// # Panics
    /// If `flag` is a [`Flag::switch`].
    pub fn value(mut self, flag: Flag, value: impl Into<String>) -> CommandLine {
        assert!(flag.takes_value, "{flag} takes no value");
        self.args.push(flag.arg());
        self.args.push(value.into());
        self
    }

    /// Appends `--flag`.
    ///
    /// # Panics
    /// If `flag` is a [`Flag::value`].
    pub fn switch(mut self, flag: Flag) -> CommandLine {
        assert!(!flag.takes_value, "{flag} takes a value");
        self.args.push(flag.arg());
        self
    }

    /// The arguments, subcommand first.
    pub fn into_args(self) -> Vec<String> {
        self.args
    }
}

/// Default listening ports of `ferrite-server serve` (Triton's, which users
/// know). The operator passes no port flags and relies on these.
pub mod ports {
    /// The KServe v2 REST API (`--http-port`).
    pub const HTTP: u16 = 8000;
    /// The gRPC API: inference, `grpc.health.v1` (one service per model,
    /// named like the model, which the pods' probes ask), reflection
    /// (`--grpc-port`).
    pub const GRPC: u16 = 8001;
    /// The Prometheus endpoint [`crate::metrics::PATH`] (`--metrics-port`).
    pub const METRICS: u16 = 8002;
}

/// `ferrite-server serve`: the model server container.
pub mod serve {
    use crate::Flag;

    /// The subcommand.
    pub const SUBCOMMAND: &str = "serve";
    /// Directory of models, `<dir>/<model>/<version>/...`.
    pub const MODEL_REPOSITORY: Flag = Flag::value("model-repository");
    /// Exit with [`crate::exit::MODEL_LOAD_FAILED`] when a model fails to
    /// load at startup, instead of staying up and not ready.
    pub const EXIT_ON_LOAD_FAILURE: Flag = Flag::switch("exit-on-load-failure");
    /// Log format: [`LOG_FORMAT_JSON`] or `text` (a global flag, accepted
    /// after the subcommand).
    pub const LOG_FORMAT: Flag = Flag::value("log-format");
    /// The value of [`LOG_FORMAT`] for one JSON object per line.
    pub const LOG_FORMAT_JSON: &str = "json";
    /// Largest dynamic batch; 1 turns batching off.
    pub const MAX_BATCH_SIZE: Flag = Flag::value("max-batch-size");
    /// Longest time, in microseconds, the batcher holds a request.
    pub const MAX_QUEUE_DELAY_US: Flag = Flag::value("max-queue-delay-us");
    /// Requests that may wait per model.
    pub const MAX_QUEUE_SIZE: Flag = Flag::value("max-queue-size");
    /// ONNX Runtime sessions per model.
    pub const INSTANCES: Flag = Flag::value("instances");
    /// Threads per session; 0 derives them from the CPU limit.
    pub const INTRA_OP_THREADS: Flag = Flag::value("intra-op-threads");
    /// One of the [`crate::ExecutionProvider`] names.
    pub const EXECUTION_PROVIDER: Flag = Flag::value("execution-provider");
    /// GPU providers: when the requested provider cannot start, run the
    /// model on the CPU (with a warning) instead of failing its load.
    pub const ALLOW_CPU_FALLBACK: Flag = Flag::switch("allow-cpu-fallback");
    /// GPU providers: the CUDA device ordinal (ONNX Runtime's `device_id`).
    pub const GPU_DEVICE_ID: Flag = Flag::value("gpu-device-id");
    /// GPU providers: most bytes of device memory ONNX Runtime's arena may
    /// take (`gpu_mem_limit`); 0: no limit.
    pub const GPU_MEM_LIMIT_BYTES: Flag = Flag::value("gpu-mem-limit-bytes");
    /// GPU providers: capture and replay CUDA graphs (models with static
    /// input shapes only).
    pub const CUDA_GRAPH: Flag = Flag::switch("cuda-graph");
    /// TensorRT: directory of the engine and timing caches.
    pub const TRT_ENGINE_CACHE_DIR: Flag = Flag::value("trt-engine-cache-dir");
    /// TensorRT: allow FP16 kernels.
    pub const TRT_FP16: Flag = Flag::switch("trt-fp16");
    /// Seconds requests in flight get to finish after SIGTERM.
    pub const SHUTDOWN_GRACE_SECONDS: Flag = Flag::value("shutdown-grace-seconds");
    /// Port of the REST API, default [`crate::ports::HTTP`].
    pub const HTTP_PORT: Flag = Flag::value("http-port");
    /// Port of the gRPC API, default [`crate::ports::GRPC`].
    pub const GRPC_PORT: Flag = Flag::value("grpc-port");
    /// Port of the metrics endpoint, default [`crate::ports::METRICS`].
    pub const METRICS_PORT: Flag = Flag::value("metrics-port");
    /// Whether clients may load and unload models through the repository
    /// API: [`MODEL_CONTROL_NONE`] (the default, refused) or
    /// [`MODEL_CONTROL_EXPLICIT`] (Triton's names).
    pub const MODEL_CONTROL_MODE: Flag = Flag::value("model-control-mode");
    /// [`MODEL_CONTROL_MODE`]: repository load/unload refused.
    pub const MODEL_CONTROL_NONE: &str = "none";
    /// [`MODEL_CONTROL_MODE`]: repository load/unload allowed.
    pub const MODEL_CONTROL_EXPLICIT: &str = "explicit";
    /// PEM certificate chain: gRPC and HTTP then speak TLS only.
    pub const TLS_CERT: Flag = Flag::value("tls-cert");
    /// PEM private key of [`TLS_CERT`].
    pub const TLS_KEY: Flag = Flag::value("tls-key");
    /// PEM CA bundle: clients must present a certificate it signed (mTLS).
    pub const TLS_CLIENT_CA: Flag = Flag::value("tls-client-ca");
    /// File of API keys, one per line: gRPC and HTTP inference calls then
    /// need `authorization: Bearer <key>` (health and metrics stay open).
    pub const API_KEY_FILE: Flag = Flag::value("api-key-file");
    /// JSON file holding an `escalation` object (micro -> macro settings,
    /// the same fields as `ferrite.json`'s `escalation` key, the target
    /// already resolved to a URL): applies to every LLM the server loads,
    /// over what their `ferrite.json` says.
    pub const ESCALATION_FILE: Flag = Flag::value("escalation-file");

    /// Every flag of `serve` in the contract.
    pub const FLAGS: &[Flag] = &[
        MODEL_REPOSITORY,
        EXIT_ON_LOAD_FAILURE,
        LOG_FORMAT,
        MAX_BATCH_SIZE,
        MAX_QUEUE_DELAY_US,
        MAX_QUEUE_SIZE,
        INSTANCES,
        INTRA_OP_THREADS,
        EXECUTION_PROVIDER,
        ALLOW_CPU_FALLBACK,
        GPU_DEVICE_ID,
        GPU_MEM_LIMIT_BYTES,
        CUDA_GRAPH,
        TRT_ENGINE_CACHE_DIR,
        TRT_FP16,
        SHUTDOWN_GRACE_SECONDS,
        HTTP_PORT,
        GRPC_PORT,
        METRICS_PORT,
        MODEL_CONTROL_MODE,
        TLS_CERT,
        TLS_KEY,
        TLS_CLIENT_CA,
        API_KEY_FILE,
        ESCALATION_FILE,
    ];
}

/// `ferrite-server fetch`: the init container that downloads the model.
/// It exits 0 on success and non-zero on failure.
pub mod fetch {
    use crate::Flag;

    /// The subcommand.
    pub const SUBCOMMAND: &str = "fetch";
    /// The model's URI (`http(s)://`, `s3://`, `gs://`, `az://`).
    pub const URI: Flag = Flag::value("uri");
    /// The environment variable that [`URI`] is read from when the flag is
    /// absent: the operator sets it from a Secret for URIs that carry
    /// credentials, which must not appear on a command line.
    pub const URI_ENV: &str = "FERRITE_MODEL_URI";
    /// The model repository to write into.
    pub const DEST: Flag = Flag::value("dest");
    /// The directory under the repository that receives the model (the
    /// served model name).
    pub const MODEL_NAME: Flag = Flag::value("model-name");
    /// Expected SHA-256 (hex) of a single-file model.
    pub const SHA256: Flag = Flag::value("sha256");
    /// Most bytes the fetch may write (downloaded and unpacked together).
    pub const MAX_BYTES: Flag = Flag::value("max-bytes");
    /// Most files the fetch may write.
    pub const MAX_FILES: Flag = Flag::value("max-files");

    /// The node's model cache (a hostPath shared by the pods of a node):
    /// when set, the model is looked up there, downloaded into it under a
    /// file lock when missing, and [`DEST`] is not written: the server
    /// container mounts the cache entry ([`entry_sub_path`]) read-only at
    /// its model repository (see `ferrite_fetch::cache`).
    pub const CACHE_DIR: Flag = Flag::value("cache-dir");
    /// Most bytes the node cache may hold; least recently used entries that
    /// no pod uses are evicted beyond it.
    pub const CACHE_MAX_BYTES: Flag = Flag::value("cache-max-bytes");
    /// Who may share an entry fetched without a SHA-256 (the ModelDeployment's
    /// namespace): entries with a verified SHA-256 are shared across scopes,
    /// the others only within one.
    pub const CACHE_SCOPE: Flag = Flag::value("cache-scope");
    /// The cache entry's file that a serving pod holds a shared `flock` on
    /// for as long as it runs, so that eviction skips the entries in use.
    pub const CACHE_IN_USE_FILE: &str = ".ferrite-in-use";

    pub use crate::cache_key::{entry_key, entry_sub_path, CACHE_ENTRIES_DIR};

    /// Every flag of `fetch` in the contract.
    pub const FLAGS: &[Flag] =
        &[URI, DEST, MODEL_NAME, SHA256, MAX_BYTES, MAX_FILES, CACHE_DIR, CACHE_MAX_BYTES, CACHE_SCOPE];
}

/// `ferrite-operator activator`: the proxy that holds the requests of a
/// ModelDeployment scaled to zero. It listens on the server's ports
/// ([`crate::ports`]), so a Service's endpoints can point at it or at the
/// pods alike, and reports what it holds on [`crate::ports::METRICS`] at
/// [`crate::metrics::PATH`], which the operator's autoscaler scrapes.
pub mod activator {
    use crate::Flag;

    /// The subcommand of `ferrite-operator`.
    pub const SUBCOMMAND: &str = "activator";
    /// `ferrite-operator run`'s flag naming the activator's Service
    /// (`namespace/name`): its ready endpoints are where a scaled-to-zero
    /// model's Service points, and the pods the autoscaler scrapes.
    pub const SERVICE: Flag = Flag::value("activator-service");
    /// Gauge: requests held for a ModelDeployment, by [`NAMESPACE_LABEL`]
    /// and [`NAME_LABEL`].
    pub const HELD_REQUESTS: &str = "ferrite_activator_held_requests";
    /// Counter: requests the activator received for a ModelDeployment (held
    /// or forwarded at once), by [`NAMESPACE_LABEL`] and [`NAME_LABEL`]:
    /// activity that keeps a model from scaling to zero.
    pub const REQUESTS: &str = "ferrite_activator_requests_total";
    /// The ModelDeployment's namespace.
    pub const NAMESPACE_LABEL: &str = "namespace";
    /// The ModelDeployment's name.
    pub const NAME_LABEL: &str = "name";
}

/// `ferrite-operator run`'s settings that name what it puts in model pods.
pub mod operator {
    use crate::Flag;

    /// The ferrite-server image for ModelDeployments whose execution provider
    /// runs on a GPU (`cuda`, `tensorrt`): ONNX Runtime with its CUDA provider
    /// and the CUDA libraries (`make images` writes `ferrite-server-cuda`).
    pub const SERVER_CUDA_IMAGE: Flag = Flag::value("server-cuda-image");
    /// The environment variable of [`SERVER_CUDA_IMAGE`] (the chart sets it
    /// from `serverCudaImage`).
    pub const SERVER_CUDA_IMAGE_ENV: &str = "FERRITE_SERVER_CUDA_IMAGE";
}

/// Health endpoints that the pods' probes use when gRPC probes cannot
/// (`--tls-cert` set: the kubelet's gRPC probe speaks no TLS). They are
/// served in plain HTTP on [`crate::ports::METRICS`], which carries no model
/// data and needs no API key, as well as on the REST port.
pub mod health {
    /// Liveness: 200 while the process serves (the gRPC health service `""`).
    pub const LIVE_PATH: &str = "/v2/health/live";

    /// Readiness of one model: 200 when it serves, 4xx/503 otherwise.
    pub fn model_ready_path(model: &str) -> String {
        format!("/v2/models/{model}/ready")
    }
}

/// Prometheus metrics of `ferrite-server` that the operator's autoscaler
/// reads, on [`crate::ports::METRICS`] at [`PATH`].
pub mod metrics {
    /// The HTTP path of the text exposition.
    pub const PATH: &str = "/metrics";
    /// Gauge: requests (LLMs: sequences) waiting in a model's queue.
    pub const QUEUE_DEPTH: &str = "ferrite_queue_depth";
    /// Gauge: requests (LLMs: sequences) executing on a model.
    pub const INFLIGHT_REQUESTS: &str = "ferrite_inflight_requests";
    /// The label of both gauges that names the model.
    pub const MODEL_LABEL: &str = "model";
    /// Counter: inference requests received, by model and outcome. The
    /// autoscaler sums it: a model whose sum does not move (and whose queue
    /// stays empty) is idle, which scale to zero waits for.
    pub const REQUESTS_TOTAL: &str = "ferrite_requests_total";
    /// Counter: a cascade's decisions per request, by [`OUTCOME_LABEL`]
    /// ([`OUTCOME_LOCAL`], [`OUTCOME_ESCALATED`], [`OUTCOME_FALLBACK`]): the
    /// escalation rate in a ModelDeployment's status.
    pub const CASCADE_DECISIONS: &str = "ferrite_cascade_decisions_total";
    /// The label of [`CASCADE_DECISIONS`] that says how a request was answered.
    pub const OUTCOME_LABEL: &str = "outcome";
    /// Answered by the micro model.
    pub const OUTCOME_LOCAL: &str = "local";
    /// Answered by the escalation target.
    pub const OUTCOME_ESCALATED: &str = "escalated";
    /// Meant for the target, which failed: answered by the micro model.
    pub const OUTCOME_FALLBACK: &str = "fallback";
    /// Gauge: 1 for each loaded model version, labelled by [`MODEL_LABEL`],
    /// `version` and [`PROVIDER_LABEL`].
    pub const MODEL_INFO: &str = "ferrite_model_info";
    /// The label of [`MODEL_INFO`] naming the execution provider a model
    /// actually runs on (`cpu` after an allowed fallback from a GPU).
    pub const PROVIDER_LABEL: &str = "provider";
    /// Gauge: 1 when the last call to a model's escalation target
    /// succeeded, 0 when it failed (absent before the first call).
    pub const ESCALATION_TARGET_UP: &str = "ferrite_escalation_target_up";
}

/// Exit statuses of `ferrite-server` that the operator interprets.
pub mod exit {
    /// `serve` with [`crate::serve::EXIT_ON_LOAD_FAILURE`]: a model failed
    /// to load at startup; the last line of stderr (the container's
    /// termination message) says why.
    pub const MODEL_LOAD_FAILED: i32 = 3;
}

/// An ONNX Runtime execution provider, by the name that
/// [`serve::EXECUTION_PROVIDER`] takes (and that the `ModelDeployment`
/// resource and `ferrite.json` use).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ExecutionProvider {
    /// `cpu`: ONNX Runtime's default CPU provider.
    #[default]
    Cpu,
    /// `cuda`: NVIDIA GPUs through CUDA.
    Cuda,
    /// `tensorrt`: NVIDIA GPUs through TensorRT (CUDA for what it cannot run).
    Tensorrt,
}

impl ExecutionProvider {
    /// Every provider, in the order of the command line's help.
    pub const ALL: [ExecutionProvider; 3] =
        [ExecutionProvider::Cpu, ExecutionProvider::Cuda, ExecutionProvider::Tensorrt];

    /// The name: `cpu`, `cuda` or `tensorrt`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::Tensorrt => "tensorrt",
        }
    }

    /// Whether the provider runs on a GPU (the pod needs one).
    pub const fn uses_gpu(self) -> bool {
        !matches!(self, ExecutionProvider::Cpu)
    }
}

impl fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`ExecutionProvider::ALL`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownExecutionProvider(pub String);

impl fmt::Display for UnknownExecutionProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = ExecutionProvider::ALL.iter().map(|p| p.as_str()).collect();
        write!(f, "unknown execution provider {:?} (expected one of: {})", self.0, names.join(", "))
    }
}

impl std::error::Error for UnknownExecutionProvider {}

impl FromStr for ExecutionProvider {
    type Err = UnknownExecutionProvider;

    /// Parses a name exactly as [`ExecutionProvider::as_str`] writes it.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        ExecutionProvider::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| UnknownExecutionProvider(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn providers_round_trip_by_name() {
        for provider in ExecutionProvider::ALL {
            assert_eq!(provider.as_str().parse::<ExecutionProvider>(), Ok(provider));
            assert_eq!(provider.to_string(), provider.as_str());
        }
        let error = "CUDA".parse::<ExecutionProvider>().unwrap_err();
        assert_eq!(error.to_string(), r#"unknown execution provider "CUDA" (expected one of: cpu, cuda, tensorrt)"#);
        assert!(!ExecutionProvider::Cpu.uses_gpu() && ExecutionProvider::Tensorrt.uses_gpu());
    }

    #[test]
    fn flags_are_unique_lowercase_names_without_dashes() {
        for flags in [serve::FLAGS, fetch::FLAGS] {
            let names: HashSet<_> = flags.iter().map(|f| f.name()).collect();
            assert_eq!(names.len(), flags.len(), "a flag listed twice");
            for flag in flags {
                let name = flag.name();
                assert!(!name.starts_with('-') && !name.ends_with('-'), "{name}");
                assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name}");
                assert_eq!(flag.arg(), format!("--{name}"));
                assert_eq!(flag.to_string(), flag.arg());
            }
        }
    }

    #[test]
    fn command_lines_keep_flag_arity() {
        let args = CommandLine::new(serve::SUBCOMMAND)
            .value(serve::MAX_BATCH_SIZE, "8")
            .switch(serve::EXIT_ON_LOAD_FAILURE)
            .value(serve::EXECUTION_PROVIDER, ExecutionProvider::Cuda.as_str())
            .into_args();
        assert_eq!(args, ["serve", "--max-batch-size", "8", "--exit-on-load-failure", "--execution-provider", "cuda"]);
    }

    #[test]
    #[should_panic(expected = "--exit-on-load-failure takes no value")]
    fn a_switch_refuses_a_value() {
        let _ = CommandLine::new(serve::SUBCOMMAND).value(serve::EXIT_ON_LOAD_FAILURE, "true");
    }

    #[test]
    #[should_panic(expected = "--uri takes a value")]
    fn a_valued_flag_needs_its_value() {
        let _ = CommandLine::new(fetch::SUBCOMMAND).switch(fetch::URI);
    }

    #[test]
    fn ports_are_distinct() {
        let ports = HashSet::from([ports::HTTP, ports::GRPC, ports::METRICS]);
        assert_eq!(ports.len(), 3);
    }
}
