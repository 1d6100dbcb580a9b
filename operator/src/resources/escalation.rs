//! The server side of `spec.escalation`: the resolved settings as a JSON
//! file in an owned ConfigMap (`<name>-escalation`, key `escalation.json`),
//! mounted read-only and named by `--escalation-file`; the target's API key
//! from a Secret, mounted as a file; in shadow mode an emptyDir for the
//! shadow log; a pod-template annotation with the settings' hash, so that a
//! change rolls the pods. Pure functions; the Deployment builder in
//! [`crate::resources`] puts the pieces together.
//!
//! The file holds the `escalation` object itself (the fields of
//! `ferrite.json`'s `escalation` key), with the target resolved: a
//! `modelDeployment` becomes `url` `http://<name>.<namespace>.svc:8000/v1`
//! and `model` `<name>`; `apiKeySecretRef` becomes `apiKeyFile`.

use std::collections::BTreeMap;

use ferrite_contract::{serve, CommandLine};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, KeyToPath, SecretVolumeSource, Volume, VolumeMount,
};
use kube::ResourceExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::{ConfidenceSignal, EscalationMode, EscalationSpec, ModelDeployment, Pricing};
use crate::resources::{empty_dir, metadata, mount, owner, HTTP_PORT};

/// Where the ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/ferrite/escalation";
/// The settings file's name: the ConfigMap key and the file in [`CONFIG_DIR`].
pub const CONFIG_KEY: &str = "escalation.json";
/// Where the target's API key is mounted.
pub const API_KEY_DIR: &str = "/var/run/secrets/ferrite/escalation";
/// The API key's file name inside [`API_KEY_DIR`].
const API_KEY_NAME: &str = "api-key";
/// Where shadow mode writes its records (an emptyDir).
pub const SHADOW_DIR: &str = "/var/lib/ferrite/shadow";
/// The shadow log's file name inside [`SHADOW_DIR`].
const SHADOW_LOG_NAME: &str = "shadow.jsonl";
/// Most bytes of shadow records a pod may keep; beyond it the kubelet
/// evicts the pod rather than let the node's disk fill.
const SHADOW_SIZE_LIMIT: u64 = 1 << 30;
/// Pod-template annotation: a hash of the settings file, so that a change
/// rolls the pods (the server reads the file at start).
pub const HASH_ANNOTATION: &str = "ferrite.dev/escalation-hash";
/// Pod label naming the ModelDeployment the pods escalate to: the target's
/// NetworkPolicy lets such pods in on its HTTP port.
pub const ESCALATES_TO_LABEL: &str = "ferrite.dev/escalates-to";
/// Owner and group may read (the pod's fsGroup is the server's group), as
/// the other Secret files.
const SECRET_FILE_MODE: i32 = 0o440;

/// The settings file: `spec.escalation` with the target resolved.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub mode: EscalationMode,
    pub target: ResolvedTarget,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<ConfidenceSignal>,
    pub on_schema_failure: bool,
    pub on_length_cutoff: bool,
    pub on_queue_full: bool,
    pub decide_after_tokens: i32,
    pub max_escalation_fraction: f64,
    pub window_seconds: i32,
    pub timeout_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// Shadow mode only: the JSON-lines file under [`SHADOW_DIR`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_log: Option<String>,
}

/// An OpenAI-compatible target as the server calls it.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedTarget {
    /// Base URL, ending in `/v1`.
    pub url: String,
    /// The model name sent to it.
    pub model: String,
    /// The file holding the Bearer token, when the target needs one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
}

/// The in-cluster base URL of ModelDeployment `name` in `namespace`.
pub fn model_deployment_url(name: &str, namespace: &str) -> String {
    format!("http://{name}.{namespace}.svc:{HTTP_PORT}/v1")
}

/// Name of the owned ConfigMap.
pub fn config_map_name(md: &ModelDeployment) -> String {
    format!("{}-escalation", md.name_any())
}

/// The resolved settings, or `None` without `spec.escalation`.
pub fn settings(md: &ModelDeployment) -> Option<Settings> {
    let spec = md.spec.escalation.as_ref()?;
    Some(resolve(spec, &md.namespace().unwrap_or_else(|| "default".into())))
}

fn resolve(spec: &EscalationSpec, namespace: &str) -> Settings {
    let target = &spec.target;
    let target = match &target.model_deployment {
        Some(name) => ResolvedTarget { url: model_deployment_url(name, namespace), model: name.clone(), api_key_file: None },
        None => ResolvedTarget {
            url: target.url.clone().unwrap_or_default(),
            model: target.model.clone().unwrap_or_default(),
            api_key_file: target.api_key_secret_ref.as_ref().map(|_| format!("{API_KEY_DIR}/{API_KEY_NAME}")),
        },
    };
    Settings {
        mode: spec.mode,
        target,
        confidence: spec.confidence.clone(),
        on_schema_failure: spec.on_schema_failure,
        on_length_cutoff: spec.on_length_cutoff,
        on_queue_full: spec.on_queue_full,
        decide_after_tokens: spec.decide_after_tokens,
        max_escalation_fraction: spec.max_escalation_fraction,
        window_seconds: spec.window_seconds,
        timeout_seconds: spec.timeout_seconds,
        pricing: spec.pricing.clone(),
        shadow_log: (spec.mode == EscalationMode::Shadow).then(|| format!("{SHADOW_DIR}/{SHADOW_LOG_NAME}")),
    }
}

/// The settings file's text (a struct, so the key order is fixed).
pub fn settings_json(md: &ModelDeployment) -> Option<String> {
    settings(md).map(|s| serde_json::to_string_pretty(&s).expect("plain data serializes"))
}

/// The ConfigMap holding the settings file, or `None` without escalation.
pub fn config_map(md: &ModelDeployment) -> Option<ConfigMap> {
    let json = settings_json(md)?;
    let mut meta = metadata(md, &owner(md));
    meta.name = Some(config_map_name(md));
    Some(ConfigMap {
        metadata: meta,
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), json)])),
        ..ConfigMap::default()
    })
}

/// `--escalation-file`, with `spec.escalation`.
pub fn server_args(md: &ModelDeployment, args: CommandLine) -> CommandLine {
    match md.spec.escalation {
        Some(_) => args.value(serve::ESCALATION_FILE, format!("{CONFIG_DIR}/{CONFIG_KEY}")),
        None => args,
    }
}

/// Volumes of the server container: the settings file, the API key and the
/// shadow log's directory, each when the spec asks for it.
pub fn server_volumes(md: &ModelDeployment) -> Vec<(Volume, VolumeMount)> {
    let Some(spec) = &md.spec.escalation else { return Vec::new() };
    let mut volumes = vec![(
        Volume {
            name: "escalation".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(md),
                items: Some(vec![KeyToPath { key: CONFIG_KEY.into(), path: CONFIG_KEY.into(), mode: None }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        mount("escalation", CONFIG_DIR, true),
    )];
    if let Some(secret) = spec.target.api_key_secret_ref.as_ref().filter(|_| spec.target.url.is_some()) {
        let item = KeyToPath { key: secret.key.clone(), path: API_KEY_NAME.into(), mode: None };
        volumes.push((
            Volume {
                name: "escalation-api-key".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.name.clone()),
                    items: Some(vec![item]),
                    default_mode: Some(SECRET_FILE_MODE),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
            mount("escalation-api-key", API_KEY_DIR, true),
        ));
    }
    if spec.mode == EscalationMode::Shadow {
        volumes.push((empty_dir("shadow", Some(SHADOW_SIZE_LIMIT)), mount("shadow", SHADOW_DIR, false)));
    }
    volumes
}

/// The pod template's annotations: the settings' hash, with escalation.
pub fn template_annotations(md: &ModelDeployment) -> Option<BTreeMap<String, String>> {
    let json = settings_json(md)?;
    let digest = Sha256::digest(json.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Some(BTreeMap::from([(HASH_ANNOTATION.to_string(), hex)]))
}

/// The label that lets the pods through the target ModelDeployment's
/// NetworkPolicy, for a `modelDeployment` target.
pub fn template_label(md: &ModelDeployment) -> Option<(String, String)> {
    let target = md.spec.escalation.as_ref()?.target.model_deployment.clone()?;
    Some((ESCALATES_TO_LABEL.to_string(), target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;
    use serde_json::json;

    fn md(escalation: serde_json::Value) -> ModelDeployment {
        let spec: ModelDeploymentSpec =
            serde_json::from_value(json!({"model": {"uri": "s3://b/m/"}, "escalation": escalation})).unwrap();
        let mut md = ModelDeployment::new("micro", spec);
        md.metadata.namespace = Some("ml".into());
        md.metadata.uid = Some("uid-1".into());
        md
    }

    fn file(md: &ModelDeployment) -> serde_json::Value {
        serde_json::from_str(&config_map(md).unwrap().data.unwrap()[CONFIG_KEY]).unwrap()
    }

    #[test]
    fn a_model_deployment_target_becomes_its_service_url_with_the_defaults() {
        let m = md(json!({"target": {"modelDeployment": "macro"}}));
        assert_eq!(
            file(&m),
            json!({
                "mode": "cascade",
                "target": {"url": "http://macro.ml.svc:8000/v1", "model": "macro"},
                "onSchemaFailure": true, "onLengthCutoff": false, "onQueueFull": false,
                "decideAfterTokens": 16, "maxEscalationFraction": 1.0, "windowSeconds": 60, "timeoutSeconds": 30.0,
            })
        );
        let cm = config_map(&m).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("micro-escalation"));
        assert_eq!(cm.metadata.owner_references.unwrap()[0].kind, "ModelDeployment");
        assert_eq!(cm.metadata.labels.unwrap()["app.kubernetes.io/managed-by"], "ferrite-operator");
        assert_eq!(template_label(&m), Some((ESCALATES_TO_LABEL.into(), "macro".into())));
        // No Secret, no shadow log: one volume, the settings, read-only.
        let volumes = server_volumes(&m);
        assert_eq!(volumes.len(), 1);
        assert_eq!(volumes[0].0.config_map.as_ref().unwrap().name, "micro-escalation");
        assert_eq!((volumes[0].1.mount_path.as_str(), volumes[0].1.read_only), (CONFIG_DIR, Some(true)));
        let args = server_args(&m, CommandLine::new(serve::SUBCOMMAND)).into_args();
        assert_eq!(args, ["serve", "--escalation-file", "/etc/ferrite/escalation/escalation.json"]);
    }

    #[test]
    fn a_url_target_gets_its_api_key_as_a_read_only_file_and_every_setting() {
        let m = md(json!({
            "target": {"url": "https://api.example.com/v1", "model": "gpt-4o",
                       "apiKeySecretRef": {"name": "openai", "key": "token"}},
            "confidence": {"threshold": -2.0},
            "onSchemaFailure": false, "onLengthCutoff": true, "onQueueFull": true,
            "decideAfterTokens": 8, "maxEscalationFraction": 0.25, "windowSeconds": 120, "timeoutSeconds": 12.5,
            "pricing": {"inputPerMillionTokens": 10.0, "outputPerMillionTokens": 30.0},
        }));
        assert_eq!(
            file(&m),
            json!({
                "mode": "cascade",
                "target": {"url": "https://api.example.com/v1", "model": "gpt-4o",
                           "apiKeyFile": "/var/run/secrets/ferrite/escalation/api-key"},
                "confidence": {"quantile": 0.1, "threshold": -2.0},
                "onSchemaFailure": false, "onLengthCutoff": true, "onQueueFull": true,
                "decideAfterTokens": 8, "maxEscalationFraction": 0.25, "windowSeconds": 120, "timeoutSeconds": 12.5,
                "pricing": {"inputPerMillionTokens": 10.0, "outputPerMillionTokens": 30.0},
            })
        );
        let volumes = server_volumes(&m);
        let (volume, mount) = &volumes[1];
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("openai"));
        assert_eq!(secret.items.as_ref().unwrap()[0].key, "token");
        assert_eq!(secret.items.as_ref().unwrap()[0].path, "api-key");
        assert_eq!(secret.default_mode, Some(0o440));
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (API_KEY_DIR, Some(true)));
        assert_eq!(template_label(&m), None, "no ModelDeployment to be let into");
    }

    #[test]
    fn shadow_mode_logs_to_an_empty_dir() {
        let m = md(json!({"target": {"modelDeployment": "macro"}, "mode": "shadow"}));
        assert_eq!(file(&m)["shadowLog"], "/var/lib/ferrite/shadow/shadow.jsonl");
        let volumes = server_volumes(&m);
        let (volume, mount) = volumes.iter().find(|(v, _)| v.name == "shadow").unwrap();
        assert_eq!(volume.empty_dir.as_ref().unwrap().size_limit.as_ref().unwrap().0, SHADOW_SIZE_LIMIT.to_string());
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (SHADOW_DIR, Some(false)));
        assert!(file(&md(json!({"target": {"modelDeployment": "macro"}}))).get("shadowLog").is_none());
    }

    #[test]
    fn the_hash_follows_the_settings() {
        let a = template_annotations(&md(json!({"target": {"modelDeployment": "macro"}}))).unwrap();
        let b = template_annotations(&md(json!({"target": {"modelDeployment": "macro"}, "windowSeconds": 30}))).unwrap();
        assert_eq!(a[HASH_ANNOTATION].len(), 16);
        assert_ne!(a, b);
        assert_eq!(a, template_annotations(&md(json!({"target": {"modelDeployment": "macro"}}))).unwrap());
    }

    #[test]
    fn nothing_without_escalation() {
        let spec: ModelDeploymentSpec = serde_json::from_value(json!({"model": {"uri": "s3://b/m/"}})).unwrap();
        let m = ModelDeployment::new("micro", spec);
        assert!(config_map(&m).is_none() && template_annotations(&m).is_none() && template_label(&m).is_none());
        assert!(server_volumes(&m).is_empty());
        assert_eq!(server_args(&m, CommandLine::new(serve::SUBCOMMAND)).into_args(), ["serve"]);
    }
}
