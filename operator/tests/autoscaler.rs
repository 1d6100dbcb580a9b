//! The autoscaler against a real API server and real ferrite-server
//! processes: the Deployment controller creates pods (no kubelet runs
//! them), and the test plays kubelet - for each pod it starts a
//! ferrite-server on its own loopback address 127.0.0.N and writes that
//! address and readiness into the pod's status. Real requests fill the real
//! queues; the operator must scale up, then back down, with no request lost.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_operator::crd::ModelDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use support::{eventually, install_crd, namespace, repo_root, Operator};

const MODEL: &str = "slow_q64";
const SCRAPE_INTERVAL_SECONDS: u64 = 1;

/// A ferrite-server standing in for one pod.
struct PodServer(Child);

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the test model repository with the slow model only.
fn slow_model_repository() -> Option<PathBuf> {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    let server = root.join("target/debug/ferrite-server");
    let ort =
        std::env::var("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or(root.join(".cache/onnxruntime/libonnxruntime.so"));
    for (path, how) in [(&python, "make venv"), (&server, "make build"), (&ort, "make ort")] {
        if !path.exists() {
            let message = format!("{} is missing: run `{how}`", path.display());
            if matches!(std::env::var("CI").as_deref(), Ok("true")) {
                panic!("CI=true: {message}");
            }
            eprintln!("\n!!!!!!!! SKIPPED, NOT PASSED: {message} !!!!!!!!\n");
            return None;
        }
    }
    let all = std::env::temp_dir().join(format!("ferrite-autoscaler-models-{}", std::process::id()));
    let status = Command::new(&python)
        .arg(root.join("scripts/make_test_models.py"))
        .arg(&all)
        .stdout(Stdio::null())
        .status()
        .expect("run make_test_models.py");
    assert!(status.success(), "make_test_models.py failed");
    let repo = all.join("only-slow");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::rename(all.join(MODEL), repo.join(MODEL)).unwrap();
    Some(repo)
}

fn start_pod_server(ip: &str, repo: &PathBuf) -> PodServer {
    let root = repo_root();
    let ort =
        std::env::var("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or(root.join(".cache/onnxruntime/libonnxruntime.so"));
    let log = std::fs::File::create(std::env::temp_dir().join(format!("ferrite-pod-{ip}.log"))).unwrap();
    let child = Command::new(root.join("target/debug/ferrite-server"))
        .args(["serve", "--host", ip, "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"])
        .arg("--model-repository")
        .arg(repo)
        .env("ORT_DYLIB_PATH", ort)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ferrite-server");
    PodServer(child)
}

async fn server_ready(http: &reqwest::Client, ip: &str) -> bool {
    let url = format!("http://{ip}:8000/v2/health/ready");
    matches!(http.get(url).send().await, Ok(r) if r.status().is_success())
}

/// Plays kubelet: every pod of the ModelDeployment without a server gets
/// one on the next free 127.0.0.N, then a Running, Ready status with that IP.
async fn attach_servers(
    pods: &Api<Pod>,
    servers: &mut HashMap<String, (String, PodServer)>,
    repo: &PathBuf,
    http: &reqwest::Client,
) {
    let list = pods.list(&ListParams::default().labels("ferrite.dev/model-deployment=scaler")).await.unwrap();
    for pod in list.items {
        let name = pod.name_any();
        if servers.contains_key(&name) || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ip = format!("127.0.0.{}", 10 + servers.len());
        let server = start_pod_server(&ip, repo);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server_ready(http, &ip).await {
            assert!(Instant::now() < deadline, "ferrite-server on {ip} did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let now = chrono::Utc::now().to_rfc3339();
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        }});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
        servers.insert(name, (ip, server));
    }
}

fn replicas(deployment: &Deployment) -> i32 {
    deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

#[tokio::test]
async fn scales_up_on_a_queue_burst_and_back_down_after_the_window() {
    let Some(plane) = support::control_plane() else { return };
    let Some(repo) = slow_model_repository() else { return };
    let client = plane.client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "autoscaler").await;
    let _operator = Operator::start(plane, &ns, "op-a");

    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "scaler"},
        "spec": {
            "model": {"uri": "s3://models/slow.onnx", "name": MODEL},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4,
                            "scrapeIntervalSeconds": SCRAPE_INTERVAL_SECONDS, "scaleDownStabilizationSeconds": 5},
        },
    }))
    .unwrap();
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    mds.create(&PostParams::default(), &md).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let http = reqwest::Client::new();
    let mut servers: HashMap<String, (String, PodServer)> = HashMap::new();

    eventually("the first pod exists", Duration::from_secs(60), || async {
        (!pods.list(&ListParams::default().labels("ferrite.dev/model-deployment=scaler")).await.ok()?.items.is_empty())
            .then_some(())
    })
    .await;
    attach_servers(&pods, &mut servers, &repo, &http).await;
    eventually("one ready replica", Duration::from_secs(60), || async {
        let d = deployments.get("scaler").await.ok()?;
        (d.status?.ready_replicas? == 1).then_some(())
    })
    .await;
    // Let the autoscaler see the idle pod first.
    tokio::time::sleep(Duration::from_secs(2 * SCRAPE_INTERVAL_SECONDS)).await;
    assert_eq!(replicas(&deployments.get("scaler").await.unwrap()), 1, "idle: min replicas");

    // The burst: 32 clients keep the first pod's queue full.
    let first_ip = servers.values().next().unwrap().0.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (stop, ok, failed, http, ip) = (stop.clone(), ok.clone(), failed.clone(), http.clone(), first_ip.clone());
        clients.push(tokio::spawn(async move {
            let body =
                json!({"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5f32; 64]}]});
            while !stop.load(Ordering::SeqCst) {
                let response = http
                    .post(format!("http://{ip}:8000/v2/models/{MODEL}/infer"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    let burst = Instant::now();
    let scaled_up = eventually("the autoscaler scales up", Duration::from_secs(30), || async {
        (replicas(&deployments.get("scaler").await.ok()?) > 1).then(Instant::now)
    })
    .await;
    let burst_to_write = scaled_up - burst;
    eprintln!(
        "queue burst -> scale-up write: {:.2} s (scrape interval {SCRAPE_INTERVAL_SECONDS} s)",
        burst_to_write.as_secs_f64()
    );
    // Within two scrape intervals of the burst, plus the time to observe it.
    assert!(burst_to_write < Duration::from_secs(2 * SCRAPE_INTERVAL_SECONDS + 2), "scale-up took {burst_to_write:?}");

    // New pods come; they get servers and become ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        attach_servers(&pods, &mut servers, &repo, &http).await;
        let d = deployments.get("scaler").await.unwrap();
        if replicas(&d) == 3 && d.status.and_then(|s| s.ready_replicas) == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "3 ready replicas did not come");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let md = mds.get("scaler").await.unwrap();
    let status = md.status.unwrap();
    assert_eq!(status.desired_replicas, 3);
    assert!(status.last_scale_time.is_some());
    assert!(status.queue_depth.unwrap_or(0) > 0, "the observed queue depth is recorded");

    // The load stops; after the stabilization window the count comes down.
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let quiet = Instant::now();
    eventually("the autoscaler scales back down to 1", Duration::from_secs(60), || async {
        (replicas(&deployments.get("scaler").await.ok()?) == 1).then_some(())
    })
    .await;
    let down_after = quiet.elapsed();
    eprintln!("load stopped -> scaled down to 1: {:.1} s (window 5 s)", down_after.as_secs_f64());
    // The window counts from the last high recommendation, up to one scrape
    // interval before the clients stopped.
    assert!(
        down_after >= Duration::from_secs(5 - 2 * SCRAPE_INTERVAL_SECONDS),
        "scaled down before the stabilization window: {down_after:?}"
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed during the burst");
    assert!(ok.load(Ordering::SeqCst) > 0);

    // Each scale write is followed by its Event, which may land a moment later.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    eventually("ScaledUp and ScaledDown events", Duration::from_secs(15), || async {
        let reasons: Vec<String> =
            events.list(&ListParams::default()).await.ok()?.items.into_iter().filter_map(|e| e.reason).collect();
        (reasons.iter().any(|r| r == "ScaledUp") && reasons.iter().any(|r| r == "ScaledDown")).then_some(())
    })
    .await;
}
