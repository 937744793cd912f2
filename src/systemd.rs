//! systemd `Type=notify`: READY, STOPPING, STATUS and a watchdog tied to the consume loop.
//! Every function does nothing when `NOTIFY_SOCKET` is unset.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::status::Status;

pub fn ready(status_line: &str) {
    let _ = sd_notify::notify(
        false,
        &[NotifyState::Ready, NotifyState::Status(status_line)],
    );
}

pub fn stopping(status_line: &str) {
    let _ = sd_notify::notify(
        false,
        &[NotifyState::Stopping, NotifyState::Status(status_line)],
    );
}

pub fn status(status_line: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(status_line)]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if it is meant for this process.
/// systemd sets `WATCHDOG_PID` too; when it is absent the interval applies to us (as
/// `sd_watchdog_enabled(3)` reads it).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends WATCHDOG=1 at half the interval, but only while the consume loop keeps turning: a loop
/// that hangs stops the pings and systemd restarts the service.
pub async fn watchdog(interval: Duration, status: Arc<Status>, shutdown: CancellationToken) {
    watch_progress(interval, &status, &shutdown, || {
        let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
    })
    .await;
}

async fn watch_progress(
    interval: Duration,
    status: &Status,
    shutdown: &CancellationToken,
    ping: impl Fn(),
) {
    let mut ticker = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if status.since_last_beat() < interval / 2 {
            ping();
        } else {
            tracing::warn!(
                since = ?status.since_last_beat(),
                "consume loop made no progress; withholding the watchdog ping"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_only_while_the_loop_beats() {
        let status = Arc::new(Status::new());
        let shutdown = CancellationToken::new();
        let pings = Arc::new(AtomicU32::new(0));
        let interval = Duration::from_secs(2);
        let task = {
            let (status, shutdown, pings) = (status.clone(), shutdown.clone(), pings.clone());
            tokio::spawn(async move {
                watch_progress(interval, &status, &shutdown, || {
                    pings.fetch_add(1, Ordering::SeqCst);
                })
                .await;
            })
        };
        // The loop beats every 250 ms for 5 s: pings every second.
        for _ in 0..20 {
            status.beat();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let while_beating = pings.load(Ordering::SeqCst);
        assert!(while_beating >= 4, "pinged {while_beating} times in 5 s");
        // The loop hangs: no beat for 5 s. At most the ping already due goes out.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after_hang = pings.load(Ordering::SeqCst) - while_beating;
        assert!(
            after_hang <= 1,
            "pinged {after_hang} times while the loop hung"
        );
        shutdown.cancel();
        task.await.expect("watchdog ends on shutdown");
    }
}
