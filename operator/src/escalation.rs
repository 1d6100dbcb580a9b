//! `status.escalation` and the `EscalationTargetReachable` condition of a
//! ModelDeployment with `spec.escalation` (mode cascade or shadow).
//!
//! The reconciler (the status's one writer, besides the autoscaler's two
//! fields) scrapes the pods' metrics at most every [`SCRAPE_PERIOD`]
//! ([`observe`]), keeps the scrapes of the last window per object
//! ([`Memory`], in the leader's memory: a new leader starts the window
//! afresh), and adds the rate and the condition to the status it computes
//! ([`apply`]). In between, a reconciliation (such as the one its own status
//! write triggers) reuses the last reading, so the status does not change
//! and no write loop starts.
//!
//! The condition: `TargetMissing` (False) when a `modelDeployment` target
//! does not exist; else `TargetUnreachable` (False) when some pod's last
//! call to the target failed (`ferrite_escalation_target_up` 0),
//! `TargetReachable` (True) when every pod that called it succeeded last
//! time, and `TargetNotCalled` (Unknown) before any pod called it.

pub mod window;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferrite_contract::metrics as names;
use futures::stream::{self, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::autoscale::{family_samples, fetch_metrics, Labels, ScrapeError};
use crate::crd::{EscalationMode, EscalationSpec, ModelDeployment, ModelDeploymentStatus};
use crate::resources::escalation::settings;
use crate::status::carry_transition_times;
pub use window::{PodCounters, PodSample, Sample, TargetCalls, Window};

/// The condition's type.
pub const TARGET_REACHABLE: &str = "EscalationTargetReachable";
/// Reason: every pod that called the target succeeded on its last call.
pub const REASON_REACHABLE: &str = "TargetReachable";
/// Reason: some pod's last call to the target failed.
pub const REASON_UNREACHABLE: &str = "TargetUnreachable";
/// Reason: the `modelDeployment` target does not exist.
pub const REASON_MISSING: &str = "TargetMissing";
/// Reason: no pod has called the target yet.
pub const REASON_NOT_CALLED: &str = "TargetNotCalled";
/// Least time between two scrapes of one ModelDeployment's pods.
pub const SCRAPE_PERIOD: Duration = Duration::from_secs(10);
/// Longest one pod's scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pods scraped at once.
const SCRAPE_CONCURRENCY: usize = 32;

/// Whether the operator reads escalation status for `md`: escalation set,
/// and not `off`.
pub fn active(md: &ModelDeployment) -> Option<&EscalationSpec> {
    md.spec.escalation.as_ref().filter(|spec| spec.mode != EscalationMode::Off)
}

/// One pod's escalation counters for `model`, from its metrics text. Absent
/// families read as zero (no request decided yet, or not an LLM).
pub fn parse_pod(text: &str, model: &str) -> Result<PodCounters, ScrapeError> {
    let of_model = |labels: &Labels| labels.iter().any(|(k, v)| k == names::MODEL_LABEL && v == model);
    let mut counters = PodCounters::default();
    for (labels, value) in family_samples(text, names::CASCADE_DECISIONS)? {
        if !of_model(&labels) {
            continue;
        }
        let outcome = labels.iter().find(|(k, _)| k == names::OUTCOME_LABEL).map(|(_, v)| v.as_str());
        match outcome {
            Some(names::OUTCOME_LOCAL) => counters.local += value.max(0.0),
            Some(names::OUTCOME_ESCALATED) => counters.escalated += value.max(0.0),
            Some(names::OUTCOME_FALLBACK) => counters.fallback += value.max(0.0),
            _ => {}
        }
    }
    for (labels, value) in family_samples(text, names::ESCALATION_TARGET_UP)? {
        if of_model(&labels) {
            // Several series (one per target) must all be up.
            counters.target_up = Some(counters.target_up.unwrap_or(true) && value >= 1.0);
        }
    }
    Ok(counters)
}

/// What the last scrape round gave.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Observed {
    /// `status.escalation`.
    pub status: crate::crd::EscalationStatus,
    /// The pods' word on the target.
    pub calls: TargetCalls,
}

struct Tracked {
    window: Window,
    scraped_at: Instant,
    observed: Observed,
}

/// The reconciler's memory of each escalating ModelDeployment's scrapes,
/// by uid.
#[derive(Default)]
pub struct Memory(Mutex<HashMap<String, Tracked>>);

impl Memory {
    /// Drops what is kept for `md` (escalation removed or turned off).
    pub fn forget(&self, md: &ModelDeployment) {
        if let Some(uid) = md.metadata.uid.as_deref() {
            self.0.lock().expect("not poisoned").remove(uid);
        }
    }
}

/// Pods worth scraping: with an IP, Running, not terminating; `(uid, url,
/// start time)`.
fn targets(pods: &[Pod]) -> Vec<(String, String, Option<f64>)> {
    pods.iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            (status.phase.as_deref() == Some("Running")).then_some(())?;
            let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
            let url = format!("http://{host}:{}{}", ferrite_contract::ports::METRICS, names::PATH);
            let started = status.start_time.as_ref().map(|t| t.0.as_second() as f64);
            Some((pod.metadata.uid.clone().unwrap_or_else(|| pod.name_any()), url, started))
        })
        .collect()
}

/// The escalation reading of `md`: a fresh scrape of `pods` when the last
/// one is [`SCRAPE_PERIOD`] old, else the last reading. Pods that do not
/// answer are left out of the round (and logged).
pub async fn observe(memory: &Memory, http: &reqwest::Client, md: &ModelDeployment, pods: &[Pod]) -> Observed {
    let Some(spec) = active(md) else { return Observed::default() };
    let uid = md.metadata.uid.clone().unwrap_or_default();
    if let Some(tracked) = memory.0.lock().expect("not poisoned").get(&uid) {
        if tracked.scraped_at.elapsed() < SCRAPE_PERIOD {
            return tracked.observed.clone();
        }
    }
    let model = md.model_name();
    let scraped: Vec<Option<PodSample>> = stream::iter(targets(pods))
        .map(|(key, url, started_at)| {
            let model = model.clone();
            async move {
                let text = fetch_metrics(http, &url, SCRAPE_TIMEOUT).await;
                match text.and_then(|text| parse_pod(&text, &model)) {
                    Ok(counters) => Some(PodSample { key, started_at, counters }),
                    Err(error) => {
                        tracing::debug!(%url, %error, "reading escalation metrics failed");
                        None
                    }
                }
            }
        })
        .buffer_unordered(SCRAPE_CONCURRENCY)
        .collect()
        .await;
    let sample = Sample { at: now_seconds(), pods: scraped.into_iter().flatten().collect() };
    let mut guard = memory.0.lock().expect("not poisoned");
    let tracked = guard.entry(uid).or_insert_with(|| Tracked {
        window: Window::default(),
        scraped_at: Instant::now(),
        observed: Observed::default(),
    });
    let (status, calls) = tracked.window.record(sample, f64::from(spec.window_seconds.max(1)));
    tracked.scraped_at = Instant::now();
    tracked.observed = Observed { status, calls };
    tracked.observed.clone()
}

fn now_seconds() -> f64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond() as f64 / 1000.0
}

/// The condition's `(status, reason, message)`. `target_exists` is whether a
/// `modelDeployment` target exists (`None` for a URL target).
pub fn target_condition(md: &ModelDeployment, observed: &Observed, target_exists: Option<bool>) -> (&'static str, &'static str, String) {
    let url = settings(md).map(|s| s.target.url).unwrap_or_default();
    let calls = observed.calls;
    if target_exists == Some(false) {
        let name = md.spec.escalation.as_ref().and_then(|e| e.target.model_deployment.clone()).unwrap_or_default();
        let message = format!(
            "ModelDeployment {name} (spec.escalation.target.modelDeployment) does not exist in namespace {}: \
             requests meant for it are answered by this model",
            md.namespace().unwrap_or_default()
        );
        return ("False", REASON_MISSING, message);
    }
    match (calls.reporting, calls.failing) {
        (0, _) => ("Unknown", REASON_NOT_CALLED, format!("no pod has called {url} yet")),
        (n, 0) => ("True", REASON_REACHABLE, format!("the last call to {url} succeeded on every pod that made one ({n})")),
        (n, failing) => (
            "False",
            REASON_UNREACHABLE,
            format!(
                "the last call to {url} failed on {failing} of {n} pods (ferrite_escalation_target_up 0): \
                 requests meant for it are answered by this model"
            ),
        ),
    }
}

/// Adds `status.escalation` and the condition to the reconciler's status,
/// keeping the condition's transition time while its status holds.
pub fn apply(status: &mut ModelDeploymentStatus, md: &ModelDeployment, observed: &Observed, target_exists: Option<bool>) {
    if active(md).is_none() {
        return;
    }
    status.escalation = Some(observed.status.clone());
    let (state, reason, message) = target_condition(md, observed, target_exists);
    let mut condition = [Condition {
        type_: TARGET_REACHABLE.into(),
        status: state.into(),
        reason: reason.into(),
        message,
        observed_generation: md.metadata.generation,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }];
    let previous = md.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    carry_transition_times(&mut condition, previous);
    status.conditions.retain(|c| c.type_ != TARGET_REACHABLE);
    status.conditions.extend(condition);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EscalationStatus, ModelDeploymentSpec};
    use serde_json::json;

    fn md(escalation: serde_json::Value) -> ModelDeployment {
        let spec: ModelDeploymentSpec =
            serde_json::from_value(json!({"model": {"uri": "s3://b/m/", "name": "smollm2"}, "escalation": escalation}))
                .unwrap();
        let mut md = ModelDeployment::new("micro", spec);
        md.metadata.namespace = Some("ml".into());
        md.metadata.uid = Some("u1".into());
        md.metadata.generation = Some(2);
        md
    }

    /// A cascade server's metrics as the contract names them, with another
    /// model's series and unrelated families around.
    const METRICS: &str = r#"# TYPE ferrite_cascade_decisions_total counter
ferrite_cascade_decisions_total{model="smollm2",outcome="local"} 40
ferrite_cascade_decisions_total{model="smollm2",outcome="escalated"} 9
ferrite_cascade_decisions_total{model="smollm2",outcome="fallback"} 1
ferrite_cascade_decisions_total{model="other",outcome="escalated"} 500
# TYPE ferrite_escalation_target_up gauge
ferrite_escalation_target_up{model="smollm2"} 1
ferrite_escalation_target_up{model="other"} 0
# TYPE ferrite_escalations_total counter
ferrite_escalations_total{model="smollm2",reason="confidence"} 9
ferrite_queue_depth{model="smollm2"} 0
"#;

    #[test]
    fn a_pods_counters_are_its_models_series() {
        let c = parse_pod(METRICS, "smollm2").unwrap();
        assert_eq!(c, PodCounters { local: 40.0, escalated: 9.0, fallback: 1.0, target_up: Some(true) });
        let other = parse_pod(METRICS, "other").unwrap();
        assert_eq!((other.escalated, other.target_up), (500.0, Some(false)));
        assert_eq!(parse_pod("ferrite_queue_depth{model=\"m\"} 0\n", "m").unwrap(), PodCounters::default());
        let broken = "ferrite_cascade_decisions_total{model=\"smollm2\",outcome=\"local\"} many\n";
        assert!(matches!(parse_pod(broken, "smollm2"), Err(ScrapeError::Parse { line: 1, .. })));
    }

    fn observed(reporting: usize, failing: usize) -> Observed {
        Observed {
            status: EscalationStatus { rate: Some(0.2), escalated: 2, total: 10, target_reachable: None },
            calls: TargetCalls { reporting, failing },
        }
    }

    #[test]
    fn the_condition_says_missing_unreachable_reachable_or_not_called() {
        let m = md(json!({"target": {"modelDeployment": "macro"}}));
        let cases = [
            (observed(2, 0), Some(false), "False", REASON_MISSING, "ModelDeployment macro"),
            (observed(2, 1), Some(true), "False", REASON_UNREACHABLE, "failed on 1 of 2 pods"),
            (observed(2, 0), Some(true), "True", REASON_REACHABLE, "http://macro.ml.svc:8000/v1"),
            (observed(0, 0), Some(true), "Unknown", REASON_NOT_CALLED, "no pod has called"),
        ];
        for (obs, exists, state, reason, text) in cases {
            let (s, r, message) = target_condition(&m, &obs, exists);
            assert_eq!((s, r), (state, reason), "{message}");
            assert!(message.contains(text), "{message}");
        }
        let url = md(json!({"target": {"url": "https://api.example.com/v1", "model": "big"}}));
        let (_, reason, message) = target_condition(&url, &observed(1, 1), None);
        assert_eq!(reason, REASON_UNREACHABLE);
        assert!(message.contains("https://api.example.com/v1"), "{message}");
    }

    #[test]
    fn apply_adds_the_status_and_one_condition_keeping_its_transition_time() {
        let mut m = md(json!({"target": {"modelDeployment": "macro"}}));
        let mut status = ModelDeploymentStatus::default();
        apply(&mut status, &m, &observed(1, 1), Some(true));
        assert_eq!(status.escalation.as_ref().unwrap().total, 10);
        let condition = status.conditions.iter().find(|c| c.type_ == TARGET_REACHABLE).unwrap().clone();
        assert_eq!((condition.status.as_str(), condition.observed_generation), ("False", Some(2)));
        // Next time, the same status: the old transition time, one condition.
        let mut old = status.clone();
        old.conditions[0].last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        m.status = Some(old.clone());
        apply(&mut old, &m, &observed(1, 1), Some(true));
        assert_eq!(old.conditions.len(), 1);
        assert_eq!(old.conditions[0].last_transition_time.0, k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        // Mode off, or no escalation: nothing added.
        let off = md(json!({"target": {"modelDeployment": "macro"}, "mode": "off"}));
        let mut status = ModelDeploymentStatus::default();
        apply(&mut status, &off, &observed(1, 1), Some(true));
        assert_eq!(status, ModelDeploymentStatus::default());
    }

    #[test]
    fn only_running_pods_with_an_ip_are_scraped() {
        let pod = |name: &str, status: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "uid": name}, "status": status})).unwrap()
        };
        let pods = [
            pod("a", json!({"phase": "Running", "podIP": "10.0.0.1", "startTime": "2026-01-01T00:00:00Z"})),
            pod("b", json!({"phase": "Pending", "podIP": "10.0.0.2"})),
            pod("c", json!({"phase": "Running"})),
            pod("d", json!({"phase": "Running", "podIP": "fd00::1"})),
        ];
        let t = targets(&pods);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].1, "http://10.0.0.1:8002/metrics");
        assert_eq!(t[0].2, Some(1_767_225_600.0));
        assert_eq!(t[1].1, "http://[fd00::1]:8002/metrics");
    }
}
