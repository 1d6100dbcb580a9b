//! The escalation budget: at most `maxEscalationFraction` of the requests
//! of the last `windowSeconds` may escalate. Pure (time is passed in), in
//! one-second buckets, so its memory is the window's length whatever the
//! request rate.

/// Requests and escalations per second over a sliding window.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    fraction: f64,
    /// `(second, requests, escalations)`, indexed by `second % window`.
    buckets: Vec<(u64, u64, u64)>,
}

impl Budget {
    /// A budget of `fraction` over `window_seconds` (at least 1).
    pub(crate) fn new(fraction: f64, window_seconds: u64) -> Budget {
        Budget { fraction, buckets: vec![(u64::MAX, 0, 0); window_seconds.max(1) as usize] }
    }

    /// Requests and escalations in the window ending at `second`.
    fn totals(&self, second: u64) -> (u64, u64) {
        let window = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|(s, _, _)| *s != u64::MAX && *s <= second && second - *s < window)
            .fold((0, 0), |(r, e), (_, requests, escalations)| (r + requests, e + escalations))
    }

    fn bucket(&mut self, second: u64) -> &mut (u64, u64, u64) {
        let window = self.buckets.len();
        let bucket = &mut self.buckets[(second % window as u64) as usize];
        if bucket.0 != second {
            *bucket = (second, 0, 0);
        }
        bucket
    }

    /// Counts a request at `second` (seconds since any fixed origin) that a
    /// signal wants to escalate (`wants`), or must (`forced`: counted, never
    /// refused). Returns whether it escalates: only while the escalations
    /// of the window, this one included, stay within the fraction of its
    /// requests.
    pub(crate) fn admit(&mut self, second: u64, wants: bool, forced: bool) -> bool {
        let (requests, escalations) = self.totals(second);
        let allowed = forced || (wants && (escalations + 1) as f64 <= self.fraction * (requests + 1) as f64);
        let bucket = self.bucket(second);
        bucket.1 += 1;
        if allowed {
            bucket.2 += 1;
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fraction_of_the_window_escalates() {
        let mut budget = Budget::new(0.5, 60);
        let escalated: Vec<bool> = (0..10).map(|_| budget.admit(5, true, false)).collect();
        assert_eq!(escalated, [false, true, false, true, false, true, false, true, false, true]);
        // Requests that do not want to escalate still count.
        let mut budget = Budget::new(0.5, 60);
        assert!(!budget.admit(0, false, false));
        assert!(budget.admit(0, true, false));
        assert!(!budget.admit(0, true, false));
    }

    #[test]
    fn all_none_and_forced() {
        let mut all = Budget::new(1.0, 1);
        assert!((0..100).all(|_| all.admit(0, true, false)));
        let mut none = Budget::new(0.0, 10);
        assert!((0..100).all(|_| !none.admit(0, true, false)));
        assert!(none.admit(0, false, true), "forced escalations are never refused");
    }

    #[test]
    fn the_window_slides() {
        let mut budget = Budget::new(0.5, 10);
        assert!(!budget.admit(0, true, false));
        assert!(budget.admit(0, true, false));
        // At second 9 the escalation of second 0 still counts: 2 of 3 > 0.5.
        assert!(!budget.admit(9, true, false));
        // At second 10 only second 9's request is in the window: 1 of 2.
        assert!(budget.admit(10, true, false));
        // Far later, everything before has left the window.
        assert!(!budget.admit(1000, true, false));
        assert!(budget.admit(1000, true, false));
    }
}
