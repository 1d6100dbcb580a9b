//! The table tests of [`decide`](super::decide): each case is a policy, a history
//! of recommendations, an observation, and the decision expected.

use super::*;

fn policy(min: u32, max: u32, target: u32, up: u64, down: u64) -> ScalePolicy {
    ScalePolicy {
        min_replicas: min,
        max_replicas: max,
        target_queue_depth: target,
        scale_up_window: Duration::from_secs(up),
        scale_down_window: Duration::from_secs(down),
        scale_to_zero: None,
    }
}

fn obs(queued: u64, inflight: u64, scraped: u32, failed: u32) -> Option<Observation> {
    Some(Observation {
        queued,
        inflight,
        pods_scraped: scraped,
        pods_failed: failed,
        pods_unready: 0,
        held: 0,
        requests: 0,
    })
}

/// An observation where `unready` of the `scraped` pods are not Ready.
fn unready(queued: u64, inflight: u64, scraped: u32, unready: u32) -> Option<Observation> {
    Some(Observation {
        queued,
        inflight,
        pods_scraped: scraped,
        pods_failed: 0,
        pods_unready: unready,
        held: 0,
        requests: 0,
    })
}

struct Case {
    name: &'static str,
    policy: ScalePolicy,
    current: u32,
    /// (seconds before now, recommendation)
    history: &'static [(u64, u32)],
    /// (seconds before now, replicas) seeded at the first step
    seed: Option<(u64, u32)>,
    observation: Option<Observation>,
    want: u32,
    want_record: Option<u32>,
    /// A piece the reason must contain.
    reason: &'static str,
}

fn run(case: &Case) {
    // A base far enough in the past that `base + offsets` stays valid.
    let now = Instant::now() + Duration::from_secs(10_000);
    let mut history = Recommendations::new();
    let mut past: Vec<_> = case.history.to_vec();
    past.sort_by_key(|&(ago, _)| std::cmp::Reverse(ago));
    for &(ago, r) in &past {
        history.record(now - Duration::from_secs(ago), r, Duration::from_secs(100_000));
    }
    if let Some((ago, r)) = case.seed {
        history.seed(now - Duration::from_secs(ago), r);
    }
    let d = decide(&DecisionInput {
        policy: case.policy,
        current_replicas: case.current,
        history: &history,
        observation: case.observation,
        now,
        idle_for: None,
    });
    assert_eq!(d.replicas, case.want, "{}: replicas ({})", case.name, d.reason);
    assert_eq!(d.changed, case.want != case.current, "{}: changed", case.name);
    let direction = match case.want.cmp(&case.current) {
        std::cmp::Ordering::Greater => Direction::Up,
        std::cmp::Ordering::Less => Direction::Down,
        std::cmp::Ordering::Equal => Direction::Hold,
    };
    assert_eq!(d.direction, direction, "{}: direction", case.name);
    assert_eq!(d.record, case.want_record, "{}: record", case.name);
    assert!(d.reason.contains(case.reason), "{}: reason {:?} lacks {:?}", case.name, d.reason, case.reason);
}

#[test]
fn decision_table() {
    let p = policy(1, 10, 8, 0, 120);
    let cases = [
        Case {
            name: "steady load, no change",
            policy: p,
            current: 2,
            history: &[(5, 2), (10, 2)],
            seed: None,
            observation: obs(10, 6, 2, 0),
            want: 2,
            want_record: Some(2),
            reason: "queue 16 (queued 10, in-flight 6) over 2 pods, target 8 -> 2 replicas; no change",
        },
        Case {
            name: "scale up at once",
            policy: p,
            current: 2,
            history: &[(5, 2), (10, 2)],
            seed: None,
            observation: obs(30, 7, 2, 0),
            want: 5,
            want_record: Some(5),
            reason: "queue 37 (queued 30, in-flight 7) over 2 pods, target 8 -> 5 replicas; scaling up from 2 to 5",
        },
        Case {
            name: "ceil: one request over a multiple adds a replica",
            policy: p,
            current: 2,
            history: &[],
            seed: None,
            observation: obs(17, 0, 2, 0),
            want: 3,
            want_record: Some(3),
            reason: "-> 3 replicas",
        },
        Case {
            name: "scale up capped at max",
            policy: p,
            current: 4,
            history: &[],
            seed: None,
            observation: obs(1000, 24, 4, 0),
            want: 10,
            want_record: Some(10),
            reason: "target 8 -> 10 replicas; scaling up from 4 to 10",
        },
        Case {
            name: "idle floors at min",
            policy: policy(2, 10, 8, 0, 0),
            current: 3,
            history: &[],
            seed: None,
            observation: obs(0, 0, 3, 0),
            want: 2,
            want_record: Some(2),
            reason: "queue 0 (queued 0, in-flight 0) over 3 pods, target 8 -> 2 replicas; scaling down from 3 to 2",
        },
        Case {
            name: "single dip does not scale down",
            policy: p,
            current: 5,
            history: &[(5, 5), (10, 5), (60, 5)],
            seed: None,
            observation: obs(3, 0, 5, 0),
            want: 5,
            want_record: Some(1),
            reason: "scale-down to 1 held by stabilization for another 115s (5 recommended within the last 120s)",
        },
        Case {
            name: "scale down after the window passes",
            policy: p,
            current: 5,
            history: &[(130, 5), (100, 2), (50, 2), (10, 2)],
            seed: None,
            observation: obs(9, 2, 5, 0),
            want: 2,
            want_record: Some(2),
            reason: "scaling down from 5 to 2",
        },
        Case {
            name: "scale down only to the highest in the window",
            policy: p,
            current: 6,
            history: &[(130, 6), (90, 4), (30, 3)],
            seed: None,
            observation: obs(4, 0, 6, 0),
            want: 4,
            want_record: Some(1),
            reason:
                "scaling down from 6 to 4; 1 held by stabilization for another 90s (4 recommended within the last 120s)",
        },
        Case {
            name: "zero down window scales down at once",
            policy: policy(1, 10, 8, 0, 0),
            current: 6,
            history: &[(1, 6)],
            seed: None,
            observation: obs(0, 1, 6, 0),
            want: 1,
            want_record: Some(1),
            reason: "scaling down from 6 to 1",
        },
        Case {
            name: "up window holds off a spike",
            policy: policy(1, 10, 8, 30, 120),
            current: 2,
            history: &[(20, 2), (10, 2)],
            seed: None,
            observation: obs(40, 0, 2, 0),
            want: 2,
            want_record: Some(5),
            reason: "scale-up to 5 held by stabilization for another 20s (2 recommended within the last 30s)",
        },
        Case {
            name: "up window: lowest recommendation over the window",
            policy: policy(1, 10, 8, 30, 120),
            current: 2,
            history: &[(40, 2), (20, 4), (10, 6)],
            seed: None,
            observation: obs(60, 0, 2, 0),
            want: 4,
            want_record: Some(8),
            reason:
                "scaling up from 2 to 4; 8 held by stabilization for another 20s (4 recommended within the last 30s)",
        },
        Case {
            name: "up window passed: sustained load scales up",
            policy: policy(1, 10, 8, 30, 120),
            current: 2,
            history: &[(40, 2), (25, 5), (10, 5)],
            seed: None,
            observation: obs(40, 0, 2, 0),
            want: 5,
            want_record: Some(5),
            reason: "scaling up from 2 to 5",
        },
        Case {
            name: "no observation holds",
            policy: p,
            current: 3,
            history: &[(5, 1)],
            seed: None,
            observation: None,
            want: 3,
            want_record: None,
            reason: "holding at 3 replicas: no metrics observed",
        },
        Case {
            name: "every scrape failed holds",
            policy: policy(1, 10, 8, 0, 0),
            current: 3,
            history: &[],
            seed: None,
            observation: obs(0, 0, 0, 3),
            want: 3,
            want_record: None,
            reason: "holding at 3 replicas: all 3 scrapes failed",
        },
        Case {
            name: "no ready pods holds",
            policy: policy(1, 10, 8, 0, 0),
            current: 2,
            history: &[],
            seed: None,
            observation: obs(0, 0, 0, 0),
            want: 2,
            want_record: None,
            reason: "holding at 2 replicas: no ready pods to scrape",
        },
        Case {
            name: "partial failure never scales down",
            policy: policy(1, 10, 8, 0, 0),
            current: 3,
            history: &[],
            seed: None,
            observation: obs(0, 0, 2, 1),
            want: 3,
            want_record: None,
            reason: "holding: 1 of 3 scrapes failed (queue 0",
        },
        Case {
            name: "partial failure still scales up",
            policy: p,
            current: 3,
            history: &[],
            seed: None,
            observation: obs(50, 6, 2, 1),
            want: 7,
            want_record: None,
            reason: "1 of 3 scrapes failed, scaling up only: 3 -> 7",
        },
        Case {
            name: "partial failure respects the up window",
            policy: policy(1, 10, 8, 30, 120),
            current: 3,
            history: &[(10, 3)],
            seed: None,
            observation: obs(50, 6, 2, 1),
            want: 3,
            want_record: None,
            reason: "holding: 1 of 3 scrapes failed",
        },
        Case {
            name: "below min moves up without data",
            policy: policy(2, 10, 8, 0, 120),
            current: 0,
            history: &[],
            seed: None,
            observation: None,
            want: 2,
            want_record: None,
            reason: "holding: no metrics observed; 0 replicas is below minReplicas 2 -> 2",
        },
        Case {
            name: "above max moves down at once, despite the window",
            policy: policy(1, 4, 8, 0, 120),
            current: 9,
            history: &[(5, 9), (10, 9)],
            seed: Some((10, 9)),
            observation: obs(100, 0, 9, 0),
            want: 4,
            want_record: Some(4),
            reason: "scaling down from 9 to 4",
        },
        Case {
            name: "above max moves down with failed scrapes",
            policy: policy(1, 4, 8, 0, 120),
            current: 6,
            history: &[],
            seed: None,
            observation: obs(0, 0, 0, 6),
            want: 4,
            want_record: None,
            reason: "holding: all 6 scrapes failed; 6 replicas is above maxReplicas 4 -> 4",
        },
        Case {
            name: "above max with a partial failure moves down",
            policy: policy(1, 4, 8, 0, 120),
            current: 6,
            history: &[],
            seed: None,
            observation: obs(0, 0, 5, 1),
            want: 4,
            want_record: None,
            reason: "holding: 1 of 6 scrapes failed; 6 replicas is above maxReplicas 4 -> 4",
        },
        Case {
            name: "fresh leader: the seed holds off scale-down",
            policy: p,
            current: 4,
            history: &[],
            seed: Some((0, 4)),
            observation: obs(0, 0, 4, 0),
            want: 4,
            want_record: Some(1),
            reason: "scale-down to 1 held by stabilization for another 120s (4 recommended within the last 120s)",
        },
        Case {
            name: "seed does not hold off scale-up",
            policy: p,
            current: 4,
            history: &[],
            seed: Some((0, 4)),
            observation: obs(48, 0, 4, 0),
            want: 6,
            want_record: Some(6),
            reason: "scaling up from 4 to 6",
        },
        Case {
            name: "seed expires with the window",
            policy: p,
            current: 4,
            history: &[(60, 1)],
            seed: Some((120, 4)),
            observation: obs(1, 0, 4, 0),
            want: 1,
            want_record: Some(1),
            reason: "scaling down from 4 to 1",
        },
        Case {
            name: "stale history above a lowered max is clamped",
            policy: policy(1, 3, 8, 0, 120),
            current: 3,
            history: &[(10, 8)],
            seed: None,
            observation: obs(8, 0, 3, 0),
            want: 3,
            want_record: Some(1),
            reason: "(3 recommended within the last 120s)",
        },
        Case {
            name: "singular in the reason",
            policy: p,
            current: 1,
            history: &[],
            seed: None,
            observation: obs(1, 0, 1, 0),
            want: 1,
            want_record: Some(1),
            reason: "queue 1 (queued 1, in-flight 0) over 1 pod, target 8 -> 1 replica; no change",
        },
        Case {
            name: "huge load saturates instead of overflowing",
            policy: policy(1, 50, 1, 0, 0),
            current: 1,
            history: &[],
            seed: None,
            observation: obs(u64::MAX, u64::MAX, 1, 0),
            want: 50,
            want_record: Some(50),
            reason: "scaling up from 1 to 50",
        },
        Case {
            name: "every pod unready under load: their queues scale up",
            policy: p,
            current: 2,
            history: &[(5, 2)],
            seed: None,
            observation: unready(60, 4, 2, 2),
            want: 8,
            want_record: None,
            reason: "2 of 2 pods not Ready, scaling up only: 2 -> 8",
        },
        Case {
            name: "an idle unready pod never scales down",
            policy: policy(1, 10, 8, 0, 0),
            current: 4,
            history: &[],
            seed: None,
            observation: unready(0, 0, 3, 1),
            want: 4,
            want_record: None,
            reason: "holding: 1 of 3 pods not Ready",
        },
        Case {
            name: "unready and failed together: still up only",
            policy: policy(1, 10, 8, 0, 0),
            current: 4,
            history: &[],
            seed: None,
            observation: Some(Observation {
                queued: 0,
                inflight: 0,
                pods_scraped: 2,
                pods_failed: 1,
                pods_unready: 1,
                held: 0,
                requests: 0,
            }),
            want: 4,
            want_record: None,
            reason: "holding: 1 of 3 scrapes failed, 1 pods not Ready",
        },
    ];
    assert!(cases.len() >= 15);
    for case in &cases {
        run(case);
    }
}

#[test]
fn history_merges_equal_runs_and_prunes() {
    let t0 = Instant::now();
    let keep = Duration::from_secs(60);
    let mut h = Recommendations::new();
    assert!(h.is_empty());
    for s in 0..10 {
        h.record(t0 + Duration::from_secs(s), 3, keep);
    }
    assert_eq!(h.entries().map(|(_, r)| r).collect::<Vec<_>>(), vec![3]);
    assert_eq!(h.entries().next().unwrap().0, t0 + Duration::from_secs(9));
    h.record(t0 + Duration::from_secs(20), 5, keep);
    h.record(t0 + Duration::from_secs(30), 3, keep);
    assert_eq!(h.entries().map(|(_, r)| r).collect::<Vec<_>>(), vec![3, 5, 3]);
    // 9s entry ages out at 69s.
    h.record(t0 + Duration::from_secs(70), 3, keep);
    assert_eq!(h.entries().map(|(_, r)| r).collect::<Vec<_>>(), vec![5, 3]);
    h.seed(t0 + Duration::from_secs(70), 4);
    h.record(t0 + Duration::from_secs(200), 2, keep);
    assert_eq!(h.entries().map(|(_, r)| r).collect::<Vec<_>>(), vec![2]);
    assert!(h.seed.is_none(), "the seed ages out like an entry");
}

#[test]
fn history_is_bounded() {
    let t0 = Instant::now();
    let mut h = Recommendations::new();
    for s in 0..(MAX_HISTORY as u64 + 100) {
        h.record(t0 + Duration::from_millis(s), (s % 2) as u32 + 1, Duration::from_secs(3600));
    }
    assert_eq!(h.entries().count(), MAX_HISTORY);
}

#[test]
fn policy_from_spec_sanitizes() {
    let spec = AutoscalingSpec {
        min_replicas: 0,
        max_replicas: -3,
        target_queue_depth: 0,
        scale_up_stabilization_seconds: -1,
        scale_down_stabilization_seconds: 300,
        scrape_interval_seconds: 5,
        scale_to_zero_after_seconds: None,
    };
    let p = ScalePolicy::from_spec(&spec, false);
    assert_eq!(p, policy(1, 1, 1, 0, 300));
    assert_eq!(p.longest_window(), Duration::from_secs(300));
}

/// A scale-to-zero policy: range 1..=5, target 4, no up window, 60 s down
/// window, zero after 30 s idle.
fn zero_policy() -> ScalePolicy {
    ScalePolicy { scale_to_zero: Some(Duration::from_secs(30)), ..policy(1, 5, 4, 0, 60) }
}

fn held(queued: u64, scraped: u32, failed: u32, held: u64) -> Option<Observation> {
    Some(Observation {
        queued,
        inflight: 0,
        pods_scraped: scraped,
        pods_failed: failed,
        pods_unready: 0,
        held,
        requests: 0,
    })
}

/// `(name, policy, current, observation, idle seconds, want, want_record, reason)`
type ZeroCase = (&'static str, ScalePolicy, u32, Option<Observation>, Option<u64>, u32, Option<u32>, &'static str);

#[test]
fn scale_to_zero_table() {
    let z = zero_policy();
    let cases: Vec<ZeroCase> = vec![
        ("idle past the window: zero", z, 2, obs(0, 0, 2, 0), Some(30), 0, None, "scaling down from 2 to zero"),
        ("idle, but not long enough: ordinary rules", z, 1, obs(0, 0, 1, 0), Some(29), 1, Some(1), "no change"),
        ("idleness unknown: never zero", z, 1, obs(0, 0, 1, 0), None, 1, Some(1), "no change"),
        ("a failed scrape: never zero", z, 2, obs(0, 0, 1, 1), Some(300), 2, None, "holding"),
        ("work in flight: never zero", z, 1, obs(0, 1, 1, 0), Some(300), 1, Some(1), "no change"),
        ("held while pods run: never zero", z, 1, held(0, 1, 0, 1), Some(300), 1, Some(1), "held by the activator 1"),
        ("no metrics at all: never zero", z, 1, None, Some(300), 1, None, "no metrics observed"),
        ("at zero, nothing held: stays", z, 0, held(0, 0, 0, 0), None, 0, None, "no request held"),
        ("at zero, the activator unread: stays", z, 0, None, None, 0, None, "no request held"),
        (
            "at zero, one held: one replica at once",
            z,
            0,
            held(0, 0, 0, 1),
            None,
            1,
            Some(1),
            "scaling up from zero to 1",
        ),
        ("at zero, nine held: ceil(9/4)", z, 0, held(0, 0, 0, 9), None, 3, Some(3), "9 requests held"),
        ("at zero, a flood: maxReplicas", z, 0, held(0, 0, 0, 1000), None, 5, Some(5), "to 5"),
        (
            "pods starting, more held: up on held alone",
            z,
            1,
            held(0, 0, 0, 12),
            Some(0),
            3,
            None,
            "no pod scraped yet, scaling up only: 1 -> 3",
        ),
        (
            "held and queued add up",
            z,
            1,
            held(6, 1, 0, 6),
            Some(0),
            3,
            Some(3),
            "queue 12 (queued 6, in-flight 0, held by the activator 6)",
        ),
        (
            "minReplicas 0 without an activator: kept at 1",
            policy(1, 5, 4, 0, 60),
            0,
            held(0, 0, 0, 0),
            Some(300),
            1,
            None,
            "holding",
        ),
    ];
    let now = Instant::now() + Duration::from_secs(10_000);
    for (name, policy, current, observation, idle, want, want_record, reason) in cases {
        let history = Recommendations::new();
        let d = decide(&DecisionInput {
            policy,
            current_replicas: current,
            history: &history,
            observation,
            now,
            idle_for: idle.map(Duration::from_secs),
        });
        assert_eq!(d.replicas, want, "{name}: replicas ({})", d.reason);
        assert_eq!(d.changed, want != current, "{name}: changed");
        assert_eq!(d.record, want_record, "{name}: record ({})", d.reason);
        assert!(d.reason.contains(reason), "{name}: reason {:?} lacks {reason:?}", d.reason);
    }
}

#[test]
fn idleness_restarts_on_any_activity() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut idle = Idleness::default();
    assert_eq!(idle.observe(at(0), Some(5), false), Some(Duration::ZERO), "the first reading starts the clock");
    assert_eq!(idle.observe(at(10), Some(5), false), Some(Duration::from_secs(10)));
    assert_eq!(idle.observe(at(11), Some(6), false), Some(Duration::ZERO), "a new request");
    assert_eq!(idle.observe(at(20), Some(6), false), Some(Duration::from_secs(9)));
    assert_eq!(idle.observe(at(21), Some(6), true), Some(Duration::ZERO), "something queued or held");
    assert_eq!(idle.observe(at(25), Some(6), false), Some(Duration::from_secs(4)));
    assert_eq!(idle.observe(at(26), Some(2), false), Some(Duration::ZERO), "a pod gone with its counter");
    assert_eq!(idle.observe(at(27), None, false), None, "unknown: not idle");
    assert_eq!(idle.observe(at(40), Some(2), false), Some(Duration::ZERO), "counting starts again after an unknown");
    assert_eq!(idle.observe(at(41), Some(2), false), Some(Duration::from_secs(1)));
}

#[test]
fn scale_to_zero_needs_min_zero_and_an_activator() {
    let spec: AutoscalingSpec =
        serde_json::from_value(serde_json::json!({"minReplicas": 0, "maxReplicas": 3})).unwrap();
    let p = ScalePolicy::from_spec(&spec, true);
    assert_eq!((p.min_replicas, p.scale_to_zero), (1, Some(Duration::from_secs(300))), "default 300 s, floor 1");
    assert_eq!(ScalePolicy::from_spec(&spec, false).scale_to_zero, None, "no activator: never zero");
    let spec: AutoscalingSpec =
        serde_json::from_value(serde_json::json!({"minReplicas": 0, "maxReplicas": 3, "scaleToZeroAfterSeconds": 5}))
            .unwrap();
    assert_eq!(ScalePolicy::from_spec(&spec, true).scale_to_zero, Some(Duration::from_secs(5)));
    let spec: AutoscalingSpec =
        serde_json::from_value(serde_json::json!({"minReplicas": 1, "maxReplicas": 3})).unwrap();
    assert_eq!(ScalePolicy::from_spec(&spec, true).scale_to_zero, None);
}
