//! One delivery, top to bottom: decode → build → send → decide → settle. Every delivery is
//! settled exactly once, whatever happens, a panic included.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
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
}

/// How one attempt ended.
struct Attempt {
    outcome: Outcome,
    error: Option<String>,
    smtp_code: Option<u16>,
    relay_reply: Option<String>,
}

impl Attempt {
    fn invalid(reason: impl ToString) -> Self {
        Self {
            outcome: Outcome::Invalid,
            error: Some(reason.to_string()),
            smtp_code: None,
            relay_reply: None,
        }
    }
}

impl Worker {
    /// Handles one delivery to the end: it is acked, or republished then acked, or handed back.
    pub async fn handle(self: Arc<Self>, delivery: Delivery) {
        self.metrics.jobs_received.inc();
        self.metrics.jobs_in_flight.inc();
        let attempts_before = attempts_made(&delivery.properties);
        let job_id = delivery
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
            let attempt = match guarded(self.attempt(&delivery.data)).await {
                Ok(attempt) => attempt,
                // A bug must cost this job an attempt, not the worker its life.
                Err(panic) => Attempt {
                    outcome: Outcome::Transient,
                    error: Some(format!("internal error while handling the job: {panic}")),
                    smtp_code: None,
                    relay_reply: None,
                },
            };
            let decision = self.schedule.decide(attempt.outcome, attempts_before);
            self.settle(&delivery, decision, attempt).await;
        }
        .instrument(span)
        .await;
        self.metrics.jobs_in_flight.dec();
    }

    async fn attempt(&self, body: &[u8]) -> Attempt {
        let job = match job::decode(body, &self.limits) {
            Ok(job) => job,
            Err(invalid) => return Attempt::invalid(invalid),
        };
        if let Some(id) = &job.id {
            Span::current().record("job_id", id.as_str());
        }
        let out = match message::build(&job, body, &self.defaults) {
            Ok(out) => out,
            Err(invalid) => return Attempt::invalid(invalid),
        };
        match self.relay.send(&out).await {
            Ok(accepted) => Attempt {
                outcome: Outcome::Delivered,
                error: None,
                smtp_code: None,
                relay_reply: Some(accepted.reply),
            },
            Err(error) => {
                let outcome = match error.class {
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
                Attempt {
                    outcome,
                    error: Some(error.to_string()),
                    smtp_code: error.code,
                    relay_reply: None,
                }
            }
        }
    }

    async fn settle(&self, delivery: &Delivery, decision: Decision, attempt: Attempt) {
        let span = Span::current();
        match decision {
            Decision::Ack => {
                span.record("outcome", "delivered");
                tracing::info!(
                    outcome = "delivered",
                    relay_reply = attempt.relay_reply.as_deref().unwrap_or(""),
                    "delivered"
                );
                self.metrics.jobs_delivered.inc();
                self.ack(delivery).await;
            }
            Decision::Retry {
                attempt: attempt_no,
                delay,
            } => {
                span.record("outcome", "retry");
                let Some(queue) = self.topology.retry_queue(delay) else {
                    // Cannot happen: the retry queues are made from the same schedule.
                    tracing::error!(
                        ?delay,
                        "no retry queue for this delay; handing the job back"
                    );
                    self.requeue(delivery).await;
                    return;
                };
                let error = attempt.error.unwrap_or_default();
                let failure = FailureHeaders {
                    attempt: attempt_no,
                    kind: ErrorKind::Transient,
                    last_error: error.clone(),
                    smtp_code: attempt.smtp_code,
                    failed_at: SystemTime::now(),
                };
                let properties = republish_properties(&delivery.properties, &failure);
                match self
                    .publisher
                    .publish("", queue, &delivery.data, properties)
                    .await
                {
                    Ok(()) => {
                        tracing::warn!(
                            outcome = "retry",
                            smtp_code = attempt.smtp_code,
                            retry_in = %crate::config::duration::format(delay),
                            queue,
                            %error,
                            "attempt failed; retrying later"
                        );
                        self.metrics.retried(attempt_no);
                        self.ack(delivery).await;
                    }
                    Err(publish_error) => {
                        tracing::error!(
                            %publish_error, %error,
                            "could not publish the retry; handing the job back to the work queue"
                        );
                        self.requeue(delivery).await;
                    }
                }
            }
            Decision::DeadLetter {
                attempt: attempt_no,
                kind,
            } => {
                span.record("outcome", kind.as_str());
                let error = attempt.error.unwrap_or_default();
                let failure = FailureHeaders {
                    attempt: attempt_no,
                    kind,
                    last_error: error.clone(),
                    smtp_code: attempt.smtp_code,
                    failed_at: SystemTime::now(),
                };
                let properties = republish_properties(&delivery.properties, &failure);
                let queue = self.topology.dead_letter_queue.as_str();
                match self
                    .publisher
                    .publish("", queue, &delivery.data, properties)
                    .await
                {
                    Ok(()) => {
                        tracing::error!(
                            outcome = kind.as_str(),
                            smtp_code = attempt.smtp_code,
                            queue,
                            reason = %error,
                            "job dead-lettered"
                        );
                        self.metrics.dead_lettered(kind);
                        self.ack(delivery).await;
                    }
                    Err(publish_error) => {
                        tracing::error!(
                            %publish_error, reason = %error,
                            "could not publish the dead letter; handing the job back to the work queue"
                        );
                        self.requeue(delivery).await;
                    }
                }
            }
        }
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
