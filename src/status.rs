//! What the worker is doing now, for `/readyz`, systemd's STATUS= and the watchdog.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting to the broker for the first time.
    Starting,
    /// Lost the broker; reconnecting.
    Reconnecting,
    /// Connected and consuming.
    Consuming,
    /// Stopping: no new deliveries, jobs in flight finishing.
    Draining,
}

#[derive(Debug)]
pub struct Status {
    state: Mutex<(Phase, String)>,
    /// The phase, for whoever waits for a change (tests, the start-up of `amqp-mailer run`).
    phase_tx: watch::Sender<Phase>,
    started: Instant,
    /// Milliseconds since `started` at the consume loop's last turn.
    last_beat_ms: AtomicU64,
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

impl Status {
    pub fn new() -> Self {
        Self {
            state: Mutex::new((Phase::Starting, "connecting to the broker".into())),
            phase_tx: watch::channel(Phase::Starting).0,
            started: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
        }
    }

    pub fn set(&self, phase: Phase, detail: impl Into<String>) {
        *self.lock() = (phase, detail.into());
        self.phase_tx.send_replace(phase);
    }

    /// Follows phase changes.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    pub fn phase(&self) -> Phase {
        self.lock().0
    }

    /// `Ok` while ready to take jobs; otherwise why not, in a few words. `broker_blocked`: the
    /// broker blocks our publishing (a memory or disk alarm).
    pub fn readiness(&self, relay_auth_failing: bool, broker_blocked: bool) -> Result<(), String> {
        let (phase, detail) = self.lock().clone();
        match phase {
            Phase::Consuming if broker_blocked => Err(
                "the broker blocks publishing (a memory or disk alarm): retries and dead letters \
                 wait"
                    .to_string(),
            ),
            Phase::Consuming if relay_auth_failing => Err(
                "relay authentication failing: check the relay's user name and password, or its OAuth2 \
                 token source (see the log)"
                    .to_string(),
            ),
            Phase::Consuming => Ok(()),
            Phase::Starting => Err(format!("starting: {detail}")),
            Phase::Reconnecting => Err(format!("reconnecting to the broker: {detail}")),
            Phase::Draining => Err(format!("draining: {detail}")),
        }
    }

    /// The consume loop calls this on every turn; the watchdog checks it.
    pub fn beat(&self) {
        self.last_beat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the consume loop's last turn.
    pub fn since_last_beat(&self) -> std::time::Duration {
        let now = self.started.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(
            now.saturating_sub(self.last_beat_ms.load(Ordering::Relaxed)),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Phase, String)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
