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

use lettre::address::Envelope;

use crate::amqp::headers;
use crate::amqp::{
    FailureHeaders, Publisher, Topology, attempts_made, header_text, republish_properties, rfc3339,
};
use crate::job::{self, Limits};
use crate::message::{self, MessageDefaults};
use crate::metrics::{KindLabel, Metrics};
use crate::policy::{Decision, ErrorKind, Outcome, Schedule};
use crate::smtp::{FailureClass, Refusal, RelaySet, Sent};

/// Pause before handing a job back when its retry or dead letter could not be published, so
/// that a broker refusing publishes is not hammered by the same jobs in a tight loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// What every job needs, shared by all of them.
pub struct Worker {
    pub relays: RelaySet,
    pub publisher: Publisher,
    pub topology: Topology,
    pub schedule: Schedule,
    pub limits: Limits,
    pub defaults: MessageDefaults,
    /// `retry.max_age`: a job unsent this long after its first failure is not sent late.
    pub max_age: Option<Duration>,
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
    /// Delivered to some recipients; the others were retried or dead-lettered on their own.
    PartlyDelivered,
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
    /// The relay answered for each recipient: some, all or none took the message.
    Sent { sent: Sent, relay: String },
    /// Nothing was sent (or, ambiguous, nobody knows).
    Failed {
        outcome: Outcome,
        error: String,
        smtp_code: Option<u16>,
    },
    /// Stopped before sending; not to be settled.
    Abandoned,
}

impl Attempt {
    fn failed(outcome: Outcome, reason: impl ToString) -> Self {
        Attempt::Failed {
            outcome,
            error: reason.to_string(),
            smtp_code: None,
        }
    }
}

/// One republish a settlement needs: where, and with which headers.
struct Republish<'a> {
    queue: &'a str,
    failure: FailureHeaders,
    delay: Option<Duration>,
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
                let attempt = Box::pin(self.attempt(&delivery, &mut job_id, &abandon));
                let attempt = match guarded(attempt).await {
                    Ok(attempt) => attempt,
                    // A bug must cost this job an attempt, not the worker its life.
                    Err(panic) => Attempt::failed(
                        Outcome::Transient,
                        format!("internal error while handling the job: {panic}"),
                    ),
                };
                let settled = Box::pin(self.settle(&delivery, attempts_before, attempt)).await;
                if !matches!(settled, JobOutcome::Requeued | JobOutcome::Abandoned) {
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
        delivery: &Delivery,
        job_id: &mut Option<String>,
        abandon: &CancellationToken,
    ) -> Attempt {
        let body = &delivery.data;
        let job = match job::decode(body, &self.limits) {
            Ok(job) => job,
            Err(invalid) => return Attempt::failed(Outcome::Invalid, invalid),
        };
        if let Some(id) = &job.id {
            Span::current().record("job_id", id.as_str());
            *job_id = Some(id.clone());
        }
        if let Some(reason) = self.expired(&job, &delivery.properties) {
            return Attempt::failed(Outcome::Expired, reason);
        }
        let mut out = match message::build(&job, body, &self.defaults) {
            Ok(out) => out,
            Err(invalid) => return Attempt::failed(Outcome::Invalid, invalid),
        };
        if let Some(list) = header_text(&delivery.properties, headers::RECIPIENTS) {
            match narrowed(&out.envelope, &list) {
                Ok(envelope) => out.envelope = envelope,
                Err(reason) => return Attempt::failed(Outcome::Invalid, reason),
            }
        }
        let (result, relay) = self.relays.send(&out, abandon).await;
        match result {
            Ok(sent) => Attempt::Sent { sent, relay },
            Err(error) => {
                let outcome = match error.class {
                    FailureClass::Abandoned => return Attempt::Abandoned,
                    FailureClass::Permanent => Outcome::Rejected,
                    FailureClass::Transient | FailureClass::Timeout if error.is_ambiguous() => {
                        self.metrics.jobs_ambiguous.inc();
                        tracing::warn!(
                            relay = %relay,
                            error = %error,
                            "the message was sent but the relay's verdict never came: it may \
                             have been delivered"
                        );
                        Outcome::Ambiguous
                    }
                    FailureClass::Transient | FailureClass::Timeout => Outcome::Transient,
                    FailureClass::Auth => {
                        tracing::error!(
                            relay = %relay,
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

    /// Why the job must not be sent any more, if it must not: past the producer's `not_after`,
    /// or `retry.max_age` after its first failure.
    fn expired(&self, job: &job::Job, properties: &lapin::BasicProperties) -> Option<String> {
        let now = SystemTime::now();
        if let Some(not_after) = job.not_after
            && now > not_after
        {
            return Some(format!(
                "not sent: past the job's not_after ({})",
                rfc3339(not_after)
            ));
        }
        let max_age = self.max_age?;
        let first = header_text(properties, headers::FIRST_FAILED_AT)?;
        let first = humantime::parse_rfc3339_weak(&first).ok()?;
        (now.duration_since(first).ok()? > max_age).then(|| {
            format!(
                "not sent: first failed at {} and retry.max_age = {} has passed",
                rfc3339(first),
                crate::amqp::format_duration(max_age)
            )
        })
    }

    /// Settles the delivery exactly once and says how.
    async fn settle(
        &self,
        delivery: &Delivery,
        attempts_before: u32,
        attempt: Attempt,
    ) -> JobOutcome {
        match attempt {
            Attempt::Abandoned => {
                tracing::info!(
                    outcome = "abandoned",
                    "stopped before sending; the broker will deliver the job again"
                );
                self.metrics.jobs_abandoned.inc();
                JobOutcome::Abandoned
            }
            Attempt::Sent { sent, relay } if sent.refused.is_empty() => {
                tracing::info!(
                    outcome = "delivered",
                    relay = %relay,
                    relay_reply = sent.reply.as_deref().unwrap_or(""),
                    "delivered"
                );
                self.metrics.jobs_delivered.inc();
                self.ack(delivery).await;
                JobOutcome::Delivered
            }
            Attempt::Sent { sent, relay } => {
                self.settle_split(delivery, attempts_before, sent, &relay)
                    .await
            }
            Attempt::Failed {
                outcome,
                error,
                smtp_code,
            } => {
                let decision = self.schedule.decide(outcome, attempts_before);
                let Some(republish) = self.republish_for(decision, error, smtp_code, None) else {
                    // The schedule acks only deliveries; were that ever to change, the safe side
                    // is to hand the job back rather than ack a failure.
                    tracing::error!("internal: a failed attempt was decided as delivered");
                    self.requeue(delivery).await;
                    return JobOutcome::Requeued;
                };
                if !self.publish_all(delivery, &[republish]).await {
                    return JobOutcome::Requeued;
                }
                self.ack(delivery).await;
                match decision {
                    Decision::Retry { .. } => JobOutcome::Retried,
                    Decision::DeadLetter { kind, .. } => JobOutcome::DeadLettered(kind),
                    Decision::Ack => JobOutcome::Delivered,
                }
            }
        }
    }

    /// Some recipients refused: the taken ones have the message; those refused for good are
    /// dead-lettered alone, those refused for now retried alone (each with the relay's reply).
    async fn settle_split(
        &self,
        delivery: &Delivery,
        attempts_before: u32,
        sent: Sent,
        relay: &str,
    ) -> JobOutcome {
        let (permanent, temporary): (Vec<Refusal>, Vec<Refusal>) =
            sent.refused.into_iter().partition(|r| r.permanent);
        let mut republishes = Vec::new();
        let mut outcome = None;
        for (refusals, kind_outcome) in [
            (&permanent, Outcome::Rejected),
            (&temporary, Outcome::Transient),
        ] {
            if refusals.is_empty() {
                continue;
            }
            let decision = self.schedule.decide(kind_outcome, attempts_before);
            let error = refusals
                .iter()
                .map(|r| format!("{}: {}", r.recipient, r.reply))
                .collect::<Vec<_>>()
                .join("; ");
            let list = refusals
                .iter()
                .map(|r| r.recipient.to_string())
                .collect::<Vec<_>>()
                .join(",");
            if let Some(republish) =
                self.republish_for(decision, error, refusals[0].code, Some(list))
            {
                outcome.get_or_insert(match decision {
                    Decision::Retry { .. } => JobOutcome::Retried,
                    Decision::DeadLetter { kind, .. } => JobOutcome::DeadLettered(kind),
                    Decision::Ack => JobOutcome::Delivered,
                });
                republishes.push(republish);
            }
        }
        if !self.publish_all(delivery, &republishes).await {
            if !sent.accepted.is_empty() {
                tracing::error!(
                    relay = %relay,
                    "the refused recipients could not be recorded; the whole job goes back to \
                     the queue, so the recipients that took it will get it again"
                );
            }
            return JobOutcome::Requeued;
        }
        self.metrics
            .recipients_refused
            .get_or_create(&KindLabel { kind: "permanent" })
            .inc_by(permanent.len() as u64);
        self.metrics
            .recipients_refused
            .get_or_create(&KindLabel { kind: "temporary" })
            .inc_by(temporary.len() as u64);
        self.ack(delivery).await;
        if sent.accepted.is_empty() {
            return outcome.unwrap_or(JobOutcome::Requeued);
        }
        tracing::info!(
            outcome = "partly-delivered",
            relay = %relay,
            delivered = sent.accepted.len(),
            refused_for_good = permanent.len(),
            refused_for_now = temporary.len(),
            relay_reply = sent.reply.as_deref().unwrap_or(""),
            "delivered to some recipients; the refused ones are handled on their own"
        );
        self.metrics.jobs_delivered.inc();
        JobOutcome::PartlyDelivered
    }

    /// The republish a decision asks for, or `None` for an ack.
    fn republish_for(
        &self,
        decision: Decision,
        error: String,
        smtp_code: Option<u16>,
        recipients: Option<String>,
    ) -> Option<Republish<'_>> {
        let (attempt, kind, queue, delay) = match decision {
            Decision::Ack => return None,
            Decision::Retry {
                attempt,
                delay,
                kind,
            } => (
                attempt,
                kind,
                self.topology.retry_queue(delay)?,
                Some(delay),
            ),
            Decision::DeadLetter { attempt, kind } => (
                attempt,
                kind,
                self.topology.dead_letter_queue.as_str(),
                None,
            ),
        };
        Some(Republish {
            queue,
            failure: FailureHeaders {
                attempt,
                kind,
                last_error: error,
                smtp_code,
                failed_at: SystemTime::now(),
                recipients,
            },
            delay,
        })
    }

    /// Publishes every republish and waits for each confirm; on any failure the delivery is
    /// handed back (false). Logs and counts what was published.
    async fn publish_all(&self, delivery: &Delivery, republishes: &[Republish<'_>]) -> bool {
        for republish in republishes {
            let failure = &republish.failure;
            let properties = republish_properties(&delivery.properties, failure);
            let publish =
                Box::pin(
                    self.publisher
                        .publish("", republish.queue, &delivery.data, properties),
                );
            if let Err(publish_error) = publish.await {
                tracing::error!(
                    %publish_error,
                    error = %failure.last_error,
                    queue = republish.queue,
                    "could not publish the job to {}; handing it back to the work queue",
                    republish.queue
                );
                self.requeue(delivery).await;
                return false;
            }
            let recipients = failure.recipients.as_deref().unwrap_or("");
            match republish.delay {
                Some(delay) => {
                    tracing::warn!(
                        outcome = "retry",
                        kind = failure.kind.as_str(),
                        smtp_code = failure.smtp_code,
                        retry_in = %crate::amqp::format_duration(delay),
                        queue = republish.queue,
                        recipients,
                        error = %failure.last_error,
                        "attempt failed; retrying later"
                    );
                    self.metrics.retried(failure.attempt);
                }
                None => {
                    tracing::error!(
                        outcome = failure.kind.as_str(),
                        smtp_code = failure.smtp_code,
                        queue = republish.queue,
                        recipients,
                        reason = %failure.last_error,
                        "job dead-lettered"
                    );
                    self.metrics.dead_lettered(failure.kind);
                }
            }
        }
        true
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

/// The envelope narrowed to the `recipients` header: each listed address must be one of the
/// job's own recipients, so that the header cannot add one.
fn narrowed(envelope: &Envelope, list: &str) -> Result<Envelope, String> {
    let mut keep = Vec::new();
    for text in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let found = envelope
            .to()
            .iter()
            .find(|known| AsRef::<str>::as_ref(*known).eq_ignore_ascii_case(text))
            .ok_or_else(|| {
                format!("the recipients header names {text:?}, which is not a recipient of the job")
            })?;
        keep.push(found.clone());
    }
    Envelope::new(envelope.from().cloned(), keep)
        .map_err(|e| format!("the recipients header leaves no recipient: {e}"))
}

fn outcome_name(outcome: JobOutcome) -> &'static str {
    match outcome {
        JobOutcome::Delivered => "delivered",
        JobOutcome::PartlyDelivered => "partly-delivered",
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
