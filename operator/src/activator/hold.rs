//! The per-ModelDeployment hold queue: a bounded count of the requests
//! waiting for a ready pod, and the wait itself (until a ready pod appears,
//! the ModelDeployment goes away, or the deadline passes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::IntGaugeVec;
use tokio::sync::watch;
use tokio::time::Instant;

use super::route::ModelKey;

/// Held requests per ModelDeployment, bounded; mirrored in the held gauge.
pub struct HoldQueue {
    max_held: usize,
    held: Mutex<HashMap<ModelKey, usize>>,
    gauge: IntGaugeVec,
}

/// The queue of this ModelDeployment is full.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{held} requests are already held for ModelDeployment {key} (the activator's --max-held); retry later")]
pub struct QueueFull {
    /// The ModelDeployment.
    pub key: ModelKey,
    /// How many are held.
    pub held: usize,
}

/// One held request's place in the queue, given back on drop.
pub struct Hold {
    queue: Arc<HoldQueue>,
    key: ModelKey,
}

impl HoldQueue {
    /// A queue holding at most `max_held` requests per ModelDeployment,
    /// reporting its counts in `gauge` (labels: namespace, name).
    pub fn new(max_held: usize, gauge: IntGaugeVec) -> Arc<HoldQueue> {
        Arc::new(HoldQueue { max_held, held: Mutex::new(HashMap::new()), gauge })
    }

    /// Takes a place for a request to `key`, or says the queue is full.
    pub fn try_hold(self: &Arc<Self>, key: &ModelKey) -> Result<Hold, QueueFull> {
        let mut held = self.held.lock().expect("hold counts");
        let count = held.entry(key.clone()).or_insert(0);
        if *count >= self.max_held {
            return Err(QueueFull { key: key.clone(), held: *count });
        }
        *count += 1;
        self.gauge.with_label_values(&[&key.namespace, &key.name]).set(*count as i64);
        Ok(Hold { queue: self.clone(), key: key.clone() })
    }

    /// Requests held for `key` now.
    pub fn held(&self, key: &ModelKey) -> usize {
        self.held.lock().expect("hold counts").get(key).copied().unwrap_or(0)
    }
}

impl Hold {
    /// Requests held for this one's ModelDeployment now (itself included).
    pub fn held_now(&self) -> usize {
        self.queue.held(&self.key)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = self.queue.held.lock().expect("hold counts");
        let remaining = match held.get_mut(&self.key) {
            Some(count) => {
                *count = count.saturating_sub(1);
                *count
            }
            None => 0,
        };
        if remaining == 0 {
            held.remove(&self.key);
        }
        self.queue.gauge.with_label_values(&[&self.key.namespace, &self.key.name]).set(remaining as i64);
    }
}

/// How a hold ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Released<T> {
    /// A ready pod (or several) to forward to.
    Ready(T),
    /// The ModelDeployment is no longer there.
    Gone,
    /// The deadline passed first.
    TimedOut,
}

/// What a held request waits on.
pub enum Readiness<T> {
    /// Ready pods.
    Ready(T),
    /// No ready pod yet.
    Waiting,
    /// The ModelDeployment was deleted.
    Gone,
}

/// Waits until `check` finds ready pods, re-checking each time `changes`
/// moves (the cluster view bumps it on every watch event), until `deadline`.
pub async fn wait_ready<T>(
    mut check: impl FnMut() -> Readiness<T>,
    changes: &mut watch::Receiver<u64>,
    deadline: Instant,
) -> Released<T> {
    loop {
        // Mark the current version seen before looking, so a change that
        // lands between the look and the wait is not missed.
        changes.borrow_and_update();
        match check() {
            Readiness::Ready(pods) => return Released::Ready(pods),
            Readiness::Gone => return Released::Gone,
            Readiness::Waiting => {}
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    // The view stopped: nothing will change any more.
                    tokio::time::sleep_until(deadline).await;
                    return Released::TimedOut;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Released::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use prometheus::Opts;

    use super::*;

    fn gauge() -> IntGaugeVec {
        IntGaugeVec::new(Opts::new("held", "held"), &["namespace", "name"]).unwrap()
    }

    #[test]
    fn the_queue_is_bounded_per_model_and_places_come_back_on_drop() {
        let gauge = gauge();
        let queue = HoldQueue::new(2, gauge.clone());
        let (a, b) = (ModelKey::new("ns", "a"), ModelKey::new("ns", "b"));
        let first = queue.try_hold(&a).unwrap();
        let second = queue.try_hold(&a).unwrap();
        assert_eq!(queue.try_hold(&a).err(), Some(QueueFull { key: a.clone(), held: 2 }));
        assert_eq!(gauge.with_label_values(&["ns", "a"]).get(), 2);
        // Another model has its own bound.
        let other = queue.try_hold(&b).unwrap();
        assert_eq!(second.held_now(), 2);
        drop(first);
        assert_eq!(gauge.with_label_values(&["ns", "a"]).get(), 1);
        let third = queue.try_hold(&a).unwrap();
        drop((second, third, other));
        assert_eq!(queue.held(&a), 0);
        assert_eq!(gauge.with_label_values(&["ns", "a"]).get(), 0);
        assert_eq!(gauge.with_label_values(&["ns", "b"]).get(), 0);
    }

    #[tokio::test]
    async fn a_hold_wakes_when_the_view_changes_and_its_pods_are_ready() {
        let (tx, mut rx) = watch::channel(0u64);
        let ready = Arc::new(AtomicUsize::new(0));
        let checks = Arc::new(AtomicUsize::new(0));
        let waiter = tokio::spawn({
            let (ready, checks) = (ready.clone(), checks.clone());
            async move {
                let check = || {
                    checks.fetch_add(1, Ordering::SeqCst);
                    match ready.load(Ordering::SeqCst) {
                        0 => Readiness::Waiting,
                        n => Readiness::Ready(n),
                    }
                };
                wait_ready(check, &mut rx, Instant::now() + Duration::from_secs(10)).await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A change that does not make a pod ready: looked at, still held.
        tx.send_modify(|v| *v += 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        assert_eq!(checks.load(Ordering::SeqCst), 2);
        ready.store(3, Ordering::SeqCst);
        tx.send_modify(|v| *v += 1);
        assert_eq!(waiter.await.unwrap(), Released::Ready(3));
    }

    #[tokio::test]
    async fn a_hold_ends_at_its_deadline_or_when_the_model_goes() {
        let (_tx, mut rx) = watch::channel(0u64);
        let start = Instant::now();
        let waited = wait_ready(|| Readiness::<()>::Waiting, &mut rx, start + Duration::from_millis(200)).await;
        assert_eq!(waited, Released::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(200));
        let gone = wait_ready(|| Readiness::<()>::Gone, &mut rx, start + Duration::from_secs(10)).await;
        assert_eq!(gone, Released::Gone);
    }
}
