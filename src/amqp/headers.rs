//! The worker's own message headers (`attempt`, `error-kind`, …) and the properties of a
//! republished job.

use std::time::SystemTime;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::policy::ErrorKind;

pub const ATTEMPT: &str = "attempt";
pub const ERROR_KIND: &str = "error-kind";
pub const LAST_ERROR: &str = "last-error";
pub const SMTP_CODE: &str = "smtp-code";
pub const FIRST_FAILED_AT: &str = "first-failed-at";
pub const FAILED_AT: &str = "failed-at";
/// The envelope of a job sent to only some of its recipients (comma-separated addresses): the
/// others already have it, or are in another retry or dead letter. The message's own To and Cc
/// stay as the producer wrote them.
pub const RECIPIENTS: &str = "recipients";
/// A random id written on each republished copy, new for each republish. When the broker's
/// confirm of a republish is lost, its job is handed back whole while the copy may have been
/// stored all the same: the worker keeps the ids of such copies, and drops one that comes back
/// instead of sending the job twice.
pub const COPY_ID: &str = "copy-id";
/// The lane (`amqp.lanes`) a republished job came through: `dead-letters replay` puts it back
/// in that lane's queue. Absent for a worker without lanes.
pub const LANE: &str = "lane";

/// The headers written on a job that failed an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureHeaders {
    /// Attempts made so far, this one included.
    pub attempt: u32,
    pub kind: ErrorKind,
    pub last_error: String,
    pub smtp_code: Option<u16>,
    pub failed_at: SystemTime,
    /// Only these recipients from now on; `None` keeps the delivery's own.
    pub recipients: Option<String>,
}

/// Attempts made before this delivery, from our `attempt` header (0 when absent). Accepts any
/// integer type and a decimal string, since producers and tools in other languages re-publish too.
pub fn attempts_made(properties: &BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPT))
        .and_then(as_u32)
        .unwrap_or(0)
}

/// A header as text, if it is a string (long or short) or a number.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => as_i64(other).map(|n| n.to_string()),
    }
}

fn as_i64(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

fn as_u32(value: &AMQPValue) -> Option<u32> {
    let n = match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok()?,
        other => as_i64(other)?,
    };
    u32::try_from(n.max(0)).ok()
}

/// Properties for republishing a job (to a retry or the dead-letter queue): the producer's
/// properties and headers, with ours added and the broker's dead-lettering history removed.
///
/// Dropped on purpose: `expiration` (a per-message TTL would make a dead letter vanish or a retry
/// come back early) and `user_id` (the broker refuses a publish whose user_id is not the
/// connection's user).
pub fn republish_properties(
    original: &BasicProperties,
    failure: &FailureHeaders,
    copy_id: &str,
    lane: Option<&str>,
) -> BasicProperties {
    let failed_at = rfc3339(failure.failed_at);
    let first_failed_at =
        header_text(original, FIRST_FAILED_AT).unwrap_or_else(|| failed_at.clone());
    let mut headers = producer_headers(original);
    headers.insert(ATTEMPT.into(), AMQPValue::LongInt(failure.attempt as i32));
    headers.insert(ERROR_KIND.into(), long(failure.kind.as_str()));
    headers.insert(
        LAST_ERROR.into(),
        long(&truncate(&failure.last_error, 1000)),
    );
    // Absent when this failure had no reply code: a code from an earlier attempt would mislead.
    if let Some(code) = failure.smtp_code {
        headers.insert(SMTP_CODE.into(), AMQPValue::LongInt(i32::from(code)));
    }
    headers.insert(FIRST_FAILED_AT.into(), long(&first_failed_at));
    headers.insert(FAILED_AT.into(), long(&failed_at));
    if let Some(recipients) = &failure.recipients {
        headers.insert(RECIPIENTS.into(), long(recipients));
    }
    headers.insert(COPY_ID.into(), long(copy_id));
    if let Some(lane) = lane {
        headers.insert(LANE.into(), long(lane));
    }
    rebuild(original, headers)
}

/// Properties for a job replayed from the dead-letter queue: the producer's, with every header
/// the worker wrote removed, so that it starts again with a full set of attempts.
pub fn replay_properties(original: &BasicProperties) -> BasicProperties {
    rebuild(original, producer_headers(original))
}

/// The producer's own headers: without ours and without the broker's `x-` ones (x-death and
/// friends: RabbitMQ 4 ignores a client-set x-death, so the worker keeps its own count).
fn producer_headers(original: &BasicProperties) -> FieldTable {
    const OURS: [&str; 8] = [
        LANE,
        ATTEMPT,
        ERROR_KIND,
        LAST_ERROR,
        SMTP_CODE,
        FIRST_FAILED_AT,
        FAILED_AT,
        COPY_ID,
    ];
    let mut headers = FieldTable::default();
    if let Some(existing) = original.headers() {
        for (key, value) in existing.inner() {
            if !key.as_str().starts_with("x-") && !OURS.contains(&key.as_str()) {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers
}

/// The producer's properties with new headers. Not copied: `expiration` and `user_id`, see
/// `republish_properties`.
fn rebuild(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut properties = BasicProperties::default().with_headers(headers);
    macro_rules! copy {
        ($getter:ident, $setter:ident) => {
            if let Some(value) = original.$getter() {
                properties = properties.$setter(value.clone());
            }
        };
    }
    copy!(content_type, with_content_type);
    copy!(content_encoding, with_content_encoding);
    copy!(priority, with_priority);
    copy!(correlation_id, with_correlation_id);
    copy!(reply_to, with_reply_to);
    copy!(message_id, with_message_id);
    copy!(timestamp, with_timestamp);
    copy!(kind, with_type);
    copy!(app_id, with_app_id);
    copy!(cluster_id, with_cluster_id);
    properties
}

pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_headers(pairs: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in pairs {
            table.insert(k.into(), v);
        }
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn attempt_header_in_any_shape() {
        assert_eq!(attempts_made(&BasicProperties::default()), 0);
        assert_eq!(
            attempts_made(&with_headers(vec![("attempt", AMQPValue::LongInt(3))])),
            3
        );
        assert_eq!(
            attempts_made(&with_headers(vec![(
                "attempt",
                AMQPValue::ShortShortUInt(2)
            )])),
            2
        );
        assert_eq!(
            attempts_made(&with_headers(vec![("attempt", long("4"))])),
            4
        );
        assert_eq!(
            attempts_made(&with_headers(vec![("attempt", AMQPValue::LongInt(-5))])),
            0
        );
        assert_eq!(
            attempts_made(&with_headers(vec![("attempt", long("many"))])),
            0
        );
    }

    #[test]
    fn republish_keeps_producer_headers_and_drops_broker_history() {
        let original = with_headers(vec![
            ("tenant", long("acme")),
            ("x-death", AMQPValue::LongString("history".into())),
            ("first-failed-at", long("2026-01-01T00:00:00.000Z")),
            ("smtp-code", AMQPValue::LongInt(451)),
        ])
        .with_content_type("application/json".into())
        .with_message_id("m-1".into())
        .with_expiration("60000".into())
        .with_user_id("someone-else".into());
        let props = republish_properties(
            &original,
            &FailureHeaders {
                attempt: 2,
                kind: ErrorKind::Transient,
                last_error: "connection refused".into(),
                smtp_code: None,
                failed_at: SystemTime::UNIX_EPOCH,
                recipients: None,
            },
            "c-1",
            None,
        );
        let h = props.headers().as_ref().expect("headers").inner();
        assert_eq!(h.get("tenant"), Some(&long("acme")));
        assert!(h.get("x-death").is_none());
        assert!(h.get("smtp-code").is_none(), "stale code removed");
        assert_eq!(h.get("attempt"), Some(&AMQPValue::LongInt(2)));
        assert_eq!(h.get("error-kind"), Some(&long("transient")));
        assert_eq!(
            h.get("first-failed-at"),
            Some(&long("2026-01-01T00:00:00.000Z"))
        );
        assert_eq!(h.get("failed-at"), Some(&long("1970-01-01T00:00:00.000Z")));
        assert_eq!(h.get("copy-id"), Some(&long("c-1")));
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert!(props.expiration().is_none());
        assert!(props.user_id().is_none());
    }

    #[test]
    fn replay_removes_our_headers() {
        let original = with_headers(vec![
            ("tenant", long("acme")),
            ("attempt", AMQPValue::LongInt(10)),
            ("error-kind", long("exhausted")),
            ("copy-id", long("c-1")),
            ("x-death", long("h")),
        ]);
        let props = replay_properties(&original);
        let h = props.headers().as_ref().expect("headers").inner();
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("tenant"), Some(&long("acme")));
    }
}
