//! `spec.escalation` against a real API server: the CEL rules refuse bad
//! specs with their messages and keep the defaults; the operator writes the
//! settings ConfigMap and the pod template, and reads the escalation rate and
//! the target's reachability from a pod's metrics into the status (the test
//! plays kubelet for the pod, and the pod's metrics port is a stand-in that
//! serves the cascade's metric families as the contract names them).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrite_operator::crd::ModelDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use support::{create, eventually, model_deployment, setup, Operator};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn bad_escalation_specs_are_refused_by_cel_rules_and_good_ones_get_the_defaults() {
    let Some((_plane, client, ns)) = setup("escalation-cel").await else { return };
    let with = |escalation: serde_json::Value| json!({"model": {"uri": "s3://b/m/"}, "escalation": escalation});
    let md = |t: serde_json::Value| with(json!({"target": t}));
    let cases = [
        (
            md(json!({"modelDeployment": "macro", "url": "https://x.example/v1", "model": "m"})),
            "spec.escalation.target needs exactly one of modelDeployment and url",
        ),
        (md(json!({})), "spec.escalation.target needs exactly one of modelDeployment and url"),
        (md(json!({"url": "https://x.example/v1"})), "spec.escalation.target.url needs spec.escalation.target.model"),
        (md(json!({"url": "ftp://x.example/v1", "model": "m"})), "must start with http:// or https://"),
        (md(json!({"url": "https://user:pw@x.example/v1", "model": "m"})), "must start with http:// or https://"),
        (md(json!({"modelDeployment": "macro", "model": "m"})), "go with url"),
        (md(json!({"modelDeployment": "Not_A_Name"})), "must be the name of a ModelDeployment"),
        (
            md(json!({"url": "https://x.example/v1", "model": "m", "apiKeySecretRef": {"name": "Bad_Name", "key": "k"}})),
            "a Secret name must be a DNS subdomain",
        ),
        // The CEL rule at the object's root sees its name.
        (md(json!({"modelDeployment": "self-target"})), "must name another ModelDeployment, not this one"),
        (with(json!({"target": {"modelDeployment": "macro"}, "mode": "sometimes"})), "Unsupported value"),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "confidence": {"quantile": 0.0, "threshold": -1.0}})),
            "spec.escalation.confidence.quantile must be more than 0 and at most 1",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "confidence": {"quantile": 1.5, "threshold": -1.0}})),
            "spec.escalation.confidence.quantile must be more than 0 and at most 1",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "confidence": {"threshold": 0.5}})),
            "spec.escalation.confidence.threshold must be 0 or less",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "decideAfterTokens": 0})),
            "spec.escalation.decideAfterTokens must be between 1 and 4096",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "decideAfterTokens": 5000})),
            "spec.escalation.decideAfterTokens must be between 1 and 4096",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "maxEscalationFraction": 1.5})),
            "spec.escalation.maxEscalationFraction must be between 0 and 1",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "windowSeconds": 0})),
            "spec.escalation.windowSeconds must be at least 1",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "timeoutSeconds": 0})),
            "spec.escalation.timeoutSeconds must be more than 0 and at most 600",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"}, "timeoutSeconds": 601})),
            "spec.escalation.timeoutSeconds must be more than 0 and at most 600",
        ),
        (
            with(json!({"target": {"modelDeployment": "macro"},
                        "pricing": {"inputPerMillionTokens": -1, "outputPerMillionTokens": 30}})),
            "spec.escalation.pricing.inputPerMillionTokens must not be negative",
        ),
    ];
    // Sent as raw JSON: some cases (an unknown enum value) have no Rust form.
    let resource = kube::api::ApiResource::erase::<ModelDeployment>(&());
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    for (i, (spec, message)) in cases.into_iter().enumerate() {
        let name = if message.contains("not this one") { "self-target".to_string() } else { format!("bad-{i}") };
        let object: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        let error = match api.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(e)) => e,
            other => panic!("case {i} should be refused with '{message}', got {other:?}"),
        };
        assert_eq!(error.code, 422, "case {i}: {}", error.message);
        assert!(error.message.contains(message), "case {i}: '{}' does not contain '{message}'", error.message);
    }

    // Good ones are accepted, and the schema fills in the defaults.
    let by_name = create(&client, &ns, &model_deployment("micro", md(json!({"modelDeployment": "macro"})))).await;
    let e = by_name.spec.escalation.unwrap();
    assert_eq!(serde_json::to_value(e.mode).unwrap(), "cascade");
    assert_eq!((e.decide_after_tokens, e.window_seconds, e.max_escalation_fraction), (16, 60, 1.0));
    assert_eq!((e.timeout_seconds, e.on_schema_failure, e.on_length_cutoff, e.on_queue_full), (30.0, true, false, false));
    let hosted = with(json!({
        "target": {"url": "https://llm.example.com/v1", "model": "large",
                   "apiKeySecretRef": {"name": "hosted-llm", "key": "api-key"}},
        "mode": "shadow", "confidence": {"threshold": -2}, "timeoutSeconds": 0.5,
        "pricing": {"inputPerMillionTokens": 10, "outputPerMillionTokens": 30},
    }));
    let hosted = create(&client, &ns, &model_deployment("hosted", hosted)).await;
    assert_eq!(hosted.spec.escalation.unwrap().confidence.unwrap().quantile, 0.1);
}

/// A pod's metrics port: the cascade's counters and target gauge, which the
/// test moves.
#[derive(Default)]
struct Cascade {
    local: u64,
    escalated: u64,
    fallback: u64,
    target_up: Option<u8>,
}

async fn fake_cascade_metrics(model: &'static str) -> (String, Arc<Mutex<Cascade>>) {
    let state = Arc::new(Mutex::new(Cascade::default()));
    let listener = {
        let mut found = None;
        for n in 1..=254 {
            if let Ok(l) = tokio::net::TcpListener::bind(format!("127.0.78.{n}:8002")).await {
                found = Some(l);
                break;
            }
        }
        found.expect("a free 127.0.78.N:8002")
    };
    let ip = listener.local_addr().unwrap().ip().to_string();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get({
            let state = state.clone();
            move || async move {
                let s = state.lock().unwrap();
                let mut text = format!(
                    "# TYPE ferrite_queue_depth gauge\nferrite_queue_depth{{model=\"{model}\"}} 0\n\
                     # TYPE ferrite_cascade_decisions_total counter\n\
                     ferrite_cascade_decisions_total{{model=\"{model}\",outcome=\"local\"}} {}\n\
                     ferrite_cascade_decisions_total{{model=\"{model}\",outcome=\"escalated\"}} {}\n\
                     ferrite_cascade_decisions_total{{model=\"{model}\",outcome=\"fallback\"}} {}\n",
                    s.local, s.escalated, s.fallback
                );
                if let Some(up) = s.target_up {
                    text += &format!(
                        "# TYPE ferrite_escalation_target_up gauge\nferrite_escalation_target_up{{model=\"{model}\"}} {up}\n"
                    );
                }
                text
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (ip, state)
}

fn condition(md: &ModelDeployment, type_: &str) -> Option<Condition> {
    md.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).cloned()
}

#[tokio::test]
async fn the_operator_mounts_the_settings_and_reports_rate_and_target() {
    let Some((plane, client, ns)) = setup("escalation-status").await else { return };
    let _operator = Operator::start(plane, &ns, "op-a");
    let spec = json!({
        "model": {"uri": "s3://b/m/", "name": "smollm2"},
        "escalation": {"target": {"modelDeployment": "macro"}, "windowSeconds": 300},
    });
    create(&client, &ns, &model_deployment("micro", spec)).await;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    // The settings file, resolved, and the pods that read it.
    let cm = eventually("the settings ConfigMap exists", WAIT, || async {
        config_maps.get_opt("micro-escalation").await.ok()?
    })
    .await;
    let settings: serde_json::Value = serde_json::from_str(&cm.data.unwrap()["escalation.json"]).unwrap();
    assert_eq!(settings["target"], json!({"url": format!("http://macro.{ns}.svc:8000/v1"), "model": "macro"}));
    assert_eq!(cm.metadata.owner_references.unwrap()[0].kind, "ModelDeployment");
    let deployment = eventually("the Deployment exists", WAIT, || async { deployments.get_opt("micro").await.ok()? }).await;
    let template = deployment.spec.unwrap().template;
    assert!(template.metadata.unwrap().annotations.unwrap().contains_key("ferrite.dev/escalation-hash"));
    let args = template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--escalation-file", "/etc/ferrite/escalation/escalation.json"]), "{args:?}");

    // The target does not exist: the condition says so.
    let md = eventually("EscalationTargetReachable is TargetMissing", WAIT, || async {
        let md = mds.get("micro").await.ok()?;
        (condition(&md, "EscalationTargetReachable")?.reason == "TargetMissing").then_some(md)
    })
    .await;
    let missing = condition(&md, "EscalationTargetReachable").unwrap();
    assert_eq!(missing.status, "False");
    assert!(missing.message.contains("macro"), "{}", missing.message);

    // Play kubelet for the Deployment's pod: Running at the stand-in's address.
    let (ip, cascade) = fake_cascade_metrics("smollm2").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = eventually("the Deployment's pod exists", WAIT, || async {
        pods.list(&ListParams::default().labels("ferrite.dev/model-deployment=micro")).await.ok()?.items.pop()
    })
    .await;
    let now = chrono::Utc::now().to_rfc3339();
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1", "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    }});
    pods.patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    {
        let mut c = cascade.lock().unwrap();
        (c.local, c.escalated, c.fallback, c.target_up) = (6, 3, 1, Some(1));
    }
    // The macro deployment appears; the pod's last call succeeded.
    create(&client, &ns, &model_deployment("macro", json!({"model": {"uri": "s3://b/m/"}}))).await;
    let md = eventually("the rate and TargetReachable", WAIT, || async {
        let md = mds.get("micro").await.ok()?;
        let reachable = condition(&md, "EscalationTargetReachable")?.reason == "TargetReachable";
        let escalation = md.status.as_ref()?.escalation.clone()?;
        (reachable && escalation.total == 10).then_some(md)
    })
    .await;
    let escalation = md.status.unwrap().escalation.unwrap();
    assert_eq!((escalation.escalated, escalation.rate, escalation.target_reachable), (3, Some(0.3), Some(true)));

    // More traffic; then the target fails.
    {
        let mut c = cascade.lock().unwrap();
        (c.local, c.escalated, c.fallback, c.target_up) = (6, 13, 1, Some(0));
    }
    let md = eventually("TargetUnreachable and the new rate", WAIT, || async {
        let md = mds.get("micro").await.ok()?;
        let unreachable = condition(&md, "EscalationTargetReachable")?.reason == "TargetUnreachable";
        (unreachable && md.status.as_ref()?.escalation.as_ref()?.total == 20).then_some(md)
    })
    .await;
    let escalation = md.status.clone().unwrap().escalation.unwrap();
    assert_eq!((escalation.escalated, escalation.rate, escalation.target_reachable), (13, Some(0.65), Some(false)));
    assert_eq!(condition(&md, "EscalationTargetReachable").unwrap().status, "False");

    // Escalation removed: the settings, the flag and the condition go.
    mds.patch("micro", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"escalation": null}}))).await.unwrap();
    eventually("the ConfigMap, the flag and the status are gone", WAIT, || async {
        config_maps.get_opt("micro-escalation").await.ok()?.is_none().then_some(())?;
        let args = deployments.get("micro").await.ok()?.spec?.template.spec?.containers[0].args.clone()?;
        (!args.iter().any(|a| a == "--escalation-file")).then_some(())?;
        let md = mds.get("micro").await.ok()?;
        let status = md.status.as_ref()?;
        (status.escalation.is_none() && condition(&md, "EscalationTargetReachable").is_none()).then_some(())
    })
    .await;
}
