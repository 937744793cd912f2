//! One delivery, top to bottom: read its metadata at the edge → attempt (decode → build → send)
//! → plan the settlement → carry it out → tell. Every delivery is settled exactly once, whatever
//! happens, a panic included.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::FutureExt as _;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span, field};

use super::attempt::{self, Attempt};
use super::context::{JobContext, JobEvent};
use super::receipt::{self, Facts};
use super::recent::settle_key;
use super::settle::{self, Settlement};
use crate::amqp::{attempts_made, header_text, headers};
use crate::policy::Failure;

/// What the pipeline needs of a delivery's AMQP properties, read once where the delivery comes
/// in, so that no later stage reads AMQP headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryMeta {
    /// Attempts made before this one (our `attempt` header; 0 when absent).
    pub attempts_before: u32,
    /// When the job first failed (`first-failed-at`), for `retry.max_age`.
    pub first_failed_at: Option<SystemTime>,
    /// The `recipients` header: only these recipients are left to send to.
    pub recipients: Option<String>,
    /// The broker delivered it before: it may have been sent already.
    pub redelivered: bool,
    /// The AMQP message id, the job's name until its body says otherwise.
    pub message_id: Option<String>,
    /// The AMQP correlation id, echoed in receipts.
    pub correlation_id: Option<String>,
    /// The AMQP `reply_to`: the queue its receipts also go to.
    pub reply_to: Option<String>,
    /// The `copy-id` of a job this worker republished (to a retry queue).
    pub copy_id: Option<String>,
}

impl DeliveryMeta {
    /// The attempt this delivery is: one more than the header says were made, saturating (the
    /// header comes from outside).
    pub fn attempt(&self) -> u32 {
        self.attempts_before.saturating_add(1)
    }

    pub fn read(delivery: &Delivery) -> Self {
        let properties = &delivery.properties;
        Self {
            attempts_before: attempts_made(properties),
            first_failed_at: header_text(properties, headers::FIRST_FAILED_AT)
                .and_then(|text| humantime::parse_rfc3339_weak(&text).ok()),
            recipients: header_text(properties, headers::RECIPIENTS),
            redelivered: delivery.redelivered,
            message_id: properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_string()),
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|id| id.as_str().to_string()),
            reply_to: properties
                .reply_to()
                .as_ref()
                .map(|queue| queue.as_str().to_string())
                .filter(|queue| !queue.is_empty()),
            copy_id: header_text(properties, headers::COPY_ID),
        }
    }
}

/// Handles one delivery to the end: it is acked, or republished then acked, or handed back.
/// `abandon` is cancelled when the delivery can no longer be settled (its channel is gone, or
/// the shutdown grace is over): a job that has not yet sent its message then stops, and the
/// broker delivers it again, instead of it being sent now and again after redelivery.
/// `drain_over` is cancelled when the shutdown grace is over: a receipt still unconfirmed then
/// is given up (see `settle::apply`).
pub async fn handle(
    ctx: Arc<JobContext>,
    lane: usize,
    delivery: Delivery,
    abandon: CancellationToken,
    drain_over: CancellationToken,
) {
    let received = SystemTime::now();
    let lane = &ctx.lanes[lane];
    lane.metrics.received.inc();
    lane.metrics.in_flight.inc();
    let meta = DeliveryMeta::read(&delivery);
    // `job_id` is recorded once, when it is known: the job's own id from its body, else the
    // AMQP message id (recording a field twice would print it twice).
    let span = tracing::info_span!(
        "job",
        lane = lane.name(),
        job_id = field::Empty,
        attempt = meta.attempt(),
        outcome = field::Empty,
    );
    async {
        let key = settle_key(&delivery.data, meta.attempts_before);
        let handling = ctx.settled.begin(key);
        let mut job_id = meta.message_id.clone();
        // A copy this worker republished for a job it then handed back whole: the job lives
        // on in its original, and this copy would send it twice.
        let stray = meta
            .copy_id
            .as_deref()
            .is_some_and(|id| ctx.settled.is_stray(id));
        // A redelivery that arrives while an earlier copy is still being sent here (the
        // connection was lost under it) waits for that copy's outcome instead of sending again.
        // Only for earlier copies: two redelivered copies of one job waiting for each other
        // would hold their permits until the shutdown grace ran out.
        let abandoned = !stray
            && meta.redelivered
            && tokio::select! {
                _ = handling.wait_for_earlier() => false,
                _ = abandon.cancelled() => true,
            };
        let mut receipt = None;
        let settlement = if stray {
            job_id = peeked_id(&ctx, &delivery.data).or(job_id);
            Span::current().record("job_id", job_id.as_deref().unwrap_or("-"));
            Settlement::Stray
        } else if abandoned {
            job_id = peeked_id(&ctx, &delivery.data).or(job_id);
            Span::current().record("job_id", job_id.as_deref().unwrap_or("-"));
            Settlement::Abandon
        } else if meta.redelivered && ctx.settled.contains(key) {
            // We handled this very delivery and its ack was lost with the connection: sending
            // it again would only make a duplicate.
            job_id = peeked_id(&ctx, &delivery.data).or(job_id);
            Span::current().record("job_id", job_id.as_deref().unwrap_or("-"));
            Settlement::AlreadyHandled
        } else {
            // Boxed: the send's state machine is kilobytes, and a task's future is copied
            // several times when spawned; this way the task keeps only a pointer.
            let attempt = Box::pin(attempt::run(&ctx, lane, &delivery.data, &meta, &abandon));
            let (facts, attempt) = match guarded(attempt).await {
                Ok((facts, attempt)) => {
                    job_id = facts.job_id.clone().or(job_id);
                    (facts, attempt)
                }
                // A bug must cost this job an attempt, not the worker its life.
                Err(panic) => (
                    Facts::default(),
                    Attempt::failed(
                        Failure::Transient,
                        format!("internal error while handling the job: {panic}"),
                    ),
                ),
            };
            let answers = ctx
                .receipts
                .is_some()
                .then(|| receipt::answers(&attempt, &facts));
            let settled = SystemTime::now();
            let settlement = settle::plan(attempt, &meta, &ctx.schedule, settled);
            receipt = answers.and_then(|answers| {
                let times = receipt::Times { received, settled };
                let mut receipt = receipt::of(&settlement, answers, facts, &meta, times)?;
                receipt.lane = lane.name().map(str::to_string);
                Some(receipt)
            });
            settlement
        };
        let apply = settle::apply(&ctx, lane, delivery, settlement, receipt, &drain_over);
        let outcome = Box::pin(apply).await;
        // Not for a stray: its key is the next attempt's, which the job's real retry has too.
        if outcome.is_settled() && !stray {
            ctx.settled.insert(key);
        }
        // After the settlement is recorded, so that a redelivery waiting for it sees it.
        drop(handling);
        Span::current().record("outcome", outcome.name());
        // The job is done before anyone hears of it: a listener that reads the gauge after the
        // event must not count this job in flight.
        lane.metrics.in_flight.dec();
        let _ = ctx.events.send(JobEvent {
            job_id,
            attempt: meta.attempt(),
            outcome,
        });
    }
    .instrument(span)
    .await;
}

/// The job's own id from a body that is not decoded, within the job's size limits.
fn peeked_id(ctx: &JobContext, body: &[u8]) -> Option<String> {
    if body.len() > ctx.limits.max_job_bytes {
        return None;
    }
    crate::job::peek_id(body)
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
