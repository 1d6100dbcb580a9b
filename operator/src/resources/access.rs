//! Who reaches the server and how: the TLS certificate and API keys mounted
//! from Secrets as files (the server's `--tls-*` and `--api-key-file`), the
//! model URI read from a Secret by the fetch container, and the probes,
//! which must keep working when the ports speak TLS. Pure functions; the
//! Deployment builder in [`crate::resources`] puts the pieces together.

use ferrite_contract::{fetch, health, serve, CommandLine};
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, GRPCAction, HTTPGetAction, KeyToPath, Probe, SecretKeySelector, SecretVolumeSource, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::ModelDeployment;
use crate::resources::{GRPC_PORT, METRICS_PORT};

/// Where the TLS Secret is mounted.
const TLS_DIR: &str = "/etc/ferrite/tls";
/// Where the API-key Secret key is mounted.
const AUTH_DIR: &str = "/etc/ferrite/auth";
/// The file name of the API keys inside [`AUTH_DIR`].
const API_KEY_FILE: &str = "api-keys";
/// Owner and group may read; the pod's fsGroup is the server's group.
const SECRET_FILE_MODE: i32 = 0o440;

/// The fetch container's environment variable that carries a URI from
/// `spec.model.uriFrom` (the name `ferrite-server fetch --uri` reads).
pub const MODEL_URI_ENV: &str = fetch::URI_ENV;

fn secret_volume(name: &str, secret: &str, items: Option<Vec<KeyToPath>>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items,
            default_mode: Some(SECRET_FILE_MODE),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn read_only_mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(true), ..VolumeMount::default() }
}

/// Secret volumes of the server container: the TLS Secret and the API-key
/// file, each when the spec asks for it.
pub fn server_volumes(md: &ModelDeployment) -> Vec<(Volume, VolumeMount)> {
    let mut volumes = Vec::new();
    if let Some(tls) = &md.spec.tls {
        volumes.push((secret_volume("tls", &tls.secret_name, None), read_only_mount("tls", TLS_DIR)));
    }
    if let Some(auth) = &md.spec.auth {
        let item = KeyToPath { key: auth.api_key_secret_ref.key.clone(), path: API_KEY_FILE.into(), mode: None };
        volumes.push((
            secret_volume("api-keys", &auth.api_key_secret_ref.name, Some(vec![item])),
            read_only_mount("api-keys", AUTH_DIR),
        ));
    }
    volumes
}

/// Adds `--tls-cert`/`--tls-key` (and `--tls-client-ca` with `clientAuth`)
/// and `--api-key-file` to the server's command line. The Secret's `ca.crt`
/// is used only when client certificates are asked for: cert-manager
/// writes one into every Secret, and mTLS must be chosen, not implied.
pub fn server_args(md: &ModelDeployment, mut args: CommandLine) -> CommandLine {
    if let Some(tls) = &md.spec.tls {
        args = args
            .value(serve::TLS_CERT, format!("{TLS_DIR}/tls.crt"))
            .value(serve::TLS_KEY, format!("{TLS_DIR}/tls.key"));
        if tls.client_auth {
            args = args.value(serve::TLS_CLIENT_CA, format!("{TLS_DIR}/ca.crt"));
        }
    }
    if md.spec.auth.is_some() {
        args = args.value(serve::API_KEY_FILE, format!("{AUTH_DIR}/{API_KEY_FILE}"));
    }
    args
}

/// The fetch container's `FERRITE_MODEL_URI` from `spec.model.uriFrom`:
/// the kubelet reads the Secret, so the URI appears neither in the pod
/// spec nor on a command line.
pub fn model_uri_env(md: &ModelDeployment) -> Option<EnvVar> {
    let source = md.spec.model.uri_from.as_ref()?;
    Some(EnvVar {
        name: MODEL_URI_ENV.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: source.secret_key_ref.name.clone(),
                key: source.secret_key_ref.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    })
}

fn probe(period: i32, failures: i32) -> Probe {
    Probe {
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// A probe of a `grpc.health.v1` service on the gRPC port.
fn grpc_probe(service: &str, period: i32, failures: i32) -> Probe {
    Probe { grpc: Some(GRPCAction { port: GRPC_PORT, service: Some(service.to_string()) }), ..probe(period, failures) }
}

/// A plain-HTTP probe on the metrics port, which never speaks TLS.
fn http_probe(path: String, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path),
            port: IntOrString::Int(METRICS_PORT),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        ..probe(period, failures)
    }
}

/// The server container's probes: `(startup, readiness, liveness)`.
///
/// Liveness asks whether the process serves (the health service `""`), so
/// that a model made unready (unloaded, or failing) takes the pod out of
/// the endpoints without getting it restarted; startup and readiness ask
/// for the model. The kubelet's gRPC probe speaks no TLS, so with TLS the
/// same questions go in plain HTTP to the metrics port.
pub fn probes(md: &ModelDeployment) -> (Probe, Probe, Probe) {
    let model = md.model_name();
    // (periodSeconds, failureThreshold). The startup probe asks every
    // second (300 tries: 5 minutes to load): the kubelet runs the readiness
    // probe the moment the startup probe passes, so Ready trails the model
    // load by at most a second - most of a cold start from zero for a small
    // model, where a 2 s period cost up to 2 s. Readiness and liveness then
    // ask less often.
    let timing = [(1, 300), (2, 2), (10, 3)];
    let [startup, readiness, liveness] = timing;
    if md.spec.tls.is_some() {
        let ready = health::model_ready_path(&model);
        (
            http_probe(ready.clone(), startup.0, startup.1),
            http_probe(ready, readiness.0, readiness.1),
            http_probe(health::LIVE_PATH.into(), liveness.0, liveness.1),
        )
    } else {
        (
            grpc_probe(&model, startup.0, startup.1),
            grpc_probe(&model, readiness.0, readiness.1),
            grpc_probe("", liveness.0, liveness.1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;

    fn md(spec: serde_json::Value) -> ModelDeployment {
        let mut md = ModelDeployment::new("resnet", serde_json::from_value::<ModelDeploymentSpec>(spec).unwrap());
        md.metadata.namespace = Some("ml".into());
        md
    }

    #[test]
    fn liveness_asks_for_the_process_and_readiness_for_the_model() {
        let (startup, readiness, liveness) = probes(&md(serde_json::json!({"model": {"uri": "s3://b/m"}})));
        let service = |p: &Probe| p.grpc.as_ref().unwrap().service.clone().unwrap();
        assert_eq!(
            (service(&startup), service(&readiness), service(&liveness)),
            ("resnet".into(), "resnet".into(), "".into())
        );
        assert!([&startup, &readiness, &liveness].iter().all(|p| p.grpc.as_ref().unwrap().port == GRPC_PORT));
        // Ready at most a second after the model loads (cold starts from
        // zero), still 5 minutes to load.
        assert_eq!(startup.period_seconds, Some(1));
        assert_eq!(startup.period_seconds.unwrap() * startup.failure_threshold.unwrap(), 300);
    }

    #[test]
    fn tls_turns_probes_into_plain_http_on_the_metrics_port() {
        let m = md(serde_json::json!({"model": {"uri": "s3://b/m", "name": "r50"}, "tls": {"secretName": "cert"}}));
        let (startup, readiness, liveness) = probes(&m);
        let get = |p: &Probe| {
            let get = p.http_get.clone().unwrap();
            (get.port, get.path.unwrap(), get.scheme.unwrap())
        };
        assert_eq!(
            get(&startup),
            (IntOrString::Int(METRICS_PORT), "/v2/models/r50/ready".to_string(), "HTTP".to_string())
        );
        assert_eq!(get(&readiness), get(&startup));
        assert_eq!(get(&liveness), (IntOrString::Int(METRICS_PORT), health::LIVE_PATH.to_string(), "HTTP".to_string()));
        assert!(liveness.grpc.is_none());
    }

    #[test]
    fn tls_and_api_keys_are_mounted_files_named_on_the_command_line() {
        let m = md(serde_json::json!({
            "model": {"uri": "s3://b/m"},
            "tls": {"secretName": "cert", "clientAuth": true},
            "auth": {"apiKeySecretRef": {"name": "keys", "key": "clients"}},
        }));
        let args = server_args(&m, CommandLine::new(serve::SUBCOMMAND)).into_args();
        assert_eq!(
            args,
            [
                "serve",
                "--tls-cert",
                "/etc/ferrite/tls/tls.crt",
                "--tls-key",
                "/etc/ferrite/tls/tls.key",
                "--tls-client-ca",
                "/etc/ferrite/tls/ca.crt",
                "--api-key-file",
                "/etc/ferrite/auth/api-keys"
            ]
        );
        let volumes = server_volumes(&m);
        let secret = |i: usize| volumes[i].0.secret.clone().unwrap();
        assert_eq!(secret(0).secret_name.as_deref(), Some("cert"));
        assert_eq!(secret(1).items.unwrap()[0].key, "clients");
        assert!(volumes.iter().all(|(_, mount)| mount.read_only == Some(true)));
        // Without clientAuth the CA stays unused.
        let m = md(serde_json::json!({"model": {"uri": "s3://b/m"}, "tls": {"secretName": "cert"}}));
        let args = server_args(&m, CommandLine::new(serve::SUBCOMMAND)).into_args();
        assert!(!args.contains(&"--tls-client-ca".to_string()), "{args:?}");
    }

    #[test]
    fn a_uri_from_a_secret_becomes_an_env_reference() {
        let m = md(serde_json::json!({"model": {"uriFrom": {"secretKeyRef": {"name": "model", "key": "uri"}}}}));
        let env = model_uri_env(&m).unwrap();
        assert_eq!(env.name, "FERRITE_MODEL_URI");
        assert!(env.value.is_none());
        let key = env.value_from.unwrap().secret_key_ref.unwrap();
        assert_eq!((key.name.as_str(), key.key.as_str()), ("model", "uri"));
        assert!(model_uri_env(&md(serde_json::json!({"model": {"uri": "s3://b/m"}}))).is_none());
    }
}
