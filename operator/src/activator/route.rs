//! Which ModelDeployment a request is for, from its Host header or HTTP/2
//! `:authority` (pure: the cluster state comes in as a [`Directory`]).
//!
//! Accepted forms, each with an optional `:port`: `NAME`, `NAME.NS`,
//! `NAME.NS.svc`, `NAME.NS.svc.<cluster domain>`, and an IP address that is
//! a model Service's ClusterIP. A bare `NAME` must be unique among the
//! watched ModelDeployments.

use std::fmt;
use std::net::IpAddr;

/// A ModelDeployment, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelKey {
    /// The ModelDeployment's namespace.
    pub namespace: String,
    /// The ModelDeployment's name.
    pub name: String,
}

impl ModelKey {
    /// The key of `name` in `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ModelKey {
        ModelKey { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ModelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a Host value names, before looking at the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostTarget {
    /// A DNS-style name.
    Name {
        /// The ModelDeployment's name.
        name: String,
        /// Its namespace, when the host names one.
        namespace: Option<String>,
    },
    /// An IP address (a Service's ClusterIP when the client dialled one).
    Ip(IpAddr),
}

/// Why a request cannot be routed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No Host header or `:authority`.
    #[error("the request names no host (Host header or :authority), so the activator cannot tell which ModelDeployment it is for")]
    NoHost,
    /// A Host value that is not a name or address.
    #[error("host {0:?} is not a valid host name or address")]
    BadHost(String),
    /// Nothing watched matches.
    #[error("no ModelDeployment matches host {0:?} (use NAME, NAME.NAMESPACE, NAME.NAMESPACE.svc[.cluster domain] or the model Service's ClusterIP)")]
    Unknown(String),
    /// A bare name that exists in several namespaces.
    #[error("host {host:?} matches ModelDeployments in several namespaces ({namespaces}); use NAME.NAMESPACE")]
    Ambiguous {
        /// The host as sent.
        host: String,
        /// The namespaces, comma-separated.
        namespaces: String,
    },
}

/// The cluster state routing needs.
pub trait Directory {
    /// Whether `key` is a watched ModelDeployment.
    fn exists(&self, key: &ModelKey) -> bool;
    /// The namespaces holding a ModelDeployment called `name`.
    fn namespaces_of(&self, name: &str) -> Vec<String>;
    /// The ModelDeployment whose Service has ClusterIP `ip`.
    fn by_cluster_ip(&self, ip: IpAddr) -> Option<ModelKey>;
}

/// Parses a Host / `:authority` value (port and a trailing dot dropped,
/// case folded).
pub fn parse_host(host: &str) -> Result<HostTarget, RouteError> {
    let bad = || RouteError::BadHost(host.to_string());
    let trimmed = host.trim();
    if trimmed.is_empty() {
        return Err(RouteError::NoHost);
    }
    // `[v6]:port` or `[v6]`.
    if let Some(rest) = trimmed.strip_prefix('[') {
        let (address, after) = rest.split_once(']').ok_or_else(bad)?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(valid_port)) {
            return Err(bad());
        }
        return address.parse().map(HostTarget::Ip).map_err(|_| bad());
    }
    let name = match trimmed.rsplit_once(':') {
        Some((name, port)) if valid_port(port) => name,
        Some(_) => return Err(bad()),
        None => trimmed,
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(HostTarget::Ip(ip));
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let labels: Vec<&str> = name.split('.').collect();
    if !labels.iter().all(|label| valid_label(label)) {
        return Err(bad());
    }
    match labels.as_slice() {
        [name] => Ok(HostTarget::Name { name: name.to_string(), namespace: None }),
        [name, namespace] => Ok(HostTarget::Name { name: name.to_string(), namespace: Some(namespace.to_string()) }),
        [name, namespace, "svc", ..] => {
            Ok(HostTarget::Name { name: name.to_string(), namespace: Some(namespace.to_string()) })
        }
        // Some other domain (`model.example.com`): no model of ours.
        _ => Err(RouteError::Unknown(host.to_string())),
    }
}

fn valid_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// An RFC 1123 label (what Kubernetes names and namespaces are made of).
fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// The ModelDeployment that `host` names.
pub fn resolve(host: Option<&str>, directory: &impl Directory) -> Result<ModelKey, RouteError> {
    let host = host.ok_or(RouteError::NoHost)?;
    match parse_host(host)? {
        HostTarget::Ip(ip) => directory.by_cluster_ip(ip).ok_or_else(|| RouteError::Unknown(host.to_string())),
        HostTarget::Name { name, namespace: Some(namespace) } => {
            let key = ModelKey::new(namespace, name);
            if directory.exists(&key) {
                Ok(key)
            } else {
                Err(RouteError::Unknown(host.to_string()))
            }
        }
        HostTarget::Name { name, namespace: None } => {
            let mut namespaces = directory.namespaces_of(&name);
            namespaces.sort();
            match namespaces.as_slice() {
                [] => Err(RouteError::Unknown(host.to_string())),
                [namespace] => Ok(ModelKey::new(namespace.clone(), name)),
                _ => Err(RouteError::Ambiguous { host: host.to_string(), namespaces: namespaces.join(", ") }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    struct Cluster {
        models: Vec<ModelKey>,
        ips: BTreeMap<IpAddr, ModelKey>,
    }

    impl Directory for Cluster {
        fn exists(&self, key: &ModelKey) -> bool {
            self.models.contains(key)
        }
        fn namespaces_of(&self, name: &str) -> Vec<String> {
            self.models.iter().filter(|k| k.name == name).map(|k| k.namespace.clone()).collect()
        }
        fn by_cluster_ip(&self, ip: IpAddr) -> Option<ModelKey> {
            self.ips.get(&ip).cloned()
        }
    }

    fn cluster() -> Cluster {
        Cluster {
            models: vec![ModelKey::new("a", "mlp"), ModelKey::new("a", "llm"), ModelKey::new("b", "llm")],
            ips: BTreeMap::from([
                ("10.96.0.12".parse().unwrap(), ModelKey::new("a", "mlp")),
                ("fd00::12".parse().unwrap(), ModelKey::new("b", "llm")),
            ]),
        }
    }

    fn route(host: &str) -> Result<ModelKey, RouteError> {
        resolve(Some(host), &cluster())
    }

    #[test]
    fn every_service_dns_form_with_or_without_a_port_names_the_model() {
        for host in [
            "mlp.a",
            "mlp.a:8000",
            "mlp.a.svc",
            "mlp.a.svc:8001",
            "mlp.a.svc.cluster.local",
            "MLP.A.svc.cluster.local.:8000",
            "mlp.a.svc.corp.example",
            "mlp",
            "mlp:8001",
        ] {
            assert_eq!(route(host), Ok(ModelKey::new("a", "mlp")), "{host}");
        }
    }

    #[test]
    fn cluster_ips_name_the_model_of_their_service() {
        assert_eq!(route("10.96.0.12"), Ok(ModelKey::new("a", "mlp")));
        assert_eq!(route("10.96.0.12:8000"), Ok(ModelKey::new("a", "mlp")));
        assert_eq!(route("[fd00::12]:8001"), Ok(ModelKey::new("b", "llm")));
        assert_eq!(route("[fd00::12]"), Ok(ModelKey::new("b", "llm")));
        assert_eq!(route("10.96.0.13:8000"), Err(RouteError::Unknown("10.96.0.13:8000".into())));
    }

    #[test]
    fn unknown_ambiguous_and_malformed_hosts_are_refused_with_a_reason() {
        assert_eq!(route("resnet"), Err(RouteError::Unknown("resnet".into())));
        assert_eq!(route("mlp.b"), Err(RouteError::Unknown("mlp.b".into())));
        assert_eq!(route("mlp.a.example.com"), Err(RouteError::Unknown("mlp.a.example.com".into())));
        assert_eq!(route("llm"), Err(RouteError::Ambiguous { host: "llm".into(), namespaces: "a, b".into() }));
        assert_eq!(route("llm.b"), Ok(ModelKey::new("b", "llm")));
        for bad in ["mlp:http", "mlp:", "ml_p", "-mlp", "mlp..a", "[fd00::12", "[nope]:1", "mlp:123456"] {
            assert_eq!(route(bad), Err(RouteError::BadHost(bad.into())), "{bad}");
        }
        assert_eq!(resolve(None, &cluster()), Err(RouteError::NoHost));
        assert_eq!(route(" "), Err(RouteError::NoHost));
        let message = route("llm").unwrap_err().to_string();
        assert!(message.contains("NAME.NAMESPACE"), "{message}");
    }
}
