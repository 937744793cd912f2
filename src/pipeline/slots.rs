//! The worker's slots: at most `worker.concurrency` jobs at once, and each lane within what it
//! is entitled to; and the plan that says what each lane is entitled to: its share by weight,
//! or, while another lane has nothing to do, that lane's slots too.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::shares;

/// How long a lane must have had nothing in flight and nothing delivered before it lends its
/// slots to the others. Long enough that a lane with a steady trickle keeps its share, short
/// enough that a newsletter gets the whole worker a moment after the last password reset.
pub const IDLE_BEFORE_LENDING: Duration = Duration::from_secs(1);

/// The slots, counted per lane. Taken by the consume loop alone, given back by the jobs (when a
/// [`Slot`] is dropped), which may outlive the session that took them.
#[derive(Debug)]
pub struct Slots {
    total: AtomicUsize,
    lanes: Vec<AtomicUsize>,
    freed: Notify,
}

/// One job's slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    lane: usize,
}

impl Slots {
    pub fn new(lanes: usize) -> Arc<Self> {
        Arc::new(Self {
            total: AtomicUsize::new(0),
            lanes: (0..lanes).map(|_| AtomicUsize::new(0)).collect(),
            freed: Notify::new(),
        })
    }

    /// Jobs in flight, every lane together.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Jobs of `lane` in flight.
    pub fn of(&self, lane: usize) -> usize {
        self.lanes[lane].load(Ordering::Acquire)
    }

    /// Takes a slot for a job of `lane`. The caller has checked that one is free.
    pub fn take(self: &Arc<Self>, lane: usize) -> Slot {
        self.lanes[lane].fetch_add(1, Ordering::AcqRel);
        self.total.fetch_add(1, Ordering::AcqRel);
        Slot {
            slots: self.clone(),
            lane,
        }
    }

    /// Resolves once a slot was given back since the last call.
    pub async fn freed(&self) {
        self.freed.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lanes[self.lane].fetch_sub(1, Ordering::AcqRel);
        self.slots.total.fetch_sub(1, Ordering::AcqRel);
        self.slots.freed.notify_one();
    }
}

/// What each lane is entitled to, and which lanes lend theirs.
#[derive(Debug)]
pub struct Plan {
    weights: Vec<u16>,
    concurrency: u16,
    lending: Vec<bool>,
    last_delivery: Vec<Instant>,
    entitled: Vec<u16>,
}

impl Plan {
    pub fn new(weights: Vec<u16>, concurrency: u16, now: Instant) -> Self {
        let n = weights.len();
        let entitled = shares(&weights, concurrency);
        Self {
            weights,
            concurrency,
            lending: vec![false; n],
            last_delivery: vec![now; n],
            entitled,
        }
    }

    /// What `lane` may have in flight now; also the prefetch of its consumer.
    pub fn entitled(&self, lane: usize) -> u16 {
        self.entitled[lane]
    }

    pub fn lending(&self, lane: usize) -> bool {
        self.lending[lane]
    }

    /// A delivery came for `lane`: a lane that lent its slots takes its share back.
    pub fn delivered(&mut self, lane: usize, now: Instant) {
        self.last_delivery[lane] = now;
        if self.lending[lane] {
            self.lending[lane] = false;
            self.recompute();
        }
    }

    /// Lends the slots of every lane that has been idle for [`IDLE_BEFORE_LENDING`] while
    /// another lane uses all it is entitled to. `busy(lane)` says whether a lane has work in
    /// flight or waiting in the worker. True when the plan changed.
    pub fn update(
        &mut self,
        now: Instant,
        in_flight: impl Fn(usize) -> usize,
        busy: impl Fn(usize) -> bool,
    ) -> bool {
        let n = self.weights.len();
        if n < 2 {
            return false;
        }
        let saturated = (0..n).any(|j| {
            !self.lending[j] && in_flight(j) >= usize::from(self.entitled[j]) && in_flight(j) > 0
        });
        if !saturated {
            return false;
        }
        let mut changed = false;
        for i in 0..n {
            let idle = !self.lending[i]
                && !busy(i)
                && now.duration_since(self.last_delivery[i]) >= IDLE_BEFORE_LENDING;
            // One lane at least keeps borrowing.
            let others = (0..n).filter(|&j| j != i && !self.lending[j]).count();
            if idle && others > 0 {
                self.lending[i] = true;
                changed = true;
            }
        }
        if changed {
            self.recompute();
        }
        changed
    }

    /// Lenders keep one slot (their consumer's prefetch of 1 watches for new work); the others
    /// share the whole concurrency by weight. While a lender's first job waits for a slot, the
    /// worker may hold one delivery more than its concurrency, unstarted.
    fn recompute(&mut self) {
        if !self.lending.contains(&true) {
            self.entitled = shares(&self.weights, self.concurrency);
            return;
        }
        let borrowers: Vec<usize> = (0..self.weights.len())
            .filter(|&i| !self.lending[i])
            .collect();
        let weights: Vec<u16> = borrowers.iter().map(|&i| self.weights[i]).collect();
        let lent = shares(&weights, self.concurrency);
        for (i, lending) in self.lending.iter().enumerate() {
            if *lending {
                self.entitled[i] = 1;
            }
        }
        for (&i, share) in borrowers.iter().zip(lent) {
            self.entitled[i] = share;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_per_lane_and_come_back_on_drop() {
        let slots = Slots::new(2);
        let a = slots.take(0);
        let b = slots.take(1);
        let c = slots.take(1);
        assert_eq!((slots.total(), slots.of(0), slots.of(1)), (3, 1, 2));
        drop(b);
        drop(a);
        assert_eq!((slots.total(), slots.of(0), slots.of(1)), (1, 0, 1));
        drop(c);
        assert_eq!(slots.total(), 0);
    }

    #[test]
    fn an_idle_lane_lends_while_another_is_saturated_and_takes_its_share_back() {
        let start = Instant::now();
        let mut plan = Plan::new(vec![3, 1], 16, start);
        assert_eq!((plan.entitled(0), plan.entitled(1)), (12, 4));
        // Bulk (lane 1) saturated, transactional idle, but not for long enough yet.
        let in_flight = |lane: usize| [0, 4][lane];
        let busy = |lane: usize| lane == 1;
        assert!(!plan.update(start + Duration::from_millis(500), in_flight, busy));
        // Idle for a second: transactional keeps one slot, bulk gets the whole concurrency.
        let later = start + IDLE_BEFORE_LENDING;
        assert!(plan.update(later, in_flight, busy));
        assert_eq!((plan.entitled(0), plan.entitled(1)), (1, 16));
        assert!(plan.lending(0) && !plan.lending(1));
        assert!(!plan.update(later, in_flight, busy), "no change twice");
        // A transactional job: its share back at once.
        plan.delivered(0, later);
        assert_eq!((plan.entitled(0), plan.entitled(1)), (12, 4));
    }

    #[test]
    fn nobody_lends_when_nobody_needs_it_nor_the_last_lane() {
        let start = Instant::now();
        let later = start + IDLE_BEFORE_LENDING * 2;
        let mut plan = Plan::new(vec![3, 1], 16, start);
        // Bulk busy but under its share: no need to lend.
        assert!(!plan.update(later, |l| [0, 2][l], |l| l == 1));
        // All idle: nothing saturated.
        assert!(!plan.update(later, |_| 0, |_| false));
        // One lane alone never lends.
        let mut one = Plan::new(vec![1], 16, start);
        assert!(!one.update(later, |_| 16, |_| false));
        assert_eq!(one.entitled(0), 16);
        // Three lanes, two idle: both lend, the busy one borrows all but their watch slots.
        let mut three = Plan::new(vec![1, 1, 2], 12, start);
        assert!(three.update(later, |l| [0, 0, 6][l], |l| l == 2));
        assert_eq!(
            (three.entitled(0), three.entitled(1), three.entitled(2)),
            (1, 1, 12)
        );
    }
}
