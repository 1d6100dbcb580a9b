//! What the activator pods report: requests held and received per
//! ModelDeployment (`ferrite_activator_held_requests`,
//! `ferrite_activator_requests_total`, labels `namespace` and `name`). The
//! autoscaler scrapes every activator pod once per tick (every second, for
//! all models at once), so a request held for a model at zero is seen within
//! about a second.

use std::collections::HashMap;
use std::time::Duration;

use ferrite_contract::activator::{HELD_REQUESTS, NAMESPACE_LABEL, NAME_LABEL, REQUESTS};
use futures::stream::{self, StreamExt};

use super::scrape::{family_samples, fetch_metrics, ScrapeError};

/// Held and received requests of one ModelDeployment, summed over the
/// activator pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivatorCounts {
    /// Requests waiting for a Ready pod.
    pub held: u64,
    /// Requests received so far (a counter).
    pub requests: u64,
}

/// One scrape round of the activator pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActivatorSnapshot {
    counts: HashMap<(String, String), ActivatorCounts>,
    /// Pods read.
    pub pods_scraped: u32,
    /// Pods whose scrape failed.
    pub pods_failed: u32,
}

impl ActivatorSnapshot {
    /// Whether every activator pod was read (and there was one): only then
    /// is a zero a zero.
    pub fn complete(&self) -> bool {
        self.pods_scraped > 0 && self.pods_failed == 0
    }

    /// The counts of ModelDeployment `namespace/name`: zeros when no pod
    /// saw it; `None` when the round is not [`complete`](Self::complete).
    pub fn for_model(&self, namespace: &str, name: &str) -> Option<ActivatorCounts> {
        self.complete()
            .then(|| self.counts.get(&(namespace.to_string(), name.to_string())).copied().unwrap_or_default())
    }

    /// Held requests of a model from the pods that answered, complete or not
    /// (a partial sum is still a reason to scale up).
    pub fn held(&self, namespace: &str, name: &str) -> u64 {
        self.counts.get(&(namespace.to_string(), name.to_string())).map_or(0, |c| c.held)
    }

    fn add(&mut self, other: CountsByModel) {
        for (key, counts) in other {
            let sum = self.counts.entry(key).or_default();
            sum.held = sum.held.saturating_add(counts.held);
            sum.requests = sum.requests.saturating_add(counts.requests);
        }
    }
}

/// Counts by ModelDeployment `(namespace, name)`.
pub type CountsByModel = HashMap<(String, String), ActivatorCounts>;

/// The per-ModelDeployment counts of one activator pod's metrics text.
/// Absent families read as zero (a fresh activator exports its counters
/// from the first request on); malformed samples are an error.
pub fn parse_activator(text: &str) -> Result<CountsByModel, ScrapeError> {
    let mut counts: HashMap<(String, String), ActivatorCounts> = HashMap::new();
    for (family, held) in [(HELD_REQUESTS, true), (REQUESTS, false)] {
        for (labels, value) in family_samples(text, family)? {
            let label = |name: &str| labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            let (Some(namespace), Some(name)) = (label(NAMESPACE_LABEL), label(NAME_LABEL)) else { continue };
            let value = value.max(0.0).round() as u64;
            let entry = counts.entry((namespace, name)).or_default();
            if held {
                entry.held = entry.held.saturating_add(value);
            } else {
                entry.requests = entry.requests.saturating_add(value);
            }
        }
    }
    Ok(counts)
}

/// Scrapes every activator pod's metrics (`urls`) concurrently and sums them.
pub async fn observe_activator(http: &reqwest::Client, urls: &[String], timeout: Duration) -> ActivatorSnapshot {
    let results: Vec<(String, Result<CountsByModel, ScrapeError>)> = stream::iter(urls.to_vec())
        .map(|url: String| -> futures::future::BoxFuture<'_, _> {
            Box::pin(async move {
                let result = fetch_metrics(http, &url, timeout).await.and_then(|text| parse_activator(&text));
                (url, result)
            })
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut snapshot = ActivatorSnapshot::default();
    for (url, result) in results {
        match result {
            Ok(counts) => {
                snapshot.pods_scraped += 1;
                snapshot.add(counts);
            }
            Err(error) => {
                tracing::warn!(%url, %error, "scraping the activator's metrics failed");
                snapshot.pods_failed += 1;
            }
        }
    }
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE ferrite_activator_held_requests gauge
ferrite_activator_held_requests{namespace="ml",name="a"} 3
ferrite_activator_held_requests{name="b",namespace="ml"} 0
# TYPE ferrite_activator_requests_total counter
ferrite_activator_requests_total{namespace="ml",name="a"} 10
ferrite_activator_requests_total{namespace="ml",name="b"} 4
ferrite_activator_requests_total{namespace="other",name="a"} 7
ferrite_activator_requests_total{name="no-namespace"} 99
process_cpu_seconds_total 1.5
"#;

    #[test]
    fn counts_per_model_deployment() {
        let counts = parse_activator(TEXT).unwrap();
        let get = |ns: &str, name: &str| counts[&(ns.to_string(), name.to_string())];
        assert_eq!(get("ml", "a"), ActivatorCounts { held: 3, requests: 10 });
        assert_eq!(get("ml", "b"), ActivatorCounts { held: 0, requests: 4 });
        assert_eq!(get("other", "a"), ActivatorCounts { held: 0, requests: 7 });
        assert_eq!(counts.len(), 3, "a sample without both labels is no model's");
        assert!(parse_activator("").unwrap().is_empty(), "a fresh activator: nothing yet");
        assert!(parse_activator("ferrite_activator_held_requests{namespace=\"ml\",name=\"a\"} x\n").is_err());
    }

    #[test]
    fn a_snapshot_sums_pods_and_is_only_trusted_complete() {
        let mut snapshot = ActivatorSnapshot::default();
        assert_eq!(snapshot.for_model("ml", "a"), None, "no activator pod read");
        snapshot.add(parse_activator(TEXT).unwrap());
        snapshot.add(parse_activator(TEXT).unwrap());
        snapshot.pods_scraped = 2;
        assert_eq!(snapshot.for_model("ml", "a"), Some(ActivatorCounts { held: 6, requests: 20 }));
        assert_eq!(snapshot.for_model("ml", "unseen"), Some(ActivatorCounts::default()));
        snapshot.pods_failed = 1;
        assert_eq!(snapshot.for_model("ml", "a"), None, "a pod not read: unknown");
        assert_eq!(snapshot.held("ml", "a"), 6, "held is still a reason to scale up");
    }
}
