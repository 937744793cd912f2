//! One attempt at a job: decode → build → send. It works on the body and the [`DeliveryMeta`]
//! read at the edge, never on AMQP properties, and says how it ended; what to do about that is
//! `settle`'s decision.

use std::time::SystemTime;

use lettre::address::Envelope;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use super::context::{JobContext, Lane};
use super::delivery::DeliveryMeta;
use super::receipt::Facts;
use super::settle;
use crate::job;
use crate::message;
use crate::policy::Failure;
use crate::smtp::{Abandoned, Attempted, EnhancedCode, JobMeaning, SendError, Sent};

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempt {
    /// The relay answered for each recipient: some, all or none took the message.
    Sent { sent: Sent, relay: String },
    /// Nothing was sent (or, ambiguous, nobody knows).
    Failed(Failed),
    /// Stopped before sending, because the delivery can no longer be settled: not to be settled.
    Abandoned,
}

/// Why an attempt failed, for the decision and the dead letter's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub failure: Failure,
    /// For the `last-error` header and the log: the relay's reply or our reason.
    pub error: String,
    pub smtp_code: Option<u16>,
    pub enhanced: Option<EnhancedCode>,
}

impl Attempt {
    pub fn failed(failure: Failure, reason: impl ToString) -> Self {
        Attempt::Failed(Failed {
            failure,
            error: reason.to_string(),
            smtp_code: None,
            enhanced: None,
        })
    }
}

/// Runs one attempt. Returns what it learnt of the job (its own `id` when the body could be
/// read that far, its Message-ID, recipients, relay: for the receipt), and how it ended.
pub async fn run(
    ctx: &JobContext,
    lane: &Lane,
    body: &[u8],
    meta: &DeliveryMeta,
    abandon: &CancellationToken,
) -> (Facts, Attempt) {
    let job = job::decode(body, &ctx.limits);
    let mut facts = Facts::default();
    match &job {
        Ok(job) => {
            facts.job_id = job.id.clone();
            facts.metadata = job.metadata.clone();
            facts.tags = job.tags.clone();
            facts.recipients = [&job.to, &job.cc, &job.bcc]
                .into_iter()
                .flatten()
                .map(|mailbox| mailbox.email.to_string())
                .collect();
            if let Some(list) = &meta.recipients {
                let listed: Vec<&str> = list.split(',').map(str::trim).collect();
                facts
                    .recipients
                    .retain(|known| listed.iter().any(|l| l.eq_ignore_ascii_case(known)));
            }
        }
        // An invalid job's receipt carries whatever id can be read.
        Err(_) if body.len() <= ctx.limits.max_job_bytes => facts.job_id = job::peek_id(body),
        Err(_) => {}
    }
    let id = facts.job_id.as_deref();
    Span::current().record("job_id", id.or(meta.message_id.as_deref()).unwrap_or("-"));
    if meta.redelivered {
        // Its earlier handling (elsewhere, or before a restart) may have reached the relay; the
        // stable Message-ID lets receivers drop the copy.
        lane.metrics.redelivered.inc();
        tracing::info!("redelivered by the broker: it may have been sent before");
    }
    let job = match job {
        Ok(job) => job,
        Err(invalid) => return (facts, Attempt::failed(Failure::Invalid, invalid)),
    };
    let attempt = send(ctx, lane, &job, body, meta, abandon, &mut facts).await;
    (facts, attempt)
}

async fn send(
    ctx: &JobContext,
    lane: &Lane,
    job: &job::Job,
    body: &[u8],
    meta: &DeliveryMeta,
    abandon: &CancellationToken,
    facts: &mut Facts,
) -> Attempt {
    let expired = settle::expired(
        job.not_after,
        meta.first_failed_at,
        ctx.max_age,
        SystemTime::now(),
    );
    if let Some(reason) = expired {
        return Attempt::failed(Failure::Expired, reason);
    }
    let mut out = match message::build(job, body, &ctx.defaults) {
        Ok(out) => out,
        Err(invalid) => return Attempt::failed(Failure::Invalid, invalid),
    };
    facts.message_id = Some(out.message_id.clone());
    if let Err(reason) = ctx.dkim.sign(&out.from_domain, &mut out.bytes) {
        // The key was good at start: the crypto library failing is no fault of the job.
        tracing::error!(%reason, "could not sign the message; it is retried, not sent unsigned");
        return Attempt::failed(Failure::Transient, reason);
    }
    if let Some(list) = &meta.recipients {
        match narrowed(&out.envelope, list) {
            Ok(envelope) => out.envelope = envelope,
            Err(reason) => return Attempt::failed(Failure::Invalid, reason),
        }
    }
    facts.recipients = out.envelope.to().iter().map(ToString::to_string).collect();
    let started = std::time::Instant::now();
    let Attempted { relay, result } = match ctx.transport.send(&out, abandon).await {
        Ok(attempted) => attempted,
        Err(Abandoned) => return Attempt::Abandoned,
    };
    facts.send_time = Some(started.elapsed());
    facts.relay = Some(relay.clone());
    match result {
        Ok(sent) => Attempt::Sent { sent, relay },
        Err(error) => Attempt::Failed(Failed {
            failure: failure_of(lane, &error, &relay),
            error: error.to_string(),
            smtp_code: error.code(),
            enhanced: error.enhanced(),
        }),
    }
}

/// What a failed send means for the job. The smtp module decided it where the failure was born;
/// here the operator is told about the two kinds that need their attention.
fn failure_of(lane: &Lane, error: &SendError, relay: &str) -> Failure {
    match error.verdict().job() {
        JobMeaning::Rejected => Failure::Rejected,
        JobMeaning::Retry => Failure::Transient,
        JobMeaning::Ambiguous => {
            lane.metrics.ambiguous.inc();
            tracing::warn!(
                relay = %relay,
                error = %error,
                "the message was sent but the relay's verdict never came: it may have been \
                 delivered"
            );
            Failure::Ambiguous
        }
        JobMeaning::Auth => {
            tracing::error!(
                relay = %relay,
                error = %error,
                "the relay refused our authentication; check the relay's user name and password \
                 (or, with xoauth2, the token's account and scope). Jobs are retried, not \
                 dead-lettered"
            );
            Failure::Transient
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(to: &[&str]) -> Envelope {
        let to = to.iter().map(|a| a.parse().expect("address")).collect();
        Envelope::new(Some("from@example.com".parse().expect("address")), to).expect("envelope")
    }

    #[test]
    fn the_recipients_header_narrows_but_never_adds() {
        let all = envelope(&["ann@example.com", "bob@example.com"]);
        let narrowed = narrowed(&all, " BOB@example.com ,").expect("bob is a recipient");
        assert_eq!(narrowed.to(), envelope(&["bob@example.com"]).to());
        let added = narrowed_err(&all, "eve@example.com");
        assert!(added.contains("not a recipient of the job"), "{added}");
        let none = narrowed_err(&all, " , ");
        assert!(none.contains("leaves no recipient"), "{none}");
    }

    fn narrowed_err(all: &Envelope, list: &str) -> String {
        narrowed(all, list).expect_err("refused")
    }
}
