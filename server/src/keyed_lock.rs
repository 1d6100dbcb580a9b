//! One async lock per key (a model name), made on first use and dropped
//! when nobody holds or waits for it, so that client-chosen names leave
//! nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// A set of async locks by name.
#[derive(Default)]
pub(crate) struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds the lock of one key until dropped.
pub(crate) struct KeyedGuard<'a> {
    owner: &'a KeyedLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Waits for the lock of `key`.
    pub(crate) async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let mutex = self.locks.lock().expect("keyed locks").entry(key.to_string()).or_default().clone();
        let guard = mutex.lock_owned().await;
        KeyedGuard { owner: self, key: key.to_string(), guard: Some(guard) }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().expect("keyed locks").len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        // Under the map's lock, so that nobody takes a new handle meanwhile:
        // with ours released, the map's handle is the last one unless
        // someone waits.
        let mut locks = self.owner.locks.lock().expect("keyed locks");
        drop(self.guard.take());
        if locks.get(&self.key).is_some_and(|mutex| Arc::strong_count(mutex) == 1) {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn one_holder_per_key_and_nothing_left_behind() {
        let locks = Arc::new(KeyedLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside) = (locks.clone(), inside.clone());
                tokio::spawn(async move {
                    let _guard = locks.lock("m").await;
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders of one key");
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        // Another key is not blocked by "m".
        drop(locks.lock("other").await);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(locks.len(), 0);
    }
}
