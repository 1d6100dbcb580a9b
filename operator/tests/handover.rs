//! Who writes, against a real API server: a leader cut off from the API
//! server stops writing before another replica takes over, and the
//! Deployment's replica count passes between the reconciler and the
//! autoscaler without falling to the API server's default of 1.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrite_operator::crd::ModelDeployment;
use ferrite_operator::leader::LeaseConfig;
use ferrite_operator::run::{run_with, RunOptions};
use ferrite_operator::telemetry::Metrics;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;
use support::{eventually, fake_pod_metrics, install_crd, make_ready, namespace, Operator};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);
const AUTOSCALER: &str = "ferrite-operator-autoscaler";
const RECONCILER: &str = "ferrite-operator";

/// A TCP proxy in front of the API server that the test can turn into a
/// black hole: connections are accepted and never answered, the way a
/// network partition looks from the client (no reset, no error, silence).
struct Proxy {
    addr: SocketAddr,
    cut: Arc<Mutex<bool>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(Mutex::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (cut2, connections2) = (cut.clone(), connections.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut client, _)) = listener.accept().await {
                if *cut2.lock().unwrap() {
                    held.push(client);
                    continue;
                }
                connections2.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Proxy { addr, cut, connections }
    }

    /// Silences the proxy: open connections go dead, new ones hang.
    fn cut(&self) {
        *self.cut.lock().unwrap() = true;
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn heal(&self) {
        *self.cut.lock().unwrap() = false;
    }
}

/// One operator replica run in this process (`run_with`), so the test can
/// give it its own client configuration and read its metrics directly.
struct Replica {
    metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    async fn start(config: kube::Config, ns: &str, identity: &str) -> Replica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let options = RunOptions {
            server_image: "ferrite-server:test".into(),
            server_cuda_image: "ferrite-server-cuda:test".into(),
            server_image_pull_policy: None,
            watch_namespaces: vec![ns.to_string()],
            policy: Default::default(),
            scrapers: Default::default(),
            model_cache: Default::default(),
            metrics_addr: listener.local_addr().unwrap(),
            lease_name: format!("ferrite-{ns}"),
            lease_namespace: ns.to_string(),
            identity: identity.to_string(),
            activator_service: None,
        };
        let lease = LeaseConfig::new(&options.lease_name, ns, identity);
        let metrics = Metrics::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let metrics = metrics.clone();
            async move {
                run_with(config, &options, lease, listener, metrics, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        Replica { metrics, stop: Some(stop), task }
    }

    fn leading(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    fn writes(&self, result: &str) -> u64 {
        self.metrics.leader_writes.with_label_values(&[result]).get()
    }
}

async fn replicas(deployments: &Api<Deployment>, name: &str) -> Option<i32> {
    deployments.get_opt(name).await.ok()??.spec?.replicas
}

fn owns_replicas(deployment: &Deployment, manager: &str) -> bool {
    ferrite_operator::resources::owns_replicas(&deployment.metadata, manager)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_the_api_server_stops_writing_before_another_takes_over() {
    let Some(plane) = support::control_plane() else { return };
    let client = plane.client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "cutoff").await;
    let direct = plane.config().await;
    let upstream: SocketAddr = direct.cluster_url.authority().unwrap().as_str().parse().unwrap();
    let proxy = Proxy::start(upstream).await;
    let mut through_proxy = direct.clone();
    through_proxy.cluster_url = format!("https://{}", proxy.addr).parse().unwrap();

    let a = Replica::start(through_proxy, &ns, "op-a").await;
    eventually("op-a leads", WAIT, || async { a.leading().then_some(()) }).await;
    let mut b = Replica::start(direct, &ns, "op-b").await;

    // op-a autoscales a ModelDeployment: 12 requests, target 4 -> 3 replicas.
    let (ip, load) = fake_pod_metrics("m").await;
    *load.lock().unwrap() = (10, 2);
    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"},
        "spec": {"model": {"uri": "s3://b/m.onnx", "name": "m"},
                 "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetQueueDepth": 4,
                                 "scrapeIntervalSeconds": 1, "scaleDownStabilizationSeconds": 300}},
    }))
    .unwrap();
    Api::<ModelDeployment>::namespaced(client.clone(), &ns).create(&PostParams::default(), &md).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = eventually("the Deployment controller created a pod", WAIT, || async {
        pods.list(&ListParams::default().labels("ferrite.dev/model-deployment=m")).await.ok()?.items.into_iter().next()
    })
    .await;
    make_ready(&pods, &pod.name_any(), &ip).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("op-a scales to 3", WAIT, || async { (replicas(&deployments, "m").await? == 3).then_some(()) }).await;
    assert!(a.writes("sent") > 0 && !b.leading());

    // The partition. The load grows: a leader would now scale to 4.
    *load.lock().unwrap() = (20, 0);
    proxy.cut();
    let cut = Instant::now();
    let a_stopped = eventually("op-a stops leading", WAIT, || async { (!a.leading()).then(|| cut.elapsed()) }).await;
    let a_writes_at_stop = a.writes("sent");
    let b_leads = eventually("op-b leads", WAIT, || async { b.leading().then(|| cut.elapsed()) }).await;
    let b_scaled = eventually("op-b scales to 4", WAIT, || async {
        (replicas(&deployments, "m").await? == 4).then(|| cut.elapsed())
    })
    .await;
    eprintln!(
        "cut off at 0 s: op-a stopped writing at {:.2} s (renew deadline 10 s), op-b led at {:.2} s \
         (lease 15 s), op-b scaled at {:.2} s; op-a writes sent {a_writes_at_stop}, refused {}",
        a_stopped.as_secs_f64(),
        b_leads.as_secs_f64(),
        b_scaled.as_secs_f64(),
        a.writes("refused"),
    );
    // The last renewal started at most one retry period (2 s) before the
    // cut, and its term ends 10 s after its start.
    assert!(a_stopped <= Duration::from_millis(10_500), "op-a wrote on for {a_stopped:?}");
    assert!(b_leads > a_stopped, "two leaders: op-b at {b_leads:?}, op-a until {a_stopped:?}");
    let holder = Api::<Lease>::namespaced(client.clone(), &ns)
        .get(&format!("ferrite-{ns}"))
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("op-b"));

    // The partition heals: op-a has ended with an error (a fresh process
    // would rejoin as follower) and writes nothing more.
    proxy.heal();
    let result = tokio::time::timeout(Duration::from_secs(30), a.task).await.expect("op-a ended").unwrap();
    assert!(result.unwrap_err().to_string().contains("lost leadership"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.metrics.leader_writes.with_label_values(&["sent"]).get(), a_writes_at_stop);
    assert!(b.leading());

    let _ = b.stop.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(30), b.task).await.expect("op-b stops").unwrap().unwrap();
}

/// Watches Deployment `name` and records every replica count it shows.
fn record_replicas(deployments: Api<Deployment>, name: &str) -> Arc<Mutex<Vec<i32>>> {
    let seen: Arc<Mutex<Vec<i32>>> = Arc::default();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(deployments, config);
    let recorded = seen.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let objects = match event {
                Ok(watcher::Event::Apply(d)) | Ok(watcher::Event::InitApply(d)) => vec![d],
                _ => vec![],
            };
            for d in objects {
                if let Some(r) = d.spec.and_then(|s| s.replicas) {
                    recorded.lock().unwrap().push(r);
                }
            }
        }
    });
    seen
}

#[tokio::test]
async fn switching_between_replicas_and_autoscaling_keeps_the_running_count() {
    let Some(plane) = support::control_plane() else { return };
    let client = plane.client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "switch").await;
    let _operator = Operator::start(plane, &ns, "op-a");
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"},
        "spec": {"model": {"uri": "s3://b/m.onnx", "name": "m"}, "replicas": 3},
    }))
    .unwrap();
    mds.create(&PostParams::default(), &md).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("3 replicas", WAIT, || async { (replicas(&deployments, "m").await? == 3).then_some(()) }).await;
    let seen = record_replicas(deployments.clone(), "m");
    let patch = |spec: serde_json::Value| {
        let mds = mds.clone();
        async move { mds.patch("m", &PatchParams::default(), &Patch::Merge(&json!({ "spec": spec }))).await.unwrap() }
    };
    let hand_over = |from: &'static str, to: &'static str| {
        let deployments = deployments.clone();
        async move {
            eventually(&format!("{to} owns spec.replicas, {from} does not"), WAIT, || async {
                let d = deployments.get("m").await.ok()?;
                (owns_replicas(&d, to) && !owns_replicas(&d, from)).then_some(())
            })
            .await
        }
    };

    // Fixed -> autoscaling: no pod serves, so the autoscaler has no data and
    // holds; the count stays at 3 while the field changes hands.
    patch(json!({"replicas": null, "autoscaling": {"minReplicas": 1, "maxReplicas": 5, "scrapeIntervalSeconds": 1}}))
        .await;
    let started = Instant::now();
    hand_over(RECONCILER, AUTOSCALER).await;
    eprintln!(
        "replicas -> autoscaling: the autoscaler owned spec.replicas after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(replicas(&deployments, "m").await, Some(3));
    let after_first = seen.lock().unwrap().clone();
    assert!(after_first.iter().all(|&r| r == 3), "the count left 3: {after_first:?}");

    // The autoscaler decides (minReplicas above the count): 4.
    patch(json!({"autoscaling": {"minReplicas": 4}})).await;
    eventually("the autoscaler enforces minReplicas 4", WAIT, || async {
        (replicas(&deployments, "m").await? == 4).then_some(())
    })
    .await;
    seen.lock().unwrap().clear();

    // Autoscaling -> fixed at the running count: the reconciler takes the
    // field back in one write.
    patch(json!({"autoscaling": null, "replicas": 4})).await;
    eventually("the reconciler owns spec.replicas", WAIT, || async {
        owns_replicas(&deployments.get("m").await.ok()?, RECONCILER).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // And to autoscaling again, now with the autoscaler still a co-owner.
    patch(json!({"replicas": null, "autoscaling": {"minReplicas": 1, "maxReplicas": 5, "scrapeIntervalSeconds": 1}}))
        .await;
    hand_over(RECONCILER, AUTOSCALER).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(replicas(&deployments, "m").await, Some(4));
    let after_back = seen.lock().unwrap().clone();
    assert!(after_back.iter().all(|&r| r == 4), "the count left 4: {after_back:?}");

    // The autoscaler's write is conditional: applied on a resourceVersion
    // that is no longer current, the API server refuses it.
    let read = deployments.get("m").await.unwrap();
    let touch = json!({"metadata": {"annotations": {"test/touched": "yes"}}});
    deployments.patch("m", &PatchParams::default(), &Patch::Merge(&touch)).await.unwrap();
    let stale = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "m", "resourceVersion": read.metadata.resource_version},
        "spec": {"replicas": 1},
    });
    let refused = deployments.patch("m", &PatchParams::apply(AUTOSCALER).force(), &Patch::Apply(&stale)).await;
    assert!(matches!(refused, Err(kube::Error::Api(ref e)) if e.code == 409), "{refused:?}");
    assert_eq!(replicas(&deployments, "m").await, Some(4));
}

#[tokio::test]
async fn a_pod_that_only_carries_the_label_is_not_scraped() {
    let Some(plane) = support::control_plane() else { return };
    let client = plane.client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "impostor").await;
    let _operator = Operator::start(plane, &ns, "op-a");
    let (real_ip, real_load) = fake_pod_metrics("m").await;
    let (impostor_ip, impostor_load) = fake_pod_metrics("m").await;
    *impostor_load.lock().unwrap() = (400, 0);
    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m"},
        "spec": {"model": {"uri": "s3://b/m.onnx", "name": "m"},
                 "autoscaling": {"minReplicas": 1, "maxReplicas": 5, "targetQueueDepth": 4,
                                 "scrapeIntervalSeconds": 1, "scaleDownStabilizationSeconds": 300}},
    }))
    .unwrap();
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    mds.create(&PostParams::default(), &md).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = eventually("the Deployment controller created a pod", WAIT, || async {
        pods.list(&ListParams::default().labels("ferrite.dev/model-deployment=m")).await.ok()?.items.into_iter().next()
    })
    .await;
    make_ready(&pods, &pod.name_any(), &real_ip).await;
    // Anyone who may create pods in the namespace can copy the label.
    let impostor: Pod = serde_json::from_value(json!({
        "metadata": {"name": "impostor", "labels": {"ferrite.dev/model-deployment": "m"}},
        "spec": {"containers": [{"name": "x", "image": "x"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &impostor).await.unwrap();
    make_ready(&pods, "impostor", &impostor_ip).await;

    let queue_depth = || async { mds.get("m").await.ok()?.status?.queue_depth };
    eventually("the autoscaler reads the real pod", WAIT, || async { (queue_depth().await? == 0).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert_eq!(queue_depth().await, Some(0), "the impostor's queue of 400 was read");
    assert_eq!(replicas(&deployments, "m").await, Some(1));

    // The real pod's load does count.
    *real_load.lock().unwrap() = (8, 0);
    eventually("queue 8 scales to 2", WAIT, || async {
        (queue_depth().await? == 8 && replicas(&deployments, "m").await? == 2).then_some(())
    })
    .await;
}
