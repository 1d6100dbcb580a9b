//! 200 ModelDeployments in one namespace: every one gets its Deployment and
//! a status, and the operator's memory (RSS) is reported.

mod support;

use std::time::{Duration, Instant};

use ferrite_operator::crd::ModelDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use support::{eventually, install_crd, namespace, Operator};

const COUNT: usize = 200;

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
    eventually("every ModelDeployment has a Deployment and a status", Duration::from_secs(240), || async {
        let with_deployment = deployments.list(&ListParams::default()).await.ok()?.items.len();
        let with_status = mds
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .filter(|md| md.status.as_ref().is_some_and(|s| s.observed_generation == md.metadata.generation))
            .count();
        (with_deployment == COUNT && with_status == COUNT).then_some(())
    })
    .await;
    let settled = started.elapsed();
    // Let the autoscaler make a few rounds over all of them.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_mib = rss_kib(operator.child.id()) as f64 / 1024.0;
    eprintln!("{COUNT} ModelDeployments reconciled in {:.1} s; operator RSS {rss_mib:.1} MiB", settled.as_secs_f64());
    let metrics = operator.metrics().await.expect("operator metrics");
    assert!(metrics.contains("ferrite_operator_reconciliations_total{result=\"ok\"}"), "{metrics}");
}
