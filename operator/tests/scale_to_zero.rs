//! Scale to zero against a real API server (with kube-controller-manager:
//! the ReplicaSet and EndpointSlice controllers run) and a real
//! ferrite-server playing the model's pod; no kubelet runs, so the test binds
//! the pod to a Node object and writes its Ready status itself.
//!
//! The activator is a stand-in here: a tiny HTTP server with the activator's
//! metrics (`ferrite_activator_held_requests`,
//! `ferrite_activator_requests_total`) whose numbers the test sets, behind a
//! Service and EndpointSlice like the chart's. The real activator (holding
//! and forwarding requests) is tested by its own test (operator/tests/activator.rs)
//! and, with the operator, in the end-to-end scenarios.
//!
//! Addresses: EndpointSlices refuse loopback addresses, so the pod's
//! ferrite-server and the stand-in listen on this machine's first
//! non-loopback IPv4 address (the stand-in on free ports, which its slice
//! names; the server on the contract's ports, which the operator scrapes).

mod support;

use std::net::{IpAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrite_operator::crd::ModelDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use support::{create, eventually, model_deployment, repo_root, setup, Operator};

/// `(held, requests)` the stand-in activator reports for the model.
type Counts = Arc<Mutex<(u64, u64)>>;

/// The machine's non-loopback IPv4 address (the source address of a route
/// to a documentation address: nothing is sent).
fn host_ip() -> Option<String> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.200:9").ok()?;
    match socket.local_addr().ok()?.ip() {
        IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip.to_string()),
        _ => None,
    }
}

/// Skips loudly (fails under CI=true) when something the test needs is missing.
fn missing(what: String) -> Option<()> {
    if matches!(std::env::var("CI").as_deref(), Ok("true")) {
        panic!("CI=true: {what}");
    }
    eprintln!("\n!!!!!!!! SKIPPED, NOT PASSED: {what} !!!!!!!!\n");
    None
}

/// The stand-in activator's metrics on `ip`, for ModelDeployment `ns/name`.
async fn fake_activator(ip: &str, ns: &'static str, name: &'static str) -> (u16, Counts) {
    let counts: Counts = Arc::new(Mutex::new((0, 0)));
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await.expect("bind the stand-in activator");
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get({
            let counts = counts.clone();
            move || async move {
                let (held, requests) = *counts.lock().unwrap();
                format!(
                    "# TYPE ferrite_activator_held_requests gauge\n\
                     ferrite_activator_held_requests{{namespace=\"{ns}\",name=\"{name}\"}} {held}\n\
                     # TYPE ferrite_activator_requests_total counter\n\
                     ferrite_activator_requests_total{{namespace=\"{ns}\",name=\"{name}\"}} {requests}\n"
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, counts)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ferrite-server serve` with its embedded `demo` model on `ip`'s contract ports.
fn start_server(ip: &str) -> Option<Server> {
    let root = repo_root();
    let binary = root.join("target/debug/ferrite-server");
    let ort =
        std::env::var("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or(root.join(".cache/onnxruntime/libonnxruntime.so"));
    for (path, how) in [(&binary, "cargo build -p ferrite-server"), (&ort, "make ort")] {
        if !path.exists() {
            missing(format!("{} is missing: run `{how}`", path.display()))?;
        }
    }
    let log = std::fs::File::create(std::env::temp_dir().join("ferrite-scale-to-zero-pod.log")).unwrap();
    let child = Command::new(binary)
        .args(["serve", "--host", ip, "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"])
        .env("ORT_DYLIB_PATH", ort)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ferrite-server");
    Some(Server(child))
}

fn replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn ready_condition(md: &ModelDeployment) -> Option<(String, String)> {
    let c = md.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn cel_keeps_scale_to_zero_consistent() {
    let Some((_plane, client, ns)) = setup("zero-cel").await else { return };
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let refused = [
        (
            json!({"minReplicas": 0, "maxReplicas": 2}),
            json!({"secretName": "cert"}),
            "minReplicas 0 (scale to zero) cannot be combined with spec.tls",
        ),
        (
            json!({"minReplicas": 1, "maxReplicas": 2, "scaleToZeroAfterSeconds": 60}),
            json!(null),
            "scaleToZeroAfterSeconds needs minReplicas 0",
        ),
        (
            json!({"minReplicas": 0, "maxReplicas": 2, "scaleToZeroAfterSeconds": 0}),
            json!(null),
            "scaleToZeroAfterSeconds must be at least 1",
        ),
        (json!({"minReplicas": -1, "maxReplicas": 2}), json!(null), "minReplicas must not be negative"),
    ];
    for (i, (autoscaling, tls, message)) in refused.into_iter().enumerate() {
        let mut spec = json!({"model": {"uri": "s3://b/m.onnx"}, "autoscaling": autoscaling});
        if !tls.is_null() {
            spec["tls"] = tls;
        }
        let md = model_deployment(&format!("bad-{i}"), spec);
        match api.create(&PostParams::default(), &md).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{e:?}");
                assert!(e.message.contains(message), "{message:?} not in {:?}", e.message);
            }
            other => panic!("case {i} should be refused: {other:?}"),
        }
    }
    let ok = model_deployment(
        "good",
        json!({"model": {"uri": "s3://b/m.onnx"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "scaleToZeroAfterSeconds": 30}}),
    );
    api.create(&PostParams::default(), &ok).await.expect("minReplicas 0 with a window is valid");
}

#[tokio::test]
async fn an_idle_model_goes_to_zero_through_the_activator_and_a_held_request_brings_it_back() {
    const NS: &str = "zero-idle";
    const NAME: &str = "zero";
    let Some(ip) = host_ip() else {
        missing("this machine has no non-loopback IPv4 address (EndpointSlices refuse loopback)".into());
        return;
    };
    let Some((plane, client, ns)) = setup(NS).await else { return };
    let Some(_server) = start_server(&ip) else { return };
    let (metrics_port, counts) = fake_activator(&ip, NS, NAME).await;

    // The activator's Service and slice, as the chart's would look.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "activator"},
        "spec": {"ports": [{"name": "http", "port": 8000}, {"name": "grpc", "port": 8001}, {"name": "metrics", "port": 8002}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &service).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let activator_slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "activator-1", "labels": {"kubernetes.io/service-name": "activator"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 18000}, {"name": "grpc", "port": 18001}, {"name": "metrics", "port": metrics_port}],
    }))
    .unwrap();
    slices.create(&PostParams::default(), &activator_slice).await.unwrap();

    let lease = format!("ferrite-{ns}");
    let activator_flag = format!("{ns}/activator");
    let args = [
        "--watch-namespace",
        &ns,
        "--lease-name",
        &lease,
        "--lease-namespace",
        &ns,
        "--activator-service",
        &activator_flag,
    ];
    let _operator = Operator::start_with(&plane.kubeconfig, &ns, "op-zero", &args);

    let md = model_deployment(
        NAME,
        json!({
            "model": {"uri": "s3://models/demo.onnx", "name": "demo"},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "targetQueueDepth": 4, "scrapeIntervalSeconds": 1,
                            "scaleDownStabilizationSeconds": 1, "scaleToZeroAfterSeconds": 3},
        }),
    );
    create(&client, &ns, &md).await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "zero-node"}})).unwrap();
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create node: {e}"),
    }

    // Plays scheduler and kubelet for the model's pods: bound to the node,
    // Running and Ready at `ip`, where the real ferrite-server listens.
    let make_pods_ready = || async {
        let list =
            pods.list(&ListParams::default().labels(&format!("ferrite.dev/model-deployment={NAME}"))).await.ok()?;
        let mut any = false;
        for pod in list.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            let name = pod.name_any();
            if pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none() {
                let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                                     "target": {"apiVersion": "v1", "kind": "Node", "name": "zero-node"}});
                let _ = pods
                    .create_subresource::<serde_json::Value, serde_json::Value>(
                        "binding",
                        &name,
                        &PostParams::default(),
                        &binding,
                    )
                    .await;
            }
            support::make_ready(&pods, &name, &ip).await;
            any = true;
        }
        any.then_some(())
    };

    // Starts at one replica (minReplicas 0 starts at 1), in pod mode.
    eventually("the first pod exists", Duration::from_secs(60), make_pods_ready).await;
    eventually("one ready replica and the Service in pod mode", Duration::from_secs(60), || async {
        let d = deployments.get(NAME).await.ok()?;
        let s = services.get(NAME).await.ok()?;
        (d.status?.ready_replicas? == 1 && s.spec?.selector.is_some()).then_some(())
    })
    .await;
    let served = eventually("Ready=True ModelServing", Duration::from_secs(30), || async {
        let md = mds.get(NAME).await.ok()?;
        (ready_condition(&md)? == ("True".into(), "ModelServing".into())).then_some(())
    });
    served.await;

    // Idle: the drain starts (the Service to the activator), and a request
    // arrives during it. The activator forwards it to the still Ready pod
    // (here: its counter moves), so the drain is cancelled: the Service goes
    // back to the pod, which was never scaled away.
    eventually("a first drain: the Service points at the activator", Duration::from_secs(60), || async {
        let s = services.get(NAME).await.ok()?;
        s.spec?.selector.is_none().then_some(())
    })
    .await;
    *counts.lock().unwrap() = (0, 1);
    eventually("the drain cancelled: the Service back with the pod", Duration::from_secs(30), || async {
        let s = services.get(NAME).await.ok()?;
        let ours = slices.get_opt(&format!("{NAME}-activator")).await.ok()?;
        let d = deployments.get(NAME).await.ok()?;
        let marked = d.annotations().contains_key("ferrite.dev/scale-to-zero-drain-since");
        (s.spec?.selector.is_some() && ours.is_none() && !marked).then_some(())
    })
    .await;
    assert_eq!(replicas(&deployments.get(NAME).await.unwrap()), 1, "a request during the drain keeps the pod");

    // Idle again (no request anywhere): the Service switches to the
    // activator, and only afterwards do the replicas go to zero.
    let idle_from = Instant::now();
    let switched = eventually("the Service points at the activator", Duration::from_secs(60), || async {
        let s = services.get(NAME).await.ok()?;
        let ours = slices.get_opt(&format!("{NAME}-activator")).await.ok()??;
        let addresses: Vec<String> = ours.endpoints.iter().flat_map(|e| e.addresses.clone()).collect();
        (s.spec?.selector.is_none() && addresses == [ip.clone()]).then(|| {
            let ports: Vec<(String, i32)> =
                ours.ports.unwrap_or_default().into_iter().map(|p| (p.name.unwrap(), p.port.unwrap())).collect();
            (Instant::now(), ports)
        })
    })
    .await;
    assert_eq!(switched.1, [("http".to_string(), 18000), ("grpc".to_string(), 18001)], "the activator's ports");
    assert_eq!(replicas(&deployments.get(NAME).await.unwrap()), 1, "the switch comes before the zero");
    let zero_at = eventually("zero replicas", Duration::from_secs(30), || async {
        (replicas(&deployments.get(NAME).await.ok()?) == 0).then(Instant::now)
    })
    .await;
    let waited = zero_at - switched.0;
    assert!(waited >= Duration::from_millis(2500), "zero only after the kube-proxy wait: {waited:?}");
    assert!(zero_at - idle_from >= Duration::from_secs(3), "not before scaleToZeroAfterSeconds");
    eprintln!("idle -> activator mode {:?}, -> zero {:?}", switched.0 - idle_from, zero_at - idle_from);

    // Status: Ready stays True, reason ScaledToZero; an Event of its own.
    eventually("Ready=True ScaledToZero", Duration::from_secs(30), || async {
        let md = mds.get(NAME).await.ok()?;
        (ready_condition(&md)? == ("True".into(), "ScaledToZero".into())).then_some(())
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    eventually("a ScaledDownToZero Event of the autoscaler's", Duration::from_secs(10), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("ScaledDownToZero")
                    && e.event_time.is_some()
                    && e.note.as_deref().is_some_and(|n| n.contains("idle for"))
            })
            .then_some(())
    })
    .await;
    // The Service stays with the activator at zero, and nothing else lists
    // the old pod (neither the controller's slice nor a mirrored one).
    assert!(services.get(NAME).await.unwrap().spec.unwrap().selector.is_none());
    let listed =
        slices.list(&ListParams::default().labels(&format!("kubernetes.io/service-name={NAME}"))).await.unwrap();
    let names: Vec<String> = listed.items.iter().map(|s| s.name_any()).collect();
    assert_eq!(names, [format!("{NAME}-activator")], "only the activator's slice");

    // A request arrives at the activator and is held: up at once.
    *counts.lock().unwrap() = (1, 2);
    let held_at = Instant::now();
    let up_at = eventually("scaled up from zero", Duration::from_secs(10), || async {
        (replicas(&deployments.get(NAME).await.ok()?) == 1).then(Instant::now)
    })
    .await;
    let reaction = up_at - held_at;
    eprintln!("held request -> replicas 1 in {reaction:?}");
    assert!(reaction < Duration::from_secs(3), "a held request is seen within about a second: {reaction:?}");
    eventually("Ready=True ScalingFromZero", Duration::from_secs(10), || async {
        let md = mds.get(NAME).await.ok()?;
        (ready_condition(&md)? == ("True".into(), "ScalingFromZero".into())).then_some(())
    })
    .await;
    // Still the activator's while no pod is Ready.
    assert!(services.get(NAME).await.unwrap().spec.unwrap().selector.is_none());

    // The pod turns Ready: the activator forwards what it held, and the
    // Service goes back to the pods once the EndpointSlice controller lists one.
    eventually("the new pod exists", Duration::from_secs(30), make_pods_ready).await;
    *counts.lock().unwrap() = (0, 2);
    eventually("the Service back in pod mode, the activator's slice gone", Duration::from_secs(30), || async {
        let s = services.get(NAME).await.ok()?;
        let ours = slices.get_opt(&format!("{NAME}-activator")).await.ok()?;
        (s.spec?.selector.is_some() && ours.is_none()).then_some(())
    })
    .await;
    eventually("Ready=True ModelServing again", Duration::from_secs(30), || async {
        let md = mds.get(NAME).await.ok()?;
        (ready_condition(&md)? == ("True".into(), "ModelServing".into())).then_some(())
    })
    .await;
    let list = events.list(&ListParams::default()).await.unwrap();
    let from_zero: Vec<_> = list.items.iter().filter(|e| e.reason.as_deref() == Some("ScaledUpFromZero")).collect();
    assert_eq!(from_zero.len(), 1, "one ScaledUpFromZero Event");
    assert!(from_zero[0].note.as_deref().unwrap_or_default().contains("1 request held by the activator"));
}

#[tokio::test]
async fn without_an_activator_min_zero_is_kept_at_one_replica_and_says_why() {
    let Some((plane, client, ns)) = setup("zero-missing").await else { return };
    let _operator = Operator::start(plane, &ns, "op-missing");
    let md = model_deployment(
        "lonely",
        json!({"model": {"uri": "s3://b/m.onnx"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "scaleToZeroAfterSeconds": 1}}),
    );
    create(&client, &ns, &md).await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let condition = eventually("ScaleToZero=False ActivatorMissing", Duration::from_secs(60), || async {
        let md = mds.get("lonely").await.ok()?;
        md.status?.conditions.into_iter().find(|c| c.type_ == "ScaleToZero" && c.reason == "ActivatorMissing")
    })
    .await;
    assert_eq!(condition.status, "False");
    assert!(condition.message.contains("--activator-service"), "{}", condition.message);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(replicas(&deployments.get("lonely").await.unwrap()), 1, "kept at one replica");
    let service: Api<Service> = Api::namespaced(client.clone(), &ns);
    assert!(service.get("lonely").await.unwrap().spec.unwrap().selector.is_some(), "pod mode");
}
