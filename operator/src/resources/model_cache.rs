//! The node model cache in the pod spec (docs/model-cache.md): the fetch
//! init container mounts the node's cache directory (a hostPath) read-write
//! and runs `fetch --cache-dir`; the server container mounts only the
//! model's entry, read-only, as its model repository. Pure builders.

use ferrite_contract::fetch::{self, entry_key, entry_sub_path};
use ferrite_contract::CommandLine;
use k8s_openapi::api::core::v1::{HostPathVolumeSource, Volume, VolumeMount};
use kube::ResourceExt;

use crate::crd::{ModelCache, ModelDeployment};

/// The volume's name in the pod.
pub const VOLUME: &str = "model-cache";
/// Where the fetch init container sees the cache.
pub const FETCH_MOUNT_PATH: &str = "/var/cache/ferrite";

/// The operator's cache settings (`--model-cache-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelCacheConfig {
    /// `spec.model.cache` when a ModelDeployment does not say.
    pub default: ModelCache,
    /// The node directory (hostPath); `None`: no cache, every pod downloads.
    pub host_path: Option<String>,
    /// `--cache-max-bytes` of the fetch: the bound of each node's cache.
    pub max_bytes: u64,
}

/// A pod's use of the cache: where it is and which entry is the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePlan {
    /// The node directory.
    pub host_path: String,
    /// The cache's bound.
    pub max_bytes: u64,
    /// The namespace: who shares entries fetched without a SHA-256.
    pub scope: String,
    /// The entry's key, as `fetch` computes it ([`entry_key`]).
    pub key: String,
}

/// The plan when the ModelDeployment uses the node cache: asked for (or the
/// default), a cache configured, a URI in the spec that is downloaded (not
/// `pvc://`, not from a Secret, whose URI the key depends on).
pub fn plan(md: &ModelDeployment, config: &ModelCacheConfig) -> Option<CachePlan> {
    if md.spec.model.cache.unwrap_or(config.default) != ModelCache::Node {
        return None;
    }
    let host_path = config.host_path.clone().filter(|p| !p.is_empty())?;
    let uri = md.spec.model.uri.as_deref().filter(|u| !u.starts_with("pvc://"))?;
    let scope = md.namespace()?;
    let key = entry_key(&scope, uri, md.spec.model.sha256.as_deref(), &md.model_name());
    Some(CachePlan { host_path, max_bytes: config.max_bytes, scope, key })
}

impl CachePlan {
    /// The entry's path under the cache directory: the server mount's `subPath`.
    pub fn sub_path(&self) -> String {
        entry_sub_path(&self.key)
    }

    /// The node directory, which must exist (writable by the pods' user).
    pub fn volume(&self) -> Volume {
        Volume {
            name: VOLUME.into(),
            host_path: Some(HostPathVolumeSource { path: self.host_path.clone(), type_: Some("Directory".into()) }),
            ..Volume::default()
        }
    }

    /// The fetch init container's mount: the whole cache, read-write.
    pub fn fetch_mount(&self) -> VolumeMount {
        VolumeMount {
            name: VOLUME.into(),
            mount_path: FETCH_MOUNT_PATH.into(),
            read_only: Some(false),
            ..VolumeMount::default()
        }
    }

    /// The server container's mount: only the model's entry, read-only, at
    /// the model repository.
    pub fn server_mount(&self, models_dir: &str) -> VolumeMount {
        VolumeMount {
            name: VOLUME.into(),
            mount_path: models_dir.into(),
            sub_path: Some(self.sub_path()),
            read_only: Some(true),
            ..VolumeMount::default()
        }
    }

    /// The fetch's cache flags.
    pub fn fetch_args(&self, args: CommandLine) -> CommandLine {
        args.value(fetch::CACHE_DIR, FETCH_MOUNT_PATH)
            .value(fetch::CACHE_SCOPE, self.scope.clone())
            .value(fetch::CACHE_MAX_BYTES, self.max_bytes.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;

    fn md(model: serde_json::Value) -> ModelDeployment {
        let spec: ModelDeploymentSpec = serde_json::from_value(serde_json::json!({"model": model})).unwrap();
        let mut md = ModelDeployment::new("resnet", spec);
        md.metadata.namespace = Some("ml".into());
        md
    }

    fn config(default: ModelCache) -> ModelCacheConfig {
        ModelCacheConfig { default, host_path: Some("/var/lib/ferrite/models".into()), max_bytes: 10 << 30 }
    }

    #[test]
    fn the_entry_is_the_one_fetch_computes() {
        let m = md(serde_json::json!({"uri": "s3://b/m.onnx", "cache": "node"}));
        let private = plan(&m, &config(ModelCache::None)).unwrap();
        assert_eq!(private.key, entry_key("ml", "s3://b/m.onnx", None, "resnet"));
        assert_eq!(private.sub_path(), format!("entries/{}", private.key));
        let sha = "a".repeat(64);
        let pinned = md(serde_json::json!({"uri": "s3://b/m.onnx", "sha256": sha, "name": "x"}));
        let shared = plan(&pinned, &config(ModelCache::Node)).unwrap();
        assert_eq!(shared.key, entry_key("other-namespace", "s3://b/m.onnx", Some(&sha), "x"));
    }

    #[test]
    fn the_cache_is_used_only_when_asked_configured_and_computable() {
        let cached = |model: serde_json::Value, config: &ModelCacheConfig| plan(&md(model), config).is_some();
        let (on, off) = (config(ModelCache::Node), config(ModelCache::None));
        assert!(cached(serde_json::json!({"uri": "s3://b/m"}), &on), "the default");
        assert!(!cached(serde_json::json!({"uri": "s3://b/m"}), &off));
        assert!(!cached(serde_json::json!({"uri": "s3://b/m", "cache": "none"}), &on));
        assert!(!cached(serde_json::json!({"uri": "pvc://claim/m", "cache": "node"}), &on), "pvc:// is mounted");
        let from_secret = serde_json::json!({"uriFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                                             "sha256": "a".repeat(64), "cache": "node"});
        assert!(!cached(from_secret, &on), "the key needs the URI");
        let unconfigured = ModelCacheConfig { host_path: None, ..on.clone() };
        assert!(!cached(serde_json::json!({"uri": "s3://b/m", "cache": "node"}), &unconfigured));
    }

    #[test]
    fn mounts_the_cache_for_fetch_and_one_entry_read_only_for_the_server() {
        let cache = plan(&md(serde_json::json!({"uri": "s3://b/m"})), &config(ModelCache::Node)).unwrap();
        let volume = cache.volume();
        let host = volume.host_path.unwrap();
        assert_eq!((host.path.as_str(), host.type_.as_deref()), ("/var/lib/ferrite/models", Some("Directory")));
        let fetch = cache.fetch_mount();
        assert_eq!((fetch.mount_path.as_str(), fetch.read_only, fetch.sub_path), (FETCH_MOUNT_PATH, Some(false), None));
        let server = cache.server_mount("/models");
        assert_eq!(server.read_only, Some(true));
        assert_eq!(server.sub_path, Some(cache.sub_path()));
        let args = cache.fetch_args(CommandLine::new(fetch::SUBCOMMAND)).into_args();
        let joined = args.join(" ");
        assert!(joined.contains(&format!("--cache-dir {FETCH_MOUNT_PATH}")), "{joined}");
        assert!(joined.contains("--cache-scope ml") && joined.contains(&format!("--cache-max-bytes {}", 10u64 << 30)));
    }
}
