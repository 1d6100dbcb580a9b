//! Test harness: a real control plane (etcd, kube-apiserver,
//! kube-controller-manager built from pinned Go modules by `e2e/`), shared
//! by the tests of one binary, plus helpers to run the operator binary and
//! wait for conditions.
//!
//! Missing binaries fail the tests under `CI=true` and skip them loudly
//! otherwise (`make control-plane` builds them).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A running control plane.
pub struct ControlPlane {
    pub state_dir: PathBuf,
    pub kubeconfig: PathBuf,
}

static CONTROL_PLANE: OnceLock<Option<ControlPlane>> = OnceLock::new();

fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1" | "yes"))
}

/// The shared control plane, started on first use; `None` when the
/// binaries are missing outside CI (the test then returns after a loud
/// notice).
pub fn control_plane() -> Option<&'static ControlPlane> {
    CONTROL_PLANE.get_or_init(start_control_plane).as_ref()
}

fn start_control_plane() -> Option<ControlPlane> {
    let root = repo_root();
    let bin_dir = Command::new("bash")
        .arg(root.join("e2e/build-control-plane.sh"))
        .arg("--print-bin-dir")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let present = bin_dir
        .as_ref()
        .is_some_and(|dir| ["etcd", "kube-apiserver", "kube-controller-manager"].iter().all(|b| dir.join(b).is_file()));
    if !present {
        let message = format!(
            "the control-plane binaries are missing from {bin_dir:?}: run `make control-plane` \
             (these tests need a real API server)"
        );
        if in_ci() {
            panic!("CI=true: {message}");
        }
        eprintln!("\n!!!!!!!! SKIPPED, NOT PASSED: {message} !!!!!!!!\n");
        return None;
    }
    let output = Command::new("bash")
        .arg(root.join("e2e/start-apiserver.sh"))
        .args(["start", "--controller-manager"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run e2e/start-apiserver.sh");
    assert!(output.status.success(), "the control plane did not start");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("start-apiserver.sh printed no {key}: {stdout}"))
    };
    let plane = ControlPlane { state_dir: value("STATE_DIR"), kubeconfig: value("KUBECONFIG") };
    // The test process has no teardown hook: a detached reaper stops the
    // control plane once this process is gone (so it is never waited for).
    #[allow(clippy::zombie_processes)]
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; exec bash {script} stop {state}",
            pid = std::process::id(),
            script = root.join("e2e/start-apiserver.sh").display(),
            state = plane.state_dir.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the control-plane reaper");
    Some(plane)
}

use std::os::unix::process::CommandExt;

impl ControlPlane {
    /// A client for this test (clients are bound to the test's runtime).
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).expect("client")
    }

    /// The client configuration of the kubeconfig.
    pub async fn config(&self) -> Config {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig is valid")
    }
}

/// A stand-in for one pod's ferrite-server metrics on `<ip>:8002` (the
/// port the operator scrapes), with a load the test sets: `(queued,
/// in-flight)` of model `model`.
pub async fn fake_pod_metrics(model: &'static str) -> (String, std::sync::Arc<std::sync::Mutex<(u64, u64)>>) {
    let load = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64)));
    // A loopback address of its own: other tests (and other test
    // processes on this machine) take 127.0.0.N.
    let listener = {
        let mut found = None;
        for n in 1..=254 {
            if let Ok(l) = tokio::net::TcpListener::bind(format!("127.0.77.{n}:8002")).await {
                found = Some(l);
                break;
            }
        }
        found.expect("a free 127.0.77.N:8002")
    };
    let ip = listener.local_addr().unwrap().ip().to_string();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get({
            let load = load.clone();
            move || async move {
                let (queued, inflight) = *load.lock().unwrap();
                format!(
                    "# TYPE ferrite_queue_depth gauge\nferrite_queue_depth{{model=\"{model}\"}} {queued}\n\
                     # TYPE ferrite_inflight_requests gauge\nferrite_inflight_requests{{model=\"{model}\"}} {inflight}\n"
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (ip, load)
}

/// Plays kubelet for `pod`: Running and Ready at `ip`.
pub async fn make_ready(pods: &Api<k8s_openapi::api::core::v1::Pod>, pod: &str, ip: &str) {
    let now = chrono::Utc::now().to_rfc3339();
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    }});
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status)).await.expect("patch pod status");
}

/// Installs (or updates) the CRD from `manifests/crd.yaml` and waits until
/// it is established.
pub async fn install_crd(client: &Client) {
    let text = std::fs::read_to_string(repo_root().join("manifests/crd.yaml")).expect("manifests/crd.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD YAML");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch("modeldeployments.ferrite.dev", &PatchParams::apply("ferrite-tests").force(), &Patch::Apply(&crd))
        .await
        .expect("apply CRD");
    eventually("the CRD is established", Duration::from_secs(30), || async {
        let crd = api.get("modeldeployments.ferrite.dev").await.ok()?;
        crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
}

/// Creates a fresh namespace for one test.
pub async fn namespace(client: &Client, name: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
    // The API server needs the default service account for nothing here,
    // but namespaces are usable at once.
    name.to_string()
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `ferrite-operator run` process, killed on drop.
pub struct Operator {
    pub child: Child,
    pub metrics_port: u16,
    pub identity: String,
}

impl Operator {
    /// Starts the operator for one namespace, with its own lease.
    pub fn start(plane: &ControlPlane, namespace: &str, identity: &str) -> Operator {
        let lease = format!("ferrite-{namespace}");
        let args = ["--watch-namespace", namespace, "--lease-name", &lease, "--lease-namespace", namespace];
        Operator::start_with(&plane.kubeconfig, namespace, identity, &args)
    }

    /// Starts the operator with `kubeconfig` and the given `run` flags (a
    /// log file named after `log_name` and `identity`).
    pub fn start_with(kubeconfig: &Path, log_name: &str, identity: &str, args: &[&str]) -> Operator {
        let metrics_port = free_port();
        let log =
            std::fs::File::create(std::env::temp_dir().join(format!("ferrite-operator-{log_name}-{identity}.log")))
                .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ferrite-operator"))
            .args(["--log-format", "text", "run"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--identity", identity])
            .args(["--server-image", "ferrite-server:test"])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ferrite-operator");
        Operator { child, metrics_port, identity: identity.to_string() }
    }

    /// The operator's /metrics text.
    pub async fn metrics(&self) -> Option<String> {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await.ok()?.text().await.ok()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        send_signal(self.child.id() as i32, "TERM");
        self.child.wait().expect("wait for operator")
    }
}

fn send_signal(pid: i32, signal: &str) {
    let _ = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Control plane, a client with the CRD installed, a fresh namespace named
/// after the test; `None` when the control plane is missing (said loudly).
pub async fn setup(test: &str) -> Option<(&'static ControlPlane, Client, String)> {
    let plane = control_plane()?;
    let client = plane.client().await;
    install_crd(&client).await;
    let ns = namespace(&client, test).await;
    Some((plane, client, ns))
}

/// A ModelDeployment named `name` with `spec`.
pub fn model_deployment(name: &str, spec: serde_json::Value) -> ferrite_operator::crd::ModelDeployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "ferrite.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("valid ModelDeployment")
}

/// Creates `md` in `ns`.
pub async fn create(
    client: &Client,
    ns: &str,
    md: &ferrite_operator::crd::ModelDeployment,
) -> ferrite_operator::crd::ModelDeployment {
    kube::Api::namespaced(client.clone(), ns).create(&kube::api::PostParams::default(), md).await.expect("create")
}

/// A binary of the control plane's build (kubectl, helm, ...).
pub fn k8s_bin(name: &str) -> PathBuf {
    let dir = std::process::Command::new("bash")
        .arg(repo_root().join("e2e/build-control-plane.sh"))
        .arg("--print-bin-dir")
        .output()
        .expect("build-control-plane.sh --print-bin-dir");
    PathBuf::from(String::from_utf8_lossy(&dir.stdout).trim()).join(name)
}
