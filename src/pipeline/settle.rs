//! Decide, then settle. [`plan`] is pure: from how the attempt ended, the attempts made before
//! it, the retry ladder and the clock, it computes one [`Settlement`]. [`apply`] carries it out
//! and takes the `Delivery` by value, so that a delivery cannot be settled twice.
//!
//! | attempt ended                          | settlement                                             |
//! |----------------------------------------|--------------------------------------------------------|
//! | every recipient took it                | `Ack`                                                  |
//! | some or all recipients refused         | `RepublishThenAck`: one republish per kind of refusal, |
//! |                                        | with only those recipients (`recipients` header)       |
//! | failed: transient/ambiguous, attempts left | `RepublishThenAck` to the retry queue of its delay |
//! | failed: rejected, invalid, expired, exhausted | `RepublishThenAck` to the dead-letter queue     |
//! | abandoned before sending               | `Abandon`: left to the broker                          |
//! | a redelivery this worker settled already | `AlreadyHandled`: ack, not sent again                |
//! | a stray copy (see below)               | `Stray`: ack, not sent                                 |
//!
//! A republish that the broker does not confirm hands the job back whole (nack with requeue),
//! never acked, so no refused recipient can be acked away unrecorded. The copies this settlement
//! published, and the unconfirmed one when it may have been stored all the same (its confirm was
//! lost, not refused), are then strays: the job lives on in its original. Each copy carries its
//! own `copy-id`; one that comes back to this worker is acked without sending. When receipts are on,
//! `Ack` and `RepublishThenAck` publish the receipt, confirmed, just before the ack; one that is
//! not confirmed is tried again with the outcome kept (the job is never sent again for it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;

use super::attempt::Attempt;
use super::context::{JobContext, JobOutcome, Lane};
use super::delivery::DeliveryMeta;
use super::receipt::{self, Receipt};
use crate::amqp::{FailureHeaders, PublishError, format_duration, republish_properties, rfc3339};
use crate::metrics::{RECEIPT_DROPPED_AT_STOP, RECEIPT_REFUSED_BY_REPLY_TO};
use crate::policy::{Decision, Failure, Schedule};
use crate::smtp::{EnhancedCode, Refusal, Sent};

/// Pause before handing a job back when its retry or dead letter could not be published, so
/// that a broker refusing publishes is not hammered by the same jobs in a tight loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// The longest an ack or a nack may take. On a connection that died under it, lapin may never
/// answer; a job must not hold its permit (and a redelivery waiting for it) for ever because of
/// that. Past this, the delivery is left to the broker, which redelivers it.
pub const ACK_WAIT: Duration = Duration::from_secs(5);

/// How a delivery is settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Every recipient has the message: ack.
    Ack(Delivered),
    /// Publish the republishes, each confirmed by the broker, then ack. When a publish is not
    /// confirmed, the job is handed back whole (nack with requeue) instead. Boxed: failures are
    /// the rare case, and a delivered job should not carry their size.
    RepublishThenAck(Box<Republishes>),
    /// A redelivery of a delivery this worker settled and could not ack: ack, do not send again.
    AlreadyHandled,
    /// A copy this worker republished for a job it then handed back whole: ack, do not send.
    Stray,
    /// Leave it unsettled: it was given up before sending because its channel is going away,
    /// and the broker delivers it again.
    Abandon,
}

/// What a failed or partial attempt publishes: at least one republish.
#[derive(Debug, Clone, PartialEq)]
pub struct Republishes {
    pub republish: Republish,
    /// The second kind of refusal of a partial delivery.
    pub also: Option<Republish>,
    /// Some recipients took the message (a partial delivery).
    pub delivered: Option<Delivered>,
}

impl Republishes {
    fn all(&self) -> impl Iterator<Item = &Republish> {
        std::iter::once(&self.republish).chain(&self.also)
    }

    /// How many refused recipients of this kind (for good, or for now) the republishes carry.
    fn refused(&self, permanent: bool) -> usize {
        self.all()
            .filter_map(|r| r.refused)
            .filter(|r| r.permanent == permanent)
            .map(|r| r.count)
            .sum()
    }
}

/// What the relay said when it took the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub relay: String,
    /// The relay's final reply, e.g. `250 2.0.0 Ok: queued as 4F1`.
    pub reply: Option<String>,
    /// How many recipients took it.
    pub recipients: usize,
}

/// One republish of the job: where, and with which headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Republish {
    pub to: Target,
    pub failure: FailureHeaders,
    /// For a partial delivery: which refusals this republish records, and how many.
    pub refused: Option<Refused>,
}

/// The queue a republish goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The retry queue of this delay.
    Retry(Duration),
    DeadLetter,
}

/// The refused recipients one republish carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// For good (5xx), or for now (4xx).
    pub permanent: bool,
    pub count: usize,
}

impl Settlement {
    /// What the settlement reports once carried out.
    pub fn outcome(&self) -> JobOutcome {
        match self {
            Settlement::Ack(_) => JobOutcome::Delivered,
            Settlement::RepublishThenAck(r) if r.delivered.is_some() => JobOutcome::PartlyDelivered,
            Settlement::RepublishThenAck(r) => match r.republish.to {
                Target::Retry(_) => JobOutcome::Retried,
                Target::DeadLetter => JobOutcome::DeadLettered(r.republish.failure.kind),
            },
            Settlement::AlreadyHandled | Settlement::Stray => JobOutcome::AlreadyHandled,
            Settlement::Abandon => JobOutcome::Abandoned,
        }
    }
}

/// The settlement of an attempt, given the delivery's metadata, the ladder and the time now.
pub fn plan(
    attempt: Attempt,
    meta: &DeliveryMeta,
    schedule: &Schedule,
    now: SystemTime,
) -> Settlement {
    let before = meta.attempts_before;
    match attempt {
        Attempt::Abandoned => Settlement::Abandon,
        Attempt::Sent { sent, relay } => split(sent, relay, before, schedule, now),
        Attempt::Failed(failed) => Settlement::RepublishThenAck(Box::new(Republishes {
            republish: republish(
                schedule.decide(failed.failure, before),
                failed.error,
                failed.smtp_code,
                None,
                now,
            ),
            also: None,
            delivered: None,
        })),
    }
}

/// The recipients that took the message have it; those refused for good are dead-lettered
/// alone, those refused for now retried alone, each group with the relay's replies. Every
/// refused group gets its republish: there is no path on which a refusal is dropped.
fn split(
    sent: Sent,
    relay: String,
    before: u32,
    schedule: &Schedule,
    now: SystemTime,
) -> Settlement {
    let (permanent, temporary): (Vec<Refusal>, Vec<Refusal>) =
        sent.refused.into_iter().partition(|r| r.permanent);
    let delivered = Delivered {
        relay,
        reply: sent.reply,
        recipients: sent.accepted.len(),
    };
    let group = |refusals: Vec<Refusal>, failure: Failure| {
        let first = refusals.first()?;
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
        let mut republish = republish(
            schedule.decide(failure, before),
            error,
            first.code,
            Some(list),
            now,
        );
        republish.refused = Some(Refused {
            permanent: failure == Failure::Rejected,
            count: refusals.len(),
        });
        Some(republish)
    };
    let partial = |delivered: Delivered| (delivered.recipients > 0).then_some(delivered);
    match (
        group(permanent, Failure::Rejected),
        group(temporary, Failure::Transient),
    ) {
        (None, None) => Settlement::Ack(delivered),
        (Some(republish), also) => Settlement::RepublishThenAck(Box::new(Republishes {
            republish,
            also,
            delivered: partial(delivered),
        })),
        (None, Some(republish)) => Settlement::RepublishThenAck(Box::new(Republishes {
            republish,
            also: None,
            delivered: partial(delivered),
        })),
    }
}

fn republish(
    decision: Decision,
    error: String,
    smtp_code: Option<u16>,
    recipients: Option<String>,
    now: SystemTime,
) -> Republish {
    let (attempt, kind, to) = match decision {
        Decision::Retry {
            attempt,
            delay,
            kind,
        } => (attempt, kind, Target::Retry(delay)),
        Decision::DeadLetter { attempt, kind } => (attempt, kind, Target::DeadLetter),
    };
    Republish {
        to,
        failure: FailureHeaders {
            attempt,
            kind,
            last_error: error,
            smtp_code,
            failed_at: now,
            recipients,
        },
        refused: None,
    }
}

/// Why the job must not be sent any more, if it must not: past the producer's `not_after`, or
/// `retry.max_age` after its first failure. Asked before sending; pure, with the clock passed in.
pub fn expired(
    not_after: Option<SystemTime>,
    first_failed_at: Option<SystemTime>,
    max_age: Option<Duration>,
    now: SystemTime,
) -> Option<String> {
    if let Some(not_after) = not_after
        && now > not_after
    {
        return Some(format!(
            "not sent: past the job's not_after ({})",
            rfc3339(not_after)
        ));
    }
    let (max_age, first) = (max_age?, first_failed_at?);
    (now.duration_since(first).ok()? > max_age).then(|| {
        format!(
            "not sent: first failed at {} and retry.max_age = {} has passed",
            rfc3339(first),
            format_duration(max_age)
        )
    })
}

/// Carries a settlement out, exactly once: the delivery is consumed. Logs and counts what was
/// done, and says how the delivery ended.
///
/// A `receipt` is published, and confirmed, after the republishes and before the ack. While it
/// is not confirmed the job stays unacked, and its outcome is kept: the mail is never sent again
/// because of a receipt. It is tried again until `drain_over` (the shutdown grace is over);
/// then the receipt is given up (logged whole, counted) and the job acked without it. Only when
/// that ack cannot be given either (the connection is gone) does the broker deliver the job
/// again: `ReceiptUnconfirmed`, a possible duplicate.
pub async fn apply(
    ctx: &JobContext,
    lane: &Lane,
    delivery: Delivery,
    settlement: Settlement,
    receipt: Option<Receipt>,
    drain_over: &CancellationToken,
) -> JobOutcome {
    let outcome = settlement.outcome();
    // Held to the end: a stop whose grace ran out waits a moment for this job's ack.
    let _settling = ctx.settling.token();
    match settlement {
        Settlement::Abandon => {
            tracing::info!(
                outcome = "abandoned",
                "stopped before sending; the broker will deliver the job again"
            );
            lane.metrics.abandoned.inc();
            // Neither acked nor nacked: its channel is closing, and the broker requeues it.
            drop(delivery);
            outcome
        }
        Settlement::AlreadyHandled => {
            lane.metrics.redelivered.inc();
            lane.metrics.duplicates_avoided.inc();
            tracing::info!(
                outcome = "already-handled",
                "redelivered after a lost ack; this worker had already handled it: acked \
                 without sending again"
            );
            let _acked = ack(lane, delivery).await;
            outcome
        }
        Settlement::Stray => {
            lane.metrics.duplicates_avoided.inc();
            tracing::info!(
                outcome = "already-handled",
                "a copy this worker republished although the broker did not confirm it, for a \
                 job it then handed back whole: the job lives on in its original, so this copy \
                 is acked without sending"
            );
            let _acked = ack(lane, delivery).await;
            outcome
        }
        Settlement::Ack(delivered) => {
            let (queue_id, enhanced_code) = reply_facts(delivered.reply.as_deref());
            tracing::info!(
                outcome = "delivered",
                relay = %delivered.relay,
                relay_reply = delivered.reply.as_deref(),
                queue_id,
                enhanced_code,
                "delivered"
            );
            lane.metrics.delivered.inc();
            let receipted = receipted(ctx, lane, receipt, drain_over).await;
            settled(ack(lane, delivery).await, receipted, outcome)
        }
        Settlement::RepublishThenAck(republishes) => {
            let mut published = Vec::new();
            for republish in republishes.all() {
                let copy_id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
                let result = publish(ctx, lane, &delivery, republish, &copy_id).await;
                let may_exist = result
                    .as_ref()
                    .map_or_else(PublishError::may_have_landed, |()| true);
                if may_exist && matches!(republish.to, Target::Retry(_)) {
                    published.push(copy_id);
                }
                if result.is_err() {
                    // Handed back whole: a retry copy that the broker holds would be the job a
                    // second time. Dead letters do not come back to the worker.
                    for copy_id in &published {
                        ctx.settled.insert_stray(copy_id);
                    }
                    if let Some(delivered) = &republishes.delivered {
                        tracing::error!(
                            relay = %delivered.relay,
                            "the refused recipients could not be recorded; the whole job goes \
                             back to the queue, so the recipients that took it will get it again"
                        );
                    }
                    return requeue(lane, delivery).await;
                }
            }
            for refused in republishes.all().filter_map(|r| r.refused) {
                let kind = if refused.permanent {
                    "permanent"
                } else {
                    "temporary"
                };
                lane.metrics.recipients_refused(kind, refused.count as u64);
            }
            // Even without its receipt, the job is acked once its republishes are confirmed:
            // left unacked, it would live on twice, here and in the queue it was republished to.
            let receipted = receipted(ctx, lane, receipt, drain_over).await;
            let acked = ack(lane, delivery).await;
            if let Some(delivered) = &republishes.delivered {
                let (queue_id, enhanced_code) = reply_facts(delivered.reply.as_deref());
                tracing::info!(
                    outcome = "partly-delivered",
                    relay = %delivered.relay,
                    delivered = delivered.recipients,
                    refused_for_good = republishes.refused(true),
                    refused_for_now = republishes.refused(false),
                    relay_reply = delivered.reply.as_deref(),
                    queue_id,
                    enhanced_code,
                    "delivered to some recipients; the refused ones are handled on their own"
                );
                lane.metrics.delivered.inc();
            }
            settled(acked, receipted, outcome)
        }
    }
}

/// The relay's queue id and the enhanced status code of its reply, for the log (`None`, which
/// leaves the field out of the line, when the reply has none).
fn reply_facts(reply: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(reply) = reply else {
        return (None, None);
    };
    (
        receipt::queue_id(reply),
        receipt::coded(reply).1.map(|code| code.to_string()),
    )
}

/// The enhanced status code of the reply a failure records, found after its basic code (the
/// error may start with the recipient it is about).
fn enhanced_code(failure: &FailureHeaders) -> Option<String> {
    let code = failure.smtp_code?;
    let text = &failure.last_error;
    text.find(&format!("{code} "))
        .and_then(|at| EnhancedCode::parse(code, &text[at + 4..]))
        .map(|code| code.to_string())
}

/// How a delivery that got as far as its ack ended: as planned, unless neither its receipt was
/// confirmed nor its ack given. Then the broker delivers it again, and the mail is sent again:
/// a possible duplicate, counted where the ack failed.
fn settled(acked: bool, receipted: bool, outcome: JobOutcome) -> JobOutcome {
    if acked || receipted {
        outcome
    } else {
        JobOutcome::ReceiptUnconfirmed
    }
}

/// Publishes one republish, as the copy `copy_id`, and waits for its confirm; logs and counts it
/// once confirmed. An error when the broker did not confirm it.
async fn publish(
    ctx: &JobContext,
    lane: &Lane,
    delivery: &Delivery,
    republish: &Republish,
    copy_id: &str,
) -> Result<(), PublishError> {
    let failure = &republish.failure;
    let queue = match republish.to {
        Target::Retry(delay) => lane.topology.retry_queue(delay),
        Target::DeadLetter => ctx.topology.dead_letter_queue.clone(),
    };
    let properties = republish_properties(&delivery.properties, failure, copy_id, lane.name());
    let publish = Box::pin(
        ctx.publisher
            .publish("", &queue, &delivery.data, properties),
    );
    if let Err(publish_error) = publish.await {
        let stored = if publish_error.may_have_landed() {
            "; the broker may have stored it all the same: if that copy comes back to this \
             worker, it is dropped, not sent"
        } else {
            ""
        };
        tracing::error!(
            %publish_error,
            error = %failure.last_error,
            queue = %queue,
            copy_id,
            "could not publish the job to {queue}; handing it back to the work queue{stored}"
        );
        return Err(publish_error);
    }
    // Fields without a value are left out of the line (tracing records no `None`).
    let recipients = failure.recipients.as_deref();
    let enhanced_code = enhanced_code(failure);
    match republish.to {
        Target::Retry(delay) => {
            tracing::warn!(
                outcome = "retry",
                kind = failure.kind.as_str(),
                smtp_code = failure.smtp_code,
                enhanced_code,
                retry_in = %format_duration(delay),
                queue = %queue,
                recipients,
                error = %failure.last_error,
                "attempt failed; retrying later"
            );
            lane.metrics.retried(failure.attempt);
        }
        Target::DeadLetter => {
            tracing::error!(
                outcome = failure.kind.as_str(),
                smtp_code = failure.smtp_code,
                enhanced_code,
                queue = %queue,
                recipients,
                reason = %failure.last_error,
                "job dead-lettered"
            );
            lane.metrics.dead_lettered(failure.kind);
        }
    }
    Ok(())
}

/// The first pause before a receipt is published again, and the longest.
const RECEIPT_RETRY_FIRST: Duration = Duration::from_millis(250);
const RECEIPT_RETRY_MAX: Duration = Duration::from_secs(5);

/// Publishes the receipt to the events exchange (routing key: the outcome) and to the job's
/// `reply_to` queue, each confirmed, trying again until both are. True once they are (or when
/// there is no receipt to publish); false when `drain_over` came first: the receipt is then given
/// up, written whole to the log, and counted.
///
/// A `reply_to` queue that refuses the receipt (the broker nacks it: a length limit with
/// `reject-publish`) is not waited for: it is the producer's queue, and a producer must not be
/// able to hold the worker's jobs. That copy is dropped and counted; the events exchange, the
/// operator's, is waited for.
async fn receipted(
    ctx: &JobContext,
    lane: &Lane,
    receipt: Option<Receipt>,
    drain_over: &CancellationToken,
) -> bool {
    let (Some(exchange), Some(receipt)) = (&ctx.receipts, receipt) else {
        return true;
    };
    let body = match serde_json::to_vec(&receipt) {
        Ok(body) => body,
        // Our own struct of strings and numbers: cannot fail. Were it to, holding the job for
        // ever would not help anyone.
        Err(e) => {
            tracing::error!(error = %e, "could not write the receipt; the job is acked without it");
            return true;
        }
    };
    let mut targets = vec![(exchange.as_str(), receipt.outcome)];
    match &receipt.reply_to {
        Some(queue) if ctx.topology.is_own_queue(queue) => reply_to_own_queue(queue),
        Some(queue) => targets.push(("", queue.as_str())),
        None => {}
    }
    let mut pause = RECEIPT_RETRY_FIRST;
    let mut tries = 0u32;
    loop {
        // Enabled before the publishes, so that a reconnect during them is not missed.
        let mut reattached = std::pin::pin!(ctx.publisher.reattached());
        reattached.as_mut().enable();
        let mut failure = None;
        while let Some(&(exchange, routing_key)) = targets.first() {
            let properties = receipt_properties(&receipt);
            let publish = ctx
                .publisher
                .publish_event(exchange, routing_key, &body, properties);
            match Box::pin(publish).await {
                Ok(()) => {
                    targets.remove(0);
                }
                Err(PublishError::Nacked) if exchange.is_empty() => {
                    reply_to_refused(lane, routing_key, &receipt);
                    targets.remove(0);
                }
                Err(e) => {
                    failure = Some((exchange, routing_key, e));
                    break;
                }
            }
        }
        let Some((exchange, routing_key, publish_error)) = failure else {
            lane.metrics.receipt_published(receipt.outcome);
            if tries > 0 && ctx.receipts_waiting.fetch_sub(1, Ordering::Relaxed) == 1 {
                tracing::info!("receipts are confirmed again; their jobs are acked");
            }
            return true;
        };
        tries += 1;
        lane.metrics.receipts_retried.inc();
        // Said once while receipts wait, by the first job to wait, not by each one.
        if tries == 1 && ctx.receipts_waiting.fetch_add(1, Ordering::Relaxed) == 0 {
            let to = if exchange.is_empty() {
                format!("the reply_to queue {routing_key}")
            } else {
                format!("the exchange {exchange}")
            };
            tracing::warn!(
                %publish_error,
                receipt_id = %receipt.receipt_id,
                "a receipt could not be published to {to}; its job is kept unacked, with its \
                 outcome, and the receipt tried again (the mail is not sent again); \
                 receipts_retried counts the tries"
            );
        }
        let gave_up = tokio::select! {
            () = tokio::time::sleep(pause) => false,
            // A reconnect: try again now, not at the end of the pause.
            () = &mut reattached => false,
            () = drain_over.cancelled() => true,
        };
        if gave_up {
            ctx.receipts_waiting.fetch_sub(1, Ordering::Relaxed);
            lane.metrics.receipt_dropped(RECEIPT_DROPPED_AT_STOP);
            tracing::error!(
                receipt_id = %receipt.receipt_id,
                receipt = %String::from_utf8_lossy(&body),
                "the shutdown grace is over with this receipt unconfirmed: it is given up (here \
                 in the log, whole) and its job acked without it, so that its mail is not sent \
                 again; receipts_dropped counts it"
            );
            return false;
        }
        pause = (pause * 2).min(RECEIPT_RETRY_MAX);
    }
}

/// Properties of a receipt: JSON, its own id as message id, the job's correlation id.
fn receipt_properties(receipt: &Receipt) -> BasicProperties {
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(receipt.receipt_id.as_str().into())
        .with_type("amqp-mailer.receipt".into())
        .with_app_id("amqp-mailer".into())
        .with_timestamp(timestamp);
    if let Some(id) = &receipt.correlation_id {
        properties = properties.with_correlation_id(id.as_str().into());
    }
    properties
}

/// Said once per process, then counted only: a producer that names a full queue as `reply_to`
/// would otherwise write a line per job.
static REPLY_TO_REFUSED_SAID: AtomicBool = AtomicBool::new(false);

/// Said once per process: a job whose `reply_to` names one of the worker's own queues.
static REPLY_TO_OWN_SAID: AtomicBool = AtomicBool::new(false);

/// The job's `reply_to` names the work queue, the dead-letter queue or a retry queue: its
/// receipt goes to the events exchange only, not there, where it would be taken for a job.
fn reply_to_own_queue(queue: &str) {
    if !REPLY_TO_OWN_SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            reply_to = queue,
            "a job's reply_to names one of this worker's own queues: its receipts are not sent \
             there (they would be taken for jobs), only to the events exchange. Said once"
        );
    }
}

/// The job's `reply_to` queue refused its receipt: that copy is dropped (the events exchange's
/// is not).
fn reply_to_refused(lane: &Lane, queue: &str, receipt: &Receipt) {
    lane.metrics.receipt_dropped(RECEIPT_REFUSED_BY_REPLY_TO);
    if !REPLY_TO_REFUSED_SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            reply_to = queue,
            receipt_id = %receipt.receipt_id,
            "the job's reply_to queue refused its receipt (full, with reject-publish): that \
             copy is dropped, not waited for. Said once; receipts_dropped{{reason=\"{}\"}} \
             counts the others",
            RECEIPT_REFUSED_BY_REPLY_TO
        );
    }
}

/// Acks the delivery; false (counted as a possible duplicate) when the ack could not be given:
/// the broker will deliver the job again.
async fn ack(lane: &Lane, delivery: Delivery) -> bool {
    match tokio::time::timeout(ACK_WAIT, delivery.acker.ack(BasicAckOptions::default())).await {
        Ok(Ok(true)) => true,
        // The channel this came on is gone: the broker will deliver the job again.
        Ok(Ok(false) | Err(_)) | Err(_) => {
            lane.metrics.possible_duplicates.inc();
            tracing::warn!(
                "could not ack: the broker connection was lost after the job was handled; the \
                 broker will redeliver it (a possible duplicate)"
            );
            false
        }
    }
}

async fn requeue(lane: &Lane, delivery: Delivery) -> JobOutcome {
    lane.metrics.requeued.inc();
    tokio::time::sleep(REQUEUE_PAUSE).await;
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    // If this fails too, the channel is gone and the broker requeues the job by itself.
    let _ = tokio::time::timeout(ACK_WAIT, delivery.acker.nack(options)).await;
    JobOutcome::Requeued
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lettre::Address;

    use super::*;
    use crate::amqp::Topology;
    use crate::config::{AmqpConfig, RetryConfig};
    use crate::pipeline::attempt::Failed;
    use crate::policy::ErrorKind;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Three attempts: waits of 100 ms and 200 ms, then exhausted.
    fn schedule() -> Schedule {
        Schedule::new(&RetryConfig {
            initial_delay: MS(100),
            multiplier: 2.0,
            max_delay: MS(1000),
            max_attempts: 3,
            max_age: None,
        })
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn meta(attempts_before: u32) -> DeliveryMeta {
        DeliveryMeta {
            attempts_before,
            ..DeliveryMeta::default()
        }
    }

    fn address(text: &str) -> Address {
        text.parse().expect("address")
    }

    fn refusal(to: &str, code: u16) -> Refusal {
        Refusal {
            recipient: address(to),
            code: Some(code),
            reply: format!("{code} {}.1.1 no", code / 100),
            permanent: code >= 500,
        }
    }

    fn sent(accepted: &[&str], refused: Vec<Refusal>) -> Attempt {
        Attempt::Sent {
            sent: Sent {
                reply: (!accepted.is_empty()).then(|| "250 2.0.0 queued as 4F1".to_string()),
                accepted: accepted.iter().map(|a| address(a)).collect(),
                refused,
            },
            relay: "main".into(),
        }
    }

    fn failed(failure: Failure) -> Attempt {
        Attempt::Failed(Failed {
            failure,
            error: "451 4.3.0 try later".into(),
            smtp_code: Some(451),
            enhanced: None,
        })
    }

    fn republishes(settlement: &Settlement) -> Vec<&Republish> {
        match settlement {
            Settlement::RepublishThenAck(r) => r.all().collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn every_failure_at_every_position_of_the_ladder() {
        use Failure::*;
        let retry = |ms| Some(Target::Retry(MS(ms)));
        let dead = Some(Target::DeadLetter);
        // (failure, attempts made before) → (target, error-kind, attempt header)
        let table = [
            (Transient, 0, retry(100), ErrorKind::Transient, 1),
            (Transient, 1, retry(200), ErrorKind::Transient, 2),
            (Transient, 2, dead, ErrorKind::Exhausted, 3),
            (Transient, 9, dead, ErrorKind::Exhausted, 10),
            (Ambiguous, 0, retry(100), ErrorKind::Ambiguous, 1),
            (Ambiguous, 1, retry(200), ErrorKind::Ambiguous, 2),
            (Ambiguous, 2, dead, ErrorKind::Exhausted, 3),
            (Rejected, 0, dead, ErrorKind::Rejected, 1),
            (Rejected, 2, dead, ErrorKind::Rejected, 3),
            (Invalid, 0, dead, ErrorKind::Invalid, 1),
            (Invalid, 1, dead, ErrorKind::Invalid, 2),
            (Expired, 0, dead, ErrorKind::Expired, 1),
            (Expired, 2, dead, ErrorKind::Expired, 3),
        ];
        for (failure, before, target, kind, attempt) in table {
            let settlement = plan(failed(failure), &meta(before), &schedule(), now());
            let row = format!("{failure:?} after {before}: {settlement:?}");
            let [republish] = republishes(&settlement)[..] else {
                panic!("one republish: {row}");
            };
            assert_eq!(Some(republish.to), target, "{row}");
            assert_eq!(republish.failure.kind, kind, "{row}");
            assert_eq!(republish.failure.attempt, attempt, "{row}");
            assert_eq!(republish.failure.last_error, "451 4.3.0 try later");
            assert_eq!(republish.failure.smtp_code, Some(451));
            assert_eq!(republish.failure.failed_at, now(), "the clock passed in");
            assert_eq!(republish.failure.recipients, None, "the whole job");
            let expected = match target {
                Some(Target::Retry(_)) => JobOutcome::Retried,
                _ => JobOutcome::DeadLettered(kind),
            };
            assert_eq!(settlement.outcome(), expected, "{row}");
        }
    }

    #[test]
    fn ambiguous_is_dead_lettered_when_the_policy_says_so() {
        let schedule = schedule().dead_letter_ambiguous(true);
        let settlement = plan(failed(Failure::Ambiguous), &meta(0), &schedule, now());
        assert_eq!(
            settlement.outcome(),
            JobOutcome::DeadLettered(ErrorKind::Ambiguous)
        );
    }

    #[test]
    fn taken_by_every_recipient_is_an_ack() {
        let settlement = plan(
            sent(&["a@example.com", "b@example.com"], vec![]),
            &meta(1),
            &schedule(),
            now(),
        );
        assert_eq!(
            settlement,
            Settlement::Ack(Delivered {
                relay: "main".into(),
                reply: Some("250 2.0.0 queued as 4F1".into()),
                recipients: 2,
            })
        );
        assert_eq!(settlement.outcome(), JobOutcome::Delivered);
    }

    #[test]
    fn a_partial_delivery_republishes_each_kind_of_refusal_with_only_its_recipients() {
        let attempt = sent(
            &["a@example.com"],
            vec![
                refusal("gone@example.com", 550),
                refusal("later@example.com", 450),
                refusal("never@example.com", 553),
            ],
        );
        let settlement = plan(attempt, &meta(0), &schedule(), now());
        assert_eq!(settlement.outcome(), JobOutcome::PartlyDelivered);
        let Settlement::RepublishThenAck(r) = &settlement else {
            panic!("republishes: {settlement:?}");
        };
        let (republish, Some(also), Some(delivered)) = (&r.republish, &r.also, &r.delivered) else {
            panic!("two republishes and a delivery: {settlement:?}");
        };
        assert_eq!((r.refused(true), r.refused(false)), (2, 1));
        assert_eq!(delivered.recipients, 1);
        assert_eq!(republish.to, Target::DeadLetter);
        assert_eq!(republish.failure.kind, ErrorKind::Rejected);
        assert_eq!(
            republish.failure.recipients.as_deref(),
            Some("gone@example.com,never@example.com")
        );
        assert_eq!(
            republish.failure.last_error,
            "gone@example.com: 550 5.1.1 no; never@example.com: 553 5.1.1 no"
        );
        assert_eq!(republish.failure.smtp_code, Some(550));
        assert_eq!(
            republish.refused,
            Some(Refused {
                permanent: true,
                count: 2
            })
        );
        assert_eq!(also.to, Target::Retry(MS(100)));
        assert_eq!(also.failure.kind, ErrorKind::Transient);
        assert_eq!(also.failure.attempt, 1);
        assert_eq!(
            also.failure.recipients.as_deref(),
            Some("later@example.com")
        );
        assert_eq!(also.failure.smtp_code, Some(450));
    }

    #[test]
    fn refused_for_now_on_the_last_attempt_is_exhausted_alone() {
        let attempt = sent(&["a@example.com"], vec![refusal("later@example.com", 450)]);
        let settlement = plan(attempt, &meta(2), &schedule(), now());
        let [republish] = republishes(&settlement)[..] else {
            panic!("one republish: {settlement:?}");
        };
        assert_eq!(republish.to, Target::DeadLetter);
        assert_eq!(republish.failure.kind, ErrorKind::Exhausted);
        assert_eq!(
            republish.failure.recipients.as_deref(),
            Some("later@example.com")
        );
        assert_eq!(settlement.outcome(), JobOutcome::PartlyDelivered);
    }

    #[test]
    fn refused_by_every_recipient_is_not_a_delivery() {
        let gone = plan(
            sent(&[], vec![refusal("gone@example.com", 550)]),
            &meta(0),
            &schedule(),
            now(),
        );
        assert_eq!(
            gone.outcome(),
            JobOutcome::DeadLettered(ErrorKind::Rejected)
        );
        let later = plan(
            sent(&[], vec![refusal("later@example.com", 421)]),
            &meta(0),
            &schedule(),
            now(),
        );
        assert_eq!(later.outcome(), JobOutcome::Retried);
        assert!(matches!(&later, Settlement::RepublishThenAck(r) if r.delivered.is_none()));
    }

    /// The state the issue forbids: an ack while a refused recipient is neither retried nor
    /// dead-lettered. Over every mix of taken and refused recipients and every position of the
    /// ladder, each refused recipient is in exactly one republish, and no taken one is.
    #[test]
    fn no_refused_recipient_is_ever_acked_away() {
        let everyone = [
            ("a1@example.com", 250),
            ("a2@example.com", 250),
            ("p1@example.com", 550),
            ("p2@example.com", 552),
            ("t1@example.com", 450),
            ("t2@example.com", 452),
        ];
        for mask in 1u32..(1 << everyone.len()) {
            for before in 0..4 {
                let chosen: Vec<_> = (0..everyone.len())
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| everyone[i])
                    .collect();
                let accepted: Vec<&str> = chosen
                    .iter()
                    .filter(|(_, c)| *c == 250)
                    .map(|(a, _)| *a)
                    .collect();
                let refused: Vec<Refusal> = chosen
                    .iter()
                    .filter(|(_, c)| *c != 250)
                    .map(|(a, c)| refusal(a, *c))
                    .collect();
                let expected: Vec<String> =
                    refused.iter().map(|r| r.recipient.to_string()).collect();
                let settlement = plan(sent(&accepted, refused), &meta(before), &schedule(), now());
                let mut recorded: Vec<String> = republishes(&settlement)
                    .iter()
                    .flat_map(|r| {
                        r.failure
                            .recipients
                            .as_deref()
                            .unwrap_or_default()
                            .split(',')
                            .map(str::to_string)
                            .collect::<Vec<_>>()
                    })
                    .collect();
                recorded.sort();
                let mut expected = expected;
                expected.sort();
                assert_eq!(
                    recorded, expected,
                    "{chosen:?} after {before}: {settlement:?}"
                );
                assert_eq!(
                    matches!(settlement, Settlement::Ack(_)),
                    expected.is_empty(),
                    "an ack only when nobody refused: {settlement:?}"
                );
            }
        }
    }

    /// Every retry the ladder can ask for has a declared queue to go to.
    #[test]
    fn every_retry_target_is_a_declared_queue() {
        let schedule = Schedule::new(&RetryConfig::default());
        let topology = Topology::new(&AmqpConfig::default(), &schedule)
            .lanes
            .remove(0);
        for before in 0..schedule.max_attempts() + 2 {
            let settlement = plan(failed(Failure::Transient), &meta(before), &schedule, now());
            for republish in republishes(&settlement) {
                if let Target::Retry(delay) = republish.to {
                    let queue = topology.retry_queue(delay);
                    assert!(
                        topology.retry_queues.iter().any(|(_, name)| *name == queue),
                        "{queue} is declared"
                    );
                }
            }
        }
    }

    #[test]
    fn abandoned_is_left_to_the_broker() {
        let settlement = plan(Attempt::Abandoned, &meta(1), &schedule(), now());
        assert_eq!(settlement, Settlement::Abandon);
        assert_eq!(settlement.outcome(), JobOutcome::Abandoned);
        assert_eq!(
            Settlement::AlreadyHandled.outcome(),
            JobOutcome::AlreadyHandled
        );
    }

    #[test]
    fn not_after_and_max_age_with_the_clock_passed_in() {
        let hour = Duration::from_secs(3600);
        let now = now();
        // not_after
        let past = expired(Some(now - hour), None, None, now).expect("past not_after");
        assert!(
            past.starts_with("not sent: past the job's not_after ("),
            "{past}"
        );
        assert_eq!(expired(Some(now + hour), None, None, now), None);
        assert_eq!(
            expired(Some(now), None, None, now),
            None,
            "at the instant is still in time"
        );
        // max_age, counted from the first failure
        let old = expired(None, Some(now - 2 * hour), Some(hour), now).expect("too old");
        assert!(old.contains("retry.max_age = 1h has passed"), "{old}");
        assert_eq!(expired(None, Some(now - hour / 2), Some(hour), now), None);
        assert_eq!(expired(None, None, Some(hour), now), None, "never failed");
        assert_eq!(
            expired(None, Some(now - 2 * hour), None, now),
            None,
            "no max_age"
        );
        assert_eq!(
            expired(None, Some(now + hour), Some(hour), now),
            None,
            "a first failure in the future (clock skew) is not an expiry"
        );
        // not_after wins over max_age
        let both =
            expired(Some(now - hour), Some(now - 2 * hour), Some(hour), now).expect("expired");
        assert!(both.contains("not_after"), "{both}");
    }
}
