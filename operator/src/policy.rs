//! The operator's policy: what a ModelDeployment may ask for, set by the
//! cluster administrator (Helm values -> `ferrite-operator run` flags), and
//! checked before any object is built. Whoever may edit a ModelDeployment
//! must not thereby run an arbitrary image, inject a shared library into the
//! server, open the model to the outside or reserve a node's memory.
//!
//! [`Policy::check`] is pure: the reconciler turns a [`Violation`] into
//! `Ready=False`, reason `PolicyViolation`, and builds no pods.

use std::fmt;

use crate::crd::ModelDeployment;

/// Environment variable names no ModelDeployment may set, whatever the
/// operator's flags say: `LD_*` (the dynamic loader: `LD_PRELOAD` runs any
/// shared library), `ORT_*` (`ORT_DYLIB_PATH` loads ONNX Runtime from any
/// path, e.g. the fetched archive) and `FERRITE_*` (the server's flags read
/// from the environment, among them `FERRITE_MODEL_URI`, which the operator
/// sets itself, and settings the operator deliberately leaves at their
/// defaults).
pub const ALWAYS_DENIED_ENV: &[&str] = &["LD_*", "ORT_*", "FERRITE_*"];

/// Service types allowed when the operator is given none.
pub const DEFAULT_SERVICE_TYPES: &[&str] = &["ClusterIP"];

/// What ModelDeployments may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Prefixes `spec.image` must start with (e.g. `registry.example/ml/`).
    /// The repository of the operator's own server image is always allowed.
    pub allowed_image_prefixes: Vec<String>,
    /// Environment names denied besides [`ALWAYS_DENIED_ENV`]; a trailing
    /// `*` matches any suffix.
    pub denied_env: Vec<String>,
    /// `spec.service.type`s allowed (the default ClusterIP counts too).
    pub allowed_service_types: Vec<String>,
    /// Most replicas: `spec.replicas` and `spec.autoscaling.maxReplicas`.
    pub max_replicas: i32,
    /// Largest `spec.batching.maxBatchSize`.
    pub max_batch_size: i32,
    /// Largest `spec.batching.maxQueueSize`.
    pub max_queue_size: i32,
    /// Largest `spec.runtime.instances`.
    pub max_instances: i32,
    /// Largest `spec.model.maxSize`, in bytes; also its default.
    pub model_max_bytes: u64,
    /// Largest `spec.model.maxFiles`; also its default.
    pub model_max_files: u64,
}

impl Default for Policy {
    /// The chart's defaults: the operator's own image only, ClusterIP only,
    /// and maxima that fit one node.
    fn default() -> Self {
        Policy {
            allowed_image_prefixes: Vec::new(),
            denied_env: Vec::new(),
            allowed_service_types: DEFAULT_SERVICE_TYPES.iter().map(|s| s.to_string()).collect(),
            max_replicas: 32,
            max_batch_size: 256,
            max_queue_size: 8192,
            max_instances: 8,
            model_max_bytes: 20 << 30,
            model_max_files: 10_000,
        }
    }
}

/// A ModelDeployment outside the policy: the rule (the operator flag that
/// sets it) and what broke it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule, named as the operator flag that sets it.
    pub rule: &'static str,
    /// What the ModelDeployment asked for, and what the rule allows.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (operator policy {})", self.message, self.rule)
    }
}

/// The repository of an image reference: without its tag or digest.
fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    // A ':' after the last '/' starts the tag; before it, a registry port.
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

/// Whether `name` matches `pattern` (exact, or a prefix before a trailing `*`).
fn env_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// Parses a byte count as `spec.model.maxSize` writes it: digits and an
/// optional suffix Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (of 1000).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(multiplier)
}

impl Policy {
    /// Checks a ModelDeployment against the policy; the first rule broken.
    /// `server_image` is the operator's own (always allowed) image.
    pub fn check(&self, md: &ModelDeployment, server_image: &str) -> Result<(), Violation> {
        let spec = &md.spec;
        if let Some(image) = &spec.image {
            let own = repository(image) == repository(server_image);
            if !own && !self.allowed_image_prefixes.iter().any(|p| !p.is_empty() && image.starts_with(p.as_str())) {
                return Err(Violation {
                    rule: "--allowed-image-prefixes",
                    message: format!(
                        "spec.image {image:?} is not the operator's server image ({}) and starts with none of the allowed prefixes {:?}",
                        repository(server_image),
                        self.allowed_image_prefixes
                    ),
                });
            }
        }
        let denied = ALWAYS_DENIED_ENV.iter().copied().chain(self.denied_env.iter().map(String::as_str));
        for pattern in denied {
            if let Some(env) = spec.env.iter().find(|e| env_matches(pattern, &e.name)) {
                return Err(Violation {
                    rule: "--denied-env",
                    message: format!("spec.env sets {}, which matches the denied name {pattern}", env.name),
                });
            }
        }
        let service_type = spec.service.type_.as_deref().unwrap_or("ClusterIP");
        if !self.allowed_service_types.iter().any(|t| t == service_type) {
            return Err(Violation {
                rule: "--allowed-service-types",
                message: format!(
                    "spec.service.type {service_type} is not one of the allowed types {:?}",
                    self.allowed_service_types
                ),
            });
        }
        let replicas = [
            ("spec.replicas", spec.replicas),
            ("spec.autoscaling.maxReplicas", spec.autoscaling.as_ref().map(|a| a.max_replicas)),
        ];
        for (field, value) in replicas {
            at_most(field, value, self.max_replicas, "--max-replicas")?;
        }
        at_most(
            "spec.batching.maxBatchSize",
            Some(spec.batching.max_batch_size),
            self.max_batch_size,
            "--max-batch-size",
        )?;
        at_most(
            "spec.batching.maxQueueSize",
            Some(spec.batching.max_queue_size),
            self.max_queue_size,
            "--max-queue-size",
        )?;
        at_most("spec.runtime.instances", Some(spec.runtime.instances), self.max_instances, "--max-instances")?;
        if let Some(size) = &spec.model.max_size {
            let bytes = parse_bytes(size).ok_or_else(|| Violation {
                rule: "--model-max-bytes",
                message: format!("spec.model.maxSize {size:?} is not a byte count"),
            })?;
            if bytes > self.model_max_bytes {
                return Err(Violation {
                    rule: "--model-max-bytes",
                    message: format!(
                        "spec.model.maxSize {size} ({bytes} bytes) exceeds the maximum of {} bytes",
                        self.model_max_bytes
                    ),
                });
            }
        }
        if let Some(files) = spec.model.max_files {
            if u64::try_from(files).map_or(true, |f| f > self.model_max_files) {
                return Err(Violation {
                    rule: "--model-max-files",
                    message: format!("spec.model.maxFiles {files} exceeds the maximum of {}", self.model_max_files),
                });
            }
        }
        Ok(())
    }

    /// The byte cap of a ModelDeployment's download (and its volume's size limit).
    pub fn model_max_bytes(&self, md: &ModelDeployment) -> u64 {
        md.spec.model.max_size.as_deref().and_then(parse_bytes).unwrap_or(self.model_max_bytes)
    }

    /// The file-count cap of a ModelDeployment's download.
    pub fn model_max_files(&self, md: &ModelDeployment) -> u64 {
        md.spec.model.max_files.and_then(|f| u64::try_from(f).ok()).unwrap_or(self.model_max_files)
    }
}

fn at_most(field: &str, value: Option<i32>, max: i32, rule: &'static str) -> Result<(), Violation> {
    match value {
        Some(value) if value > max => {
            Err(Violation { rule, message: format!("{field} {value} exceeds the maximum of {max}") })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;

    const OWN: &str = "registry.example:5000/ferrite/ferrite-server:0.1.0";

    fn md(spec: serde_json::Value) -> ModelDeployment {
        let mut spec_json = serde_json::json!({"model": {"uri": "s3://b/m.onnx"}});
        spec_json.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        let spec: ModelDeploymentSpec = serde_json::from_value(spec_json).unwrap();
        ModelDeployment::new("m", spec)
    }

    fn rule(policy: &Policy, spec: serde_json::Value) -> Option<&'static str> {
        policy.check(&md(spec), OWN).err().map(|v| v.rule)
    }

    #[test]
    fn a_plain_spec_passes_the_default_policy() {
        assert_eq!(rule(&Policy::default(), serde_json::json!({})), None);
        assert_eq!(rule(&Policy::default(), serde_json::json!({"replicas": 32, "env": [{"name": "RUST_LOG"}]})), None);
    }

    #[test]
    fn images_need_an_allowed_prefix_or_the_operators_repository() {
        let policy = Policy { allowed_image_prefixes: vec!["registry.example/ml/".into()], ..Policy::default() };
        let image = |image: &str| rule(&policy, serde_json::json!({ "image": image }));
        assert_eq!(image("registry.example:5000/ferrite/ferrite-server:0.2.0"), None, "another tag of our own");
        assert_eq!(image("registry.example:5000/ferrite/ferrite-server@sha256:00"), None);
        assert_eq!(image("registry.example/ml/custom:1"), None);
        assert_eq!(image("evil.example/ferrite-server:1"), Some("--allowed-image-prefixes"));
        assert_eq!(image("registry.example:5000/ferrite/ferrite-server-evil:1"), Some("--allowed-image-prefixes"));
        let none = Policy::default();
        let message = none.check(&md(serde_json::json!({"image": "busybox"})), OWN).unwrap_err().to_string();
        assert!(message.contains("busybox") && message.contains("--allowed-image-prefixes"), "{message}");
    }

    #[test]
    fn loader_runtime_and_server_env_names_are_denied() {
        let policy = Policy { denied_env: vec!["HTTP_PROXY".into(), "AWS_*".into()], ..Policy::default() };
        for name in ["LD_PRELOAD", "LD_LIBRARY_PATH", "ORT_DYLIB_PATH", "FERRITE_MODEL_URI", "HTTP_PROXY", "AWS_ROLE"] {
            let env = serde_json::json!({"env": [{"name": "RUST_LOG", "value": "info"}, {"name": name, "value": "x"}]});
            let violation = policy.check(&md(env), OWN).unwrap_err();
            assert_eq!(violation.rule, "--denied-env");
            assert!(violation.message.contains(name), "{violation}");
        }
        assert_eq!(rule(&policy, serde_json::json!({"env": [{"name": "HTTP_PROXY_X"}, {"name": "OLD_LD_X"}]})), None);
    }

    #[test]
    fn service_types_default_to_cluster_ip_only() {
        let policy = Policy::default();
        assert_eq!(rule(&policy, serde_json::json!({"service": {"type": "ClusterIP"}})), None);
        assert_eq!(
            rule(&policy, serde_json::json!({"service": {"type": "LoadBalancer"}})),
            Some("--allowed-service-types")
        );
        let open = Policy { allowed_service_types: vec!["ClusterIP".into(), "LoadBalancer".into()], ..policy };
        assert_eq!(rule(&open, serde_json::json!({"service": {"type": "LoadBalancer"}})), None);
        assert_eq!(rule(&open, serde_json::json!({"service": {"type": "NodePort"}})), Some("--allowed-service-types"));
    }

    #[test]
    fn maxima_bound_replicas_batches_queues_instances_and_downloads() {
        let policy = Policy {
            max_replicas: 4,
            max_batch_size: 64,
            max_queue_size: 2000,
            max_instances: 2,
            model_max_bytes: 1 << 30,
            model_max_files: 10,
            ..Policy::default()
        };
        let cases = [
            (serde_json::json!({"replicas": 4}), None),
            (serde_json::json!({"replicas": 5}), Some("--max-replicas")),
            (serde_json::json!({"autoscaling": {"maxReplicas": 5}}), Some("--max-replicas")),
            (serde_json::json!({"batching": {"maxBatchSize": 65}}), Some("--max-batch-size")),
            (serde_json::json!({"batching": {"maxQueueSize": 2001}}), Some("--max-queue-size")),
            (serde_json::json!({"runtime": {"instances": 3}}), Some("--max-instances")),
            (serde_json::json!({"model": {"uri": "s3://b/m", "maxSize": "1Gi", "maxFiles": 10}}), None),
            (serde_json::json!({"model": {"uri": "s3://b/m", "maxSize": "1025Mi"}}), Some("--model-max-bytes")),
            (serde_json::json!({"model": {"uri": "s3://b/m", "maxSize": "lots"}}), Some("--model-max-bytes")),
            (serde_json::json!({"model": {"uri": "s3://b/m", "maxFiles": 11}}), Some("--model-max-files")),
        ];
        for (spec, expected) in cases {
            assert_eq!(rule(&policy, spec.clone()), expected, "{spec}");
        }
        let message = policy.check(&md(serde_json::json!({"replicas": 5})), OWN).unwrap_err().to_string();
        assert_eq!(message, "spec.replicas 5 exceeds the maximum of 4 (operator policy --max-replicas)");
    }

    #[test]
    fn download_caps_come_from_the_spec_or_the_policy() {
        let policy = Policy::default();
        assert_eq!(policy.model_max_bytes(&md(serde_json::json!({}))), 20 << 30);
        let small = md(serde_json::json!({"model": {"uri": "s3://b/m", "maxSize": "500M", "maxFiles": 3}}));
        assert_eq!((policy.model_max_bytes(&small), policy.model_max_files(&small)), (500_000_000, 3));
    }

    #[test]
    fn byte_counts_parse_with_binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("2Gi"), Some(2 << 30));
        assert_eq!(parse_bytes("3k"), Some(3000));
        assert_eq!(parse_bytes("1Pi"), None);
        assert_eq!(parse_bytes("Gi"), None);
        assert_eq!(parse_bytes("99999999999Ti"), None, "overflow");
    }

    /// The examples users copy pass the chart's default policy.
    #[test]
    fn the_examples_pass_the_default_policy() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            // A file may hold several documents (a micro and a macro model).
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value: serde_yaml::Value = serde::Deserialize::deserialize(document).unwrap();
                if value["kind"].as_str() != Some("ModelDeployment") {
                    continue;
                }
                let md: ModelDeployment = serde_yaml::from_value(value).unwrap();
                assert_eq!(Policy::default().check(&md, "ferrite-server:0.1.0"), Ok(()), "{}", path.display());
                checked += 1;
            }
        }
        assert!(checked >= 8, "{checked} examples");
    }
}
