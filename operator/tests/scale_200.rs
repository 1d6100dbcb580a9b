//! 200 ModelDeployments in one namespace: every one gets its Deployment and
//! a status, and the operator's memory (RSS) is reported.

mod support;

use std::time::{Duration, Instant};

use ferrite_operator::crd::ModelDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::{install_crd, namespace, Operator};

const COUNT: usize = 200;
/// How long reconciliation may make no progress before the test fails.
const STALL: Duration = Duration::from_secs(120);

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn reconciles_200_model_deployments() {
    let Some(plane) = support::control_plane() else { return };
    let client = plane.client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "scale-200").await;
    let operator = Operator::start(plane, &ns, "op-a");
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    for i in 0..COUNT {
        let md: ModelDeployment = serde_json::from_value(json!({
            "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": format!("model-{i:03}")},
            "spec": {"model": {"uri": format!("s3://models/m{i}.onnx")},
                     "autoscaling": {"maxReplicas": 4, "scrapeIntervalSeconds": 5}},
        }))
        .unwrap();
        mds.create(&PostParams::default(), &md).await.unwrap();
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    // Reconciling 200 objects is API-bound: about 90 s on an idle 2-core
    // machine, minutes with a compile beside the tests. So the test waits as
    // long as the count keeps growing and fails only when it stalls.
    let mut best = 0;
    let mut last_progress = Instant::now();
    loop {
        let with_deployment = deployments.list(&ListParams::default()).await.map_or(0, |l| l.items.len());
        let with_status = mds.list(&ListParams::default()).await.map_or(0, |l| {
            l.items
                .iter()
                .filter(|md| md.status.as_ref().is_some_and(|s| s.observed_generation == md.metadata.generation))
                .count()
        });
        if with_deployment == COUNT && with_status == COUNT {
            break;
        }
        if with_deployment + with_status > best {
            best = with_deployment + with_status;
            last_progress = Instant::now();
        }
        assert!(
            last_progress.elapsed() < STALL,
            "no progress for {STALL:?}: {with_deployment} of {COUNT} Deployments, {with_status} statuses"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settled = started.elapsed();
    // Let the autoscaler make a few rounds over all of them.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_mib = rss_kib(operator.child.id()) as f64 / 1024.0;
    eprintln!("{COUNT} ModelDeployments reconciled in {:.1} s; operator RSS {rss_mib:.1} MiB", settled.as_secs_f64());
    let metrics = operator.metrics().await.expect("operator metrics");
    assert!(metrics.contains("ferrite_operator_reconciliations_total{result=\"ok\"}"), "{metrics}");
}
