//! The autoscaler's own Prometheus metrics, on a registry the caller owns
//! (no process-global registry, so tests and several operators in one
//! process do not collide).

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::{Direction, ScaleOutcome};

/// Counters of the autoscaler.
#[derive(Clone, Debug)]
pub struct AutoscaleMetrics {
    /// `ferrite_operator_scaling_decisions_total{direction="up|down|hold"}`.
    pub decisions: IntCounterVec,
    /// `ferrite_operator_scrape_errors_total`: pod scrapes that failed.
    pub scrape_errors: IntCounter,
}

impl AutoscaleMetrics {
    /// Creates the counters and registers them on `registry`; fails only if
    /// they are registered there already.
    pub fn new(registry: &Registry) -> prometheus::Result<AutoscaleMetrics> {
        let decisions = IntCounterVec::new(
            Opts::new("ferrite_operator_scaling_decisions_total", "Autoscaler decisions by direction (up, down, hold)"),
            &["direction"],
        )?;
        let scrape_errors = IntCounter::new(
            "ferrite_operator_scrape_errors_total",
            "Scrapes of model-server pod metrics that failed (timeout, connection, status, parse)",
        )?;
        registry.register(Box::new(decisions.clone()))?;
        registry.register(Box::new(scrape_errors.clone()))?;
        // Export every direction from the start, so rate() has a zero baseline.
        for d in [Direction::Up, Direction::Down, Direction::Hold] {
            decisions.with_label_values(&[d.as_str()]);
        }
        Ok(AutoscaleMetrics { decisions, scrape_errors })
    }

    /// Counts one [`super::scale_step`] outcome: its direction and its failed scrapes.
    pub fn observe(&self, outcome: &ScaleOutcome) {
        self.decisions.with_label_values(&[outcome.direction.as_str()]).inc();
        self.scrape_errors.inc_by(u64::from(outcome.pods_failed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    #[test]
    fn registers_and_counts() {
        let registry = Registry::new();
        let m = AutoscaleMetrics::new(&registry).unwrap();
        assert!(AutoscaleMetrics::new(&registry).is_err(), "double registration is refused");
        let outcome = ScaleOutcome {
            old_replicas: 2,
            new_replicas: 5,
            changed: true,
            direction: Direction::Up,
            reason: "x".into(),
            queue_depth: Some(37),
            pods_scraped: 2,
            pods_failed: 1,
        };
        m.observe(&outcome);
        m.observe(&ScaleOutcome { direction: Direction::Hold, pods_failed: 0, ..outcome });
        let mut out = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ferrite_operator_scaling_decisions_total{direction=\"up\"} 1"), "{text}");
        assert!(text.contains("ferrite_operator_scaling_decisions_total{direction=\"hold\"} 1"), "{text}");
        assert!(text.contains("ferrite_operator_scaling_decisions_total{direction=\"down\"} 0"), "{text}");
        assert!(text.contains("ferrite_operator_scrape_errors_total 1"), "{text}");
    }
}
