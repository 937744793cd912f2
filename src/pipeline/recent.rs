//! The deliveries this worker settled lately, so that a broker redelivery after a lost ack is
//! acked without sending the job twice; and those it is handling now, so that a redelivery that
//! arrives while its first copy is still being sent waits for that copy's outcome instead of
//! sending it again. And the copies it republished for jobs it then handed back whole (a lost
//! confirm), so that such a copy, if the broker stored it after all, is dropped when it comes
//! back instead of the job being sent twice.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
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
    /// Deliveries being handled now, by key: the ticket of each, in the order they began (a
    /// producer may publish the same job twice, and both copies may come back redelivered).
    in_flight: HashMap<u64, BTreeSet<u64>>,
    /// The next ticket.
    next_ticket: u64,
    /// Copies (by the hash of their `copy-id`) whose job was handed back whole after they were
    /// published: if the broker stored one, it is a stray, the job living on in its original.
    strays: HashSet<u64>,
    strays_order: VecDeque<u64>,
}

/// A delivery being handled: while it lives, a later redelivery of it waits. Dropping it (after
/// the settlement was recorded) ends the wait.
pub struct Handling<'a> {
    recent: &'a RecentlySettled,
    key: u64,
    ticket: u64,
}

impl Handling<'_> {
    /// Waits until no copy of this delivery that began before this one is still being handled.
    /// Only earlier copies are waited for: two redelivered copies of one job never wait for
    /// each other, and the earliest copy never waits at all.
    pub async fn wait_for_earlier(&self) {
        loop {
            let finished = self.recent.finished.notified();
            tokio::pin!(finished);
            // Registered before the check, so that a finish in between is not missed.
            finished.as_mut().enable();
            let first = self
                .recent
                .lock()
                .in_flight
                .get(&self.key)
                .and_then(|tickets| tickets.first().copied());
            if first.is_none_or(|first| first >= self.ticket) {
                return;
            }
            finished.await;
        }
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        let mut state = self.recent.lock();
        if let Some(tickets) = state.in_flight.get_mut(&self.key) {
            tickets.remove(&self.ticket);
            if tickets.is_empty() {
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
                next_ticket: 0,
                strays: HashSet::new(),
                strays_order: VecDeque::new(),
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
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.in_flight.entry(key).or_default().insert(ticket);
        Handling {
            recent: self,
            key,
            ticket,
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
        remember(set, order, key, self.capacity);
    }

    /// The copy `copy_id` was published (or may have been) for a job that is handed back whole:
    /// if it comes back, it is a stray.
    pub fn insert_stray(&self, copy_id: &str) {
        let mut guard = self.lock();
        let State {
            strays,
            strays_order,
            ..
        } = &mut *guard;
        remember(strays, strays_order, stray_key(copy_id), self.capacity);
    }

    /// Whether `copy_id` names a stray copy. It stays one: a stray whose ack is lost and that
    /// comes back again is dropped again.
    pub fn is_stray(&self, copy_id: &str) -> bool {
        self.lock().strays.contains(&stray_key(copy_id))
    }
}

fn stray_key(copy_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(copy_id.as_bytes())
}

/// Adds `key` to a bounded set, forgetting the oldest past `capacity`.
fn remember(set: &mut HashSet<u64>, order: &mut VecDeque<u64>, key: u64, capacity: usize) {
    if set.insert(key) {
        order.push_back(key);
        if order.len() > capacity
            && let Some(oldest) = order.pop_front()
        {
            set.remove(&oldest);
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

    #[test]
    fn strays_are_remembered_by_copy_id_and_the_oldest_forgotten() {
        let recent = RecentlySettled::new(2);
        recent.insert_stray("c-1");
        assert!(recent.is_stray("c-1"));
        assert!(recent.is_stray("c-1"), "and stays one");
        assert!(!recent.is_stray("c-2"));
        recent.insert_stray("c-2");
        recent.insert_stray("c-3");
        assert!(!recent.is_stray("c-1"), "the oldest is forgotten");
        assert!(recent.is_stray("c-2") && recent.is_stray("c-3"));
        let key = settle_key(b"c-3", 0);
        assert!(!recent.contains(key), "strays are not settled deliveries");
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivery_waits_for_the_copy_being_handled() {
        let recent = std::sync::Arc::new(RecentlySettled::new(8));
        let key = settle_key(b"job", 0);
        let first = recent.begin(key);
        let waiter = {
            let recent = recent.clone();
            tokio::spawn(async move {
                let mine = recent.begin(key);
                mine.wait_for_earlier().await;
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
        recent.begin(other).wait_for_earlier().await;
    }

    /// Two redelivered copies of one job (a producer published it twice, and the connection
    /// was lost under both) must not wait for each other: the earlier goes first, the later
    /// waits for it alone.
    #[tokio::test(start_paused = true)]
    async fn two_copies_of_one_job_never_wait_for_each_other() {
        let recent = RecentlySettled::new(8);
        let key = settle_key(b"job", 0);
        let first = recent.begin(key);
        let second = recent.begin(key);
        tokio::time::timeout(std::time::Duration::from_secs(1), first.wait_for_earlier())
            .await
            .expect("the earlier copy waits for nothing");
        let waiting =
            tokio::time::timeout(std::time::Duration::from_secs(5), second.wait_for_earlier())
                .await;
        assert!(waiting.is_err(), "the later copy waits for the earlier one");
        recent.insert(key);
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second.wait_for_earlier())
            .await
            .expect("and goes on once it is done");
        assert!(recent.contains(key), "seeing it settled");
        // A third copy that begins after the first ended waits only for the second.
        let third = recent.begin(key);
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(1), third.wait_for_earlier())
            .await
            .expect("nothing earlier is left");
    }
}
