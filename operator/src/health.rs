//! Liveness from progress: each loop that must keep going (the election,
//! the controller, the autoscaler) holds a [`Heartbeat`] and beats it when
//! it gets something done. `/healthz` answers 503, naming the loops, when
//! one has not beaten within its limit; the kubelet then restarts the
//! process. A loop that waits on an API server that is down still beats
//! (its attempts end, in errors): a restart would not help there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The registry of heartbeats that `/healthz` checks.
#[derive(Debug)]
pub struct Health {
    origin: Instant,
    beats: Mutex<Vec<Weak<Beat>>>,
}

#[derive(Debug)]
struct Beat {
    name: &'static str,
    max_age: Duration,
    /// Milliseconds since `Health::origin` of the last beat.
    last_ms: AtomicU64,
}

/// One loop's heartbeat. Checked while any clone of it lives: a loop that
/// ends on purpose drops it.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    beat: Arc<Beat>,
    origin: Instant,
}

impl Heartbeat {
    /// Records progress now.
    pub fn beat(&self) {
        self.beat.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Health {
    /// An empty registry.
    pub fn new() -> Arc<Health> {
        Arc::new(Health { origin: Instant::now(), beats: Mutex::new(Vec::new()) })
    }

    /// A heartbeat that counts as stalled when not beaten for `max_age`;
    /// it starts beaten.
    pub fn register(&self, name: &'static str, max_age: Duration) -> Heartbeat {
        let beat = Arc::new(Beat { name, max_age, last_ms: AtomicU64::new(0) });
        let heartbeat = Heartbeat { beat: beat.clone(), origin: self.origin };
        heartbeat.beat();
        let mut beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.retain(|b| b.strong_count() > 0);
        beats.push(Arc::downgrade(&beat));
        heartbeat
    }

    /// One line per stalled loop (empty when all are alive).
    pub fn stalled(&self) -> Vec<String> {
        let now_ms = self.origin.elapsed().as_millis() as u64;
        let beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|b| {
                let age = Duration::from_millis(now_ms.saturating_sub(b.last_ms.load(Ordering::Relaxed)));
                (age > b.max_age).then(|| {
                    format!("{}: no progress for {:.0}s (limit {}s)", b.name, age.as_secs_f64(), b.max_age.as_secs())
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_after_max_age_and_recovers_on_a_beat() {
        let health = Health::new();
        let fast = health.register("autoscaler", Duration::from_millis(50));
        let slow = health.register("controller", Duration::from_secs(60));
        assert!(health.stalled().is_empty());
        std::thread::sleep(Duration::from_millis(120));
        let stalled = health.stalled();
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert!(stalled[0].starts_with("autoscaler: no progress for"), "{stalled:?}");
        fast.clone().beat();
        assert!(health.stalled().is_empty());
        // A dropped heartbeat (a loop that ended on purpose) is not checked.
        std::thread::sleep(Duration::from_millis(120));
        drop(fast);
        assert!(health.stalled().is_empty());
        slow.beat();
    }
}
