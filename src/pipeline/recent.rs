//! The deliveries this worker settled lately, so that a broker redelivery after a lost ack is
//! acked without sending the job twice; and those it is handling now, so that a redelivery that
//! arrives while its first copy is still being sent waits for that copy's outcome instead of
//! sending it again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// Identifies a delivery: the job's bytes and the attempt. Retries and replays are other
/// deliveries (another attempt header or none); a broker redelivery is the same. XXH3: fast on
/// every job's body, and 64 bits make a false match (a skipped job) vanishingly unlikely among
/// the few thousand deliveries remembered.
pub fn settle_key(body: &[u8], attempts_before: u32) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(body, u64::from(attempts_before))
}

/// Bounded: the oldest are forgotten first.
pub struct RecentlySettled {
    inner: Mutex<State>,
    capacity: usize,
    /// Told whenever a delivery stops being handled.
    finished: Notify,
}

#[derive(Default)]
struct State {
    settled: HashSet<u64>,
    order: VecDeque<u64>,
    /// Deliveries being handled now, by key, and how many of them (a producer may publish the
    /// same job twice).
    in_flight: HashMap<u64, u32>,
}

/// A delivery being handled: while it lives, a redelivery of it waits. Dropping it (after the
/// settlement was recorded) ends the wait.
pub struct Handling<'a> {
    recent: &'a RecentlySettled,
    key: u64,
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        let mut state = self.recent.lock();
        if let Some(n) = state.in_flight.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                state.in_flight.remove(&self.key);
            }
        }
        drop(state);
        self.recent.finished.notify_waiters();
    }
}

impl RecentlySettled {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(State {
                settled: HashSet::with_capacity(capacity),
                order: VecDeque::with_capacity(capacity),
                in_flight: HashMap::new(),
            }),
            capacity,
            finished: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the set and the order inconsistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the delivery `key` as being handled until the returned guard is dropped.
    pub fn begin(&self, key: u64) -> Handling<'_> {
        *self.lock().in_flight.entry(key).or_default() += 1;
        Handling { recent: self, key }
    }

    /// Waits until no other delivery of `key` is being handled. `handling` is the caller's own.
    pub async fn wait_for_others(&self, key: u64) {
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            // Registered before the check, so that a finish in between is not missed.
            finished.as_mut().enable();
            if self.lock().in_flight.get(&key).copied().unwrap_or(0) <= 1 {
                return;
            }
            finished.await;
        }
    }

    pub fn contains(&self, key: u64) -> bool {
        self.lock().settled.contains(&key)
    }

    pub fn insert(&self, key: u64) {
        let mut guard = self.lock();
        let State {
            settled: set,
            order,
            ..
        } = &mut *guard;
        if set.insert(key) {
            order.push_back(key);
            if order.len() > self.capacity
                && let Some(oldest) = order.pop_front()
            {
                set.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_latest_and_forgets_the_oldest() {
        let recent = RecentlySettled::new(2);
        let (a, b, c) = (
            settle_key(b"a", 0),
            settle_key(b"b", 0),
            settle_key(b"c", 0),
        );
        recent.insert(a);
        recent.insert(b);
        recent.insert(b);
        assert!(recent.contains(a) && recent.contains(b));
        recent.insert(c);
        assert!(!recent.contains(a), "the oldest is forgotten");
        assert!(recent.contains(b) && recent.contains(c));
        assert_ne!(
            settle_key(b"a", 0),
            settle_key(b"a", 1),
            "another attempt is another delivery"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivery_waits_for_the_copy_being_handled() {
        let recent = std::sync::Arc::new(RecentlySettled::new(8));
        let key = settle_key(b"job", 0);
        let first = recent.begin(key);
        let waiter = {
            let recent = recent.clone();
            tokio::spawn(async move {
                let _mine = recent.begin(key);
                recent.wait_for_others(key).await;
                recent.contains(key)
            })
        };
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(
            !waiter.is_finished(),
            "still waiting while the first copy is handled"
        );
        recent.insert(key);
        drop(first);
        assert!(waiter.await.expect("joined"), "and then sees it settled");
        // Alone, there is nothing to wait for.
        let other = settle_key(b"other", 0);
        let _alone = recent.begin(other);
        recent.wait_for_others(other).await;
    }
}
