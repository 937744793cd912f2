//! Relay-aware flow control: a smooth rate limit, and a concurrency window that halves when the
//! relay says it is overloaded and grows back one step at a time (AIMD, as TCP does).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// At most `rate` messages per second, evenly spaced: a send waits for its slot, so there is
/// never a burst at a second boundary (GCRA with a burst of one).
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// A limit of `per_second` messages per second (positive; configuration checks it).
    pub fn new(per_second: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / per_second),
            next: Mutex::new(None),
        }
    }

    /// Waits for the next slot. Slots are taken in call order; a slot not used is not saved.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = match *next {
                Some(at) if at > now => at,
                _ => now,
            };
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// How many sends may be in flight to a relay, adjusted to what the relay says. Sends wait in
/// line, first come first served (a semaphore's queue): a job refused for overload goes to the
/// back, so the refusals of a long throttle are shared by the waiting jobs instead of falling on
/// the few that happen to ask first.
#[derive(Debug)]
pub struct Window {
    max: usize,
    /// One permit per send in flight, `limit` of them in use or free; the rest were forgotten
    /// when the window shrank.
    permits: Semaphore,
    state: Mutex<WindowState>,
}

#[derive(Debug)]
struct WindowState {
    limit: usize,
    /// The most the limit may grow to: `max`, or fewer while the relay takes fewer connections.
    ceiling: usize,
    /// Permits to forget as sends come back, after a shrink while they were in flight.
    debt: usize,
    /// Successes since the last change; the window grows by one after `limit` of them.
    successes: usize,
    /// No second halving within this time: one overload burst is one signal.
    calm_until: Option<Instant>,
    /// After an overload reply no send starts before this: the relay gets time, not just
    /// fewer sends at once (a message-rate limit refuses the next send as readily as a burst).
    pause_until: Option<Instant>,
    /// Overload replies since the last success: each pause is twice the one before.
    pauses: u32,
}

/// The first pause after an overload reply, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The pause after `pauses` overload replies in a row (1 for the first), with ±20 % jitter so that
/// instances refused at once do not come back in step.
fn pause_after(pauses: u32) -> Duration {
    let base = FIRST_PAUSE
        .saturating_mul(1u32 << pauses.saturating_sub(1).min(8))
        .min(MAX_PAUSE);
    base.mul_f64(0.8 + fastrand::f64() * 0.4)
}

/// A send's place in the window. Give it back with `succeeded` or `overloaded`; dropping it
/// (any other outcome) frees the place without changing the window.
#[derive(Debug)]
pub struct Slot<'a> {
    window: &'a Window,
    permit: Option<SemaphorePermit<'a>>,
}

impl Window {
    /// A window of `max` sends (at least one), starting wide open.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            max,
            permits: Semaphore::new(max),
            state: Mutex::new(WindowState {
                limit: max,
                ceiling: max,
                debt: 0,
                successes: 0,
                calm_until: None,
                pause_until: None,
                pauses: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Waits in line for room in the window, then for the pause after an overload to end (in
    /// its place: the next in line is the next to try).
    pub async fn acquire(&self) -> Slot<'_> {
        let permit = match self.permits.acquire().await {
            Ok(permit) => permit,
            // The semaphore is never closed; were it, waiting forever is the safe answer.
            Err(_) => std::future::pending().await,
        };
        loop {
            let paused = self
                .lock()
                .pause_until
                .filter(|until| Instant::now() < *until);
            match paused {
                Some(until) => tokio::time::sleep_until(until).await,
                None => break,
            }
        }
        Slot {
            window: self,
            permit: Some(permit),
        }
    }

    fn release(&self, permit: SemaphorePermit<'_>, outcome: Option<bool>) {
        let mut state = self.lock();
        match outcome {
            Some(true) => {
                state.pauses = 0;
                state.successes += 1;
                if state.successes >= state.limit && state.limit < state.ceiling {
                    state.limit += 1;
                    state.successes = 0;
                    if state.debt > 0 {
                        state.debt -= 1;
                    } else {
                        self.permits.add_permits(1);
                    }
                }
            }
            Some(false) => {
                let now = Instant::now();
                // Sends that were under way during the pause report the same overload.
                if state.pause_until.is_none_or(|until| now >= until) {
                    state.pauses += 1;
                    state.pause_until = Some(now + pause_after(state.pauses));
                }
                if state.calm_until.is_none_or(|until| now >= until) {
                    let halved = (state.limit / 2).max(1);
                    state.debt += state.limit - halved;
                    state.limit = halved;
                    state.successes = 0;
                    // Sends already in flight may still report the same overload.
                    state.calm_until = Some(now + Duration::from_secs(1));
                }
            }
            None => {}
        }
        if state.debt > 0 {
            permit.forget();
            state.debt -= 1;
        } else {
            drop(permit);
        }
        self.pay_debt(&mut state);
    }

    /// The rest of a shrink: from the permits nobody holds.
    fn pay_debt(&self, state: &mut WindowState) {
        while state.debt > 0 {
            match self.permits.try_acquire() {
                Ok(free) => {
                    free.forget();
                    state.debt -= 1;
                }
                Err(_) => break,
            }
        }
    }

    /// At most `ceiling` sends from now on (between 1 and `max`): the connections the relay
    /// accepts. Shrinks the window at once if it is wider; it grows back only up to it.
    pub fn set_ceiling(&self, ceiling: usize) {
        let mut state = self.lock();
        state.ceiling = ceiling.clamp(1, self.max);
        if state.limit > state.ceiling {
            state.debt += state.limit - state.ceiling;
            state.limit = state.ceiling;
            state.successes = 0;
        }
        self.pay_debt(&mut state);
    }
}

impl Slot<'_> {
    /// The send went through: the window may grow.
    pub fn succeeded(mut self) {
        if let Some(permit) = self.permit.take() {
            self.window.release(permit, Some(true));
        }
    }

    /// The relay said it is overloaded: the window halves, and sends pause.
    pub fn overloaded(mut self) {
        if let Some(permit) = self.permit.take() {
            self.window.release(permit, Some(false));
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.window.release(permit, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_sends_evenly() {
        let limit = RateLimit::new(20.0);
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..5 {
            limit.acquire().await;
            at.push(start.elapsed());
        }
        let ms: Vec<u128> = at.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 50, 100, 150, 200]);
        // Idle time is not saved up for a burst later.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = start.elapsed();
        limit.acquire().await;
        limit.acquire().await;
        assert_eq!((start.elapsed() - before).as_millis(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn window_halves_on_overload_and_grows_back() {
        let window = Window::new(8);
        assert_eq!(window.limit(), 8);
        window.acquire().await.overloaded();
        assert_eq!(window.limit(), 4);
        // A second signal in the same burst does not halve again.
        window.acquire().await.overloaded();
        assert_eq!(window.limit(), 4);
        tokio::time::sleep(Duration::from_secs(2)).await;
        window.acquire().await.overloaded();
        assert_eq!(window.limit(), 2);
        // Grows by one after `limit` successes.
        for _ in 0..2 {
            window.acquire().await.succeeded();
        }
        assert_eq!(window.limit(), 3);
        for _ in 0..3 {
            window.acquire().await.succeeded();
        }
        assert_eq!(window.limit(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_overload_pauses_sends_and_the_pauses_grow_until_a_success() {
        let window = Window::new(8);
        let start = Instant::now();
        window.acquire().await.overloaded();
        let first = {
            let _slot = window.acquire().await;
            start.elapsed()
        };
        assert!(
            first >= FIRST_PAUSE.mul_f64(0.8) && first <= FIRST_PAUSE.mul_f64(1.2),
            "{first:?}"
        );
        // Refused again after the pause: twice as long.
        window.acquire().await.overloaded();
        let before = Instant::now();
        window.acquire().await.succeeded();
        let second = before.elapsed();
        assert!(
            second >= (FIRST_PAUSE * 2).mul_f64(0.8) && second <= (FIRST_PAUSE * 2).mul_f64(1.2),
            "{second:?}"
        );
        // A success resets the ladder: the next pause is the first again.
        window.acquire().await.overloaded();
        let before = Instant::now();
        drop(window.acquire().await);
        assert!(before.elapsed() <= FIRST_PAUSE.mul_f64(1.2));
        for n in [6, 9, 40] {
            assert!(pause_after(n) <= MAX_PAUSE.mul_f64(1.2));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sends_wait_in_line_so_a_refused_one_goes_to_the_back() {
        let window = std::sync::Arc::new(Window::new(1));
        let first = window.acquire().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let second = {
            let (window, tx) = (window.clone(), tx.clone());
            tokio::spawn(async move {
                let slot = window.acquire().await;
                let _ = tx.send("second");
                slot.overloaded();
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The first is refused and asks again at once: the one that waited goes first.
        first.overloaded();
        let again = window.acquire().await;
        let _ = tx.send("first again");
        drop(again);
        second.await.expect("second");
        assert_eq!(rx.recv().await, Some("second"));
        assert_eq!(rx.recv().await, Some("first again"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shrink_while_sends_are_in_flight_is_paid_as_they_come_back() {
        let window = Window::new(4);
        let slots: Vec<_> = futures_util::future::join_all((0..4).map(|_| window.acquire())).await;
        let mut slots = slots.into_iter();
        slots.next().expect("slot").overloaded();
        assert_eq!(window.limit(), 2);
        // Two more come back: one of them pays the rest of the debt; then two fit, not three.
        drop(slots.next());
        drop(slots.next());
        drop(slots.next());
        tokio::time::sleep(Duration::from_secs(6)).await;
        let a = window.acquire().await;
        let b = window.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(10), window.acquire()).await;
        assert!(third.is_err(), "a third send does not fit a window of 2");
        drop((a, b));
    }

    #[tokio::test(start_paused = true)]
    async fn window_makes_sends_wait_for_room() {
        let window = std::sync::Arc::new(Window::new(1));
        let first = window.acquire().await;
        let waiter = {
            let window = window.clone();
            tokio::spawn(async move {
                let _slot = window.acquire().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !waiter.is_finished(),
            "no room while the first send is in flight"
        );
        drop(first);
        waiter.await.expect("got room");
    }
}
