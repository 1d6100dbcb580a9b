//! The NetworkPolicy a ModelDeployment may ask for (`spec.networkPolicy`):
//! ingress to the HTTP and gRPC ports from the peers it names (by default
//! its own namespace), to the metrics port only from the operator (which
//! scrapes queue depth), the Prometheus the operator is configured with, and
//! the peers in `metricsFrom`. Egress stays open: the fetch container
//! downloads the model, and an escalating server calls its target (another
//! ModelDeployment or a hosted URL). When `from` names the clients, the
//! pods of the namespace's ModelDeployments that escalate to this one (pod
//! label `ferrite.dev/escalates-to: <name>`) may reach the HTTP port too. A
//! pure builder; NetworkPolicies are enforced only by network plugins that
//! implement them.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{ModelDeployment, NetworkPeer};
use crate::resources::escalation::ESCALATES_TO_LABEL;
use crate::resources::{selector_labels, GRPC_PORT, HTTP_PORT, INSTANCE_LABEL, METRICS_PORT};

/// The label every namespace carries with its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Who scrapes the metrics port, besides what a ModelDeployment adds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsScrapers {
    /// The operator's namespace.
    pub operator_namespace: String,
    /// Labels of the operator's pods (empty: every pod of its namespace).
    pub operator_pod_labels: BTreeMap<String, String>,
    /// Prometheus: its namespace's labels and its pods' labels; `None` when
    /// no Prometheus is configured.
    pub prometheus: Option<(BTreeMap<String, String>, BTreeMap<String, String>)>,
    /// The activator's namespace (`--activator-service`), when there is one:
    /// its pods ([`ACTIVATOR_POD_LABELS`]) forward the held requests of a
    /// model scaled to zero, so they may reach the HTTP and gRPC ports.
    pub activator_namespace: Option<String>,
}

/// Labels of the activator's pods (the chart's): `app.kubernetes.io/component: activator`.
pub const ACTIVATOR_POD_LABELS: [(&str, &str); 1] = [("app.kubernetes.io/component", "activator")];

fn selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector { match_labels: (!labels.is_empty()).then_some(labels), ..LabelSelector::default() }
}

fn peer(peer: &NetworkPeer) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: peer.namespace_selector.clone(),
        pod_selector: peer.pod_selector.clone(),
        ..NetworkPolicyPeer::default()
    }
}

fn ports(numbers: &[i32]) -> Vec<NetworkPolicyPort> {
    numbers
        .iter()
        .map(|&n| NetworkPolicyPort {
            port: Some(IntOrString::Int(n)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        })
        .collect()
}

/// The NetworkPolicy of a ModelDeployment, or `None` when it asks for none.
pub fn network_policy(md: &ModelDeployment, scrapers: &MetricsScrapers) -> Option<NetworkPolicy> {
    let spec = md.spec.network_policy.as_ref()?;
    let model_peers = if spec.from.is_empty() {
        // Only the ModelDeployment's namespace (a pod selector alone).
        vec![NetworkPolicyPeer { pod_selector: Some(LabelSelector::default()), ..NetworkPolicyPeer::default() }]
    } else {
        spec.from.iter().map(peer).collect()
    };
    let mut metrics_peers = vec![NetworkPolicyPeer {
        namespace_selector: Some(selector(BTreeMap::from([(
            NAMESPACE_NAME_LABEL.to_string(),
            scrapers.operator_namespace.clone(),
        )]))),
        pod_selector: Some(selector(scrapers.operator_pod_labels.clone())),
        ..NetworkPolicyPeer::default()
    }];
    if let Some((namespaces, pods)) = &scrapers.prometheus {
        metrics_peers.push(NetworkPolicyPeer {
            namespace_selector: Some(selector(namespaces.clone())),
            pod_selector: Some(selector(pods.clone())),
            ..NetworkPolicyPeer::default()
        });
    }
    metrics_peers.extend(spec.metrics_from.iter().map(peer));

    let mut ingress = vec![
        NetworkPolicyIngressRule { from: Some(model_peers), ports: Some(ports(&[HTTP_PORT, GRPC_PORT])) },
        NetworkPolicyIngressRule { from: Some(metrics_peers), ports: Some(ports(&[METRICS_PORT])) },
    ];
    if let Some(namespace) = &scrapers.activator_namespace {
        let pods = ACTIVATOR_POD_LABELS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let peer = NetworkPolicyPeer {
            namespace_selector: Some(selector(BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.clone())]))),
            pod_selector: Some(selector(pods)),
            ..NetworkPolicyPeer::default()
        };
        ingress.push(NetworkPolicyIngressRule { from: Some(vec![peer]), ports: Some(ports(&[HTTP_PORT, GRPC_PORT])) });
    }
    // The default (the own namespace) already lets escalating pods in.
    if !spec.from.is_empty() {
        ingress
            .push(NetworkPolicyIngressRule { from: Some(vec![escalating_pods(md)]), ports: Some(ports(&[HTTP_PORT])) });
    }

    let owner = md.controller_owner_ref(&()).expect("a ModelDeployment from the API has a name and uid");
    let mut labels = selector_labels(md);
    labels.insert("app.kubernetes.io/managed-by".into(), "ferrite-operator".into());
    Some(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(md.name_any()),
            namespace: md.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(selector_labels(md))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    })
}

/// Pods of this namespace's ModelDeployments that escalate to `md` (the
/// operator labels them; see [`crate::resources::escalation`]).
fn escalating_pods(md: &ModelDeployment) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(ESCALATES_TO_LABEL.to_string(), md.name_any())])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: INSTANCE_LABEL.into(),
                operator: "Exists".into(),
                values: None,
            }]),
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// Parses `key=value,key2=value2` (a flag's label set); empty: no labels.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_string(), value.trim().to_string())),
            _ => Err(format!("{pair:?} is not key=value")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ModelDeploymentSpec;

    fn md(spec: serde_json::Value) -> ModelDeployment {
        let mut md = ModelDeployment::new("resnet", serde_json::from_value::<ModelDeploymentSpec>(spec).unwrap());
        md.metadata.namespace = Some("ml".into());
        md.metadata.uid = Some("uid-1".into());
        md
    }

    fn scrapers() -> MetricsScrapers {
        MetricsScrapers {
            operator_namespace: "ferrite-system".into(),
            operator_pod_labels: parse_labels("app.kubernetes.io/name=ferrite,app.kubernetes.io/component=operator")
                .unwrap(),
            prometheus: Some((parse_labels("team=monitoring").unwrap(), parse_labels("app=prometheus").unwrap())),
            activator_namespace: None,
        }
    }

    #[test]
    fn the_activator_reaches_the_model_ports_when_there_is_one() {
        let spec = serde_json::json!({"model": {"uri": "s3://b/m"}, "networkPolicy": {}});
        let with = MetricsScrapers { activator_namespace: Some("ferrite-system".into()), ..scrapers() };
        let rules = ingress(&network_policy(&md(spec.clone()), &with).unwrap());
        assert_eq!(rules.len(), 3);
        assert_eq!(port_numbers(&rules[2]), [IntOrString::Int(8000), IntOrString::Int(8001)]);
        let peer = &rules[2].from.as_ref().unwrap()[0];
        assert_eq!(
            peer.namespace_selector.clone().unwrap().match_labels.unwrap()[NAMESPACE_NAME_LABEL],
            "ferrite-system"
        );
        assert_eq!(
            peer.pod_selector.clone().unwrap().match_labels.unwrap()["app.kubernetes.io/component"],
            "activator"
        );
        assert_eq!(ingress(&network_policy(&md(spec), &scrapers()).unwrap()).len(), 2, "no activator: no rule");
    }

    fn ingress(policy: &NetworkPolicy) -> Vec<NetworkPolicyIngressRule> {
        policy.spec.clone().unwrap().ingress.unwrap()
    }

    fn port_numbers(rule: &NetworkPolicyIngressRule) -> Vec<IntOrString> {
        rule.ports.iter().flatten().filter_map(|p| p.port.clone()).collect()
    }

    #[test]
    fn none_unless_asked_for() {
        assert!(network_policy(&md(serde_json::json!({"model": {"uri": "s3://b/m"}})), &scrapers()).is_none());
    }

    #[test]
    fn model_ports_default_to_the_own_namespace_and_metrics_to_the_scrapers() {
        let policy =
            network_policy(&md(serde_json::json!({"model": {"uri": "s3://b/m"}, "networkPolicy": {}})), &scrapers())
                .unwrap();
        let spec = policy.spec.clone().unwrap();
        assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap()["ferrite.dev/model-deployment"], "resnet");
        assert_eq!(spec.policy_types.unwrap(), ["Ingress"], "egress stays open for the model download");
        let rules = ingress(&policy);
        assert_eq!(port_numbers(&rules[0]), [IntOrString::Int(8000), IntOrString::Int(8001)]);
        let own = &rules[0].from.as_ref().unwrap()[0];
        assert!(own.namespace_selector.is_none() && own.pod_selector == Some(LabelSelector::default()));
        assert_eq!(port_numbers(&rules[1]), [IntOrString::Int(8002)]);
        let metrics = rules[1].from.clone().unwrap();
        assert_eq!(metrics.len(), 2);
        let operator_ns = metrics[0].namespace_selector.clone().unwrap().match_labels.unwrap();
        assert_eq!(operator_ns[NAMESPACE_NAME_LABEL], "ferrite-system");
        assert_eq!(metrics[0].pod_selector.clone().unwrap().match_labels.unwrap().len(), 2);
        assert_eq!(metrics[1].pod_selector.clone().unwrap().match_labels.unwrap()["app"], "prometheus");
        assert_eq!(policy.metadata.owner_references.unwrap()[0].kind, "ModelDeployment");
    }

    #[test]
    fn chosen_peers_reach_the_model_and_metrics_ports() {
        let policy = network_policy(
            &md(serde_json::json!({
                "model": {"uri": "s3://b/m"},
                "networkPolicy": {
                    "from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}, "podSelector": {"matchLabels": {"app": "api"}}}],
                    "metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "sre"}}}],
                },
            })),
            &MetricsScrapers { prometheus: None, ..scrapers() },
        )
        .unwrap();
        let rules = ingress(&policy);
        let from = rules[0].from.clone().unwrap();
        assert_eq!(from.len(), 1);
        assert_eq!(from[0].pod_selector.clone().unwrap().match_labels.unwrap()["app"], "api");
        let metrics = rules[1].from.clone().unwrap();
        assert_eq!(metrics.len(), 2, "the operator and metricsFrom, no Prometheus configured");
        assert_eq!(metrics[1].namespace_selector.clone().unwrap().match_labels.unwrap()["team"], "sre");
        // Pods escalating to this deployment reach its HTTP port, and only that.
        assert_eq!(rules.len(), 3);
        assert_eq!(port_numbers(&rules[2]), [IntOrString::Int(8000)]);
        let escalating = rules[2].from.clone().unwrap();
        let selector = escalating[0].pod_selector.clone().unwrap();
        assert_eq!(selector.match_labels.unwrap()[ESCALATES_TO_LABEL], "resnet");
        assert_eq!(selector.match_expressions.unwrap()[0].key, INSTANCE_LABEL);
        assert!(escalating[0].namespace_selector.is_none(), "the own namespace only");
    }

    #[test]
    fn the_default_peers_need_no_rule_for_escalating_pods() {
        let policy =
            network_policy(&md(serde_json::json!({"model": {"uri": "s3://b/m"}, "networkPolicy": {}})), &scrapers())
                .unwrap();
        assert_eq!(ingress(&policy).len(), 2, "the own namespace is let in already");
    }

    #[test]
    fn label_flags_parse() {
        assert_eq!(parse_labels("").unwrap(), BTreeMap::new());
        assert_eq!(parse_labels(" a=1, b = 2 ").unwrap().len(), 2);
        assert!(parse_labels("a").is_err());
        assert!(parse_labels("=1").is_err());
    }
}
