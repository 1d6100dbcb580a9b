//! The `ferrite-server` command line. What the operator passes (flag names,
//! provider names, default ports, the load-failure exit status) comes from
//! `ferrite_contract`; the tests below check the two agree.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ferrite_contract::{self as contract, serve as flags};
use ferrite_server::config::{LlmLimits, ModelSettings};
use ferrite_server::policy::{ModelControlMode, Policy};
use ferrite_server::repository::Sources;
use ferrite_server::runtime::ProviderConfig;
use ferrite_server::server::{serve, ServeOptions};
use ferrite_server::tls::TlsFiles;
use ferrite_server::transport::Limits;

/// ferrite model server: serves ONNX models over the Open Inference Protocol
/// (KServe v2 / Triton) on gRPC and HTTP, with dynamic batching.
#[derive(Parser, Debug)]
#[command(name = "ferrite-server", version)]
struct Cli {
    /// Log format.
    #[arg(
        long = flags::LOG_FORMAT.name(),
        env = "FERRITE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

/// `--execution-provider`: the contract's provider names, listed in `--help`
/// (the library does not depend on clap).
fn provider_parser() -> impl clap::builder::TypedValueParser<Value = contract::ExecutionProvider> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(contract::ExecutionProvider::ALL.map(contract::ExecutionProvider::as_str))
        .map(|name| name.parse::<contract::ExecutionProvider>().expect("one of the possible values"))
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve models until SIGTERM (then drain and exit 0).
    Serve(ServeArgs),
    /// Download a model into a model repository, then exit: what the
    /// operator's init container runs before `serve --model-repository DIR`.
    ///
    /// A URI naming one object is written to DIR/<model-name>/1/<model-file>;
    /// a URI ending with '/' (a prefix) has every object under it copied to
    /// DIR/<model-name>/<relative path>. Cloud clients read the standard
    /// variables (AWS_*, GOOGLE_*, AZURE_*). pvc:// is mounted by the
    /// operator, not fetched. Exit status 0 on success, 1 on failure.
    #[cfg(feature = "fetch")]
    Fetch(FetchArgs),
    /// Print (JSON) the escalation threshold that escalates a given
    /// fraction of the requests a `shadow`-mode log recorded, and how many
    /// escalated and kept answers differ from the macro model's. Exit
    /// status 0 on success, 1 on a missing or malformed log.
    Calibrate(CalibrateArgs),
}

#[derive(Args, Debug)]
struct CalibrateArgs {
    /// The shadow log (JSON lines, `escalation.shadowLog`).
    #[arg(long)]
    shadow_log: PathBuf,
    /// Fraction of requests to escalate, in [0, 1].
    #[arg(long)]
    target_fraction: f64,
    /// Quantile of each answer's token log-probabilities taken as its
    /// confidence (`escalation.confidence.quantile`), in (0, 1].
    #[arg(long, default_value_t = ferrite_server::cascade::calibrate::DEFAULT_QUANTILE)]
    quantile: f64,
}

impl CalibrateArgs {
    /// The report as one JSON line, or the error to print.
    fn run(&self) -> Result<String, String> {
        let text = std::fs::read_to_string(&self.shadow_log)
            .map_err(|e| format!("cannot read {}: {e}", self.shadow_log.display()))?;
        let report = ferrite_server::cascade::calibrate::calibrate(&text, self.target_fraction, self.quantile)
            .map_err(|e| e.to_string())?;
        serde_json::to_string(&report).map_err(|e| e.to_string())
    }
}

#[cfg(feature = "fetch")]
#[derive(Args, Debug)]
struct FetchArgs {
    /// Model to download: http(s)://host/path, s3://bucket/key,
    /// gs://bucket/key, az://container/key (or azure://), file:///path or a
    /// local path. End with '/' to copy a whole prefix (directory). A URI
    /// with credentials (user:password@, a presigned query) is best passed
    /// in the environment (from a Secret); messages never show them.
    #[arg(long, env = contract::fetch::URI_ENV, hide_env_values = true)]
    uri: String,
    /// Model repository to write into.
    #[arg(long, env = "FERRITE_MODEL_DEST")]
    dest: PathBuf,
    /// Directory under DEST that receives the model (the served model name).
    #[arg(long, env = "FERRITE_MODEL_NAME")]
    model_name: String,
    /// File name of a single downloaded object inside <model-name>/1/.
    #[arg(long, env = "FERRITE_MODEL_FILE", default_value = ferrite_fetch::DEFAULT_MODEL_FILE)]
    model_file: String,
    /// Expected SHA-256 (hex) of a single object: a mismatch deletes the
    /// download and fails.
    #[arg(long, env = "FERRITE_MODEL_SHA256")]
    sha256: Option<String>,
    /// Retries of a transient failure (connection, HTTP 5xx/429, cut body), per file.
    #[arg(long, env = "FERRITE_FETCH_RETRIES", default_value_t = 5)]
    retries: u32,
    /// Seconds without data after which a download is retried.
    #[arg(long, env = "FERRITE_FETCH_IDLE_TIMEOUT_SECONDS", default_value_t = 120)]
    idle_timeout_seconds: u64,
    /// Most bytes the fetch may write, downloads and unpacked archive contents
    /// together (default 20 GiB): an endless body or a tar bomb stops there,
    /// the partial output is removed and the fetch fails.
    #[arg(
        long = contract::fetch::MAX_BYTES.name(),
        env = "FERRITE_FETCH_MAX_BYTES",
        default_value_t = ferrite_fetch::DEFAULT_MAX_BYTES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_bytes: u64,
    /// Most files the fetch may write (downloaded or unpacked).
    #[arg(
        long = contract::fetch::MAX_FILES.name(),
        env = "FERRITE_FETCH_MAX_FILES",
        default_value_t = ferrite_fetch::DEFAULT_MAX_FILES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_files: u64,
    /// The node's model cache (a directory shared by the pods of a node):
    /// the model is looked up there, downloaded into it once under a file
    /// lock when missing, and served from its entry `entries/<key>`, which
    /// the operator mounts read-only as the server's model repository;
    /// DEST is not written then. See docs/model-cache.md.
    #[arg(long = contract::fetch::CACHE_DIR.name(), env = "FERRITE_CACHE_DIR", requires = "cache_scope")]
    cache_dir: Option<PathBuf>,
    /// Most bytes the cache's entries may hold: least recently used entries
    /// no pod uses (nor used in the last 10 minutes) are evicted beyond it.
    #[arg(
        long = contract::fetch::CACHE_MAX_BYTES.name(),
        env = "FERRITE_CACHE_MAX_BYTES",
        default_value_t = 50 << 30,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    cache_max_bytes: u64,
    /// Who shares a cache entry fetched without --sha256 (the namespace);
    /// entries with a SHA-256 are shared by all. Required with --cache-dir.
    #[arg(
        long = contract::fetch::CACHE_SCOPE.name(),
        env = "FERRITE_CACHE_SCOPE",
        requires = "cache_dir"
    )]
    cache_scope: Option<String>,
}

#[cfg(feature = "fetch")]
impl FetchArgs {
    /// The cache's settings, with --cache-dir.
    fn cache(&self) -> Option<ferrite_fetch::cache::CacheOptions> {
        let dir = self.cache_dir.clone()?;
        Some(ferrite_fetch::cache::CacheOptions::new(
            dir,
            self.cache_max_bytes,
            self.cache_scope.clone().unwrap_or_default(),
        ))
    }

    fn into_options(self) -> ferrite_fetch::FetchOptions {
        let mut options = ferrite_fetch::FetchOptions::new(self.uri, self.dest, self.model_name);
        options.model_file = self.model_file;
        options.sha256 = self.sha256;
        options.retries = self.retries;
        options.idle_timeout = Duration::from_secs(self.idle_timeout_seconds.max(1));
        options.max_bytes = self.max_bytes;
        options.max_files = self.max_files;
        options
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Model repository: every DIR/<model>/<version>/model.onnx is served;
    /// an optional DIR/<model>/ferrite.json overrides the settings below.
    #[arg(long = flags::MODEL_REPOSITORY.name(), env = "FERRITE_MODEL_REPOSITORY")]
    model_repository: Option<PathBuf>,
    /// Serve one ONNX file, an LLM model directory (with llm.json) or an
    /// encoder model directory (with encoder.json) as NAME (version 1). Repeatable; in the environment, separate entries
    /// with commas.
    #[arg(long = "model", value_name = "NAME=PATH", env = "FERRITE_MODELS", value_delimiter = ',', value_parser = parse_model)]
    models: Vec<(String, PathBuf)>,
    /// Address to listen on. With no model flags at all, the embedded demo
    /// model `demo` is served.
    #[arg(long, env = "FERRITE_HOST", default_value = "0.0.0.0")]
    host: IpAddr,
    /// Port of the KServe v2 REST API.
    #[arg(long = flags::HTTP_PORT.name(), env = "FERRITE_HTTP_PORT", default_value_t = contract::ports::HTTP)]
    http_port: u16,
    /// Port of the gRPC API (inference, health, reflection).
    #[arg(long = flags::GRPC_PORT.name(), env = "FERRITE_GRPC_PORT", default_value_t = contract::ports::GRPC)]
    grpc_port: u16,
    /// Port of the Prometheus /metrics endpoint.
    #[arg(long = flags::METRICS_PORT.name(), env = "FERRITE_METRICS_PORT", default_value_t = contract::ports::METRICS)]
    metrics_port: u16,
    /// Largest dynamic batch; 1 turns batching off. Batching applies to
    /// models whose inputs and outputs all have a dynamic first dimension.
    #[arg(long = flags::MAX_BATCH_SIZE.name(), env = "FERRITE_MAX_BATCH_SIZE", default_value_t = 32)]
    max_batch_size: usize,
    /// Longest time (microseconds) the batcher holds a request to grow a
    /// batch; 0 batches only what is already waiting.
    #[arg(long = flags::MAX_QUEUE_DELAY_US.name(), env = "FERRITE_MAX_QUEUE_DELAY_US", default_value_t = 0)]
    max_queue_delay_us: u64,
    /// Requests that may wait per model; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long = flags::MAX_QUEUE_SIZE.name(), env = "FERRITE_MAX_QUEUE_SIZE", default_value_t = 1024)]
    max_queue_size: usize,
    /// ONNX Runtime sessions per model, each on its own thread.
    #[arg(long = flags::INSTANCES.name(), env = "FERRITE_INSTANCES", default_value_t = 1)]
    instances: usize,
    /// Threads per session; 0 divides the CPUs this container may use
    /// (cgroup quota included) among the instances.
    #[arg(long = flags::INTRA_OP_THREADS.name(), env = "FERRITE_INTRA_OP_THREADS", default_value_t = 0)]
    intra_op_threads: usize,
    /// Execution provider.
    #[arg(
        long = flags::EXECUTION_PROVIDER.name(),
        env = "FERRITE_EXECUTION_PROVIDER",
        value_parser = provider_parser(),
        default_value = contract::ExecutionProvider::Cpu.as_str()
    )]
    execution_provider: contract::ExecutionProvider,
    /// GPU providers: when the requested provider cannot start (no GPU, no
    /// driver, ONNX Runtime without CUDA), load the model on the CPU with a
    /// warning instead of failing the load.
    #[arg(long = flags::ALLOW_CPU_FALLBACK.name(), env = "FERRITE_ALLOW_CPU_FALLBACK")]
    allow_cpu_fallback: bool,
    /// GPU providers: the CUDA device ordinal.
    #[arg(long = flags::GPU_DEVICE_ID.name(), env = "FERRITE_GPU_DEVICE_ID", default_value_t = 0)]
    gpu_device_id: u32,
    /// GPU providers: most bytes of device memory ONNX Runtime's arena may
    /// take; 0: no limit.
    #[arg(long = flags::GPU_MEM_LIMIT_BYTES.name(), env = "FERRITE_GPU_MEM_LIMIT_BYTES", default_value_t = 0)]
    gpu_mem_limit_bytes: u64,
    /// GPU providers: capture the model's launches once as a CUDA graph and
    /// replay it; refused at load for inputs with dynamic shapes.
    #[arg(long = flags::CUDA_GRAPH.name(), env = "FERRITE_CUDA_GRAPH")]
    cuda_graph: bool,
    /// TensorRT: directory of its engine and timing caches (built engines
    /// survive a restart).
    #[arg(long = flags::TRT_ENGINE_CACHE_DIR.name(), env = "FERRITE_TRT_ENGINE_CACHE_DIR")]
    trt_engine_cache_dir: Option<PathBuf>,
    /// TensorRT: allow FP16 kernels.
    #[arg(long = flags::TRT_FP16.name(), env = "FERRITE_TRT_FP16")]
    trt_fp16: bool,
    /// LLMs: longest prompt in bytes of text, refused before tokenizing;
    /// 0: the context length times 16 (or the longest token's bytes).
    #[arg(long, env = "FERRITE_LLM_MAX_PROMPT_BYTES", default_value_t = 0)]
    llm_max_prompt_bytes: usize,
    /// LLMs: most tokens one request may generate; larger `max_tokens` are
    /// refused (400). 0: the model's context length.
    #[arg(long, env = "FERRITE_LLM_MAX_TOKENS", default_value_t = 0)]
    llm_max_tokens: usize,
    /// LLMs: let requests set `ignore_eos` (benchmarks); refused otherwise.
    #[arg(long, env = "FERRITE_LLM_ALLOW_IGNORE_EOS")]
    llm_allow_ignore_eos: bool,
    /// LLMs: bytes of KV cache each engine may hold; requests wait until
    /// theirs fits. 0: the container's memory limit less the loaded model
    /// and a margin.
    #[arg(long, env = "FERRITE_LLM_KV_BUDGET_BYTES", default_value_t = 0)]
    llm_kv_budget_bytes: u64,
    /// LLMs: bytes of the prefix cache (KV blocks of prompts seen, reused by
    /// requests that start the same way), taken from the KV budget; 0 turns
    /// it off. Default: an eighth of the KV budget, at most 1 GiB (at most
    /// half the budget when given).
    #[arg(long, env = "FERRITE_LLM_PREFIX_CACHE_BYTES")]
    llm_prefix_cache_bytes: Option<u64>,
    /// Largest request message, in bytes, on gRPC and HTTP. 32 MiB holds a
    /// batch of 32 RGB 224x224 FP32 images (18.4 MiB) with room; decoding
    /// one takes at most 24x its size (docs/security.md).
    #[arg(long, env = "FERRITE_MAX_MESSAGE_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Budget of the wire bytes of all requests in flight (received,
    /// queued or executing), on gRPC and HTTP together; a request beyond it
    /// gets RESOURCE_EXHAUSTED (HTTP 429). 0: 1/32 of the container's
    /// memory limit (cgroup), or of the machine's memory, and never less
    /// than --max-message-bytes.
    #[arg(long, env = "FERRITE_MAX_INFLIGHT_BYTES", default_value_t = 0)]
    max_inflight_bytes: usize,
    /// Open connections per port (gRPC, HTTP); more are closed at once.
    #[arg(long, env = "FERRITE_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// HTTP/2 streams (requests) at once per connection, gRPC and HTTP.
    #[arg(long, env = "FERRITE_MAX_CONCURRENT_STREAMS", default_value_t = Limits::default().max_concurrent_streams)]
    max_concurrent_streams: u32,
    /// Seconds a new connection has to send its request headers (HTTP/1)
    /// or its HTTP/2 preface (gRPC); then it is closed.
    #[arg(long, env = "FERRITE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = Limits::default().header_read_timeout.as_secs())]
    header_read_timeout_seconds: u64,
    /// Seconds an HTTP request (or a unary gRPC inference call) has to send
    /// its whole body; then 408 (DEADLINE_EXCEEDED).
    #[arg(long, env = "FERRITE_BODY_READ_TIMEOUT_SECONDS", default_value_t = Limits::default().body_read_timeout.as_secs())]
    body_read_timeout_seconds: u64,
    /// Seconds of silence after which the server pings an HTTP/2 connection.
    #[arg(long, env = "FERRITE_HTTP2_KEEPALIVE_INTERVAL_SECONDS", default_value_t = Limits::default().keepalive_interval.as_secs())]
    http2_keepalive_interval_seconds: u64,
    /// Seconds a ping may go unanswered before the connection is closed.
    #[arg(long, env = "FERRITE_HTTP2_KEEPALIVE_TIMEOUT_SECONDS", default_value_t = Limits::default().keepalive_timeout.as_secs())]
    http2_keepalive_timeout_seconds: u64,
    /// Seconds that requests in flight get to finish after SIGTERM.
    #[arg(long = flags::SHUTDOWN_GRACE_SECONDS.name(), env = "FERRITE_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Exit with status 3 when a model fails to load at startup (the
    /// operator sets it, so the pod's status says why) instead of staying up
    /// and not ready.
    #[arg(long = flags::EXIT_ON_LOAD_FAILURE.name(), env = "FERRITE_EXIT_ON_LOAD_FAILURE")]
    exit_on_load_failure: bool,
    /// The ONNX Runtime shared library (libonnxruntime.so).
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = "libonnxruntime.so")]
    onnxruntime: PathBuf,
    /// Whether clients may load and unload models through the repository
    /// API (gRPC RepositoryModelLoad/Unload, HTTP POST
    /// /v2/repository/models/*/load|unload): `none` refuses them
    /// (FAILED_PRECONDITION, HTTP 403), `explicit` allows them.
    #[arg(
        long = flags::MODEL_CONTROL_MODE.name(),
        env = "FERRITE_MODEL_CONTROL_MODE",
        value_parser = model_control_parser(),
        default_value = flags::MODEL_CONTROL_NONE
    )]
    model_control_mode: ModelControlMode,
    /// Honour the `priority` request parameter (1: ahead of every other
    /// request). Without it any client could jump the queue, so a priority
    /// is served as the default one. Server-only: the operator does not set it.
    #[arg(long, env = "FERRITE_ALLOW_PRIORITY")]
    allow_priority: bool,
    /// PEM certificate chain: the gRPC and HTTP ports then speak TLS only
    /// (the metrics port stays plain HTTP). Needs --tls-key.
    #[arg(long = flags::TLS_CERT.name(), env = "FERRITE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = flags::TLS_KEY.name(), env = "FERRITE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients must present a certificate it signed (mutual
    /// TLS). Needs --tls-cert.
    #[arg(long = flags::TLS_CLIENT_CA.name(), env = "FERRITE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// File of API keys, one per line (blank lines and # comments ignored):
    /// gRPC and HTTP calls then need `authorization: Bearer <key>`, except
    /// health checks; the metrics port needs none.
    #[arg(long = flags::API_KEY_FILE.name(), env = "FERRITE_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// JSON file of an `escalation` object (docs/escalation.md): micro ->
    /// macro escalation for every LLM served, over their ferrite.json's
    /// `escalation` key. Checked at start.
    #[arg(long = flags::ESCALATION_FILE.name(), env = "FERRITE_ESCALATION_FILE")]
    escalation_file: Option<PathBuf>,
}

/// `--model-control-mode`: the contract's names, listed in `--help`.
fn model_control_parser() -> impl clap::builder::TypedValueParser<Value = ModelControlMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(ModelControlMode::ALL.map(ModelControlMode::as_str))
        .map(|name| name.parse::<ModelControlMode>().expect("one of the possible values"))
}

fn parse_model(value: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = value.split_once('=').ok_or("expected NAME=PATH")?;
    if name.is_empty() || path.is_empty() {
        return Err("expected NAME=PATH".into());
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

impl ServeArgs {
    fn into_options(self) -> ServeOptions {
        let files: BTreeMap<String, PathBuf> = self.models.into_iter().collect();
        let embedded = (self.model_repository.is_none() && files.is_empty())
            .then_some((ferrite_server::DEMO_MODEL_NAME.to_string(), ferrite_server::DEMO_MODEL));
        ServeOptions {
            grpc_addr: SocketAddr::new(self.host, self.grpc_port),
            http_addr: SocketAddr::new(self.host, self.http_port),
            metrics_addr: SocketAddr::new(self.host, self.metrics_port),
            sources: Sources { repository: self.model_repository, files, embedded },
            defaults: ModelSettings {
                max_batch_size: self.max_batch_size.max(1),
                max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
                max_queue_size: self.max_queue_size.max(1),
                instance_count: self.instances.max(1),
                intra_op_threads: self.intra_op_threads,
                execution_provider: self.execution_provider,
                llm: LlmLimits {
                    max_prompt_bytes: self.llm_max_prompt_bytes,
                    max_tokens: self.llm_max_tokens,
                    allow_ignore_eos: self.llm_allow_ignore_eos,
                    kv_budget_bytes: self.llm_kv_budget_bytes,
                    prefix_cache_bytes: self.llm_prefix_cache_bytes,
                },
            },
            max_message_bytes: self.max_message_bytes,
            max_inflight_bytes: match self.max_inflight_bytes {
                0 => ferrite_server::config::default_inflight_bytes(),
                set => set,
            }
            .max(self.max_message_bytes),
            limits: Limits {
                max_connections: self.max_connections.max(1),
                max_concurrent_streams: self.max_concurrent_streams.max(1),
                header_read_timeout: Duration::from_secs(self.header_read_timeout_seconds.max(1)),
                body_read_timeout: Duration::from_secs(self.body_read_timeout_seconds.max(1)),
                keepalive_interval: Duration::from_secs(self.http2_keepalive_interval_seconds.max(1)),
                keepalive_timeout: Duration::from_secs(self.http2_keepalive_timeout_seconds.max(1)),
            },
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            onnxruntime: self.onnxruntime,
            providers: ProviderConfig {
                device_id: self.gpu_device_id,
                gpu_mem_limit: Some(self.gpu_mem_limit_bytes).filter(|&b| b > 0),
                cuda_graph: self.cuda_graph,
                trt_engine_cache_dir: self.trt_engine_cache_dir,
                trt_fp16: self.trt_fp16,
                allow_cpu_fallback: self.allow_cpu_fallback,
            },
            exit_on_load_failure: self.exit_on_load_failure,
            policy: Policy { model_control: self.model_control_mode, allow_priority: self.allow_priority },
            tls: self.tls_cert.zip(self.tls_key).map(|(cert, key)| TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            api_key_file: self.api_key_file,
            escalation_file: self.escalation_file,
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => {
            let options = args.into_options();
            if options.sources.embedded.is_some() {
                tracing::info!("no model given: serving the embedded demo model 'demo'");
            }
            // Held until the process exits: the node cache's eviction skips
            // the entries this server reads.
            let in_use = match &options.sources.repository {
                Some(repository) => Some(ferrite_server::model_cache::hold_in_use_locks(repository)?),
                None => None,
            };
            for path in in_use.iter().flat_map(|locks| locks.paths()) {
                tracing::info!("model cache: holding {} while serving", path.display());
            }
            match serve(options).await {
                Err(error) if error.is::<ferrite_server::server::ModelLoadFailure>() => {
                    tracing::error!(%error, "exiting");
                    // Also the container's termination message, for the operator.
                    eprintln!("{error}");
                    std::process::exit(contract::exit::MODEL_LOAD_FAILED);
                }
                other => other,
            }
        }
        #[cfg(feature = "fetch")]
        Command::Fetch(args) => match run_fetch(args).await {
            Ok(()) => Ok(()),
            Err(error) => {
                // One line, credentials already removed.
                eprintln!("error: {error}");
                std::process::exit(1);
            }
        },
        Command::Calibrate(args) => match args.run() {
            Ok(report) => {
                println!("{report}");
                Ok(())
            }
            Err(error) => {
                eprintln!("error: {error}");
                std::process::exit(1);
            }
        },
    }
}

/// `fetch`, through the node cache with --cache-dir.
#[cfg(feature = "fetch")]
async fn run_fetch(args: FetchArgs) -> Result<(), ferrite_fetch::FetchError> {
    match args.cache() {
        Some(cache) => ferrite_fetch::cache::fetch_cached(&args.into_options(), &cache).await.map(drop),
        None => ferrite_fetch::fetch(&args.into_options()).await.map(drop),
    }
}

/// The command line against `ferrite_contract`: what the operator passes must
/// be what this binary accepts. The operator's side (its `resources.rs`)
/// checks that its pods use only the contract's flags.
#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Checks that every contract flag is an argument of the subcommand (a
    /// global one counts) with the contract's arity.
    fn assert_flags(subcommand: &str, flags: &[contract::Flag]) {
        let mut cli = Cli::command();
        cli.build();
        let command = cli.find_subcommand(subcommand).unwrap_or_else(|| panic!("no subcommand `{subcommand}`"));
        for flag in flags {
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(flag.name()))
                .unwrap_or_else(|| panic!("`ferrite-server {subcommand}` has no {flag}, which ferrite-contract names"));
            assert_eq!(
                arg.get_action().takes_values(),
                flag.takes_value(),
                "{flag}: the contract says it takes a value: {}",
                flag.takes_value()
            );
        }
    }

    #[test]
    fn serve_accepts_every_contract_flag() {
        assert_flags(contract::serve::SUBCOMMAND, contract::serve::FLAGS);
    }

    #[cfg(feature = "fetch")]
    #[test]
    fn fetch_accepts_every_contract_flag() {
        assert_flags(contract::fetch::SUBCOMMAND, contract::fetch::FLAGS);
    }

    #[test]
    fn provider_and_log_format_values_are_the_contracts() {
        let mut cli = Cli::command();
        cli.build();
        let serve = cli.find_subcommand(contract::serve::SUBCOMMAND).unwrap();
        let values = |flag: contract::Flag| -> Vec<String> {
            let arg = serve.get_arguments().find(|a| a.get_long() == Some(flag.name())).unwrap();
            arg.get_possible_values().iter().map(|v| v.get_name().to_string()).collect()
        };
        let providers: Vec<_> = contract::ExecutionProvider::ALL.iter().map(|p| p.to_string()).collect();
        assert_eq!(values(flags::EXECUTION_PROVIDER), providers);
        assert!(values(flags::LOG_FORMAT).contains(&flags::LOG_FORMAT_JSON.to_string()));
        assert_eq!(values(flags::MODEL_CONTROL_MODE), [flags::MODEL_CONTROL_NONE, flags::MODEL_CONTROL_EXPLICIT]);
    }

    fn serve_options(args: &[&str]) -> Result<ServeOptions, clap::Error> {
        let cli = Cli::try_parse_from(["ferrite-server", "serve"].iter().chain(args))?;
        match cli.command {
            Command::Serve(args) => Ok(args.into_options()),
            #[allow(unreachable_patterns)]
            _ => unreachable!("parsed `serve`"),
        }
    }

    /// Model control is off unless asked for; TLS needs a certificate and
    /// its key together.
    #[test]
    fn safe_defaults_and_tls_flags() {
        let options = serve_options(&[]).unwrap();
        assert_eq!(options.policy, Policy::default());
        assert_eq!(options.policy.model_control, ModelControlMode::None);
        assert!(!options.policy.allow_priority);
        assert!(options.tls.is_none() && options.api_key_file.is_none());
        let options = serve_options(&["--model-control-mode", "explicit", "--allow-priority"]).unwrap();
        assert_eq!(options.policy, Policy { model_control: ModelControlMode::Explicit, allow_priority: true });
        assert!(serve_options(&["--model-control-mode", "poll"]).is_err());
        assert!(serve_options(&["--tls-cert", "c.pem"]).is_err());
        assert!(serve_options(&["--tls-key", "k.pem"]).is_err());
        assert!(serve_options(&["--tls-client-ca", "ca.pem"]).is_err());
        let options =
            serve_options(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]).unwrap();
        let tls = options.tls.unwrap();
        assert_eq!(tls.client_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
    }

    /// `calibrate` reads a shadow log and reports; a missing log is an error
    /// naming the file.
    #[test]
    fn calibrate_reads_a_shadow_log() {
        let path = std::env::temp_dir().join(format!("ferrite-calibrate-{}.jsonl", std::process::id()));
        let log = concat!(
            r#"{"logprobs": [-2.0, -0.1], "micro": {"text": "Lyon"}, "macro": {"text": "Paris"}}"#,
            "\n",
            r#"{"logprobs": [-0.1], "micro": {"text": "Paris"}, "macro": {"text": "paris"}}"#,
            "\n"
        );
        std::fs::write(&path, log).unwrap();
        let parse = |extra: &[&str]| {
            let base = ["ferrite-server", "calibrate", "--shadow-log", path.to_str().unwrap()];
            match Cli::try_parse_from(base.iter().chain(extra)).map(|cli| cli.command) {
                Ok(Command::Calibrate(args)) => Ok(args),
                Ok(other) => panic!("parsed {other:?}"),
                Err(e) => Err(e),
            }
        };
        assert!(parse(&[]).is_err(), "--target-fraction is required");
        let args = parse(&["--target-fraction", "0.5"]).unwrap();
        assert_eq!(args.quantile, ferrite_server::cascade::calibrate::DEFAULT_QUANTILE);
        let report: serde_json::Value = serde_json::from_str(&args.run().unwrap()).unwrap();
        assert_eq!(report["records"], 2);
        assert_eq!(report["escalated"], 1);
        assert_eq!(report["escalated_disagree"], 1);
        assert_eq!(report["kept_disagree"], 0);
        let args = parse(&["--target-fraction", "0.5", "--quantile", "0"]).unwrap();
        assert!(args.run().unwrap_err().contains("--quantile"));
        std::fs::remove_file(&path).unwrap();
        let missing = parse(&["--target-fraction", "0.5"]).unwrap().run().unwrap_err();
        assert!(missing.starts_with("cannot read ") && missing.contains("ferrite-calibrate-"), "{missing}");
    }

    /// A command line as the operator builds it parses, and means what the
    /// contract says: the provider by name, the default ports.
    #[test]
    fn the_operators_command_line_parses() {
        for provider in contract::ExecutionProvider::ALL {
            let args = contract::CommandLine::new(contract::serve::SUBCOMMAND)
                .value(flags::MODEL_REPOSITORY, "/models")
                .switch(flags::EXIT_ON_LOAD_FAILURE)
                .value(flags::LOG_FORMAT, flags::LOG_FORMAT_JSON)
                .value(flags::MAX_BATCH_SIZE, "8")
                .value(flags::MAX_QUEUE_DELAY_US, "100")
                .value(flags::MAX_QUEUE_SIZE, "16")
                .value(flags::INSTANCES, "2")
                .value(flags::INTRA_OP_THREADS, "3")
                .value(flags::EXECUTION_PROVIDER, provider.as_str())
                .value(flags::SHUTDOWN_GRACE_SECONDS, "30")
                .into_args();
            let cli = Cli::try_parse_from(std::iter::once("ferrite-server".to_string()).chain(args)).unwrap();
            assert!(matches!(cli.log_format, LogFormat::Json));
            let options = match cli.command {
                Command::Serve(args) => args.into_options(),
                #[allow(unreachable_patterns)]
                _ => unreachable!("parsed `serve`"),
            };
            assert_eq!(options.defaults.execution_provider, provider);
            assert!(options.exit_on_load_failure);
            assert_eq!(options.defaults.max_batch_size, 8);
            let ports = [options.http_addr.port(), options.grpc_addr.port(), options.metrics_addr.port()];
            assert_eq!(ports, [contract::ports::HTTP, contract::ports::GRPC, contract::ports::METRICS]);
        }
    }
}
