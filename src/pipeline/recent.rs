//! The deliveries this worker settled lately, so that a broker redelivery after a lost ack is
//! acked without sending the job twice.

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Identifies a delivery: the job's bytes and the attempt. Retries and replays are other
/// deliveries (another attempt header or none); a broker redelivery is the same. XXH3: fast on
/// every job's body, and 64 bits make a false match (a skipped job) vanishingly unlikely among
/// the few thousand deliveries remembered.
pub fn settle_key(body: &[u8], attempts_before: u32) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(body, u64::from(attempts_before))
}

/// Bounded: the oldest are forgotten first.
pub struct RecentlySettled {
    inner: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    capacity: usize,
}

impl RecentlySettled {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((
                HashSet::with_capacity(capacity),
                VecDeque::with_capacity(capacity),
            )),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, (HashSet<u64>, VecDeque<u64>)> {
        // A panic while holding this lock cannot leave the set and the order inconsistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn contains(&self, key: u64) -> bool {
        self.lock().0.contains(&key)
    }

    pub fn insert(&self, key: u64) {
        let mut guard = self.lock();
        let (set, order) = &mut *guard;
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
}
