//! A watch-backed view of the cluster: ModelDeployments, their Services
//! (for ClusterIP routing) and pods (which are ready, at which IP), kept
//! by kube reflectors. Every watch event bumps a counter that held requests
//! wait on.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::hold::Readiness;
use super::route::{Directory, ModelKey};
use crate::crd::ModelDeployment;
use crate::resources::{selector_labels, INSTANCE_LABEL};

/// The caches of one watch scope (a namespace, or the whole cluster).
struct Scope {
    namespace: Option<String>,
    models: Store<ModelDeployment>,
    services: Store<Service>,
    pods: Store<Pod>,
}

/// Pods by namespace and instance label, as of one version of the view:
/// a thousand held requests woken by one event look up their own pods
/// instead of each scanning them all.
type PodIndex = HashMap<(String, String), Vec<Arc<Pod>>>;

/// What the activator knows of the cluster.
pub struct ClusterView {
    scopes: Vec<Scope>,
    changes: watch::Sender<u64>,
    pod_index: Mutex<Option<(u64, Arc<PodIndex>)>>,
}

impl ClusterView {
    /// Starts the watches (one set per namespace in `namespaces`, or one for
    /// the cluster when empty); the returned tasks drive them.
    pub fn start(client: &Client, namespaces: &[String]) -> (Arc<ClusterView>, Vec<JoinHandle<()>>) {
        let (changes, _) = watch::channel(0u64);
        let namespaces: Vec<Option<String>> =
            if namespaces.is_empty() { vec![None] } else { namespaces.iter().cloned().map(Some).collect() };
        let mut tasks = Vec::new();
        let mut scopes = Vec::new();
        for namespace in namespaces {
            let ns = namespace.as_deref();
            let (models, task) = reflect::<ModelDeployment>(client, ns, None, changes.clone());
            tasks.push(task);
            // Only the operator's objects carry the instance label: no need
            // to cache every Service and pod of the cluster.
            let (services, task) = reflect::<Service>(client, ns, Some(INSTANCE_LABEL), changes.clone());
            tasks.push(task);
            let (pods, task) = reflect::<Pod>(client, ns, Some(INSTANCE_LABEL), changes.clone());
            tasks.push(task);
            scopes.push(Scope { namespace, models, services, pods });
        }
        (Arc::new(ClusterView { scopes, changes, pod_index: Mutex::new(None) }), tasks)
    }

    /// Waits until every watch has listed once.
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        for scope in &self.scopes {
            scope.models.wait_until_ready().await?;
            scope.services.wait_until_ready().await?;
            scope.pods.wait_until_ready().await?;
        }
        Ok(())
    }

    /// A receiver that moves on every watch event.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn scope(&self, namespace: &str) -> Option<&Scope> {
        self.scopes.iter().find(|s| s.namespace.as_deref().is_none_or(|ns| ns == namespace))
    }

    /// The ModelDeployment `key`, when watched.
    pub fn model(&self, key: &ModelKey) -> Option<Arc<ModelDeployment>> {
        self.scope(&key.namespace)?.models.get(&ObjectRef::new(&key.name).within(&key.namespace))
    }

    /// The pod index of the current version, rebuilt when a watch event
    /// moved the version. The version is read before the stores, so the
    /// index is never older than the version it is filed under.
    fn pod_index(&self) -> Arc<PodIndex> {
        let version = *self.changes.borrow();
        let mut cached = self.pod_index.lock().expect("pod index");
        if let Some((built, index)) = cached.as_ref() {
            if *built == version {
                return index.clone();
            }
        }
        let mut index = PodIndex::new();
        for pod in self.scopes.iter().flat_map(|s| s.pods.state()) {
            let instance = pod.labels().get(INSTANCE_LABEL).cloned();
            if let (Some(namespace), Some(instance)) = (pod.namespace(), instance) {
                index.entry((namespace, instance)).or_default().push(pod);
            }
        }
        let index = Arc::new(index);
        *cached = Some((version, index.clone()));
        index
    }

    /// The ready pods of `key`, by IP (sorted), or why there are none.
    pub fn ready_pods(&self, key: &ModelKey) -> Readiness<Vec<IpAddr>> {
        let Some(model) = self.model(key) else { return Readiness::Gone };
        let selector = selector_labels(&model);
        let Some(instance) = selector.get(INSTANCE_LABEL) else { return Readiness::Gone };
        let index = self.pod_index();
        let pods = index.get(&(key.namespace.clone(), instance.clone())).map_or(&[][..], Vec::as_slice);
        let ips = ready_ips(&model, pods.iter().map(|p| p.as_ref()));
        if ips.is_empty() {
            Readiness::Waiting
        } else {
            Readiness::Ready(ips)
        }
    }
}

impl Directory for ClusterView {
    fn exists(&self, key: &ModelKey) -> bool {
        self.model(key).is_some()
    }

    fn namespaces_of(&self, name: &str) -> Vec<String> {
        self.scopes
            .iter()
            .flat_map(|s| s.models.state())
            .filter(|md| md.name_any() == name)
            .filter_map(|md| md.namespace())
            .collect()
    }

    fn by_cluster_ip(&self, ip: IpAddr) -> Option<ModelKey> {
        self.scopes.iter().flat_map(|s| s.services.state()).find_map(|service| {
            let key = ModelKey::new(service.namespace()?, service.name_any());
            (cluster_ips(&service).contains(&ip) && self.exists(&key)).then_some(key)
        })
    }
}

/// The ClusterIPs of a Service (none for a headless one).
fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else { return Vec::new() };
    let mut all: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    all.extend(spec.cluster_ip.iter());
    all.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// The IP of a pod that can take requests: Ready=True, an IP, not
/// terminating.
pub fn ready_ip(pod: &Pod) -> Option<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// The ready pods of `model` among `pods` (its namespace, its selector
/// labels), sorted and without duplicates.
pub fn ready_ips<'a>(model: &ModelDeployment, pods: impl Iterator<Item = &'a Pod>) -> Vec<IpAddr> {
    let selector = selector_labels(model);
    let namespace = model.namespace();
    let empty = BTreeMap::new();
    let mut ips: Vec<IpAddr> = pods
        .filter(|pod| pod.namespace() == namespace)
        .filter(|pod| {
            let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter_map(ready_ip)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// A reflector of `K` in `namespace` (all when `None`), optionally only
/// objects carrying `label`; each event bumps `changes`.
fn reflect<K>(
    client: &Client,
    namespace: Option<&str>,
    label: Option<&str>,
    changes: watch::Sender<u64>,
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let config = match label {
        Some(label) => watcher::Config::default().labels(label),
        None => watcher::Config::default(),
    };
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let task = tokio::spawn(async move {
        stream
            .for_each(|event| {
                match event {
                    Ok(_) => changes.send_modify(|version| *version = version.wrapping_add(1)),
                    // Forbidden (RBAC), or the API server away: the store
                    // keeps its last state and the watch retries.
                    Err(error) => tracing::warn!(%kind, %error, "watch failed; retrying"),
                }
                futures::future::ready(())
            })
            .await
    });
    (reader, task)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn model(name: &str, namespace: &str) -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"model": {"uri": "s3://b/m"}},
        }))
        .unwrap()
    }

    fn pod(model: &str, namespace: &str, ip: Option<&str>, ready: &str, deleting: bool) -> Pod {
        let mut metadata = json!({"name": format!("{model}-{}", ip.unwrap_or("x")), "namespace": namespace,
            "labels": {INSTANCE_LABEL: model}});
        if deleting {
            metadata["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({
            "metadata": metadata,
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
        }))
        .unwrap()
    }

    #[test]
    fn only_ready_running_pods_of_the_model_with_an_ip_count() {
        let md = model("mlp", "a");
        let pods = [
            pod("mlp", "a", Some("10.0.0.3"), "True", false),
            pod("mlp", "a", Some("10.0.0.1"), "True", false),
            pod("mlp", "a", Some("10.0.0.2"), "False", false),
            pod("mlp", "a", Some("10.0.0.4"), "True", true),
            pod("mlp", "a", None, "True", false),
            pod("mlp", "b", Some("10.0.1.1"), "True", false),
            pod("other", "a", Some("10.0.2.1"), "True", false),
        ];
        let ips: Vec<String> = ready_ips(&md, pods.iter()).iter().map(|ip| ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.3"]);
    }

    #[test]
    fn a_service_lists_its_cluster_ips_and_none_when_headless() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "mlp", "namespace": "a"},
            "spec": {"clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9", "fd00::9"]},
        }))
        .unwrap();
        let ips = cluster_ips(&service);
        assert!(ips.contains(&"10.96.0.9".parse().unwrap()) && ips.contains(&"fd00::9".parse().unwrap()));
        let headless: Service =
            serde_json::from_value(json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}})).unwrap();
        assert!(cluster_ips(&headless).is_empty());
    }
}
