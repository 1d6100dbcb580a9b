//! The escalation rate over a sliding window, from the pods' cumulative
//! counters (`ferrite_cascade_decisions_total{outcome}`) read at each
//! scrape. Pure: times are seconds since the epoch, passed in.
//!
//! The window's base is the newest scrape at least `windowSeconds` old (or
//! the oldest one kept, while fewer have been taken), so the span is the
//! window rounded up to a scrape. Per pod, the increase since the base is
//! counted; a counter that went down (the server restarted) counts from
//! zero; a pod absent from the base counts from zero if it started after
//! the base (its counters began then), else not at all (its history before
//! the operator saw it is unknown).

use std::collections::VecDeque;

use crate::crd::EscalationStatus;

/// One pod's escalation metrics at one scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodCounters {
    /// Requests the micro model answered.
    pub local: f64,
    /// Requests the target answered.
    pub escalated: f64,
    /// Requests meant for the target that the micro model answered after
    /// the target failed.
    pub fallback: f64,
    /// `ferrite_escalation_target_up`: whether the pod's last call to the
    /// target succeeded; `None` before its first call.
    pub target_up: Option<bool>,
}

/// A pod as one scrape saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSample {
    /// The pod's uid.
    pub key: String,
    /// When the pod started (seconds since the epoch), if known.
    pub started_at: Option<f64>,
    /// What its metrics said.
    pub counters: PodCounters,
}

/// One scrape round over a ModelDeployment's pods (those that answered).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// When (seconds since the epoch).
    pub at: f64,
    /// The pods that answered.
    pub pods: Vec<PodSample>,
}

/// The scrapes of one ModelDeployment that the window still needs.
#[derive(Clone, Debug, Default)]
pub struct Window {
    samples: VecDeque<Sample>,
}

/// Pods whose last target call is known, and how many of them failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetCalls {
    /// Pods that report `ferrite_escalation_target_up`.
    pub reporting: usize,
    /// Of those, the pods whose last call failed (gauge 0).
    pub failing: usize,
}

impl Window {
    /// Adds a scrape and returns the status over the last `window_seconds`,
    /// with the pods' latest word on the target.
    pub fn record(&mut self, sample: Sample, window_seconds: f64) -> (EscalationStatus, TargetCalls) {
        let now = sample.at;
        self.samples.push_back(sample);
        // Keep one scrape at or before the window's start: the base.
        while self.samples.len() > 2 && self.samples[1].at <= now - window_seconds {
            self.samples.pop_front();
        }
        let current = self.samples.back().expect("just pushed");
        let base = (self.samples.len() > 1).then(|| &self.samples[0]);
        let since = base.map_or(now - window_seconds, |b| b.at);
        let mut totals = PodCounters::default();
        for pod in &current.pods {
            let before = base.and_then(|b| b.pods.iter().find(|p| p.key == pod.key));
            let delta = |now: f64, then: Option<f64>| match then {
                Some(then) if now >= then => now - then,
                // Restarted: the counter began again from zero.
                Some(_) => now,
                None if pod.started_at.is_some_and(|t| t >= since) => now,
                None => 0.0,
            };
            let c = &pod.counters;
            let b = before.map(|p| p.counters);
            totals.local += delta(c.local, b.map(|b| b.local));
            totals.escalated += delta(c.escalated, b.map(|b| b.escalated));
            totals.fallback += delta(c.fallback, b.map(|b| b.fallback));
        }
        let escalated = totals.escalated.round() as i64;
        let total = (totals.local + totals.escalated + totals.fallback).round() as i64;
        let reports: Vec<bool> = current.pods.iter().filter_map(|p| p.counters.target_up).collect();
        let calls = TargetCalls { reporting: reports.len(), failing: reports.iter().filter(|up| !**up).count() };
        let status = EscalationStatus {
            // Rounded so that the status does not change on float noise.
            rate: (total > 0).then(|| (escalated as f64 / total as f64 * 1e4).round() / 1e4),
            escalated,
            total,
            target_reachable: (calls.reporting > 0).then_some(calls.failing == 0),
        };
        (status, calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(key: &str, started_at: f64, local: f64, escalated: f64, fallback: f64, up: Option<bool>) -> PodSample {
        PodSample {
            key: key.into(),
            started_at: Some(started_at),
            counters: PodCounters { local, escalated, fallback, target_up: up },
        }
    }

    fn sample(at: f64, pods: Vec<PodSample>) -> Sample {
        Sample { at, pods }
    }

    #[test]
    fn the_rate_is_the_increase_over_the_window() {
        let mut w = Window::default();
        // A pod up for an hour: what it did before the operator looked is not counted.
        let (s, _) = w.record(sample(1000.0, vec![pod("a", 0.0, 500.0, 100.0, 0.0, Some(true))]), 60.0);
        assert_eq!((s.escalated, s.total, s.rate), (0, 0, None));
        let (s, calls) = w.record(sample(1010.0, vec![pod("a", 0.0, 530.0, 110.0, 0.0, Some(true))]), 60.0);
        assert_eq!((s.escalated, s.total, s.rate), (10, 40, Some(0.25)));
        assert_eq!((s.target_reachable, calls), (Some(true), TargetCalls { reporting: 1, failing: 0 }));
        // 70 s later the first scrapes have left the window: the base is the
        // newest scrape at least 60 s old (t=1010).
        w.record(sample(1030.0, vec![pod("a", 0.0, 560.0, 110.0, 0.0, Some(true))]), 60.0);
        let (s, _) = w.record(sample(1080.0, vec![pod("a", 0.0, 570.0, 115.0, 5.0, Some(false))]), 60.0);
        assert_eq!((s.escalated, s.total), (5, 50), "{s:?}");
        assert_eq!(s.rate, Some(0.1));
        assert_eq!(s.target_reachable, Some(false));
        assert!(w.samples.len() <= 3, "old scrapes are dropped: {}", w.samples.len());
    }

    #[test]
    fn new_and_restarted_pods_count_from_zero() {
        let mut w = Window::default();
        w.record(sample(1000.0, vec![pod("a", 0.0, 10.0, 10.0, 0.0, None)]), 60.0);
        let (s, calls) = w.record(
            sample(
                1010.0,
                vec![
                    // Restarted: counters below the base count in full.
                    pod("a", 0.0, 3.0, 1.0, 0.0, None),
                    // Started after the base: everything it counted is new.
                    pod("b", 1005.0, 6.0, 2.0, 0.0, Some(true)),
                    // Missed by the base scrape but older: unknown, not counted.
                    pod("c", 0.0, 1000.0, 1000.0, 0.0, Some(true)),
                ],
            ),
            60.0,
        );
        assert_eq!((s.escalated, s.total), (3, 12), "{s:?}");
        assert_eq!((s.target_reachable, calls.reporting), (Some(true), 2));
    }

    #[test]
    fn a_first_scrape_counts_pods_started_within_the_window() {
        let mut w = Window::default();
        let (s, _) = w.record(sample(1000.0, vec![pod("a", 980.0, 3.0, 1.0, 0.0, Some(true))]), 60.0);
        assert_eq!((s.escalated, s.total, s.rate), (1, 4, Some(0.25)));
    }

    #[test]
    fn one_failing_pod_makes_the_target_unreachable_and_no_report_says_nothing() {
        let mut w = Window::default();
        let pods =
            vec![pod("a", 0.0, 0.0, 0.0, 0.0, Some(true)), pod("b", 0.0, 0.0, 0.0, 0.0, Some(false)), pod("c", 0.0, 0.0, 0.0, 0.0, None)];
        let (s, calls) = w.record(sample(1000.0, pods), 60.0);
        assert_eq!((s.target_reachable, calls), (Some(false), TargetCalls { reporting: 2, failing: 1 }));
        let (s, calls) = w.record(sample(1010.0, vec![pod("c", 0.0, 0.0, 0.0, 0.0, None)]), 60.0);
        assert_eq!((s.target_reachable, calls.reporting), (None, 0));
    }
}
