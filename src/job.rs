//! The job format producers publish, and its decoding. Pure: bytes in, a checked job or a reason
//! a person can read out.

use std::collections::BTreeMap;
use std::str::FromStr;

use base64::Engine as _;
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use serde::Deserialize;

use crate::config::{LimitsConfig, is_dot_atom};

/// Why a job cannot be sent, for the `last-error` header of its dead letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidJob(pub String);

impl InvalidJob {
    fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

/// A decoded, checked job: every address parsed, every header safe to write.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: Option<String>,
    pub from: Option<Mailbox>,
    pub reply_to: Vec<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone)]
pub struct Attachment {
    pub filename: String,
    pub content_type: ContentType,
    pub content: Vec<u8>,
}

/// Limits checked while decoding.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_job_bytes: usize,
    pub max_recipients: usize,
    pub max_attachments: usize,
    pub max_attachment_bytes: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

impl Limits {
    pub fn new(max_job_bytes: usize, limits: &LimitsConfig) -> Self {
        Self {
            max_job_bytes,
            max_recipients: limits.max_recipients,
            max_attachments: limits.max_attachments,
            max_attachment_bytes: limits.max_attachment_bytes,
            max_headers: limits.max_headers,
            max_header_bytes: limits.max_header_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(5 * 1024 * 1024, &LimitsConfig::default())
    }
}

/// Headers the worker writes itself; a job may not set or override them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "sender",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-id",
    "return-path",
    "received",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    id: Option<String>,
    from: Option<String>,
    reply_to: Option<OneOrMany>,
    to: Option<OneOrMany>,
    cc: Option<OneOrMany>,
    bcc: Option<OneOrMany>,
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    attachments: Option<Vec<RawAttachment>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttachment {
    filename: String,
    content_type: Option<String>,
    content_base64: String,
}

/// Decodes and checks a job body. Every error says which field is wrong and why.
pub fn decode(body: &[u8], limits: &Limits) -> Result<Job, InvalidJob> {
    if body.len() > limits.max_job_bytes {
        return Err(InvalidJob::new(format!(
            "job is {} bytes, over the limit worker.max_job_bytes = {}",
            body.len(),
            limits.max_job_bytes
        )));
    }
    if let Err(e) = std::str::from_utf8(body) {
        return Err(InvalidJob::new(format!(
            "job is not UTF-8 text: invalid byte at offset {}",
            e.valid_up_to()
        )));
    }
    let raw: RawJob = serde_json::from_slice(body)
        .map_err(|e| InvalidJob::new(format!("job is not a valid JSON job: {e}")))?;

    let id = match raw.id {
        Some(id) => {
            // The id becomes the left part of the Message-ID, so it must be a dot-atom.
            if id.len() > 200 || !is_dot_atom(&id) {
                return Err(InvalidJob::new(format!(
                    "id {:?} may only hold letters, digits and !#$%&'*+-/=?^_`{{|}}~. \
                     (no spaces, no @, no leading, trailing or double dots), at most 200 bytes",
                    truncate(&id)
                )));
            }
            Some(id)
        }
        None => None,
    };

    let from = raw.from.map(|f| mailbox("from", &f)).transpose()?;
    let reply_to = mailboxes("reply_to", raw.reply_to)?;
    let to = mailboxes("to", raw.to)?;
    let cc = mailboxes("cc", raw.cc)?;
    let bcc = mailboxes("bcc", raw.bcc)?;
    let recipients = to.len() + cc.len() + bcc.len();
    if recipients == 0 {
        return Err(InvalidJob::new(
            "no recipients: give at least one address in to, cc or bcc",
        ));
    }
    if recipients > limits.max_recipients {
        return Err(InvalidJob::new(format!(
            "{recipients} recipients, over the limit limits.max_recipients = {}",
            limits.max_recipients
        )));
    }

    let subject = raw
        .subject
        .ok_or_else(|| InvalidJob::new("missing field `subject`"))?;
    no_control("subject", &subject)?;

    if raw.text.is_none() && raw.html.is_none() {
        return Err(InvalidJob::new("no body: give text, html or both"));
    }
    for (field, value) in [("text", &raw.text), ("html", &raw.html)] {
        if let Some(value) = value
            && value.contains('\0')
        {
            return Err(InvalidJob::new(format!("{field} contains a NUL character")));
        }
    }

    let headers = headers(raw.headers.unwrap_or_default(), limits)?;
    let attachments = attachments(raw.attachments.unwrap_or_default(), limits)?;

    Ok(Job {
        id,
        from,
        reply_to,
        to,
        cc,
        bcc,
        subject,
        text: raw.text,
        html: raw.html,
        headers,
        attachments,
    })
}

fn mailboxes(field: &str, value: Option<OneOrMany>) -> Result<Vec<Mailbox>, InvalidJob> {
    let list = value.map(OneOrMany::into_vec).unwrap_or_default();
    list.iter()
        .enumerate()
        .map(|(i, text)| mailbox(&format!("{field}[{i}]"), text))
        .collect()
}

fn mailbox(field: &str, text: &str) -> Result<Mailbox, InvalidJob> {
    no_control(field, text)?;
    Mailbox::from_str(text).map_err(|e| {
        InvalidJob::new(format!(
            "{field}: {:?} is not a valid address: {e}",
            truncate(text)
        ))
    })
}

/// CR, LF and NUL would end a header line early or be refused by relays: never allowed in a value
/// that becomes (part of) a header. Other control characters are refused too, for the same reason.
fn no_control(field: &str, text: &str) -> Result<(), InvalidJob> {
    match text.chars().find(|c| c.is_control() && *c != '\t') {
        Some(c) => Err(InvalidJob::new(format!(
            "{field} contains the control character {c:?}"
        ))),
        None => Ok(()),
    }
}

fn headers(
    raw: BTreeMap<String, String>,
    limits: &Limits,
) -> Result<Vec<(String, String)>, InvalidJob> {
    if raw.len() > limits.max_headers {
        return Err(InvalidJob::new(format!(
            "{} headers, over the limit limits.max_headers = {}",
            raw.len(),
            limits.max_headers
        )));
    }
    let mut out = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        // RFC 5322 field name: printable ASCII except colon; lettre also refuses spaces.
        if name.is_empty()
            || name.len() > 76
            || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
        {
            return Err(InvalidJob::new(format!(
                "headers: {:?} is not a header name (printable ASCII, no colon or space, \
                 at most 76 bytes)",
                truncate(&name)
            )));
        }
        if RESERVED_HEADERS
            .iter()
            .any(|reserved| reserved.eq_ignore_ascii_case(&name))
        {
            return Err(InvalidJob::new(format!(
                "headers: {name} is set by the worker from the job's own fields; \
                 it cannot be given in headers"
            )));
        }
        no_control(&format!("headers.{name}"), &value)?;
        if name.len() + 2 + value.len() > limits.max_header_bytes {
            return Err(InvalidJob::new(format!(
                "headers.{name} is {} bytes, over the limit limits.max_header_bytes = {}",
                name.len() + 2 + value.len(),
                limits.max_header_bytes
            )));
        }
        out.push((name, value));
    }
    Ok(out)
}

fn attachments(raw: Vec<RawAttachment>, limits: &Limits) -> Result<Vec<Attachment>, InvalidJob> {
    if raw.len() > limits.max_attachments {
        return Err(InvalidJob::new(format!(
            "{} attachments, over the limit limits.max_attachments = {}",
            raw.len(),
            limits.max_attachments
        )));
    }
    let mut total = 0usize;
    let mut out = Vec::with_capacity(raw.len());
    for (i, attachment) in raw.into_iter().enumerate() {
        let field = format!("attachments[{i}]");
        if attachment.filename.is_empty() || attachment.filename.len() > 255 {
            return Err(InvalidJob::new(format!(
                "{field}.filename must be 1 to 255 bytes"
            )));
        }
        no_control(&format!("{field}.filename"), &attachment.filename)?;
        let content_type = match &attachment.content_type {
            Some(text) => {
                no_control(&format!("{field}.content_type"), text)?;
                ContentType::parse(text).map_err(|_| {
                    InvalidJob::new(format!(
                        "{field}.content_type {:?} is not a MIME type like application/pdf",
                        truncate(text)
                    ))
                })?
            }
            None => ContentType::parse("application/octet-stream")
                .map_err(|_| InvalidJob::new("internal: default content type"))?,
        };
        // Producers often wrap base64 at 76 columns; whitespace carries no data.
        let compact: Vec<u8> = attachment
            .content_base64
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let content = base64::engine::general_purpose::STANDARD
            .decode(&compact)
            .map_err(|e| InvalidJob::new(format!("{field}.content_base64 is not base64: {e}")))?;
        total += content.len();
        if total > limits.max_attachment_bytes {
            return Err(InvalidJob::new(format!(
                "attachments total more than {} bytes, over the limit \
                 limits.max_attachment_bytes = {}",
                total, limits.max_attachment_bytes
            )));
        }
        out.push(Attachment {
            filename: attachment.filename,
            content_type,
            content,
        });
    }
    Ok(out)
}

/// Keeps reasons short when a hostile job puts a megabyte in a field.
fn truncate(text: &str) -> String {
    const MAX: usize = 100;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_str(json: &str) -> Result<Job, InvalidJob> {
        decode(json.as_bytes(), &Limits::default())
    }

    fn reason(json: &str) -> String {
        decode_str(json).expect_err("must be invalid").0
    }

    #[test]
    fn full_job_decodes() {
        let job = decode_str(
            r#"{"id":"order-1234","from":"Shop <shop@example.com>","reply_to":"help@example.com",
                "to":["Ann <ann@example.com>","bob@example.com"],"cc":"c@example.com",
                "bcc":[],"subject":"Your order","text":"plain","html":"<p>x</p>",
                "headers":{"X-Campaign":"spring"},
                "attachments":[{"filename":"a.txt","content_type":"text/plain",
                                "content_base64":"aGVs\nbG8="}]}"#,
        )
        .expect("valid");
        assert_eq!(job.id.as_deref(), Some("order-1234"));
        assert_eq!(job.to.len(), 2);
        assert_eq!(job.to[0].email.to_string(), "ann@example.com");
        assert_eq!(job.cc.len(), 1);
        assert_eq!(job.reply_to.len(), 1);
        assert_eq!(
            job.headers,
            vec![("X-Campaign".to_string(), "spring".to_string())]
        );
        assert_eq!(job.attachments[0].content, b"hello");
    }

    #[test]
    fn invalid_jobs_have_readable_reasons() {
        let cases = [
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","tp":1}"#,
                "unknown field `tp`",
            ),
            (r#"{"subject":"s","text":"t"}"#, "no recipients"),
            (
                r#"{"to":[],"bcc":[],"subject":"s","text":"t"}"#,
                "no recipients",
            ),
            (
                r#"{"to":"not an address","subject":"s","text":"t"}"#,
                "to[0]",
            ),
            (r#"{"to":["a@b.c","x@"],"subject":"s","text":"t"}"#, "to[1]"),
            (r#"{"to":"a@b.c","subject":"s"}"#, "no body"),
            (r#"{"to":"a@b.c","text":"t"}"#, "subject"),
            (
                r#"{"to":"a@b.c","subject":"a\r\nBcc: x@y.z","text":"t"}"#,
                "subject contains",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","headers":{"X-A":"v\r\nBcc: e@f.g"}}"#,
                "headers.X-A contains",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","headers":{"X-A\r\nB":"v"}}"#,
                "not a header name",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","headers":{"from":"e@f.g"}}"#,
                "from is set by the worker",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","id":"a b"}"#,
                "id",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","id":"a@b"}"#,
                "id",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","attachments":[{"filename":"f","content_base64":"!!"}]}"#,
                "attachments[0].content_base64 is not base64",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","attachments":[{"filename":"f","content_type":"nonsense","content_base64":""}]}"#,
                "attachments[0].content_type",
            ),
            ("[1,2", "not a valid JSON job"),
            ("", "not a valid JSON job"),
        ];
        for (json, expected) in cases {
            let reason = reason(json);
            assert!(
                reason.contains(expected),
                "{json}: reason {reason:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn non_utf8_body_is_invalid() {
        let reason = decode(b"{\"to\":\"\xff\"}", &Limits::default())
            .expect_err("invalid")
            .0;
        assert!(reason.contains("not UTF-8"), "{reason}");
    }

    #[test]
    fn over_size_job_names_the_limit() {
        let limits = Limits {
            max_job_bytes: 10,
            ..Limits::default()
        };
        let reason = decode(br#"{"to":"a@b.c","subject":"s","text":"t"}"#, &limits)
            .expect_err("too big")
            .0;
        assert!(reason.contains("worker.max_job_bytes = 10"), "{reason}");
    }

    #[test]
    fn limits_are_named() {
        let limits = Limits {
            max_recipients: 2,
            max_attachments: 1,
            max_attachment_bytes: 3,
            max_headers: 1,
            max_header_bytes: 10,
            ..Limits::default()
        };
        let cases = [
            (
                r#"{"to":["a@b.c","d@e.f"],"cc":"g@h.i","subject":"s","text":"t"}"#,
                "limits.max_recipients = 2",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","attachments":[
                    {"filename":"a","content_base64":""},{"filename":"b","content_base64":""}]}"#,
                "limits.max_attachments = 1",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","attachments":[
                    {"filename":"a","content_base64":"aGVsbG8="}]}"#,
                "limits.max_attachment_bytes = 3",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","headers":{"X-A":"1","X-B":"2"}}"#,
                "limits.max_headers = 1",
            ),
            (
                r#"{"to":"a@b.c","subject":"s","text":"t","headers":{"X-A":"0123456789"}}"#,
                "limits.max_header_bytes = 10",
            ),
        ];
        for (json, expected) in cases {
            let reason = decode(json.as_bytes(), &limits).expect_err(json).0;
            assert!(reason.contains(expected), "{json}: {reason}");
        }
    }

    #[test]
    fn reserved_headers_are_refused_in_any_case() {
        for name in [
            "From",
            "TO",
            "cc",
            "Bcc",
            "Message-ID",
            "Date",
            "Content-Type",
            "MIME-Version",
        ] {
            let json =
                format!(r#"{{"to":"a@b.c","subject":"s","text":"t","headers":{{"{name}":"x"}}}}"#);
            let reason = reason(&json);
            assert!(reason.contains("set by the worker"), "{name}: {reason}");
        }
    }

    #[test]
    fn long_field_is_truncated_in_reason() {
        let long = "x".repeat(10_000);
        let reason = reason(&format!(r#"{{"to":"{long}","subject":"s","text":"t"}}"#));
        assert!(reason.len() < 400, "{} bytes", reason.len());
    }
}
