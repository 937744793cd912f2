//! The job format producers publish, and its decoding. Pure: bytes in, a checked job or a reason
//! a person can read out.

use std::collections::BTreeMap;
use std::str::FromStr;

use base64::Engine as _;
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use serde::Deserialize;

/// The limits a job is decoded under; declared with the `[limits]` section it is read from.
pub use crate::config::Limits;
use crate::config::is_dot_atom;

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
    /// Not to be sent after this time (the producer's `not_after`, RFC 3339).
    pub not_after: Option<std::time::SystemTime>,
    /// The producer's own values, echoed in every receipt and never put in the mail.
    pub metadata: BTreeMap<String, String>,
    /// The producer's labels, echoed in every receipt and never put in the mail.
    pub tags: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Attachment {
    pub filename: String,
    pub content_type: ContentType,
    pub content: Vec<u8>,
}

/// The longest display name of an address, in bytes. lettre writes a name with no space in it
/// on one line, and may double it in escaping: 256 keeps every address header line under RFC
/// 5322's 998 bytes, with room for the longest address (320). Real names are far shorter.
const MAX_NAME_BYTES: usize = 256;

/// Headers the worker writes itself; a job may not set or override them. Every `Content-*` header
/// is refused as well (see `is_reserved`): they describe the MIME structure, which is the
/// worker's.
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
    not_after: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    tags: Option<Vec<String>>,
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

/// The job's own `id`, read without decoding or checking the rest: for a delivery that is not
/// decoded (a redelivery handled already), so that its log lines still name the job. `None`
/// when the body is not a JSON object with an `id` that [`decode`] would accept.
pub fn peek_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    let id = serde_json::from_slice::<IdOnly>(body).ok()?.id?;
    (id.len() <= MAX_ID_BYTES && is_dot_atom(&id)).then_some(id)
}

/// The longest job `id`: it becomes the left part of the Message-ID.
const MAX_ID_BYTES: usize = 200;

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
    let raw: RawJob = serde_json::from_slice(body).map_err(json_error)?;

    let id = match raw.id {
        Some(id) => {
            // The id becomes the left part of the Message-ID, so it must be a dot-atom.
            if id.len() > MAX_ID_BYTES || !is_dot_atom(&id) {
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

    // Counted before any address is parsed: a job over the limit costs no parsing.
    let (to, cc, bcc) = (listed(raw.to), listed(raw.cc), listed(raw.bcc));
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
    let from = raw.from.map(|f| mailbox("from", &f)).transpose()?;
    let reply_to = mailboxes("reply_to", listed(raw.reply_to))?;
    let to = mailboxes("to", to)?;
    let cc = mailboxes("cc", cc)?;
    let bcc = mailboxes("bcc", bcc)?;

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

    let not_after = raw
        .not_after
        .map(|text| {
            humantime::parse_rfc3339_weak(&text).map_err(|_| {
                InvalidJob::new(format!(
                    "not_after {:?} is not a time like 2026-12-24T18:00:00Z",
                    truncate(&text)
                ))
            })
        })
        .transpose()?;
    let metadata = metadata(raw.metadata.unwrap_or_default())?;
    let tags = tags(raw.tags.unwrap_or_default())?;

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
        not_after,
        metadata,
        tags,
    })
}

/// The most `metadata` entries a job may carry, and the longest key and value, in bytes. A
/// receipt echoes them all, so they are kept small.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_KEY_BYTES: usize = 64;
pub const MAX_METADATA_VALUE_BYTES: usize = 512;
/// The most `tags` a job may carry, and the longest tag, in bytes.
pub const MAX_TAGS: usize = 16;
pub const MAX_TAG_BYTES: usize = 64;

fn metadata(raw: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, InvalidJob> {
    if raw.len() > MAX_METADATA_ENTRIES {
        return Err(InvalidJob::new(format!(
            "metadata has {} entries, at most {MAX_METADATA_ENTRIES}",
            raw.len()
        )));
    }
    for (key, value) in &raw {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES {
            return Err(InvalidJob::new(format!(
                "metadata: the key {:?} must be 1 to {MAX_METADATA_KEY_BYTES} bytes",
                truncate(key)
            )));
        }
        no_control(&format!("metadata key {:?}", truncate(key)), key)?;
        if value.len() > MAX_METADATA_VALUE_BYTES {
            return Err(InvalidJob::new(format!(
                "metadata.{key}: the value is {} bytes, at most {MAX_METADATA_VALUE_BYTES}",
                value.len()
            )));
        }
        no_control(&format!("metadata.{key}"), value)?;
    }
    Ok(raw)
}

fn tags(raw: Vec<String>) -> Result<Vec<String>, InvalidJob> {
    if raw.len() > MAX_TAGS {
        return Err(InvalidJob::new(format!(
            "{} tags, at most {MAX_TAGS}",
            raw.len()
        )));
    }
    for (i, tag) in raw.iter().enumerate() {
        if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
            return Err(InvalidJob::new(format!(
                "tags[{i}] must be 1 to {MAX_TAG_BYTES} bytes"
            )));
        }
        no_control(&format!("tags[{i}]"), tag)?;
    }
    Ok(raw)
}

fn listed(value: Option<OneOrMany>) -> Vec<String> {
    value.map(OneOrMany::into_vec).unwrap_or_default()
}

/// serde_json's message quotes the offending key or value whole: a megabyte-long unknown field
/// would make a megabyte-long reason (and log line), and a key with CR/LF a reason with line
/// breaks. Cut and escaped, with serde_json's position kept.
fn json_error(e: serde_json::Error) -> InvalidJob {
    const MAX: usize = 300;
    let message = e.to_string();
    let location = format!(" at line {} column {}", e.line(), e.column());
    let message = message.strip_suffix(&location).unwrap_or(&message);
    let message = without_quoted_values(message);
    let mut escaped = String::new();
    for c in message.chars() {
        if escaped.len() >= MAX {
            escaped.push('…');
            break;
        }
        if c.is_control() {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    let location = if e.line() > 0 { location.as_str() } else { "" };
    InvalidJob::new(format!("job is not a valid JSON job: {escaped}{location}"))
}

/// serde's message with the string values it quotes (`invalid type: string "…", expected a
/// map`) elided. The reason goes to logs, headers and receipts, and a value in the wrong field
/// may be anything, a token in `headers` say; the job itself is kept whole in the dead-letter
/// queue. Field names, which serde quotes with backticks, stay.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '"' {
            continue;
        }
        // serde writes the value with Rust's escapes: `\"` inside does not end it.
        let mut closed = false;
        while let Some(inner) = chars.next() {
            match inner {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    closed = true;
                    break;
                }
                _ => {}
            }
        }
        out.push('…');
        if closed {
            out.push('"');
        }
    }
    out
}

fn mailboxes(field: &str, list: Vec<String>) -> Result<Vec<Mailbox>, InvalidJob> {
    list.iter()
        .enumerate()
        .map(|(i, text)| mailbox(&format!("{field}[{i}]"), text))
        .collect()
}

fn mailbox(field: &str, text: &str) -> Result<Mailbox, InvalidJob> {
    no_control(field, text)?;
    let mailbox = Mailbox::from_str(text).map_err(|e| {
        InvalidJob::new(format!(
            "{field}: {:?} is not a valid address: {e}",
            truncate(text)
        ))
    })?;
    if let Some(name) = &mailbox.name
        && name.len() > MAX_NAME_BYTES
    {
        return Err(InvalidJob::new(format!(
            "{field}: the display name is {} bytes, at most {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    Ok(mailbox)
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
        if is_reserved(&name) {
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

/// A header the job may not give: one of [`RESERVED_HEADERS`], or any `Content-*`, in any case.
fn is_reserved(name: &str) -> bool {
    RESERVED_HEADERS
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(name))
        || name
            .get(.."content-".len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("content-"))
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
        // Mail clients decode RFC 2047 encoded words even in a filename parameter (against RFC
        // 2231, but widely): `=?utf-8?b?ZXZpbC5leGU=?=` would be shown and saved as `evil.exe`.
        if let Some(start) = attachment.filename.find("=?")
            && attachment.filename[start + 2..].contains("?=")
        {
            return Err(InvalidJob::new(format!(
                "{field}.filename {:?} holds an RFC 2047 encoded word (=?…?=), which mail \
                 clients would show decoded; give the name as plain UTF-8",
                truncate(&attachment.filename)
            )));
        }
        let content_type = match &attachment.content_type {
            Some(text) => {
                no_control(&format!("{field}.content_type"), text)?;
                // Written as one header line; RFC 6838 names are at most 127 bytes a side.
                if text.len() > 255 {
                    return Err(InvalidJob::new(format!(
                        "{field}.content_type must be at most 255 bytes"
                    )));
                }
                // A multipart attachment's content would be read as MIME parts of the message:
                // parts, headers and recipients the job never declared.
                if text
                    .trim_start()
                    .get(.."multipart/".len())
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case("multipart/"))
                {
                    return Err(InvalidJob::new(format!(
                        "{field}.content_type {:?}: an attachment cannot be multipart",
                        truncate(text)
                    )));
                }
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
    fn metadata_and_tags_are_kept_within_their_limits() {
        let base = r#""to":"a@example.com","subject":"s","text":"t""#;
        let job = decode_str(&format!(
            r#"{{{base},"metadata":{{"tenant":"acme","order":"1234"}},"tags":["reset","eu"]}}"#
        ))
        .expect("valid");
        assert_eq!(job.metadata.get("tenant").map(String::as_str), Some("acme"));
        assert_eq!(job.tags, ["reset", "eu"]);
        let many: Vec<String> = (0..=MAX_METADATA_ENTRIES)
            .map(|i| format!(r#""k{i}":"v""#))
            .collect();
        let too_many = reason(&format!(r#"{{{base},"metadata":{{{}}}}}"#, many.join(",")));
        assert!(
            too_many.contains("metadata has 33 entries, at most 32"),
            "{too_many}"
        );
        let long = "v".repeat(MAX_METADATA_VALUE_BYTES + 1);
        let long = reason(&format!(r#"{{{base},"metadata":{{"k":"{long}"}}}}"#));
        assert!(
            long.contains("metadata.k: the value is 513 bytes"),
            "{long}"
        );
        let control = reason(&format!(r#"{{{base},"metadata":{{"k":"a\u0007b"}}}}"#));
        assert!(
            control.contains("metadata.k contains the control"),
            "{control}"
        );
        let number = reason(&format!(r#"{{{base},"metadata":{{"k":1}}}}"#));
        assert!(number.contains("expected a string"), "{number}");
        let empty = reason(&format!(r#"{{{base},"tags":["ok",""]}}"#));
        assert!(empty.contains("tags[1] must be 1 to 64 bytes"), "{empty}");
        let tags: Vec<String> = (0..=MAX_TAGS).map(|i| format!(r#""t{i}""#)).collect();
        let too_many = reason(&format!(r#"{{{base},"tags":[{}]}}"#, tags.join(",")));
        assert!(too_many.contains("17 tags, at most 16"), "{too_many}");
    }

    #[test]
    fn the_id_is_peeked_only_when_decode_would_accept_it() {
        assert_eq!(
            peek_id(br#"{"id":"order-1","to":"a@b.c","surprise":[1,2]}"#).as_deref(),
            Some("order-1")
        );
        assert_eq!(peek_id(br#"{"to":"a@b.c"}"#), None);
        assert_eq!(
            peek_id(br#"{"id":"a b\nINFO forged"}"#),
            None,
            "nothing unsafe to log"
        );
        assert_eq!(
            peek_id(format!(r#"{{"id":"{}"}}"#, "x".repeat(201)).as_bytes()),
            None
        );
        assert_eq!(peek_id(b"not json"), None);
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

    /// Regression (fuzz/regressions/decode_job/content-star-header.json): the README says every
    /// Content-* header is the worker's, but only four were refused.
    #[test]
    fn every_content_header_is_refused() {
        for name in [
            "Content-Description",
            "content-location",
            "CONTENT-LANGUAGE",
        ] {
            let json =
                format!(r#"{{"to":"a@b.c","subject":"s","text":"t","headers":{{"{name}":"x"}}}}"#);
            let reason = reason(&json);
            assert!(reason.contains("set by the worker"), "{name}: {reason}");
        }
        assert!(
            decode_str(r#"{"to":"a@b.c","subject":"s","text":"t","headers":{"X-Content":"x"}}"#)
                .is_ok()
        );
    }

    /// Regression (fuzz/regressions/decode_job/multipart-attachment.json): a multipart attachment
    /// type made its content MIME parts of the message, with headers the job never declared.
    #[test]
    fn multipart_attachment_type_is_refused() {
        let reason = reason(
            r#"{"to":"a@b.c","subject":"s","text":"t","attachments":[
                {"filename":"a","content_type":" Multipart/Mixed; boundary=x","content_base64":""}]}"#,
        );
        assert!(reason.contains("cannot be multipart"), "{reason}");
    }

    /// Regression (fuzz/regressions/decode_job/long-unknown-field.json and
    /// crlf-in-unknown-field.json): serde_json's message quoted the key whole, so a reason could
    /// be megabytes long and hold line breaks.
    #[test]
    fn json_errors_are_short_and_one_line() {
        let long = "y".repeat(5000);
        for json in [
            format!(r#"{{"to":"a@b.c","subject":"s","text":"t","{long}":1}}"#),
            format!(r#"{{"to":"a@b.c","subject":"s","text":"t","headers":"{long}"}}"#),
            r#"{"to":"a@b.c","subject":"s","text":"t","x\r\nBcc: e@f.g":1}"#.to_string(),
        ] {
            let reason = reason(&json);
            assert!(reason.len() < 500, "{} bytes: {reason}", reason.len());
            assert!(!reason.contains(['\r', '\n']), "{reason:?}");
            assert!(reason.contains("at line 1 column"), "{reason}");
        }
        assert!(reason(r#"{"to":"a@b.c","subject":"s","text":"t","x\r\n":1}"#).contains(r"x\r\n"));
    }

    /// A value in the wrong field is not quoted in the reason, which logs and receipts carry.
    #[test]
    fn json_errors_do_not_quote_values() {
        let quoted = reason(
            r#"{"to":"a@b.c","subject":"s","text":"t","headers":"X-Api-Key: sk-\"live\"-123"}"#,
        );
        assert!(
            !quoted.contains("sk-") && !quoted.contains("live"),
            "{quoted}"
        );
        assert!(quoted.contains(r#"invalid type: string "…""#), "{quoted}");
        assert!(quoted.contains("at line 1 column"), "{quoted}");
        let named = reason(r#"{"to":"a@b.c","subject":"s","text":"t","bogus":5}"#);
        assert!(named.contains("`bogus`"), "field names stay: {named}");
    }

    /// Regression (fuzz/regressions/decode_job/long-display-name.json): a long name with no space
    /// was written on one line, past RFC 5322's 998 bytes.
    #[test]
    fn long_display_name_is_refused() {
        let name = "n".repeat(257);
        let reason = reason(&format!(
            r#"{{"to":"{name} <a@b.c>","subject":"s","text":"t"}}"#
        ));
        assert!(
            reason.contains("to[0]: the display name is 257 bytes"),
            "{reason}"
        );
        let name = "n".repeat(256);
        assert!(
            decode_str(&format!(
                r#"{{"to":"{name} <a@b.c>","subject":"s","text":"t"}}"#
            ))
            .is_ok()
        );
    }

    /// Regression: an encoded-word look-alike as a filename was shown decoded by mail clients
    /// (`=?utf-8?b?ZXZpbC5leGU=?=` as `evil.exe`).
    #[test]
    fn encoded_word_filename_is_refused() {
        let reason = reason(
            r#"{"to":"a@b.c","subject":"s","text":"t","attachments":[
                {"filename":"=?utf-8?b?ZXZpbC5leGU=?=","content_base64":""}]}"#,
        );
        assert!(reason.contains("attachments[0].filename"), "{reason}");
        assert!(
            decode_str(
                r#"{"to":"a@b.c","subject":"s","text":"t","attachments":[
                    {"filename":"a=?b.txt","content_base64":""}]}"#
            )
            .is_ok()
        );
    }

    /// Regression (fuzz/regressions/decode_job/fuzzer-found-long-attachment-content-type, found by
    /// the decode_job fuzzer): a 1,700-byte content type made a Content-Type line past 998 bytes.
    #[test]
    fn long_attachment_content_type_is_refused() {
        let long = format!("application/{}", "x".repeat(250));
        let reason = reason(&format!(
            r#"{{"to":"a@b.c","subject":"s","text":"t","attachments":[
                {{"filename":"a","content_type":"{long}","content_base64":""}}]}}"#
        ));
        assert!(reason.contains("at most 255 bytes"), "{reason}");
    }

    /// Recipients are counted before any address is parsed: a job over the limit costs no
    /// parsing, whatever its addresses.
    #[test]
    fn recipients_over_the_limit_are_refused_before_parsing() {
        let limits = Limits {
            max_recipients: 2,
            ..Limits::default()
        };
        let reason = decode(
            br#"{"to":["not an address","x","y"],"subject":"s","text":"t"}"#,
            &limits,
        )
        .expect_err("over the limit")
        .0;
        assert!(reason.contains("limits.max_recipients = 2"), "{reason}");
    }

    #[test]
    fn long_field_is_truncated_in_reason() {
        let long = "x".repeat(10_000);
        let reason = reason(&format!(r#"{{"to":"{long}","subject":"s","text":"t"}}"#));
        assert!(reason.len() < 400, "{} bytes", reason.len());
    }
}
