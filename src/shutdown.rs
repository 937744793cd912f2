//! The one owner of stopping: the tokens, the job tasks and the phases
//! running → draining (within `shutdown.grace`) → forced.
//!
//! Like mini-redis's `Shutdown`, it is passed in, never global: the binary cancels `requested` on
//! SIGTERM and `force` on a second signal; a test cancels its own tokens. Whichever way the worker
//! stops (a request while consuming, while reconnecting, or a fatal topology error), [`drain`]
//! runs exactly once: later calls wait for the first one to end and do nothing more.
//!
//! [`drain`]: Shutdown::drain

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// After the grace, how long the stop still waits for the jobs that were settling (a receipt
/// given up at the grace's end, then the job's ack) before the channel is closed.
const LAST_ACKS: Duration = Duration::from_secs(2);
/// The same after a second signal ("stop at once"): a sent job whose receipt was in flight
/// acks in milliseconds, and is not worth sending again.
const LAST_ACKS_FORCED: Duration = Duration::from_millis(500);

/// How far the worker is on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Progress {
    /// Taking deliveries.
    Running = 0,
    /// No new deliveries; the jobs in flight finish within `shutdown.grace`.
    Draining = 1,
    /// The grace ran out or a second stop came: what has not finished goes back to the queue.
    Forced = 2,
    /// Every job task ended within the grace.
    Drained = 3,
}

impl Progress {
    fn from_u8(value: u8) -> Progress {
        match value {
            0 => Progress::Running,
            1 => Progress::Draining,
            2 => Progress::Forced,
            _ => Progress::Drained,
        }
    }
}

/// How the worker stops.
#[derive(Debug)]
pub struct Shutdown {
    /// A stop was asked for: take no more deliveries.
    requested: CancellationToken,
    /// A second stop: do not wait for the jobs in flight any more.
    force: CancellationToken,
    /// Cancelled when the drain ends (drained, grace over or forced): a job that has not started
    /// sending gives up, and its delivery goes back to the queue.
    abandon: CancellationToken,
    /// Every job task, across broker sessions.
    jobs: TaskTracker,
    grace: Duration,
    progress: AtomicU8,
    /// The drain ended because the grace ran out (not drained, not forced).
    grace_ran_out: AtomicBool,
    drained: OnceCell<()>,
}

impl Shutdown {
    /// `requested` and `force` are the caller's (the binary's signals, or a test's tokens).
    pub fn new(requested: CancellationToken, force: CancellationToken, grace: Duration) -> Self {
        Self {
            requested,
            force,
            abandon: CancellationToken::new(),
            jobs: TaskTracker::new(),
            grace,
            progress: AtomicU8::new(Progress::Running as u8),
            grace_ran_out: AtomicBool::new(false),
            drained: OnceCell::new(),
        }
    }

    /// Resolves once a stop was asked for.
    pub fn requested(&self) -> WaitForCancellationFuture<'_> {
        self.requested.cancelled()
    }

    pub fn progress(&self) -> Progress {
        Progress::from_u8(self.progress.load(Ordering::Relaxed))
    }

    /// A token for the jobs of one broker session: cancelled when that session's channel is lost
    /// (by the caller), and when the drain ends (by this).
    pub fn abandon_token(&self) -> CancellationToken {
        self.abandon.child_token()
    }

    /// Cancelled when the drain ends (drained, grace over or forced), and only then: for work
    /// that outlives a lost channel but not the worker, such as a receipt waiting for the
    /// broker's confirm.
    pub fn drain_over(&self) -> CancellationToken {
        self.abandon.clone()
    }

    /// Runs one job as a tracked task: the drain waits for it.
    pub fn spawn_job<F>(&self, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.jobs.spawn(job);
    }

    /// Waits for the jobs in flight, at most `shutdown.grace`, or until `force`; then every job
    /// that has not started sending gives up. Runs once: a second call waits for the first.
    pub async fn drain(&self) {
        self.drained
            .get_or_init(|| async {
                self.set(Progress::Draining);
                self.jobs.close();
                tokio::select! {
                    _ = self.jobs.wait() => {}
                    _ = tokio::time::sleep(self.grace) => {
                        self.grace_ran_out.store(true, Ordering::Relaxed);
                        self.set(Progress::Forced);
                        tracing::warn!(
                            unfinished = self.jobs.len(),
                            grace = ?self.grace,
                            "jobs still running after shutdown.grace; they go back to the queue unacked"
                        );
                    }
                    _ = self.force.cancelled() => {
                        self.set(Progress::Forced);
                        tracing::warn!(
                            unfinished = self.jobs.len(),
                            "stopping at once; unfinished jobs go back to the queue unacked"
                        );
                    }
                }
                // Whatever has not started sending must not start now: it goes back to the queue.
                self.abandon.cancel();
                if self.progress() == Progress::Draining {
                    self.set(Progress::Drained);
                }
            })
            .await;
    }

    /// After a drain that did not end with every job done (its grace ran out, or a second
    /// signal came): waits for `settling`, the jobs past their send that give up their receipt
    /// now and ack, so that those acks go out before the channel is closed. At most
    /// `LAST_ACKS`, or `LAST_ACKS_FORCED` after a second signal.
    pub async fn last_acks(&self, settling: &TaskTracker) {
        let forced = self.force.is_cancelled();
        if !forced && !self.grace_ran_out.load(Ordering::Relaxed) {
            return;
        }
        settling.close();
        let window = if forced { LAST_ACKS_FORCED } else { LAST_ACKS };
        tokio::select! {
            () = settling.wait() => {}
            () = tokio::time::sleep(window) => {}
            // A second signal during the longer moment: the shorter one, from now.
            () = self.force.cancelled(), if !forced => {
                let _ = tokio::time::timeout(LAST_ACKS_FORCED, settling.wait()).await;
            }
        }
    }

    fn set(&self, progress: Progress) {
        self.progress.store(progress as u8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn shutdown(grace: Duration) -> (Arc<Shutdown>, CancellationToken, CancellationToken) {
        let requested = CancellationToken::new();
        let force = CancellationToken::new();
        let s = Shutdown::new(requested.clone(), force.clone(), grace);
        (Arc::new(s), requested, force)
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_the_jobs_and_runs_once() {
        let (s, requested, _force) = shutdown(Duration::from_secs(30));
        let finished = Arc::new(AtomicUsize::new(0));
        for secs in [1, 2] {
            let finished = finished.clone();
            s.spawn_job(async move {
                tokio::time::sleep(Duration::from_secs(secs)).await;
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        requested.cancel();
        let started = tokio::time::Instant::now();
        // Two drains at once, and one after: the jobs are waited for once, by the first.
        tokio::join!(s.drain(), s.drain());
        assert_eq!(finished.load(Ordering::SeqCst), 2);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(s.progress(), Progress::Drained);
        let again = tokio::time::Instant::now();
        s.drain().await;
        assert_eq!(again.elapsed(), Duration::ZERO);
        assert!(s.abandon_token().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn grace_over_abandons_the_jobs_that_have_not_started_sending() {
        let (s, _requested, _force) = shutdown(Duration::from_secs(5));
        let abandon = s.abandon_token();
        s.spawn_job(async { tokio::time::sleep(Duration::from_secs(60)).await });
        let started = tokio::time::Instant::now();
        assert!(!abandon.is_cancelled());
        s.drain().await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(abandon.is_cancelled(), "a job not yet sending gives up");
        assert_eq!(s.progress(), Progress::Forced);
        assert_eq!(s.jobs.len(), 1, "the long job was left to the broker");
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_grace_the_settling_jobs_get_a_moment_for_their_acks() {
        let (s, _requested, _force) = shutdown(Duration::from_secs(5));
        let settling = TaskTracker::new();
        let drain_over = s.drain_over();
        let acked = Arc::new(AtomicUsize::new(0));
        let counter = acked.clone();
        let token = settling.token();
        // A job waiting for its receipt until the grace is over, then acking.
        s.spawn_job(async move {
            drain_over.cancelled().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            counter.fetch_add(1, Ordering::Relaxed);
            drop(token);
        });
        // And one still in its send: not waited for beyond the moment.
        s.spawn_job(async { tokio::time::sleep(Duration::from_secs(60)).await });
        let started = tokio::time::Instant::now();
        s.drain().await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        s.last_acks(&settling).await;
        assert_eq!(started.elapsed(), Duration::from_millis(5010));
        assert_eq!(
            acked.load(Ordering::Relaxed),
            1,
            "its ack came before the channel closed"
        );

        // A second signal: the shorter moment.
        let (forced, _requested, force) = shutdown(Duration::from_secs(5));
        let stuck = TaskTracker::new();
        let _held = stuck.token();
        force.cancel();
        forced.drain().await;
        let before = tokio::time::Instant::now();
        forced.last_acks(&stuck).await;
        assert_eq!(before.elapsed(), LAST_ACKS_FORCED);

        // Nothing settling: no wait at all. A drain that did not run out: no wait either.
        let before = tokio::time::Instant::now();
        let idle = TaskTracker::new();
        s.last_acks(&idle).await;
        let (drained, _requested, _force) = shutdown(Duration::from_secs(5));
        drained.drain().await;
        let busy = TaskTracker::new();
        let _busy = busy.token();
        drained.last_acks(&busy).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn force_ends_the_drain_at_once() {
        let (s, _requested, force) = shutdown(Duration::from_secs(30));
        s.spawn_job(async { tokio::time::sleep(Duration::from_secs(60)).await });
        let drain = {
            let s = s.clone();
            tokio::spawn(async move { s.drain().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(s.progress(), Progress::Draining);
        force.cancel();
        drain.await.expect("drain ended");
        assert_eq!(s.progress(), Progress::Forced);
        assert!(s.abandon_token().is_cancelled());
    }
}
