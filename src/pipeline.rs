//! One delivery, top to bottom: decode → build → send → decide → settle. Every delivery is
//! settled exactly once, whatever happens, a panic included.

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span, field};

use crate::amqp::{FailureHeaders, Publisher, Topology, attempts_made, republish_properties};
use crate::job::{self, Limits};
use crate::message::{self, MessageDefaults};
use crate::metrics::Metrics;
use crate::policy::{Decision, ErrorKind, Outcome, Schedule};
use crate::smtp::{FailureClass, Relay};

/// Pause before handing a job back when its retry or dead letter could not be published, so
/// that a broker refusing publishes is not hammered by the same jobs in a tight loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// What every job needs, shared by all of them.
pub struct Worker {
    pub relay: Relay,
    pub publisher: Publisher,
    pub topology: Topology,
    pub schedule: Schedule,
    pub limits: Limits,
    pub defaults: MessageDefaults,
    pub metrics: Arc<Metrics>,
    pub events: broadcast::Sender<JobEvent>,
    pub settled: RecentlySettled,
}

/// How a delivery was settled, for whoever listens (tests, tools). Sending costs next to
/// nothing when nobody listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// The job's `id`, else the AMQP message id.
    pub job_id: Option<String>,
    /// The attempt this was, 1-based.
    pub attempt: u32,
    pub outcome: JobOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Delivered,
    /// Republished to a retry queue (confirmed) and acked.
    Retried,
    /// Republished to the dead-letter queue (confirmed) and acked.
    DeadLettered(ErrorKind),
    /// Handed back to the work queue because the republish was not confirmed.
    Requeued,
    /// Stopped before sending; the broker delivers it again.
    Abandoned,
    /// A redelivery of a delivery this worker had settled but could not ack: acked, not sent.
    AlreadyHandled,
}

/// How one attempt ended.
enum Attempt {
    Delivered {
        relay_reply: String,
    },
    Failed {
        outcome: Outcome,
        error: String,
        smtp_code: Option<u16>,
    },
    /// Stopped before sending; not to be settled.
    Abandoned,
}

impl Attempt {
    fn invalid(reason: impl ToString) -> Self {
        Attempt::Failed {
            outcome: Outcome::Invalid,
            error: reason.to_string(),
            smtp_code: None,
        }
    }
}

impl Worker {
    /// Handles one delivery to the end: it is acked, or republished then acked, or handed back.
    /// `abandon` is cancelled when the delivery can no longer be settled (its channel is gone, or
    /// the shutdown grace is over): a job that has not yet sent its message then stops, and the
    /// broker delivers it again, instead of it being sent now and again after redelivery.
    pub async fn handle(self: Arc<Self>, delivery: Delivery, abandon: CancellationToken) {
        self.metrics.jobs_received.inc();
        self.metrics.jobs_in_flight.inc();
        let attempts_before = attempts_made(&delivery.properties);
        let mut job_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_string());
        let span = tracing::info_span!(
            "job",
            job_id = job_id.as_deref().unwrap_or("-"),
            attempt = attempts_before + 1,
            outcome = field::Empty,
        );
        async {
            let key = settle_key(&delivery.data, attempts_before);
            let settled = if delivery.redelivered && self.settled.contains(key) {
                // We handled this very delivery and its ack was lost with the connection:
                // sending it again would only make a duplicate.
                self.metrics.jobs_redelivered.inc();
                self.metrics.duplicates_avoided.inc();
                tracing::info!(
                    outcome = "already-handled",
                    "redelivered after a lost ack; this worker had already handled it: acked \
                     without sending again"
                );
                self.ack(&delivery).await;
                JobOutcome::AlreadyHandled
            } else {
                if delivery.redelivered {
                    // Its earlier handling (elsewhere, or before a restart) may have reached the
                    // relay; the stable Message-ID lets receivers drop the copy.
                    self.metrics.jobs_redelivered.inc();
                    tracing::info!("redelivered by the broker: it may have been sent before");
                }
                // Boxed: the send's state machine is kilobytes, and a task's future is copied
                // several times when spawned; this way the task keeps only a pointer.
                let attempt = Box::pin(self.attempt(&delivery.data, &mut job_id, &abandon));
                let attempt = match guarded(attempt).await {
                    Ok(attempt) => attempt,
                    // A bug must cost this job an attempt, not the worker its life.
                    Err(panic) => Attempt::Failed {
                        outcome: Outcome::Transient,
                        error: format!("internal error while handling the job: {panic}"),
                        smtp_code: None,
                    },
                };
                let settled = Box::pin(self.settle(&delivery, attempts_before, attempt)).await;
                if matches!(
                    settled,
                    JobOutcome::Delivered | JobOutcome::Retried | JobOutcome::DeadLettered(_)
                ) {
                    self.settled.insert(key);
                }
                settled
            };
            Span::current().record("outcome", outcome_name(settled));
            let _ = self.events.send(JobEvent {
                job_id,
                attempt: attempts_before + 1,
                outcome: settled,
            });
        }
        .instrument(span)
        .await;
        self.metrics.jobs_in_flight.dec();
    }

    async fn attempt(
        &self,
        body: &[u8],
        job_id: &mut Option<String>,
        abandon: &CancellationToken,
    ) -> Attempt {
        let job = match job::decode(body, &self.limits) {
            Ok(job) => job,
            Err(invalid) => return Attempt::invalid(invalid),
        };
        if let Some(id) = &job.id {
            Span::current().record("job_id", id.as_str());
            *job_id = Some(id.clone());
        }
        let out = match message::build(&job, body, &self.defaults) {
            Ok(out) => out,
            Err(invalid) => return Attempt::invalid(invalid),
        };
        match self.relay.send(&out, abandon).await {
            Ok(accepted) => Attempt::Delivered {
                relay_reply: accepted.reply,
            },
            Err(error) => {
                let outcome = match error.class {
                    FailureClass::Abandoned => return Attempt::Abandoned,
                    FailureClass::Permanent => Outcome::Rejected,
                    FailureClass::Transient | FailureClass::Timeout => Outcome::Transient,
                    FailureClass::Auth => {
                        tracing::error!(
                            error = %error,
                            "the relay refused our authentication; check smtp.username and the \
                             password. Jobs are retried, not dead-lettered"
                        );
                        Outcome::Transient
                    }
                };
                Attempt::Failed {
                    outcome,
                    error: error.to_string(),
                    smtp_code: error.code,
                }
            }
        }
    }

    /// Settles the delivery exactly once and says how.
    async fn settle(
        &self,
        delivery: &Delivery,
        attempts_before: u32,
        attempt: Attempt,
    ) -> JobOutcome {
        let (outcome, error, smtp_code) = match attempt {
            Attempt::Abandoned => {
                tracing::info!(
                    outcome = "abandoned",
                    "stopped before sending; the broker will deliver the job again"
                );
                self.metrics.jobs_abandoned.inc();
                return JobOutcome::Abandoned;
            }
            Attempt::Delivered { relay_reply } => {
                tracing::info!(outcome = "delivered", %relay_reply, "delivered");
                self.metrics.jobs_delivered.inc();
                self.ack(delivery).await;
                return JobOutcome::Delivered;
            }
            Attempt::Failed {
                outcome,
                error,
                smtp_code,
            } => (outcome, error, smtp_code),
        };
        let (attempt, kind, queue, delay) = match self.schedule.decide(outcome, attempts_before) {
            // The schedule acks only deliveries; were that ever to change, the safe side is to
            // hand the job back rather than ack a failure.
            Decision::Ack => {
                tracing::error!(
                    "internal: a failed attempt was decided as delivered; handing it back"
                );
                self.requeue(delivery).await;
                return JobOutcome::Requeued;
            }
            Decision::Retry { attempt, delay } => match self.topology.retry_queue(delay) {
                Some(queue) => (attempt, ErrorKind::Transient, queue, Some(delay)),
                None => {
                    // Cannot happen: the retry queues are made from the same schedule.
                    tracing::error!(
                        ?delay,
                        "no retry queue for this delay; handing the job back"
                    );
                    self.requeue(delivery).await;
                    return JobOutcome::Requeued;
                }
            },
            Decision::DeadLetter { attempt, kind } => (
                attempt,
                kind,
                self.topology.dead_letter_queue.as_str(),
                None,
            ),
        };
        let failure = FailureHeaders {
            attempt,
            kind,
            last_error: error.clone(),
            smtp_code,
            failed_at: SystemTime::now(),
        };
        let properties = republish_properties(&delivery.properties, &failure);
        if let Err(publish_error) =
            Box::pin(
                self.publisher
                    .publish("", queue, &delivery.data, properties),
            )
            .await
        {
            tracing::error!(
                %publish_error, %error, queue,
                "could not publish the job to {queue}; handing it back to the work queue"
            );
            self.requeue(delivery).await;
            return JobOutcome::Requeued;
        }
        let settled = match delay {
            Some(delay) => {
                tracing::warn!(
                    outcome = "retry",
                    smtp_code,
                    retry_in = %crate::config::duration::format(delay),
                    queue,
                    %error,
                    "attempt failed; retrying later"
                );
                self.metrics.retried(attempt);
                JobOutcome::Retried
            }
            None => {
                tracing::error!(
                    outcome = kind.as_str(),
                    smtp_code,
                    queue,
                    reason = %error,
                    "job dead-lettered"
                );
                self.metrics.dead_lettered(kind);
                JobOutcome::DeadLettered(kind)
            }
        };
        self.ack(delivery).await;
        settled
    }

    async fn ack(&self, delivery: &Delivery) {
        match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            // The channel this came on is gone: the broker will deliver the job again.
            Ok(false) | Err(_) => {
                self.metrics.possible_duplicates.inc();
                tracing::warn!(
                    "could not ack: the broker connection was lost after the job was handled; \
                     the broker will redeliver it (a possible duplicate)"
                );
            }
        }
    }

    async fn requeue(&self, delivery: &Delivery) {
        self.metrics.jobs_requeued.inc();
        tokio::time::sleep(REQUEUE_PAUSE).await;
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        // If this fails too, the channel is gone and the broker requeues the job by itself.
        let _ = delivery.acker.nack(options).await;
    }
}

fn outcome_name(outcome: JobOutcome) -> &'static str {
    match outcome {
        JobOutcome::Delivered => "delivered",
        JobOutcome::Retried => "retry",
        JobOutcome::DeadLettered(kind) => kind.as_str(),
        JobOutcome::Requeued => "requeued",
        JobOutcome::Abandoned => "abandoned",
        JobOutcome::AlreadyHandled => "already-handled",
    }
}

/// Identifies a delivery: the job's bytes and the attempt. Retries and replays are other
/// deliveries (another attempt header or none); a broker redelivery is the same. XXH3: fast on
/// every job's body, and 64 bits make a false match (a skipped job) vanishingly unlikely among
/// the few thousand deliveries remembered.
fn settle_key(body: &[u8], attempts_before: u32) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(body, u64::from(attempts_before))
}

/// The deliveries this worker settled lately, so that a redelivery after a lost ack is not sent
/// twice. Bounded: the oldest are forgotten first.
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

    fn lock(&self) -> std::sync::MutexGuard<'_, (HashSet<u64>, VecDeque<u64>)> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn contains(&self, key: u64) -> bool {
        self.lock().0.contains(&key)
    }

    fn insert(&self, key: u64) {
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

/// Runs `future`, turning a panic inside it into an error with the panic's message.
pub async fn guarded<T>(future: impl std::future::Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|panic| {
            if let Some(text) = panic.downcast_ref::<&str>() {
                (*text).to_string()
            } else if let Some(text) = panic.downcast_ref::<String>() {
                text.clone()
            } else {
                "panic".to_string()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_error_with_its_message() {
        let id = 7;
        let result = guarded(async move {
            if id == 7 {
                panic!("job {id} broke the builder");
            }
            1
        })
        .await;
        assert_eq!(result, Err("job 7 broke the builder".to_string()));
        assert_eq!(guarded(async { 2 }).await, Ok(2));
    }
}
