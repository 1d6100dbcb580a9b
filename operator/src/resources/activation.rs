//! Where a scale-to-zero model's Service sends its traffic: to the pods
//! ("pod mode": the Service has its selector, and the EndpointSlice
//! controller lists the Ready pods) or to the activator ("activator mode":
//! no selector, and the operator's own EndpointSlice `<md>-activator` lists
//! the activator pods, which hold each request until a pod is Ready). Pure
//! builders and rules; the reconciler applies them (`crate::reconcile`), the
//! autoscaler asks for activator mode before scaling to zero (the
//! [`DRAIN_ANNOTATION`] on the Deployment) and checks it took effect
//! ([`settled_in_activator_mode`]).
//!
//! The rule: a ModelDeployment with `minReplicas: 0` (and an activator) is
//! in activator mode while its Deployment asks for 0 replicas, has no Ready
//! one, or carries the drain annotation; in pod mode otherwise. Why the
//! operator deletes the controller's slices in activator mode: the
//! EndpointSlice controller ignores a Service without a selector, and leaves
//! its last slices (the old pod IPs) in place, which kube-proxy would keep
//! using; the endpoints controller likewise leaves its v1 Endpoints, which
//! the mirroring controller then copies into a slice of the pod IPs. Both
//! are deleted when the selector goes.

use std::collections::BTreeMap;

use ferrite_contract::ports;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::{owner, selector_labels};
use crate::crd::ModelDeployment;

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label of an EndpointSlice naming who manages it.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// [`MANAGED_BY_LABEL`] of the slices the operator writes.
pub const MANAGED_BY_OPERATOR: &str = "ferrite-operator";
/// [`MANAGED_BY_LABEL`] of the slices the EndpointSlice controller writes
/// for a Service with a selector.
pub const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// [`MANAGED_BY_LABEL`] of the slices the mirroring controller copies from
/// a selector-less Service's v1 Endpoints.
pub const MANAGED_BY_MIRRORING: &str = "endpointslicemirroring-controller.k8s.io";
/// Label of the v1 Endpoints the endpoints controller writes for a Service
/// with a selector, and its value.
pub const LEGACY_ENDPOINTS_MANAGER: (&str, &str) = ("endpoints.kubernetes.io/managed-by", "endpoint-controller");
/// Annotation the autoscaler puts on a Deployment it is about to scale to
/// zero (value: when, RFC 3339): the Service goes to activator mode first.
pub const DRAIN_ANNOTATION: &str = "ferrite.dev/scale-to-zero-drain-since";

/// Where a model Service sends traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The Service selects the pods.
    Pods,
    /// The Service has no selector; `<md>-activator` lists the activator.
    Activator,
}

/// The activator pods, read from the EndpointSlices of the activator's
/// Service (`--activator-service`): their ready addresses and the ports its
/// Service names `http`, `grpc` and `metrics` (the contract's when absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivatorEndpoints {
    /// Ready addresses, sorted, without duplicates.
    pub addresses: Vec<String>,
    /// `IPv4` or `IPv6`: the address type of the slice to write.
    pub address_type: String,
    /// Port of the activator's HTTP listener.
    pub http_port: i32,
    /// Port of the activator's gRPC listener.
    pub grpc_port: i32,
    /// Port of the activator's `/metrics`.
    pub metrics_port: i32,
}

impl Default for ActivatorEndpoints {
    fn default() -> Self {
        ActivatorEndpoints {
            addresses: Vec::new(),
            address_type: "IPv4".into(),
            http_port: ports::HTTP.into(),
            grpc_port: ports::GRPC.into(),
            metrics_port: ports::METRICS.into(),
        }
    }
}

impl ActivatorEndpoints {
    /// The activator from its Service's slices: endpoints that are ready (a
    /// missing condition counts as ready, as for kube-proxy) and not
    /// terminating, of the first address type found.
    pub fn from_slices<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> ActivatorEndpoints {
        let mut found = ActivatorEndpoints::default();
        let mut address_type: Option<String> = None;
        for slice in slices {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            if address_type.as_ref().is_some_and(|t| *t != slice.address_type) {
                continue;
            }
            address_type = Some(slice.address_type.clone());
            for port in slice.ports.iter().flatten() {
                let Some(number) = port.port else { continue };
                match port.name.as_deref() {
                    Some("http") => found.http_port = number,
                    Some("grpc") => found.grpc_port = number,
                    Some("metrics") => found.metrics_port = number,
                    _ => {}
                }
            }
            for endpoint in &slice.endpoints {
                if endpoint_ready(endpoint) {
                    found.addresses.extend(endpoint.addresses.iter().cloned());
                }
            }
        }
        found.addresses.sort();
        found.addresses.dedup();
        found.address_type = address_type.unwrap_or_else(|| "IPv4".into());
        found
    }

    /// `http://<ip>:<metrics port>/metrics` of each activator pod.
    pub fn metrics_urls(&self) -> Vec<String> {
        let path = ferrite_contract::metrics::PATH;
        let port = self.metrics_port;
        self.addresses
            .iter()
            .map(|ip| {
                if ip.contains(':') {
                    format!("http://[{ip}]:{port}{path}")
                } else {
                    format!("http://{ip}:{port}{path}")
                }
            })
            .collect()
    }
}

fn endpoint_ready(endpoint: &Endpoint) -> bool {
    let conditions = endpoint.conditions.clone().unwrap_or_default();
    conditions.ready != Some(false) && conditions.terminating != Some(true)
}

/// Whether the model scales to zero (`minReplicas: 0`).
pub fn scales_to_zero(md: &ModelDeployment) -> bool {
    md.spec.autoscaling.as_ref().is_some_and(|a| a.scales_to_zero())
}

/// The mode the model's Service should be in (see the module
/// documentation). `activator_ready`: an activator is configured and has a
/// ready endpoint; without one, a model whose pods are Ready stays in pod
/// mode (a drain waits), and one with none goes to the activator anyway
/// (there is nothing better to send its requests to).
pub fn wanted_mode(
    md: &ModelDeployment,
    deployment: Option<&Deployment>,
    activator: bool,
    activator_ready: bool,
) -> Mode {
    if !activator || !scales_to_zero(md) {
        return Mode::Pods;
    }
    let replicas = deployment.and_then(|d| d.spec.as_ref()?.replicas).unwrap_or(1);
    let ready = deployment.and_then(|d| d.status.as_ref()?.ready_replicas).unwrap_or(0);
    let draining = deployment.is_some_and(|d| d.annotations().contains_key(DRAIN_ANNOTATION));
    if replicas == 0 || ready == 0 || (draining && activator_ready) {
        Mode::Activator
    } else {
        Mode::Pods
    }
}

/// The name of the operator's slice for a model in activator mode.
pub fn slice_name(md: &ModelDeployment) -> String {
    format!("{}-activator", md.name_any())
}

/// The model's Service in `mode`: [`super::service`], without its selector
/// in activator mode.
pub fn service(md: &ModelDeployment, mode: Mode) -> Service {
    let mut service = super::service(md);
    if mode == Mode::Activator {
        if let Some(spec) = service.spec.as_mut() {
            spec.selector = None;
        }
    }
    service
}

/// The EndpointSlice `<md>-activator`: the model Service's `http` and `grpc`
/// ports, served by the activator pods.
pub fn activator_slice(md: &ModelDeployment, activator: &ActivatorEndpoints) -> EndpointSlice {
    let mut labels: BTreeMap<String, String> = selector_labels(md);
    labels.insert(SERVICE_NAME_LABEL.into(), md.name_any());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_OPERATOR.into());
    labels.insert("app.kubernetes.io/managed-by".into(), "ferrite-operator".into());
    let port = |name: &str, number: i32, app_protocol: &str| EndpointPort {
        name: Some(name.into()),
        port: Some(number),
        protocol: Some("TCP".into()),
        app_protocol: Some(app_protocol.into()),
    };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(md)),
            namespace: md.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner(md)]),
            ..ObjectMeta::default()
        },
        address_type: activator.address_type.clone(),
        endpoints: activator
            .addresses
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.clone()],
                conditions: Some(EndpointConditions { ready: Some(true), ..EndpointConditions::default() }),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![port("http", activator.http_port, "http"), port("grpc", activator.grpc_port, "grpc")]),
    }
}

/// Whether the EndpointSlice controller lists a ready pod for the model's
/// Service: the activator's slice may go (kube-proxy has somewhere else to
/// send new connections).
pub fn pods_listed(slices: &[EndpointSlice]) -> bool {
    slices
        .iter()
        .filter(|s| s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_CONTROLLER))
        .any(|s| s.endpoints.iter().any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true)))
}

/// The controllers' slices left behind when the Service lost its selector
/// (names to delete in activator mode): the EndpointSlice controller's and
/// the mirroring controller's.
pub fn stale_pod_slices(slices: &[EndpointSlice]) -> Vec<String> {
    slices
        .iter()
        .filter(|s| {
            let manager = s.labels().get(MANAGED_BY_LABEL).map(String::as_str);
            manager == Some(MANAGED_BY_CONTROLLER) || manager == Some(MANAGED_BY_MIRRORING)
        })
        .map(|s| s.name_any())
        .collect()
}

/// Whether the switch to activator mode has taken effect in the API: the
/// Service has no selector, the activator's slice lists at least one
/// address, and no other slice of the Service lists an endpoint.
pub fn settled_in_activator_mode(md: &ModelDeployment, service: Option<&Service>, slices: &[EndpointSlice]) -> bool {
    let selector_gone = service.is_some_and(|s| s.spec.as_ref().is_none_or(|spec| spec.selector.is_none()));
    let ours = slice_name(md);
    let activator_listed = slices.iter().any(|s| s.name_any() == ours && !s.endpoints.is_empty());
    let others_empty = slices.iter().filter(|s| s.name_any() != ours).all(|s| s.endpoints.is_empty());
    selector_gone && activator_listed && others_empty
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn md(min: i32) -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "ferrite.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
            "spec": {"model": {"uri": "s3://b/m"}, "autoscaling": {"minReplicas": min, "maxReplicas": 3}},
        }))
        .unwrap()
    }

    fn deployment(replicas: i32, ready: i32, draining: bool) -> Deployment {
        let annotations = if draining { json!({DRAIN_ANNOTATION: "2026-01-01T00:00:00Z"}) } else { json!({}) };
        serde_json::from_value(json!({
            "metadata": {"name": "m", "annotations": annotations},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {"readyReplicas": ready},
        }))
        .unwrap()
    }

    fn slice(name: &str, managed_by: &str, endpoints: serde_json::Value, ports: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {SERVICE_NAME_LABEL: "svc", MANAGED_BY_LABEL: managed_by}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
        }))
        .unwrap()
    }

    #[test]
    fn the_mode_follows_ready_replicas_zero_and_the_drain() {
        let zero = md(0);
        let cases = [
            ("pods ready", deployment(2, 2, false), true, true, Mode::Pods),
            ("scaled to zero", deployment(0, 0, false), true, true, Mode::Activator),
            ("scaling up, none ready yet", deployment(1, 0, false), true, true, Mode::Activator),
            ("draining before zero", deployment(1, 1, true), true, true, Mode::Activator),
            ("draining, but no ready activator: pods keep serving", deployment(1, 1, true), true, false, Mode::Pods),
            ("no activator configured", deployment(0, 0, false), false, false, Mode::Pods),
        ];
        for (name, d, configured, ready, want) in cases {
            assert_eq!(wanted_mode(&zero, Some(&d), configured, ready), want, "{name}");
        }
        assert_eq!(wanted_mode(&md(1), Some(&deployment(1, 0, false)), true, true), Mode::Pods, "minReplicas 1");
        assert_eq!(wanted_mode(&zero, None, true, true), Mode::Activator, "no Deployment yet: nothing Ready");
    }

    #[test]
    fn activator_mode_drops_the_selector_and_lists_the_activator() {
        let m = md(0);
        assert!(service(&m, Mode::Pods).spec.unwrap().selector.is_some());
        let service = service(&m, Mode::Activator);
        assert!(service.spec.as_ref().unwrap().selector.is_none());
        let port_names: Vec<_> = service.spec.unwrap().ports.unwrap().into_iter().map(|p| p.name.unwrap()).collect();
        assert_eq!(port_names, ["http", "grpc", "metrics"], "the same ports in both modes");

        let activator =
            ActivatorEndpoints { addresses: vec!["10.0.0.7".into(), "10.0.0.8".into()], ..Default::default() };
        let slice = activator_slice(&m, &activator);
        assert_eq!(slice.metadata.name.as_deref(), Some("m-activator"));
        let labels = slice.metadata.labels.clone().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "m");
        assert_eq!(labels[MANAGED_BY_LABEL], "ferrite-operator");
        assert_eq!(slice.metadata.owner_references.as_ref().unwrap()[0].kind, "ModelDeployment");
        let addresses: Vec<_> = slice.endpoints.iter().flat_map(|e| e.addresses.clone()).collect();
        assert_eq!(addresses, ["10.0.0.7", "10.0.0.8"]);
        let ports: Vec<_> = slice.ports.unwrap().into_iter().map(|p| (p.name.unwrap(), p.port.unwrap())).collect();
        assert_eq!(ports, [("http".to_string(), 8000), ("grpc".to_string(), 8001)]);
    }

    #[test]
    fn the_activator_is_read_from_its_ready_endpoints_and_named_ports() {
        let a = slice(
            "act-1",
            MANAGED_BY_CONTROLLER,
            json!([
                {"addresses": ["10.0.0.9"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": true, "terminating": true}},
            ]),
            json!([{"name": "http", "port": 9000}, {"name": "metrics", "port": 9002}]),
        );
        let b = slice("act-2", MANAGED_BY_CONTROLLER, json!([{"addresses": ["10.0.0.9"]}]), json!([]));
        let found = ActivatorEndpoints::from_slices([&a, &b]);
        assert_eq!(found.addresses, ["10.0.0.3", "10.0.0.9"]);
        assert_eq!((found.http_port, found.grpc_port, found.metrics_port), (9000, 8001, 9002));
        assert_eq!(found.metrics_urls(), ["http://10.0.0.3:9002/metrics", "http://10.0.0.9:9002/metrics"]);
        assert!(ActivatorEndpoints::from_slices([]).addresses.is_empty());
    }

    #[test]
    fn pod_slices_decide_when_the_activator_can_go_and_what_is_stale() {
        let ready = slice(
            "m-abc",
            MANAGED_BY_CONTROLLER,
            json!([{"addresses": ["10.1.0.1"], "conditions": {"ready": true}}]),
            json!([]),
        );
        let unready = slice(
            "m-def",
            MANAGED_BY_CONTROLLER,
            json!([{"addresses": ["10.1.0.2"], "conditions": {"ready": false}}]),
            json!([]),
        );
        let ours = slice(
            "m-activator",
            MANAGED_BY_OPERATOR,
            json!([{"addresses": ["10.0.0.7"], "conditions": {"ready": true}}]),
            json!([]),
        );
        assert!(pods_listed(&[ready.clone(), ours.clone()]));
        assert!(!pods_listed(&[unready.clone(), ours.clone()]), "no ready pod: keep the activator");
        assert!(!pods_listed(std::slice::from_ref(&ours)), "our own slice is not a pod");
        let mirrored = slice("m-xyz", MANAGED_BY_MIRRORING, json!([{"addresses": ["10.1.0.1"]}]), json!([]));
        assert_eq!(stale_pod_slices(&[ready.clone(), ours.clone(), unready, mirrored]), ["m-abc", "m-def", "m-xyz"]);

        let m = md(0);
        let selectorless = service(&m, Mode::Activator);
        let with_selector = service(&m, Mode::Pods);
        assert!(settled_in_activator_mode(&m, Some(&selectorless), std::slice::from_ref(&ours)));
        assert!(
            !settled_in_activator_mode(&m, Some(&with_selector), std::slice::from_ref(&ours)),
            "selector still there"
        );
        assert!(!settled_in_activator_mode(&m, Some(&selectorless), &[ours.clone(), ready]), "stale pod slice");
        assert!(!settled_in_activator_mode(&m, Some(&selectorless), &[]), "no activator slice");
        assert!(!settled_in_activator_mode(&m, None, &[ours]), "no Service");
    }
}
