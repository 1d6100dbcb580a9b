//! Tests of the glue: endpoint selection, scraping real and fake servers,
//! and `scale_step` against a fake API server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::*;

fn pod(name: &str, ip: Option<&str>, ready: &str, deleting: bool) -> Pod {
    let mut v = json!({
        "metadata": { "name": name, "namespace": "ns" },
        "status": {
            "phase": "Running",
            "conditions": [
                { "type": "PodScheduled", "status": "True" },
                { "type": "Ready", "status": ready },
            ],
        },
    });
    if let Some(ip) = ip {
        v["status"]["podIP"] = json!(ip);
    }
    if deleting {
        v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn endpoints_keep_only_ready_pods_with_an_ip() {
    let no_status: Pod = serde_json::from_value(json!({ "metadata": { "name": "new" } })).unwrap();
    let no_conditions: Pod =
        serde_json::from_value(json!({ "metadata": { "name": "p" }, "status": { "podIP": "10.0.0.9" } })).unwrap();
    let pods = vec![
        pod("b", Some("10.0.0.2"), "True", false),
        pod("a", Some("10.0.0.1"), "True", false),
        pod("unready", Some("10.0.0.3"), "False", false),
        pod("no-ip", None, "True", false),
        pod("empty-ip", Some(""), "True", false),
        pod("terminating", Some("10.0.0.4"), "True", true),
        pod("v6", Some("fd00::5"), "True", false),
        pod("dup", Some("10.0.0.1"), "True", false),
        no_status,
        no_conditions,
    ];
    assert_eq!(
        pod_metrics_endpoints(&pods, 8002),
        vec![
            "http://10.0.0.1:8002/metrics".to_string(),
            "http://10.0.0.2:8002/metrics".to_string(),
            "http://[fd00::5]:8002/metrics".to_string(),
        ]
    );
    assert!(pod_metrics_endpoints(&[], 8002).is_empty());
}

#[test]
fn timeout_is_min_of_two_seconds_and_interval() {
    assert_eq!(scrape_timeout(Duration::from_secs(5)), Duration::from_secs(2));
    assert_eq!(scrape_timeout(Duration::from_secs(1)), Duration::from_secs(1));
}

// ---------------------------------------------------------------- fake pods

/// A fake ferrite-server metrics endpoint whose load the test sets.
#[derive(Clone)]
struct FakePod {
    load: Arc<Mutex<(u64, u64)>>,
    url: String,
}

impl FakePod {
    async fn start(model: &str, queued: u64, inflight: u64) -> FakePod {
        let load = Arc::new(Mutex::new((queued, inflight)));
        let model = model.to_string();
        let state = load.clone();
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let (q, i) = *state.lock().unwrap();
                let model = model.clone();
                async move {
                    format!(
                        "# HELP ferrite_inflight_requests x\n# TYPE ferrite_inflight_requests gauge\n\
                         ferrite_inflight_requests{{model=\"{model}\"}} {i}\n\
                         # HELP ferrite_queue_depth x\n# TYPE ferrite_queue_depth gauge\n\
                         ferrite_queue_depth{{model=\"{model}\"}} {q}\n"
                    )
                }
            }),
        );
        let addr = serve(app).await;
        FakePod { load, url: format!("http://{addr}/metrics") }
    }

    fn set(&self, queued: u64, inflight: u64) {
        *self.load.lock().unwrap() = (queued, inflight);
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// An endpoint that accepts connections and never answers.
async fn hung_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{addr}/metrics")
}

/// A port nothing listens on.
fn closed_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/metrics")
}

#[tokio::test]
async fn scrape_errors_are_typed() {
    let http = reqwest::Client::new();
    let t = Duration::from_millis(300);

    let started = Instant::now();
    let err = scrape(&http, &hung_endpoint().await, "m", t).await.unwrap_err();
    assert!(matches!(err, ScrapeError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "the timeout bounds the scrape");

    let err = scrape(&http, &closed_endpoint(), "m", t).await.unwrap_err();
    assert!(matches!(err, ScrapeError::Http(_)), "{err:?}");

    let app = Router::new()
        .route("/metrics", get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "no") }))
        .route("/other", get(|| async { "hello" }));
    let addr = serve(app).await;
    let err = scrape(&http, &format!("http://{addr}/metrics"), "m", t).await.unwrap_err();
    assert!(matches!(err, ScrapeError::Status(503)), "{err:?}");
    let err = scrape(&http, &format!("http://{addr}/other"), "m", t).await.unwrap_err();
    assert!(matches!(err, ScrapeError::MissingFamily(_)), "{err:?}");

    let pod = FakePod::start("m", 3, 4).await;
    assert_eq!(scrape(&http, &pod.url, "m", t).await.unwrap(), PodLoad { queued: 3, inflight: 4 });
}

#[tokio::test]
async fn observe_sums_pods_and_counts_failures() {
    let http = reqwest::Client::new();
    let a = FakePod::start("m", 20, 3).await;
    let b = FakePod::start("m", 10, 4).await;
    let endpoints = vec![a.url.clone(), closed_endpoint(), b.url.clone()];
    let obs = observe_pods(&http, &endpoints, "m", Duration::from_millis(500)).await;
    assert_eq!(obs, Observation { queued: 30, inflight: 7, pods_scraped: 2, pods_failed: 1 });
    assert_eq!(observe_pods(&http, &[], "m", Duration::from_millis(500)).await, Observation::default());
}

// ------------------------------------------------------- fake API server

#[derive(Default)]
struct FakeApi {
    /// Deployment name -> replicas.
    replicas: HashMap<String, i32>,
    /// (content type, fieldManager, body) of every PATCH.
    patches: Vec<(String, Option<String>, Value)>,
}

type Shared = Arc<Mutex<FakeApi>>;

fn scale_json(ns: &str, name: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": { "name": name, "namespace": ns, "resourceVersion": "1" },
        "spec": { "replicas": replicas },
        "status": { "replicas": replicas, "selector": "app=x" },
    })
}

fn not_found(name: &str) -> axum::response::Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("deployments.apps \"{name}\" not found"), "reason": "NotFound", "code": 404,
        })),
    )
        .into_response()
}

async fn get_scale(State(api): State<Shared>, Path((ns, name)): Path<(String, String)>) -> axum::response::Response {
    let api = api.lock().unwrap();
    match api.replicas.get(&name) {
        Some(&r) => Json(scale_json(&ns, &name, r)).into_response(),
        None => not_found(&name),
    }
}

async fn patch_scale(
    State(api): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let mut api = api.lock().unwrap();
    let body: Value = serde_json::from_str(&body).unwrap();
    let content_type = headers.get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    api.patches.push((content_type, query.get("fieldManager").cloned(), body.clone()));
    let Some(r) = api.replicas.get_mut(&name) else {
        return not_found(&name);
    };
    *r = body["spec"]["replicas"].as_i64().unwrap() as i32;
    Json(scale_json(&ns, &name, *r)).into_response()
}

async fn fake_api(deployments: &[(&str, i32)]) -> (kube::Client, Shared) {
    let api: Shared = Arc::new(Mutex::new(FakeApi {
        replicas: deployments.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
        ..Default::default()
    }));
    let app = Router::new()
        .route("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale", get(get_scale).patch(patch_scale))
        .with_state(api.clone());
    let addr = serve(app).await;
    let mut config = kube::Config::new(format!("http://{addr}").parse::<axum::http::Uri>().unwrap());
    config.default_namespace = "ns".into();
    (kube::Client::try_from(config).unwrap(), api)
}

fn model_deployment(name: &str, autoscaling: Option<Value>) -> ModelDeployment {
    let mut spec = json!({ "model": { "uri": "https://example.com/m.onnx", "name": "m" } });
    if let Some(a) = autoscaling {
        spec["autoscaling"] = a;
    }
    serde_json::from_value(json!({
        "apiVersion": "ferrite.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": { "name": name, "namespace": "ns" },
        "spec": spec,
    }))
    .unwrap()
}

#[tokio::test]
async fn scale_step_scales_up_holds_then_scales_down() {
    let (client, api) = fake_api(&[("llm", 2)]).await;
    let http = reqwest::Client::new();
    let md = model_deployment(
        "llm",
        Some(json!({
            "minReplicas": 1, "maxReplicas": 10, "targetQueueDepth": 8,
            "scaleDownStabilizationSeconds": 120, "scrapeIntervalSeconds": 1,
        })),
    );
    let a = FakePod::start("m", 20, 3).await;
    let b = FakePod::start("m", 10, 4).await;
    let endpoints = || vec![a.url.clone(), b.url.clone()];
    let mut state = Recommendations::new();
    let t0 = Instant::now();

    // 37 requests over 2 pods, target 8: up to 5 at once.
    let out = scale_step(client.clone(), &md, &mut state, endpoints(), &http, t0).await.unwrap().unwrap();
    assert_eq!((out.old_replicas, out.new_replicas, out.changed, out.direction), (2, 5, true, Direction::Up));
    assert_eq!(out.queue_depth, Some(37));
    assert_eq!(
        out.reason,
        "queue 37 (queued 30, in-flight 7) over 2 pods, target 8 -> 5 replicas; scaling up from 2 to 5"
    );
    {
        let api = api.lock().unwrap();
        assert_eq!(api.replicas["llm"], 5);
        assert_eq!(api.patches.len(), 1);
        let (content_type, manager, body) = &api.patches[0];
        assert_eq!(content_type, "application/merge-patch+json");
        assert_eq!(manager.as_deref(), Some(FIELD_MANAGER));
        assert_eq!(body, &json!({ "spec": { "replicas": 5 } }));
    }

    // The queue drains: a dip does not scale down within the window.
    a.set(0, 0);
    b.set(0, 1);
    let out = scale_step(client.clone(), &md, &mut state, endpoints(), &http, t0 + Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((out.old_replicas, out.new_replicas, out.changed, out.direction), (5, 5, false, Direction::Hold));
    assert!(out.reason.contains("scale-down to 1 held by stabilization for another 115s"), "{}", out.reason);
    assert_eq!(api.lock().unwrap().patches.len(), 1, "no write when holding");

    // One pod stops answering: the partial data never scales down.
    let hung = hung_endpoint().await;
    let out =
        scale_step(client.clone(), &md, &mut state, vec![a.url.clone(), hung], &http, t0 + Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
    assert_eq!((out.new_replicas, out.direction, out.pods_scraped, out.pods_failed), (5, Direction::Hold, 1, 1));
    assert!(out.reason.starts_with("holding: 1 of 2 scrapes failed"), "{}", out.reason);

    // Low load for longer than the window: down to 1.
    let out = scale_step(client.clone(), &md, &mut state, endpoints(), &http, t0 + Duration::from_secs(130))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((out.old_replicas, out.new_replicas, out.direction), (5, 1, Direction::Down));
    assert_eq!(api.lock().unwrap().replicas["llm"], 1);
}

#[tokio::test]
async fn scale_step_fresh_leader_waits_before_scaling_down() {
    let (client, api) = fake_api(&[("m", 4)]).await;
    let http = reqwest::Client::new();
    let md = model_deployment("m", Some(json!({ "maxReplicas": 8, "scrapeIntervalSeconds": 1 })));
    let pod = FakePod::start("m", 0, 0).await;
    let mut state = Recommendations::new();
    let t0 = Instant::now();
    let out = scale_step(client.clone(), &md, &mut state, vec![pod.url.clone()], &http, t0).await.unwrap().unwrap();
    assert_eq!((out.new_replicas, out.direction), (4, Direction::Hold), "{}", out.reason);
    // Default window: 120s.
    let out = scale_step(client, &md, &mut state, vec![pod.url.clone()], &http, t0 + Duration::from_secs(121))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((out.new_replicas, out.direction), (1, Direction::Down), "{}", out.reason);
    assert_eq!(api.lock().unwrap().replicas["m"], 1);
}

#[tokio::test]
async fn scale_step_without_data_holds_but_enforces_the_range() {
    let (client, api) = fake_api(&[("m", 0)]).await;
    let http = reqwest::Client::new();
    let md = model_deployment("m", Some(json!({ "minReplicas": 2, "maxReplicas": 8, "scrapeIntervalSeconds": 1 })));
    let mut state = Recommendations::new();
    let out = scale_step(client, &md, &mut state, vec![], &http, Instant::now()).await.unwrap().unwrap();
    assert_eq!((out.old_replicas, out.new_replicas, out.direction), (0, 2, Direction::Up));
    assert_eq!(out.queue_depth, None);
    assert!(out.reason.contains("below minReplicas 2"), "{}", out.reason);
    assert_eq!(api.lock().unwrap().replicas["m"], 2);
}

#[tokio::test]
async fn scale_step_skips_what_it_cannot_scale() {
    let (client, api) = fake_api(&[]).await;
    let http = reqwest::Client::new();
    let mut state = Recommendations::new();
    let fixed = model_deployment("m", None);
    assert!(scale_step(client.clone(), &fixed, &mut state, vec![], &http, Instant::now()).await.unwrap().is_none());
    let scaled = model_deployment("m", Some(json!({ "maxReplicas": 3 })));
    assert!(
        scale_step(client, &scaled, &mut state, vec![], &http, Instant::now()).await.unwrap().is_none(),
        "no Deployment yet"
    );
    assert!(api.lock().unwrap().patches.is_empty());
}

// -------------------------------------------------- real ferrite-server

/// Kills the server when the test ends, passing or not.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn scrape_a_real_ferrite_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let binary = root.join("target/debug/ferrite-server");
    if !binary.exists() {
        let message = format!(
            "ferrite-server binary not found at {}; build it with `cargo build -p ferrite-server`",
            binary.display()
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{message}");
        }
        eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        eprintln!("!!! SKIPPED scrape_a_real_ferrite_server: {message}");
        eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
        return;
    }
    let (http_port, grpc_port, metrics_port) = (free_port(), free_port(), free_port());
    let mut command = std::process::Command::new(&binary);
    command.args([
        "serve",
        "--host",
        "127.0.0.1",
        "--http-port",
        &http_port.to_string(),
        "--grpc-port",
        &grpc_port.to_string(),
        "--metrics-port",
        &metrics_port.to_string(),
    ]);
    // The repository's ONNX Runtime, unless the environment names one.
    let ort = root.join(".cache/onnxruntime/libonnxruntime.so");
    if std::env::var_os("ORT_DYLIB_PATH").is_none() && ort.exists() {
        command.env("ORT_DYLIB_PATH", &ort);
    }
    let mut server = ChildGuard(command.stdout(std::process::Stdio::null()).spawn().expect("start ferrite-server"));

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until the demo model is loaded the families are absent (an error).
    loop {
        match scrape(&http, &url, "demo", Duration::from_secs(2)).await {
            Ok(_) => break,
            Err(e) => {
                if let Some(status) = server.0.try_wait().unwrap() {
                    panic!("ferrite-server exited with {status} before serving metrics");
                }
                assert!(Instant::now() < deadline, "ferrite-server metrics not ready after 60s: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    let infer = format!("http://127.0.0.1:{http_port}/v2/models/demo/infer");
    let body = r#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#;
    let send = || http.post(&infer).header("content-type", "application/json").body(body).send();
    let response = send().await.unwrap();
    assert!(response.status().is_success(), "inference failed: {}", response.status());

    // Scrapes while requests are running still parse.
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let request = send();
        requests.spawn(async move { request.await.map(|r| r.status()) });
    }
    for _ in 0..5 {
        scrape(&http, &url, "demo", Duration::from_secs(2)).await.expect("scrape under load");
    }
    while let Some(status) = requests.join_next().await {
        assert!(status.unwrap().unwrap().is_success());
    }

    // Idle again: the gauges return to zero.
    assert_eq!(scrape(&http, &url, "demo", Duration::from_secs(2)).await.unwrap(), PodLoad::default());
    // A model the server does not serve: families exist, no series: zero.
    assert_eq!(scrape(&http, &url, "absent", Duration::from_secs(2)).await.unwrap(), PodLoad::default());
    // observe_pods over the real pod and a dead one.
    let obs = observe_pods(&http, &[url.clone(), closed_endpoint()], "demo", Duration::from_secs(2)).await;
    assert_eq!((obs.pods_scraped, obs.pods_failed, obs.load()), (1, 1, 0));
}

/// Compile-time check: the step can run inside `tokio::spawn` (a Send,
/// 'static future), as the controller's loop does.
#[allow(dead_code)]
fn scale_step_can_be_spawned(client: kube::Client, md: ModelDeployment, http: reqwest::Client) {
    tokio::spawn(async move {
        let mut state = Recommendations::new();
        let _ = scale_step(client, &md, &mut state, vec![], &http, Instant::now()).await;
    });
}
