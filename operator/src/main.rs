//! The `ferrite-operator` command line.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};
use ferrite_operator::run::{run, RunOptions};
use kube::CustomResourceExt;

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
    Run(RunArgs),
    /// Print the ModelDeployment CustomResourceDefinition as YAML.
    Crdgen,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// ferrite-server image for model pods (a ModelDeployment may override it).
    #[arg(long, env = "FERRITE_SERVER_IMAGE", default_value = concat!("ferrite-server:", env!("CARGO_PKG_VERSION")))]
    server_image: String,
    /// Pull policy of that image (Always, IfNotPresent, Never); empty leaves it to Kubernetes.
    #[arg(long, env = "FERRITE_SERVER_IMAGE_PULL_POLICY", default_value = "")]
    server_image_pull_policy: String,
    /// Watch only this namespace; empty watches all.
    #[arg(long, env = "FERRITE_WATCH_NAMESPACE", default_value = "")]
    watch_namespace: String,
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
            print!("{}", serde_yaml::to_string(&ferrite_operator::crd::ModelDeployment::crd())?);
            Ok(())
        }
        Command::Run(args) => {
            init_logging(cli.log_format);
            let identity = lease_identity(args.identity);
            run(RunOptions {
                server_image: args.server_image,
                server_image_pull_policy: Some(args.server_image_pull_policy).filter(|p| !p.is_empty()),
                watch_namespace: Some(args.watch_namespace).filter(|ns| !ns.is_empty()),
                metrics_addr: args.metrics_addr,
                lease_name: args.lease_name,
                lease_namespace: args.lease_namespace,
                identity,
            })
            .await
        }
    }
}
