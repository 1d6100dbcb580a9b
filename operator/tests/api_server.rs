//! The operator against a real API server: owned objects, rollouts, drift,
//! CEL rules, garbage collection, status and who owns which status field,
//! leader election.

mod support;

use std::time::Duration;

use ferrite_operator::crd::ModelDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use support::{create, eventually, fake_pod_metrics, model_deployment, setup, Operator};

const WAIT: Duration = Duration::from_secs(60);

async fn deployment_args(deployments: &Api<Deployment>, name: &str) -> Option<Vec<String>> {
    deployments.get_opt(name).await.ok()??.spec?.template.spec?.containers.first()?.args.clone()
}

#[tokio::test]
async fn model_deployment_yields_owned_objects() {
    let Some((plane, client, ns)) = setup("owned-objects").await else { return };
    let _operator = Operator::start(plane, &ns, "op-a");
    let md = create(
        &client,
        &ns,
        &model_deployment(
            "resnet",
            json!({
                "model": {"uri": "https://models.example/resnet50.onnx"},
                "replicas": 2,
                "batching": {"maxBatchSize": 8, "maxQueueDelayMicroseconds": 500},
                "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
            }),
        ),
    )
    .await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment =
        eventually("the Deployment exists", WAIT, || async { deployments.get_opt("resnet").await.ok()? }).await;
    let owner = &deployment.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("ModelDeployment", md.uid().unwrap().as_str()));
    assert_eq!(owner.controller, Some(true));
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    let server = &pod.containers[0];
    let args = server.args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--max-batch-size", "8"]), "{args:?}");
    assert!(args.windows(2).any(|w| w == ["--max-queue-delay-us", "500"]), "{args:?}");
    assert_eq!(server.image.as_deref(), Some("ferrite-server:test"));
    assert_eq!(server.resources.as_ref().unwrap().limits.as_ref().unwrap()["cpu"].0, "2");
    let security = server.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(server.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap().service.as_deref(), Some("resnet"));
    let fetch = &pod.init_containers.unwrap()[0];
    assert!(fetch.args.as_ref().unwrap().contains(&"https://models.example/resnet50.onnx".to_string()));
    // The managed fields show server-side apply by the operator.
    assert!(deployment
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .any(|f| f.manager.as_deref() == Some("ferrite-operator")));

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service = eventually("the Service exists", WAIT, || async { services.get_opt("resnet").await.ok()? }).await;
    let ports: Vec<i32> = service.spec.unwrap().ports.unwrap().iter().map(|p| p.port).collect();
    assert_eq!(ports, vec![8000, 8001, 8002]);

    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    eventually("the PodDisruptionBudget exists", WAIT, || async { budgets.get_opt("resnet").await.ok()? }).await;
}

#[tokio::test]
async fn spec_change_rolls_the_deployment_and_scaling_to_one_drops_the_budget() {
    let Some((plane, client, ns)) = setup("rollout").await else { return };
    let _operator = Operator::start(plane, &ns, "op-a");
    create(&client, &ns, &model_deployment("m", json!({"model": {"uri": "s3://b/m.onnx"}, "replicas": 2}))).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let first = eventually("the Deployment exists", WAIT, || async { deployments.get_opt("m").await.ok()? }).await;

    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"batching": {"maxBatchSize": 4}, "replicas": 1}});
    mds.patch("m", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("the pod template carries the new batch size", WAIT, || async {
        let args = deployment_args(&deployments, "m").await?;
        args.windows(2).any(|w| w == ["--max-batch-size", "4"]).then_some(())
    })
    .await;
    let second = deployments.get("m").await.unwrap();
    assert!(second.metadata.generation > first.metadata.generation, "a new template is a new Deployment generation");
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    eventually("the budget is gone with one replica", WAIT, || async {
        budgets.get_opt("m").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn edited_or_deleted_owned_objects_are_restored() {
    let Some((plane, client, ns)) = setup("drift").await else { return };
    let _operator = Operator::start(plane, &ns, "op-a");
    create(&client, &ns, &model_deployment("m", json!({"model": {"uri": "s3://b/m.onnx"}}))).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    eventually("the objects exist", WAIT, || async {
        deployments.get_opt("m").await.ok()??;
        services.get_opt("m").await.ok()?
    })
    .await;

    // Someone edits the server image with another field manager, forcing it.
    let edit = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "m"},
        "spec": {"template": {"spec": {"containers": [{"name": "server", "image": "evil:latest"}]}}}
    });
    deployments.patch("m", &PatchParams::apply("someone-else").force(), &Patch::Apply(&edit)).await.unwrap();
    eventually("the image is put back", WAIT, || async {
        let d = deployments.get("m").await.ok()?;
        let image = d.spec?.template.spec?.containers.iter().find(|c| c.name == "server")?.image.clone()?;
        (image == "ferrite-server:test").then_some(())
    })
    .await;

    let before = services.get("m").await.unwrap().uid().unwrap();
    services.delete("m", &DeleteParams::default()).await.unwrap();
    eventually("the Service is recreated", WAIT, || async {
        let service = services.get_opt("m").await.ok()??;
        (service.uid()? != before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn bad_specs_are_refused_by_cel_rules() {
    let Some((_plane, client, ns)) = setup("cel").await else { return };
    let cases = [
        (json!({"model": {"uri": "s3://b/m.onnx"}, "replicas": 2, "autoscaling": {"maxReplicas": 3}}), "exclusive"),
        (
            json!({"model": {"uri": "s3://b/m.onnx"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 3}}),
            "minReplicas must not exceed maxReplicas",
        ),
        (
            json!({"model": {"uri": "s3://b/m.onnx"}, "gpus": 1}),
            "spec.gpus needs spec.runtime.executionProvider cuda or tensorrt",
        ),
        (
            json!({"model": {"uri": "s3://b/m.onnx"}, "runtime": {"executionProvider": "cuda"}}),
            "needs spec.gpus of 1 or more",
        ),
        (json!({"model": {"uri": "ftp://b/m.onnx"}}), "spec.model.uri must start with"),
        // Credentials belong in a Secret (spec.model.uriFrom), not in the pod spec.
        (
            json!({"model": {"uri": "https://user:secret@models.example/m.onnx"}}),
            "reference it with spec.model.uriFrom",
        ),
        (json!({"model": {"uri": "s3://b/m.onnx?X-Amz-Signature=abc"}}), "reference it with spec.model.uriFrom"),
        (
            json!({"model": {"uri": "s3://b/m.onnx", "uriFrom": {"secretKeyRef": {"name": "s", "key": "uri"}}}}),
            "set exactly one of spec.model.uri and spec.model.uriFrom",
        ),
        (json!({"model": {"name": "m"}}), "set exactly one of spec.model.uri and spec.model.uriFrom"),
        (json!({"model": {"uri": "s3://b/m.onnx", "maxSize": "2GB"}}), "spec.model.maxSize must be"),
        (
            json!({"model": {"uri": "s3://b/m.onnx"}, "networkPolicy": {"from": [{}]}}),
            "a network peer needs namespaceSelector, podSelector or both",
        ),
        (json!({"model": {"uri": "s3://b/m.onnx", "sha256": "xyz"}}), "64 lowercase hex digits"),
        (
            json!({"model": {"uri": "s3://b/m.onnx"}, "batching": {"maxBatchSize": 0}}),
            "maxBatchSize must be at least 1",
        ),
        (
            json!({"model": {"uri": "s3://b/m.onnx"}, "autoscaling": {"maxReplicas": 2, "scrapeIntervalSeconds": 0}}),
            "scrapeIntervalSeconds must be between 1 and 300",
        ),
        (json!({"model": {"uri": "s3://b/m.onnx"}, "service": {"type": "ExternalName"}}), "spec.service.type must be"),
        (json!({"model": {"uri": "s3://b/m.onnx"}, "runtime": {"executionProvider": "rocm"}}), "Unsupported value"),
    ];
    // Sent as raw JSON: some cases (an unknown enum value) have no Rust form.
    let resource = kube::api::ApiResource::erase::<ModelDeployment>(&());
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    for (i, (spec, message)) in cases.into_iter().enumerate() {
        let object: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": format!("bad-{i}")}, "spec": spec,
        }))
        .unwrap();
        let error = match api.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(e)) => e,
            other => panic!("case {i} should be refused with '{message}', got {other:?}"),
        };
        assert_eq!(error.code, 422, "case {i}: {}", error.message);
        assert!(error.message.contains(message), "case {i}: '{}' does not contain '{message}'", error.message);
    }
    // And a good one is accepted.
    create(
        &client,
        &ns,
        &model_deployment("good", json!({"model": {"uri": "s3://b/m.onnx"}, "autoscaling": {"maxReplicas": 3}})),
    )
    .await;
}

#[tokio::test]
async fn deleting_a_model_deployment_removes_what_it_owned() {
    let Some((plane, client, ns)) = setup("garbage").await else { return };
    let _operator = Operator::start(plane, &ns, "op-a");
    create(&client, &ns, &model_deployment("m", json!({"model": {"uri": "s3://b/m.onnx"}, "replicas": 2}))).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    eventually("all owned objects exist and pods were created", WAIT, || async {
        deployments.get_opt("m").await.ok()??;
        services.get_opt("m").await.ok()??;
        budgets.get_opt("m").await.ok()??;
        (!pods.list(&ListParams::default()).await.ok()?.items.is_empty()).then_some(())
    })
    .await;
    Api::<ModelDeployment>::namespaced(client.clone(), &ns).delete("m", &DeleteParams::foreground()).await.unwrap();
    eventually("the garbage collector removed everything", WAIT, || async {
        let gone = deployments.get_opt("m").await.ok()?.is_none()
            && services.get_opt("m").await.ok()?.is_none()
            && budgets.get_opt("m").await.ok()?.is_none()
            && pods.list(&ListParams::default()).await.ok()?.items.is_empty();
        gone.then_some(())
    })
    .await;
}

#[tokio::test]
async fn status_tracks_generation_and_says_why_pods_do_not_serve() {
    let Some((plane, client, ns)) = setup("status").await else { return };
    let _operator = Operator::start(plane, &ns, "op-a");
    create(&client, &ns, &model_deployment("m", json!({"model": {"uri": "s3://b/m.onnx"}}))).await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let md = eventually("status is written", WAIT, || async {
        let md = mds.get("m").await.ok()?;
        (md.status.as_ref()?.observed_generation == md.metadata.generation).then_some(md)
    })
    .await;
    let status = md.status.unwrap();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready condition");
    assert_eq!(ready.status, "False", "no kubelet runs pods here");
    assert_eq!(status.endpoints.unwrap().grpc, format!("m.{ns}.svc:8001"));
    assert_eq!(status.selector.as_deref(), Some("ferrite.dev/model-deployment=m"));

    // A new generation is observed.
    mds.patch("m", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"batching": {"maxQueueSize": 10}}})))
        .await
        .unwrap();
    eventually("the new generation is observed", WAIT, || async {
        let md = mds.get("m").await.ok()?;
        (md.status?.observed_generation == md.metadata.generation && md.metadata.generation >= Some(2)).then_some(())
    })
    .await;

    // A pod whose image cannot be pulled: the kubelet would say so in its
    // status; here the test writes it, as a kubelet would.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = eventually("the Deployment controller created a pod", WAIT, || async {
        pods.list(&ListParams::default().labels("ferrite.dev/model-deployment=m")).await.ok()?.items.into_iter().next()
    })
    .await;
    let pod_status = json!({"status": {"phase": "Pending", "containerStatuses": [{
        "name": "server", "image": "ferrite-server:test", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"ferrite-server:test\""}}}]}});
    pods.patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&pod_status)).await.unwrap();
    let degraded = eventually("Degraded says ImagePullFailed", WAIT, || async {
        let md = mds.get("m").await.ok()?;
        md.status?.conditions.into_iter().find(|c| c.type_ == "Degraded" && c.reason == "ImagePullFailed")
    })
    .await;
    assert_eq!(degraded.status, "True");
    assert!(degraded.message.contains("ImagePullBackOff"), "{}", degraded.message);
    // An Event records it.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    eventually("a Warning event names the reason", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ImagePullFailed") && e.type_.as_deref() == Some("Warning"))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_fail_over() {
    let Some((plane, client, ns)) = setup("leader").await else { return };
    let mut first = Operator::start(plane, &ns, "op-1");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease_name = format!("ferrite-{ns}");
    eventually("op-1 holds the lease", WAIT, || async {
        let holder = leases.get_opt(&lease_name).await.ok()??.spec?.holder_identity?;
        holder.starts_with("op-1_").then_some(())
    })
    .await;
    let second = Operator::start(plane, &ns, "op-2");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let holder = leases.get(&lease_name).await.unwrap().spec.unwrap().holder_identity.unwrap();
    assert!(holder.starts_with("op-1_"), "the follower must not take a held lease, holder {holder}");
    let leader_gauge = |text: Option<String>| {
        text.and_then(|t| t.lines().find(|l| l.starts_with("ferrite_operator_leader ")).map(str::to_string))
    };
    assert_eq!(leader_gauge(second.metrics().await).as_deref(), Some("ferrite_operator_leader 0"));

    // Kill the leader without letting it release the lease: a crash.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let started = std::time::Instant::now();
    eventually("op-2 takes over", Duration::from_secs(60), || async {
        let holder = leases.get_opt(&lease_name).await.ok()??.spec?.holder_identity?;
        holder.starts_with("op-2_").then_some(())
    })
    .await;
    eprintln!("failover after a crash took {:.1} s", started.elapsed().as_secs_f64());
    // The new leader reconciles.
    create(&client, &ns, &model_deployment("after-failover", json!({"model": {"uri": "s3://b/m.onnx"}}))).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("the new leader creates the Deployment", WAIT, || async {
        deployments.get_opt("after-failover").await.ok()?
    })
    .await;
    drop(second);
}

#[tokio::test]
async fn sigterm_releases_the_lease_for_a_fast_handover() {
    let Some((plane, client, ns)) = setup("handover").await else { return };
    let mut first = Operator::start(plane, &ns, "op-1");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease_name = format!("ferrite-{ns}");
    eventually("op-1 leads", WAIT, || async {
        (leases.get_opt(&lease_name).await.ok()??.spec?.holder_identity?.starts_with("op-1_")).then_some(())
    })
    .await;
    let _second = Operator::start(plane, &ns, "op-2");
    let status = first.terminate();
    assert!(status.success(), "SIGTERM is a clean exit, got {status}");
    let started = std::time::Instant::now();
    eventually("op-2 leads", Duration::from_secs(30), || async {
        (leases.get_opt(&lease_name).await.ok()??.spec?.holder_identity?.starts_with("op-2_")).then_some(())
    })
    .await;
    eprintln!("handover after SIGTERM took {:.1} s", started.elapsed().as_secs_f64());
}

/// The managers whose `managedFields` own `path` (`["f:status", "f:queueDepth"]`).
fn owners(meta: &ObjectMeta, path: &[&str]) -> Vec<String> {
    let mut owners: Vec<String> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| {
            let fields = entry.fields_v1.as_ref().map(|f| &f.0);
            path.iter().try_fold(fields, |node, key| node.map(|n| n.get(key))).flatten().is_some()
        })
        .map(|entry| entry.manager.clone().unwrap_or_default())
        .collect();
    owners.sort();
    owners.dedup();
    owners
}

#[tokio::test]
async fn autoscaler_and_reconciler_each_own_their_status_fields() {
    const AUTOSCALER: &str = "ferrite-operator-autoscaler";
    const RECONCILER: &str = "ferrite-operator";
    const AUTOSCALER_FIELDS: [&str; 2] = ["f:queueDepth", "f:lastScaleTime"];
    const RECONCILER_FIELDS: [&str; 7] = [
        "f:observedGeneration",
        "f:replicas",
        "f:readyReplicas",
        "f:desiredReplicas",
        "f:selector",
        "f:endpoints",
        "f:conditions",
    ];
    let Some((plane, client, ns)) = setup("status-owners").await else { return };
    let (ip, load) = fake_pod_metrics("m").await;
    *load.lock().unwrap() = (10, 2);
    let _operator = Operator::start(plane, &ns, "op-a");
    create(
        &client,
        &ns,
        &model_deployment(
            "m",
            json!({"model": {"uri": "s3://b/m.onnx"},
                   "autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4,
                                   "scrapeIntervalSeconds": 1, "scaleDownStabilizationSeconds": 300}}),
        ),
    )
    .await;
    // Play kubelet for the first pod: Ready, at the fake server's address.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = eventually("the Deployment controller created a pod", WAIT, || async {
        pods.list(&ListParams::default().labels("ferrite.dev/model-deployment=m")).await.ok()?.items.into_iter().next()
    })
    .await;
    let now = chrono::Utc::now().to_rfc3339();
    let pod_status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    }});
    pods.patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&pod_status)).await.unwrap();

    // The autoscaler sees 12 requests, scales to 3 and says so; the
    // reconciler follows the Deployment to desiredReplicas 3.
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let md = eventually("queueDepth 12, a scale time and desiredReplicas 3", WAIT, || async {
        let md = mds.get("m").await.ok()?;
        let s = md.status.as_ref()?;
        (s.queue_depth == Some(12)
            && s.last_scale_time.is_some()
            && s.desired_replicas == 3
            && s.observed_generation == md.metadata.generation)
            .then_some(md)
    })
    .await;
    let check_owners = |md: &ModelDeployment, when: &str| {
        for field in AUTOSCALER_FIELDS {
            assert_eq!(owners(&md.metadata, &["f:status", field]), [AUTOSCALER], "{when}: {field}");
        }
        for field in RECONCILER_FIELDS {
            assert_eq!(owners(&md.metadata, &["f:status", field]), [RECONCILER], "{when}: {field}");
        }
    };
    check_owners(&md, "after the scale-up");
    let scale_time = md.status.as_ref().unwrap().last_scale_time.clone();
    // The reconciler has left the Deployment's replicas to the autoscaler.
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns).get("m").await.unwrap();
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(3));
    let replica_owners = owners(&deployment.metadata, &["f:spec", "f:replicas"]);
    assert!(replica_owners.iter().all(|o| o == AUTOSCALER), "spec.replicas owned by {replica_owners:?}");

    // The reconciler writes a new generation's status and leaves the
    // autoscaler's fields as they were.
    let patch = json!({"spec": {"batching": {"maxQueueSize": 10}}});
    mds.patch("m", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let md = eventually("the new generation is observed", WAIT, || async {
        let md = mds.get("m").await.ok()?;
        (md.status.as_ref()?.observed_generation == md.metadata.generation && md.metadata.generation >= Some(2))
            .then_some(md)
    })
    .await;
    let status = md.status.as_ref().unwrap();
    assert_eq!((status.queue_depth, &status.last_scale_time), (Some(12), &scale_time), "the reconciler kept out");
    check_owners(&md, "after the reconciler's write");

    // The autoscaler writes a new queue depth (no scale: the window holds
    // the count) and leaves the reconciler's fields as they were.
    *load.lock().unwrap() = (3, 2);
    let md = eventually("queueDepth 5", WAIT, || async {
        let md = mds.get("m").await.ok()?;
        (md.status.as_ref()?.queue_depth == Some(5)).then_some(md)
    })
    .await;
    let status = md.status.as_ref().unwrap();
    assert_eq!(status.last_scale_time, scale_time, "no scale, the same scale time");
    assert_eq!(status.desired_replicas, 3);
    assert_eq!(status.observed_generation, md.metadata.generation);
    assert_eq!(status.selector.as_deref(), Some("ferrite.dev/model-deployment=m"));
    assert_eq!(status.conditions.len(), 3, "{:?}", status.conditions);
    check_owners(&md, "after the autoscaler's second write");
}
