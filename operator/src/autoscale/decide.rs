//! The scaling decision: pure, no I/O, no clock of its own, so every rule is
//! tested in a table.
//!
//! The algorithm is the HPA's stabilization (`kube-controller-manager`'s
//! `stabilizeRecommendationWithBehaviors`) applied to queue depth:
//!
//! 1. recommendation = `ceil((queued + in-flight) / targetQueueDepth)`, clamped
//!    to `[minReplicas, maxReplicas]`;
//! 2. the scale-up bound is the *lowest* recommendation within
//!    `scaleUpStabilizationSeconds` (just the current one when that is 0, so
//!    scale-up is immediate), the scale-down bound the *highest* within
//!    `scaleDownStabilizationSeconds` (so a single dip does not scale down);
//! 3. the new count is the current one moved into `[up bound, down bound]`.
//!
//! Missing data never scales down: with no observation the count holds, with
//! some scrapes failed it may only go up (the pods that did not answer may be
//! the busy ones, so the partial sum is a lower bound of the load). Either way
//! `[minReplicas, maxReplicas]` is enforced at once, since that is the user's
//! hard limit and needs no metrics.
//!
//! Pods that are Running but not Ready are scraped too, and their load
//! counts, but only upwards (the same "scale up only" rule as a failed
//! scrape). Why: an overloaded server answers its readiness probe late, so
//! under a burst every pod can turn unready at once while its queue is full;
//! reading Ready pods only, the autoscaler then saw no data and held - at
//! the moment it was needed most. The queue of an unready pod is real
//! demand (requests it accepted), so it may add replicas; its emptiness is
//! no evidence of low demand (the Service sends it nothing, or it is still
//! loading its model), so it never removes any. An unready pod that does
//! not answer its metrics port is skipped, not counted as a failed scrape:
//! a starting or crash-looping pod must not freeze scale-down. When no pod
//! answers at all, the count holds.
//!
//! Scale to zero (`minReplicas: 0`, [`ScalePolicy::scale_to_zero`] set by
//! the caller only when an activator is configured) adds two rules before
//! the ones above:
//!
//! - at zero, requests held by the activator ([`Observation::held`]) scale
//!   up at once to `max(1, ceil(held / targetQueueDepth))` within
//!   `maxReplicas`; without any, the count stays at zero;
//! - above zero, a model idle for `scaleToZeroAfterSeconds`
//!   ([`DecisionInput::idle_for`], kept by [`Idleness`]: request counters
//!   unchanged, nothing queued, in flight or held) with every scrape read
//!   goes to zero. The caller switches the Service to the activator first and
//!   only applies the zero after the switch has settled (see
//!   `crate::autoscale`).
//!
//! Otherwise the range is `[1, maxReplicas]` as for `minReplicas: 1`, and
//! held requests count as load like queued ones while the pods start.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::crd::AutoscalingSpec;

/// Entries kept in a [`Recommendations`] history at most. Equal consecutive
/// recommendations are merged, so this is only reached by a load that changes
/// at every scrape over a very long window; the oldest entries go first.
const MAX_HISTORY: usize = 4096;

/// The autoscaling settings `decide` needs, in unsigned, sanitized form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalePolicy {
    /// Fewest replicas (at least 1).
    pub min_replicas: u32,
    /// Most replicas (at least `min_replicas`).
    pub max_replicas: u32,
    /// Queued plus in-flight requests one replica should carry (at least 1).
    pub target_queue_depth: u32,
    /// How long a higher count must be wanted before scaling up (zero: at once).
    pub scale_up_window: Duration,
    /// How long a lower count must be wanted before scaling down.
    pub scale_down_window: Duration,
    /// How long the model must be idle before going to zero; `None`: never
    /// (`minReplicas` above 0, or no activator to hold its requests).
    pub scale_to_zero: Option<Duration>,
}

impl ScalePolicy {
    /// The policy of a spec. The CRD's CEL rules already refuse bad values;
    /// this still clamps them so a spec written before a rule existed cannot
    /// divide by zero or invert the range. `minReplicas: 0` becomes a floor
    /// of 1 plus [`ScalePolicy::scale_to_zero`] when `activator` (an
    /// activator is configured to hold the requests), else a plain floor of 1.
    pub fn from_spec(spec: &AutoscalingSpec, activator: bool) -> ScalePolicy {
        let min_replicas = spec.min_replicas.max(1) as u32;
        ScalePolicy {
            min_replicas,
            max_replicas: (spec.max_replicas.max(1) as u32).max(min_replicas),
            target_queue_depth: spec.target_queue_depth.max(1) as u32,
            scale_up_window: Duration::from_secs(spec.scale_up_stabilization_seconds.max(0) as u64),
            scale_down_window: Duration::from_secs(spec.scale_down_stabilization_seconds.max(0) as u64),
            scale_to_zero: spec.scale_to_zero_after().filter(|_| activator),
        }
    }

    /// The longest window: how long a history entry can still matter.
    pub fn longest_window(&self) -> Duration {
        self.scale_up_window.max(self.scale_down_window)
    }

    fn clamp(&self, replicas: u32) -> u32 {
        replicas.clamp(self.min_replicas, self.max_replicas)
    }
}

/// Recent recommendations of one ModelDeployment, with the time each was
/// made: the memory behind the stabilization windows. The caller keeps one
/// per ModelDeployment across steps and drops it when the object goes away.
#[derive(Clone, Debug, Default)]
pub struct Recommendations {
    /// Oldest first; consecutive entries never hold the same count.
    entries: VecDeque<(Instant, u32)>,
    /// The replica count found at the first step, counted as a recommendation
    /// for scale-down only (see [`Recommendations::seed`]).
    seed: Option<(Instant, u32)>,
}

impl Recommendations {
    /// An empty history.
    pub fn new() -> Recommendations {
        Recommendations::default()
    }

    /// Whether nothing was recorded or seeded yet (a fresh leader).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.seed.is_none()
    }

    /// Counts the current replica count as recommended `now`, for scale-down
    /// only. A new leader (or a restarted operator) has no history; without
    /// this it would scale down on its first low reading, defeating the
    /// scale-down window exactly when the operator is least sure. Scale-up is
    /// not delayed by the seed.
    pub fn seed(&mut self, now: Instant, current_replicas: u32) {
        self.seed = Some((now, current_replicas));
    }

    /// Adds a recommendation made at `now` and forgets entries older than
    /// `keep` (the longest window, see [`ScalePolicy::longest_window`]).
    pub fn record(&mut self, now: Instant, replicas: u32, keep: Duration) {
        // Of a run of equal values only the newest matters: it stays in any
        // window at least as long as the older ones.
        if let Some(last) = self.entries.back_mut() {
            if last.1 == replicas {
                *last = (now, replicas);
                self.prune(now, keep);
                return;
            }
        }
        self.entries.push_back((now, replicas));
        while self.entries.len() > MAX_HISTORY {
            self.entries.pop_front();
        }
        self.prune(now, keep);
    }

    /// The recorded entries, oldest first (for tests and debugging).
    pub fn entries(&self) -> impl Iterator<Item = (Instant, u32)> + '_ {
        self.entries.iter().copied()
    }

    fn prune(&mut self, now: Instant, keep: Duration) {
        while let Some(&(t, _)) = self.entries.front() {
            if in_window(now, t, keep) {
                break;
            }
            self.entries.pop_front();
        }
        if let Some((t, _)) = self.seed {
            if !in_window(now, t, keep) {
                self.seed = None;
            }
        }
    }

    /// Entries made within `window` before `now`.
    fn within(&self, now: Instant, window: Duration) -> impl Iterator<Item = (Instant, u32)> + '_ {
        self.entries.iter().copied().filter(move |&(t, _)| in_window(now, t, window))
    }
}

/// Whether a recommendation made at `t` still counts at `now`. A zero window
/// holds nothing, so a zero stabilization means "at once". Saturating: an
/// entry from the future (which a monotonic clock never makes) counts as new.
fn in_window(now: Instant, t: Instant, window: Duration) -> bool {
    now.saturating_duration_since(t) < window
}

/// Load summed over the pods that answered a scrape round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Requests waiting in the pods' queues (`ferrite_queue_depth`).
    pub queued: u64,
    /// Requests executing (`ferrite_inflight_requests`).
    pub inflight: u64,
    /// Pods whose metrics were read.
    pub pods_scraped: u32,
    /// Pods whose scrape failed (connection, timeout, status, parse).
    pub pods_failed: u32,
    /// Of `pods_scraped`, those not Ready: their load may only scale up.
    pub pods_unready: u32,
    /// Requests the activator holds for the model
    /// (`ferrite_activator_held_requests`): waiting for a Ready pod.
    pub held: u64,
    /// The pods' request counters (`ferrite_requests_total`) summed over the
    /// pods read: activity, for [`Idleness`].
    pub requests: u64,
}

impl Observation {
    /// Queued, in-flight and held requests.
    pub fn load(&self) -> u64 {
        self.queued.saturating_add(self.inflight).saturating_add(self.held)
    }
}

/// Whether a model is idle, and since when: the memory behind
/// `scaleToZeroAfterSeconds`, one per ModelDeployment next to its
/// [`Recommendations`]. Pure: the caller passes the clock.
///
/// Activity is the sum of the request counters (the pods'
/// `ferrite_requests_total` for the model plus the activator's
/// `ferrite_activator_requests_total` for the ModelDeployment): any change
/// of the sum, up or down (a pod gone with its counter), or any queued,
/// in-flight or held request restarts the idle time. An unknown sum (a Ready
/// pod or the activator not read) is never idle.
#[derive(Clone, Debug, Default)]
pub struct Idleness {
    last: Option<u64>,
    since: Option<Instant>,
}

impl Idleness {
    /// Records one observation at `now`: `requests` the counter sum (`None`:
    /// unknown), `busy` whether anything is queued, in flight or held.
    /// Returns how long the model has been idle (`None`: not known idle).
    /// A fresh memory (a new leader) starts counting at its first reading.
    pub fn observe(&mut self, now: Instant, requests: Option<u64>, busy: bool) -> Option<Duration> {
        let Some(requests) = requests else {
            self.last = None;
            self.since = None;
            return None;
        };
        if busy || self.last != Some(requests) || self.since.is_none() {
            self.last = Some(requests);
            self.since = Some(now);
        }
        self.since.map(|since| now.saturating_duration_since(since))
    }
}

/// Everything one decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct DecisionInput<'a> {
    /// Range, target and windows.
    pub policy: ScalePolicy,
    /// Replicas the Deployment asks for now (its `spec.replicas`).
    pub current_replicas: u32,
    /// Earlier recommendations; `decide` reads it, the caller records
    /// [`Decision::record`] into it afterwards.
    pub history: &'a Recommendations,
    /// The latest scrape round. `None`, or `pods_scraped == 0`, means no data
    /// (every scrape failed, or no pod was ready): hold.
    pub observation: Option<Observation>,
    /// The time of this decision (the same clock as the history's entries).
    pub now: Instant,
    /// How long the model has been idle ([`Idleness::observe`]); `None`:
    /// not known idle. Read only with [`ScalePolicy::scale_to_zero`].
    pub idle_for: Option<Duration>,
}

/// Which way a decision moved the replica count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// More replicas.
    Up,
    /// Fewer replicas.
    Down,
    /// The same count.
    Hold,
}

impl Direction {
    /// `up`, `down` or `hold` (the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Hold => "hold",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The replica count to run (equal to the current one when holding).
    pub replicas: u32,
    /// Whether `replicas` differs from the current count.
    pub changed: bool,
    /// Up, down or hold.
    pub direction: Direction,
    /// The load's recommendation (clamped to the range), when any pod answered.
    pub recommendation: Option<u32>,
    /// What to add to the history: the recommendation when every scrape
    /// succeeded. A partial sum is only a lower bound of the load; recording
    /// it would let it hold off a later scale-up through the up window.
    pub record: Option<u32>,
    /// One line for the Event and the log.
    pub reason: String,
}

/// The scale-to-zero rules (see the module documentation), or `None` when
/// the ordinary ones decide.
fn decide_zero(input: &DecisionInput, after: Duration) -> Option<Decision> {
    let policy = input.policy;
    let current = input.current_replicas;
    let held = input.observation.map_or(0, |obs| obs.held);
    if current == 0 {
        if held == 0 {
            return Some(finish(0, 0, None, None, "scaled to zero: no request held by the activator".into()));
        }
        let wanted = u32::try_from(held.div_ceil(u64::from(policy.target_queue_depth))).unwrap_or(u32::MAX);
        let replicas = policy.clamp(wanted);
        let reason = format!(
            "{held} request{} held by the activator, target {} -> scaling up from zero to {replicas}",
            if held == 1 { "" } else { "s" },
            policy.target_queue_depth,
        );
        return Some(finish(0, replicas, Some(replicas), Some(replicas), reason));
    }
    let idle_for = input.idle_for?;
    let obs = input.observation?;
    let complete = obs.pods_failed == 0 && obs.load() == 0;
    (idle_for >= after && complete).then(|| {
        let reason = format!(
            "idle for {}s (scaleToZeroAfterSeconds {}): no new request, nothing queued, in flight or held; \
             scaling down from {current} to zero",
            idle_for.as_secs(),
            after.as_secs(),
        );
        finish(current, 0, Some(0), None, reason)
    })
}

/// Decides the replica count; see the module documentation for the rules.
pub fn decide(input: &DecisionInput) -> Decision {
    if let Some(after) = input.policy.scale_to_zero {
        if let Some(decision) = decide_zero(input, after) {
            return decision;
        }
    }
    let policy = input.policy;
    let current = input.current_replicas;
    let in_range = policy.clamp(current);
    let range_note = || range_note(current, &policy);

    let obs = match input.observation {
        // Held requests are data too: pods are starting for them.
        Some(obs) if obs.pods_scraped > 0 || obs.held > 0 => obs,
        other => {
            let why = match other {
                Some(Observation { pods_failed, .. }) if pods_failed > 0 => {
                    format!("all {pods_failed} scrapes failed")
                }
                Some(_) => "no ready pods to scrape".to_string(),
                None => "no metrics observed".to_string(),
            };
            let reason = match range_note() {
                Some(note) => format!("holding: {why}; {note}"),
                None => format!("holding at {current} replicas: {why}"),
            };
            return finish(current, in_range, None, None, reason);
        }
    };

    let target = u64::from(policy.target_queue_depth);
    let wanted = obs.load().div_ceil(target);
    let recommendation = policy.clamp(u32::try_from(wanted).unwrap_or(u32::MAX));
    let pods = obs.pods_scraped + obs.pods_failed;
    let held = if obs.held > 0 { format!(", held by the activator {}", obs.held) } else { String::new() };
    let summary = format!(
        "queue {} (queued {}, in-flight {}{held}) over {} pod{}, target {} -> {} replica{}",
        obs.load(),
        obs.queued,
        obs.inflight,
        obs.pods_scraped,
        if obs.pods_scraped == 1 { "" } else { "s" },
        policy.target_queue_depth,
        recommendation,
        if recommendation == 1 { "" } else { "s" },
    );

    // HPA stabilization: the lowest recommendation of the up window and the
    // highest of the down window, the current one included in both.
    let now = input.now;
    let history = input.history;
    let up_bound =
        history.within(now, policy.scale_up_window).map(|(_, r)| policy.clamp(r)).fold(recommendation, u32::min);
    let seed = history.seed.filter(|&(t, _)| in_window(now, t, policy.scale_down_window)).map(|(_, r)| policy.clamp(r));
    let down_bound = history
        .within(now, policy.scale_down_window)
        .map(|(_, r)| policy.clamp(r))
        .chain(seed)
        .fold(recommendation, u32::max);

    let partial = match (obs.pods_failed, obs.pods_unready) {
        // Only held requests: the pods are not serving yet.
        _ if obs.pods_scraped == 0 => Some("no pod scraped yet".to_string()),
        (0, 0) => None,
        (failed, 0) => Some(format!("{failed} of {pods} scrapes failed")),
        (0, unready) => Some(format!("{unready} of {pods} pods not Ready")),
        (failed, unready) => Some(format!("{failed} of {pods} scrapes failed, {unready} pods not Ready")),
    };
    if let Some(partial) = partial {
        // Partial data: the sum is a lower bound, good enough to add
        // replicas, never to remove them.
        let replicas = in_range.max(up_bound);
        let reason = if replicas > current {
            format!("{summary}; {partial}, scaling up only: {current} -> {replicas}")
        } else if replicas < current {
            format!("holding: {partial}; {}", range_note().unwrap_or_default())
        } else {
            format!("holding: {partial} ({summary})")
        };
        return finish(current, replicas, Some(recommendation), None, reason);
    }

    let replicas = in_range.clamp(up_bound, down_bound);
    let reason = if replicas > current {
        let mut reason = format!("{summary}; scaling up from {current} to {replicas}");
        if replicas < recommendation {
            let wait = wait_for(history, now, policy.scale_up_window, |r| policy.clamp(r) < recommendation);
            reason += &format!(
                "; {recommendation} held by stabilization for another {wait}s ({up_bound} recommended within the last {}s)",
                policy.scale_up_window.as_secs(),
            );
        }
        reason
    } else if replicas < current {
        let mut reason = format!("{summary}; scaling down from {current} to {replicas}");
        if replicas > recommendation {
            let wait = wait_for_down(history, now, &policy, recommendation);
            reason += &format!(
                "; {recommendation} held by stabilization for another {wait}s ({down_bound} recommended within the last {}s)",
                policy.scale_down_window.as_secs(),
            );
        }
        reason
    } else if recommendation < current {
        let wait = wait_for_down(history, now, &policy, recommendation);
        format!(
            "{summary}; scale-down to {recommendation} held by stabilization for another {wait}s \
             ({down_bound} recommended within the last {}s)",
            policy.scale_down_window.as_secs()
        )
    } else if recommendation > current {
        let wait = wait_for(history, now, policy.scale_up_window, |r| policy.clamp(r) < recommendation);
        format!(
            "{summary}; scale-up to {recommendation} held by stabilization for another {wait}s \
             ({up_bound} recommended within the last {}s)",
            policy.scale_up_window.as_secs()
        )
    } else {
        format!("{summary}; no change")
    };
    finish(current, replicas, Some(recommendation), Some(recommendation), reason)
}

fn finish(current: u32, replicas: u32, recommendation: Option<u32>, record: Option<u32>, reason: String) -> Decision {
    let direction = match replicas.cmp(&current) {
        std::cmp::Ordering::Greater => Direction::Up,
        std::cmp::Ordering::Less => Direction::Down,
        std::cmp::Ordering::Equal => Direction::Hold,
    };
    Decision { replicas, changed: replicas != current, direction, recommendation, record, reason }
}

/// Why the count moves regardless of load, when it is out of range.
fn range_note(current: u32, policy: &ScalePolicy) -> Option<String> {
    if current < policy.min_replicas {
        Some(format!("{current} replicas is below minReplicas {0} -> {0}", policy.min_replicas))
    } else if current > policy.max_replicas {
        Some(format!("{current} replicas is above maxReplicas {0} -> {0}", policy.max_replicas))
    } else {
        None
    }
}

/// Seconds (rounded up) until every entry matching `blocks` has left the window.
fn wait_for(history: &Recommendations, now: Instant, window: Duration, blocks: impl Fn(u32) -> bool) -> u64 {
    history
        .within(now, window)
        .filter(|&(_, r)| blocks(r))
        .map(|(t, _)| window.saturating_sub(now.saturating_duration_since(t)))
        .max()
        .map_or(0, ceil_secs)
}

/// [`wait_for`] for scale-down, where the seed blocks too.
fn wait_for_down(history: &Recommendations, now: Instant, policy: &ScalePolicy, target: u32) -> u64 {
    let window = policy.scale_down_window;
    let entries = wait_for(history, now, window, |r| policy.clamp(r) > target);
    let seed = history
        .seed
        .filter(|&(t, r)| in_window(now, t, window) && policy.clamp(r) > target)
        .map_or(0, |(t, _)| ceil_secs(window.saturating_sub(now.saturating_duration_since(t))));
    entries.max(seed)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests;
