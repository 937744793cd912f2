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
    let period = interval / 2;
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if status.since_last_beat() < interval / 2 {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        } else {
            tracing::warn!(
                since = ?status.since_last_beat(),
                "consume loop made no progress; withholding the watchdog ping"
            );
        }
    }
}
