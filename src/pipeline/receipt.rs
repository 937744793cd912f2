//! Receipts: what became of a job and of each of its recipients, for the producer. Built purely
//! from how the attempt ended and how it is settled ([`answers`], then [`of`]); published by
//! `settle::apply`, confirmed, before the job is acked.
//!
//! The format is versioned ([`VERSION`]), documented in the README and in
//! `schema/receipt.schema.json`. Every field is always present (`null` when it does not apply),
//! so that a consumer never has to guess. A receipt never holds the body, the subject, or any
//! header of the mail.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::attempt::Attempt;
use super::delivery::DeliveryMeta;
use super::settle::{Settlement, Target};
use crate::policy::ErrorKind;
use crate::smtp::EnhancedCode;

/// The receipt format's version, the `receipt_version` of every receipt. A new field keeps it; a
/// field removed or changed in meaning increments it.
pub const VERSION: u32 = 1;

/// One receipt, serialized as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Receipt {
    pub receipt_version: u32,
    /// Unique to this receipt (128 random bits, hex): a consumer that may see one twice dedupes
    /// on it.
    pub receipt_id: String,
    /// The routing key: `delivered`, `partly-delivered`, `deferred`, `ambiguous`,
    /// `failed.rejected`, `failed.invalid`, `failed.exhausted`, `failed.expired`,
    /// `failed.ambiguous`.
    pub outcome: &'static str,
    /// The job's `id`, when the body could be read that far.
    pub job_id: Option<String>,
    /// The mail's Message-ID, when it was built.
    pub message_id: Option<String>,
    /// The job's AMQP `message_id` property.
    pub amqp_message_id: Option<String>,
    /// The job's AMQP `correlation_id` property.
    pub correlation_id: Option<String>,
    /// This attempt, 1-based.
    pub attempt: u32,
    /// One entry per recipient this attempt was for.
    pub recipients: Vec<RecipientReceipt>,
    /// The relay the attempt went to, when it reached one.
    pub relay: Option<RelayReceipt>,
    /// Why the job (or some recipients) failed, when it did.
    pub reason: Option<Reason>,
    /// When the next attempt is due (RFC 3339), for a deferral.
    pub next_attempt_at: Option<String>,
    /// When this worker received the delivery (RFC 3339, UTC, milliseconds).
    pub received_at: String,
    /// When it was settled.
    pub settled_at: String,
    /// How long the SMTP send took, in milliseconds, when there was one.
    pub send_ms: Option<u64>,
    /// The job's `metadata`, echoed.
    pub metadata: BTreeMap<String, String>,
    /// The job's `tags`, echoed.
    pub tags: Vec<String>,
    /// The lane (`amqp.lanes`) the job came through; absent for a worker without lanes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// The job's AMQP `reply_to`: the receipt also goes there. Not part of the document.
    #[serde(skip)]
    pub reply_to: Option<String>,
}

/// What became of one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecipientReceipt {
    pub address: String,
    pub status: Status,
    /// The relay's reply code for this recipient, when there was one.
    pub smtp_code: Option<u16>,
    /// Its RFC 3463 enhanced status code, e.g. `5.1.1`.
    pub enhanced_code: Option<String>,
    /// The reply text, or our reason when no relay answered.
    pub reply: Option<String>,
}

/// A recipient's status. `delivered`, `bounced` and `failed` are terminal; `deferred` is retried
/// (a later receipt has its end); `unknown` is a send whose verdict never came (retried or
/// dead-lettered as ambiguous: it may have been delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Delivered,
    Deferred,
    Bounced,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayReceipt {
    /// The relay's name in the configuration.
    pub name: String,
    /// The relay's own queue id, from its final 250 reply (`queued as …`, `id=…`, `<…>`).
    pub queue_id: Option<String>,
    /// The relay's final reply, when it took the message.
    pub reply: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// `transient`, `rejected`, `invalid`, `exhausted`, `ambiguous`, `expired`: the dead letter's
    /// `error-kind`.
    pub kind: &'static str,
    /// The relay's reply or our reason, as in the `last-error` header.
    pub text: String,
}

/// What the attempt learnt of the job, beyond how it ended.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub job_id: Option<String>,
    pub message_id: Option<String>,
    /// The recipients this attempt was for (after the `recipients` header narrowed them).
    pub recipients: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub tags: Vec<String>,
    /// The relay the send went to.
    pub relay: Option<String>,
    /// How long the send took.
    pub send_time: Option<Duration>,
}

/// How one recipient was answered, before the settlement says what that means.
#[derive(Debug, Clone)]
pub struct Answer {
    address: String,
    said: Said,
    code: Option<u16>,
    enhanced: Option<EnhancedCode>,
    reply: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Said {
    Accepted,
    Refused {
        permanent: bool,
    },
    /// The whole job failed; the settlement says for how long.
    Whole,
}

/// Each recipient's answer in this attempt. Read before the attempt is planned (which consumes
/// it). The relay's final reply, when there is one.
pub fn answers(attempt: &Attempt, facts: &Facts) -> (Vec<Answer>, Option<String>) {
    match attempt {
        Attempt::Abandoned => (Vec::new(), None),
        Attempt::Sent { sent, .. } => {
            let (code, enhanced) = sent.reply.as_deref().map(coded).unwrap_or_default();
            let accepted = sent.accepted.iter().map(|address| Answer {
                address: address.to_string(),
                said: Said::Accepted,
                code,
                enhanced,
                reply: sent.reply.clone(),
            });
            let refused = sent.refused.iter().map(|refusal| Answer {
                address: refusal.recipient.to_string(),
                said: Said::Refused {
                    permanent: refusal.permanent,
                },
                code: refusal.code,
                enhanced: coded(&refusal.reply).1,
                reply: Some(refusal.reply.clone()),
            });
            (accepted.chain(refused).collect(), sent.reply.clone())
        }
        Attempt::Failed(failed) => {
            let answers = facts
                .recipients
                .iter()
                .map(|address| Answer {
                    address: address.clone(),
                    said: Said::Whole,
                    code: failed.smtp_code,
                    enhanced: failed.enhanced,
                    reply: Some(failed.error.clone()),
                })
                .collect();
            (answers, None)
        }
    }
}

/// The delivery's times, for the receipt.
#[derive(Debug, Clone, Copy)]
pub struct Times {
    pub received: SystemTime,
    pub settled: SystemTime,
}

/// The receipt of a settlement, or `None` when the settlement ends nothing (abandoned, or a
/// redelivery whose receipt was published already).
pub fn of(
    settlement: &Settlement,
    (answers, final_reply): (Vec<Answer>, Option<String>),
    facts: Facts,
    meta: &DeliveryMeta,
    times: Times,
) -> Option<Receipt> {
    let republishes = match settlement {
        Settlement::Ack(_) => None,
        Settlement::RepublishThenAck(r) => Some(r),
        Settlement::AlreadyHandled | Settlement::Stray | Settlement::Abandon => return None,
    };
    let outcome = match republishes {
        None => "delivered",
        Some(r) if r.delivered.is_some() => "partly-delivered",
        Some(r) => match (r.republish.to, r.republish.failure.kind) {
            (Target::Retry(_), ErrorKind::Ambiguous) => "ambiguous",
            (Target::Retry(_), _) => "deferred",
            (Target::DeadLetter, kind) => failed(kind),
        },
    };
    let all: Vec<_> = republishes
        .map(|r| std::iter::once(&r.republish).chain(&r.also).collect())
        .unwrap_or_default();
    // Where the recipients refused for now went: retried, or dead-lettered as exhausted.
    let for_now = all
        .iter()
        .find(|r| r.refused.is_some_and(|refused| !refused.permanent))
        .map(|r| r.to);
    let whole = all.first().map(|r| (r.to, r.failure.kind));
    let recipients = answers
        .into_iter()
        .map(|answer| RecipientReceipt {
            status: match answer.said {
                Said::Accepted => Status::Delivered,
                Said::Refused { permanent: true } => Status::Bounced,
                Said::Refused { permanent: false } => match for_now {
                    Some(Target::DeadLetter) => Status::Failed,
                    _ => Status::Deferred,
                },
                Said::Whole => match whole {
                    Some((_, ErrorKind::Ambiguous)) => Status::Unknown,
                    Some((Target::Retry(_), _)) => Status::Deferred,
                    Some((Target::DeadLetter, ErrorKind::Rejected)) => Status::Bounced,
                    _ => Status::Failed,
                },
            },
            address: answer.address,
            smtp_code: answer.code,
            enhanced_code: answer.enhanced.map(|code| code.to_string()),
            reply: answer.reply,
        })
        .collect();
    let next_attempt_at = all.iter().find_map(|r| match r.to {
        Target::Retry(delay) => Some(timestamp(times.settled + delay)),
        Target::DeadLetter => None,
    });
    let reason = all.first().map(|r| Reason {
        kind: r.failure.kind.as_str(),
        text: r.failure.last_error.clone(),
    });
    let relay = facts.relay.map(|name| RelayReceipt {
        name,
        queue_id: final_reply.as_deref().and_then(queue_id),
        reply: final_reply,
    });
    Some(Receipt {
        receipt_version: VERSION,
        receipt_id: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        outcome,
        job_id: facts.job_id,
        message_id: facts.message_id,
        amqp_message_id: meta.message_id.clone(),
        correlation_id: meta.correlation_id.clone(),
        attempt: meta.attempt(),
        recipients,
        relay,
        reason,
        next_attempt_at,
        received_at: timestamp(times.received),
        settled_at: timestamp(times.settled),
        send_ms: facts
            .send_time
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        metadata: facts.metadata,
        tags: facts.tags,
        lane: None,
        reply_to: meta.reply_to.clone(),
    })
}

/// The routing key of a job dead-lettered for this reason.
fn failed(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Rejected => "failed.rejected",
        ErrorKind::Invalid => "failed.invalid",
        ErrorKind::Exhausted => "failed.exhausted",
        ErrorKind::Expired => "failed.expired",
        ErrorKind::Ambiguous => "failed.ambiguous",
        // A transient failure is dead-lettered as exhausted; named for completeness.
        ErrorKind::Transient => "failed.transient",
    }
}

/// Every routing key a receipt may have.
pub const OUTCOMES: [&str; 10] = [
    "delivered",
    "partly-delivered",
    "deferred",
    "ambiguous",
    "failed.rejected",
    "failed.invalid",
    "failed.exhausted",
    "failed.expired",
    "failed.ambiguous",
    "failed.transient",
];

fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The basic and enhanced codes a reply such as `250 2.0.0 Ok` opens with.
pub(crate) fn coded(reply: &str) -> (Option<u16>, Option<EnhancedCode>) {
    let Some(code) = reply
        .get(..3)
        .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse::<u16>().ok())
        // A reply code is 2xx to 5xx (RFC 5321 4.2); anything else is no code.
        .filter(|code| (200..600).contains(code))
    else {
        return (None, None);
    };
    let rest = reply.get(4..).unwrap_or("");
    (Some(code), EnhancedCode::parse(code, rest))
}

/// The relay's own queue id in its final reply, in the common forms: Postfix's
/// `queued as 4F7A2B`, `id=1abc-2def` (Exim, many services), or a `<…>` message id (Amazon SES,
/// Mailgun). `None` when the reply gives none.
pub fn queue_id(reply: &str) -> Option<String> {
    let lower = reply.to_ascii_lowercase();
    let word = |from: usize| {
        let id: String = reply[from..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        let id = id.trim_end_matches(['.', ',', ';', ')']);
        (!id.is_empty() && id.len() <= 256).then(|| id.to_string())
    };
    if let Some(at) = lower.find("queued as ") {
        return word(at + "queued as ".len());
    }
    if let Some(at) = lower.find("id=") {
        return word(at + "id=".len());
    }
    let open = reply.find('<')?;
    let close = reply[open..].find('>')? + open;
    let id = &reply[open + 1..close];
    (!id.is_empty() && id.len() <= 256 && !id.contains(char::is_whitespace)).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use crate::pipeline::attempt::Failed;
    use crate::pipeline::settle::plan;
    use crate::policy::{Failure, Schedule};
    use crate::smtp::{Refusal, Sent};

    fn schedule() -> Schedule {
        Schedule::new(&RetryConfig {
            initial_delay: Duration::from_secs(10),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            max_attempts: 3,
            max_age: None,
        })
    }

    fn facts() -> Facts {
        Facts {
            job_id: Some("j-1".into()),
            recipients: vec!["a@example.com".into(), "b@example.com".into()],
            relay: Some("main".into()),
            ..Facts::default()
        }
    }

    /// The receipt of `attempt` after `before` attempts.
    fn built(attempt: Attempt, before: u32) -> Receipt {
        let meta = DeliveryMeta {
            attempts_before: before,
            ..DeliveryMeta::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let answers = answers(&attempt, &facts());
        let settlement = plan(attempt, &meta, &schedule(), now);
        let times = Times {
            received: now,
            settled: now,
        };
        of(&settlement, answers, facts(), &meta, times).expect("a receipt")
    }

    /// The receipt of `attempt` after `before` attempts: its outcome and each status.
    fn receipt(attempt: Attempt, before: u32) -> (String, Vec<Status>, Option<String>) {
        let receipt = built(attempt, before);
        let statuses = receipt.recipients.iter().map(|r| r.status).collect();
        (
            receipt.outcome.to_string(),
            statuses,
            receipt.next_attempt_at,
        )
    }

    fn failed(failure: Failure, code: u16) -> Attempt {
        Attempt::Failed(Failed {
            failure,
            error: format!("{code} x"),
            smtp_code: Some(code),
            enhanced: None,
        })
    }

    #[test]
    fn every_way_an_attempt_ends_has_its_outcome_and_statuses() {
        use Status::*;
        let next = Some("2027-01-15T08:00:10.000Z".to_string());
        let table = [
            (
                failed(Failure::Transient, 451),
                0,
                "deferred",
                [Deferred; 2],
                next.clone(),
            ),
            (
                failed(Failure::Transient, 451),
                2,
                "failed.exhausted",
                [Failed; 2],
                None,
            ),
            (
                failed(Failure::Rejected, 552),
                0,
                "failed.rejected",
                [Bounced; 2],
                None,
            ),
            (
                failed(Failure::Invalid, 0),
                0,
                "failed.invalid",
                [Failed; 2],
                None,
            ),
            (
                failed(Failure::Expired, 0),
                1,
                "failed.expired",
                [Failed; 2],
                None,
            ),
            (
                failed(Failure::Ambiguous, 0),
                0,
                "ambiguous",
                [Unknown; 2],
                next,
            ),
        ];
        for (attempt, before, outcome, statuses, next) in table {
            let row = format!("{attempt:?} after {before}");
            assert_eq!(
                receipt(attempt, before),
                (outcome.to_string(), statuses.to_vec(), next),
                "{row}"
            );
        }
    }

    #[test]
    fn a_recipient_refused_for_now_on_the_last_attempt_has_failed() {
        let address = |a: &str| a.parse().expect("address");
        let sent = |before| {
            let attempt = Attempt::Sent {
                sent: Sent {
                    reply: Some("250 2.0.0 Ok: queued as 4F1".into()),
                    accepted: vec![address("a@example.com")],
                    refused: vec![Refusal {
                        recipient: address("b@example.com"),
                        code: Some(450),
                        reply: "450 4.2.1 later".into(),
                        permanent: false,
                    }],
                },
                relay: "main".into(),
            };
            receipt(attempt, before)
        };
        let (outcome, statuses, next) = sent(0);
        assert_eq!(outcome, "partly-delivered");
        assert_eq!(statuses, [Status::Delivered, Status::Deferred]);
        assert!(next.is_some());
        let (_, statuses, next) = sent(2);
        assert_eq!(statuses, [Status::Delivered, Status::Failed]);
        assert_eq!(next, None);
    }

    /// The schema file and the code say the same: every outcome, every field.
    #[test]
    fn the_schema_file_matches_the_receipt() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../schema/receipt.schema.json"))
                .expect("the schema is JSON");
        let outcomes: Vec<&str> = schema["properties"]["outcome"]["enum"]
            .as_array()
            .expect("an enum of outcomes")
            .iter()
            .filter_map(|o| o.as_str())
            .collect();
        assert_eq!(outcomes, OUTCOMES);
        assert_eq!(schema["properties"]["receipt_version"]["const"], VERSION);
        let receipt = built(failed(Failure::Transient, 451), 0);
        let written = serde_json::to_value(&receipt).expect("serializes");
        let mut fields: Vec<&str> = written
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(|f| f.as_str())
            .collect();
        fields.sort_unstable();
        required.sort_unstable();
        assert_eq!(fields, required, "every field is required, and written");
    }

    #[test]
    fn the_relay_queue_id_in_its_common_forms() {
        let cases = [
            ("250 2.0.0 Ok: queued as 4F7A2B", Some("4F7A2B")),
            ("250 2.0.0 OK queued as 4F7A2B.", Some("4F7A2B")),
            ("250 OK id=1tXyZ-0003aB-9C", Some("1tXyZ-0003aB-9C")),
            (
                "250 Ok <0100018c-a1b2@email.amazonses.com>",
                Some("0100018c-a1b2@email.amazonses.com"),
            ),
            ("250 2.0.0 Ok", None),
            ("250 <>", None),
            ("250 queued as ", None),
        ];
        for (reply, expected) in cases {
            assert_eq!(queue_id(reply).as_deref(), expected, "{reply}");
        }
    }

    #[test]
    fn codes_are_read_from_the_reply() {
        let (code, enhanced) = coded("550 5.1.1 no such user");
        assert_eq!(code, Some(550));
        assert_eq!(enhanced.map(|e| e.to_string()).as_deref(), Some("5.1.1"));
        assert_eq!(coded("250 Ok").0, Some(250));
        assert!(coded("250 Ok").1.is_none());
        assert_eq!(coded("ok").0, None);
        assert_eq!(coded("000 nothing").0, None, "not a reply code");
        assert_eq!(coded("199 too low").0, None);
        assert_eq!(coded("600 too high").0, None);
        assert_eq!(coded("599 the last").0, Some(599));
        assert!(coded("451 5.1.1 wrong class").1.is_none(), "strict");
    }
}
