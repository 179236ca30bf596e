//! One holder per key at a time, across the builds a builder runs: two builds that reach the same
//! cache key run its step once — the second waits for the first, then finds its cache record.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct KeyLocks {
    held: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a key until dropped.
pub struct KeyGuard {
    locks: Arc<KeyLocks>,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    /// Waits until no one else holds `key`, then holds it.
    pub async fn lock(self: &Arc<Self>, key: &str) -> KeyGuard {
        let m = self.held.lock().entry(key.to_string()).or_default().clone();
        KeyGuard {
            locks: self.clone(),
            key: key.to_string(),
            guard: Some(m.lock_owned().await),
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut held = self.locks.held.lock();
        // Only the map refers to it: no one holds or waits for the key any more.
        if held
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            held.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_holder_waits_for_the_first_and_the_map_empties() {
        let locks = Arc::new(KeyLocks::default());
        let first = locks.lock("k").await;
        let l2 = locks.clone();
        let second = tokio::spawn(async move { drop(l2.lock("k").await) });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second holder did not wait");
        let _other = locks.lock("other").await;
        drop(first);
        second.await.unwrap();
        assert_eq!(locks.held.lock().len(), 1, "only 'other' is still held");
    }
}
