//! Relay-aware flow control: a smooth rate limit, and a concurrency window that halves when the
//! relay says it is overloaded and grows back one step at a time (AIMD, as TCP does).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
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

/// How many sends may be in flight to a relay, adjusted to what the relay says.
#[derive(Debug)]
pub struct Window {
    max: usize,
    state: Mutex<WindowState>,
    changed: Notify,
}

#[derive(Debug)]
struct WindowState {
    limit: usize,
    in_flight: usize,
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
    settled: bool,
}

impl Window {
    /// A window of `max` sends (at least one), starting wide open.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            max,
            state: Mutex::new(WindowState {
                limit: max,
                in_flight: 0,
                successes: 0,
                calm_until: None,
                pause_until: None,
                pauses: 0,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Waits for the pause after an overload to end, then for room in the window.
    pub async fn acquire(&self) -> Slot<'_> {
        loop {
            let notified = self.changed.notified();
            let paused = self
                .lock()
                .pause_until
                .filter(|until| Instant::now() < *until);
            if let Some(until) = paused {
                tokio::time::sleep_until(until).await;
                continue;
            }
            {
                let mut state = self.lock();
                if state.in_flight < state.limit {
                    state.in_flight += 1;
                    return Slot {
                        window: self,
                        settled: false,
                    };
                }
            }
            notified.await;
        }
    }

    fn release(&self, outcome: Option<bool>) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        match outcome {
            Some(true) => {
                state.pauses = 0;
                state.successes += 1;
                if state.successes >= state.limit && state.limit < self.max {
                    state.limit += 1;
                    state.successes = 0;
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
                    state.limit = (state.limit / 2).max(1);
                    state.successes = 0;
                    // Sends already in flight may still report the same overload.
                    state.calm_until = Some(now + Duration::from_secs(1));
                }
            }
            None => {}
        }
        drop(state);
        self.changed.notify_waiters();
    }
}

impl Slot<'_> {
    /// The send went through: the window may grow.
    pub fn succeeded(mut self) {
        self.settled = true;
        self.window.release(Some(true));
    }

    /// The relay said it is overloaded: the window halves.
    pub fn overloaded(mut self) {
        self.settled = true;
        self.window.release(Some(false));
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.window.release(None);
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
