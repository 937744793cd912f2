//! What must hold for every job, whatever its bytes: decoding ends in a checked job or a short
//! reason, and a built message declares nothing the job did not. One function for the fuzz
//! targets (`fuzz/`), the regression inputs (`tests/fuzz_regressions.rs`) and the end-to-end tests
//! (`tests/hardening.rs`), so that all three check the same thing.
//!
//! Depends only on `amqp_mailer`, `mail_parser` and `serde_json`, never on the `io` feature, so
//! that the fuzz crate's sanitizer build stays small.

use std::collections::BTreeSet;

use amqp_mailer::job::{self, InvalidJob, Job, Limits};
use amqp_mailer::message::{self, MessageDefaults, Outgoing};
use mail_parser::{MessageParser, MimeHeaders as _, PartType};

/// A reason goes into the dead letter's `last-error` (cut at 1000 bytes there) and into the log
/// line of the dead letter: a hostile job must not be able to make it megabytes long.
pub const MAX_REASON_BYTES: usize = 1000;

/// RFC 5322 2.1.1: a line is at most 998 bytes, CRLF excluded.
pub const MAX_LINE_BYTES: usize = 998;

/// Header fields the worker writes at the top of every message (lowercase). The job's own
/// `headers` keys are the only others allowed.
pub const WORKER_HEADERS: &[&str] = &[
    "from",
    "reply-to",
    "to",
    "cc",
    "subject",
    "message-id",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// Header fields a MIME part below the top may carry (lowercase): all written by the worker.
pub const PART_HEADERS: &[&str] = &[
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
];

/// The sender the checks build with, standing in for `smtp.from`.
pub fn defaults() -> MessageDefaults {
    MessageDefaults {
        from: Some(
            "Fuzz Sender <sender@example.com>"
                .parse()
                .expect("a valid sender"),
        ),
        message_id_domain: None,
    }
}

/// Limits small enough that a fuzzer reaches every one of them with short inputs.
pub fn small_limits() -> Limits {
    Limits {
        max_job_bytes: 4096,
        max_recipients: 3,
        max_attachments: 2,
        max_attachment_bytes: 64,
        max_headers: 2,
        max_header_bytes: 40,
    }
}

/// How a job ended: refused with a reason, or built into a message that passed every check.
#[derive(Debug)]
pub enum Verdict {
    Invalid(String),
    Built(Box<Outgoing>),
}

impl Verdict {
    /// Whether the job was refused.
    pub fn is_invalid(&self) -> bool {
        matches!(self, Verdict::Invalid(_))
    }
}

/// Decodes `body` with `limits`, builds it if it is valid, and checks everything this module
/// knows about the outcome. `Err` is a broken invariant, described for a person.
pub fn check_body(
    body: &[u8],
    limits: &Limits,
    defaults: &MessageDefaults,
) -> Result<Verdict, String> {
    let job = match job::decode(body, limits) {
        Ok(job) => job,
        Err(InvalidJob(reason)) => {
            check_reason(&reason)?;
            return Ok(Verdict::Invalid(reason));
        }
    };
    check_decoded(body, &job, limits)?;
    let out = match message::build(&job, body, defaults) {
        Ok(out) => out,
        // The checks' defaults always have a sender, and a decoded job has a recipient and a body:
        // a job that decodes but cannot be built means decoding let something through that lettre
        // refuses, and the reason it would get is lettre's, not one made for a person.
        Err(InvalidJob(reason)) => {
            return Err(format!(
                "job decoded but could not be built: {}",
                cut(&reason)
            ));
        }
    };
    let sender = job
        .from
        .as_ref()
        .or(defaults.from.as_ref())
        .map(|m| m.email.to_string())
        .unwrap_or_default();
    let mail_from = out
        .envelope
        .from()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if mail_from != sender {
        return Err(format!(
            "envelope sender {mail_from:?}, expected {sender:?}"
        ));
    }
    let rcpt_to: Vec<String> = out.envelope.to().iter().map(|a| a.to_string()).collect();
    check_message(&job, &out.bytes, &rcpt_to)?;
    let ids = header_fields(&out.bytes)?
        .into_iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("message-id"))
        .map(|(_, value)| value.trim().to_string())
        .collect::<Vec<_>>();
    if ids != [out.message_id.clone()] {
        return Err(format!(
            "Message-ID headers {ids:?}, expected [{:?}]",
            out.message_id
        ));
    }
    Ok(Verdict::Built(Box::new(out)))
}

/// A reason is for a person: present, short, one line.
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.trim().is_empty() {
        return Err("an invalid job without a reason".into());
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(format!(
            "a reason of {} bytes (at most {MAX_REASON_BYTES}): {}",
            reason.len(),
            cut(reason)
        ));
    }
    if reason.contains(['\r', '\n', '\0']) {
        return Err(format!("a reason with a line break or NUL: {reason:?}"));
    }
    Ok(())
}

/// A decoded job keeps every limit, and holds what its JSON declared: no recipient, header or
/// attachment more or less, no control character in anything that becomes a header.
pub fn check_decoded(body: &[u8], job: &Job, limits: &Limits) -> Result<(), String> {
    if body.len() > limits.max_job_bytes {
        return Err(format!(
            "a {}-byte job accepted over worker.max_job_bytes = {}",
            body.len(),
            limits.max_job_bytes
        ));
    }
    let recipients = job.to.len() + job.cc.len() + job.bcc.len();
    if recipients == 0 || recipients > limits.max_recipients {
        return Err(format!(
            "{recipients} recipients accepted (limits.max_recipients = {})",
            limits.max_recipients
        ));
    }
    if job.attachments.len() > limits.max_attachments {
        return Err(format!(
            "{} attachments accepted over limits.max_attachments = {}",
            job.attachments.len(),
            limits.max_attachments
        ));
    }
    let total: usize = job.attachments.iter().map(|a| a.content.len()).sum();
    if total > limits.max_attachment_bytes {
        return Err(format!(
            "{total} attachment bytes accepted over limits.max_attachment_bytes = {}",
            limits.max_attachment_bytes
        ));
    }
    if job.headers.len() > limits.max_headers {
        return Err(format!(
            "{} headers accepted over limits.max_headers = {}",
            job.headers.len(),
            limits.max_headers
        ));
    }
    for (name, value) in &job.headers {
        if name.len() + 2 + value.len() > limits.max_header_bytes {
            return Err(format!(
                "header {name} of {} bytes accepted over limits.max_header_bytes = {}",
                name.len() + 2 + value.len(),
                limits.max_header_bytes
            ));
        }
        if WORKER_HEADERS
            .iter()
            .chain(["bcc", "sender"].iter())
            .any(|reserved| reserved.eq_ignore_ascii_case(name))
            || name.to_ascii_lowercase().starts_with("content-")
        {
            return Err(format!("the reserved header {name:?} was accepted"));
        }
        if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
            return Err(format!("the header name {name:?} was accepted"));
        }
        no_control("a header value", value)?;
    }
    no_control("the subject", &job.subject)?;
    for mailbox in job
        .to
        .iter()
        .chain(&job.cc)
        .chain(&job.bcc)
        .chain(&job.reply_to)
        .chain(&job.from)
    {
        no_control("an address", &mailbox.to_string())?;
    }
    for attachment in &job.attachments {
        no_control("an attachment filename", &attachment.filename)?;
    }

    // What the JSON itself declares, read independently of the decoder.
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("decoded, yet not JSON: {e}"))?;
    let count = |field: &str| match json.get(field) {
        None | Some(serde_json::Value::Null) => 0,
        Some(serde_json::Value::Array(list)) => list.len(),
        Some(_) => 1,
    };
    for (field, decoded) in [
        ("to", job.to.len()),
        ("cc", job.cc.len()),
        ("bcc", job.bcc.len()),
        ("reply_to", job.reply_to.len()),
        ("attachments", job.attachments.len()),
    ] {
        if count(field) != decoded {
            return Err(format!(
                "{field}: the JSON declares {} entries, the job has {decoded}",
                count(field)
            ));
        }
    }
    let declared: BTreeSet<&str> = json
        .get("headers")
        .and_then(|h| h.as_object())
        .map(|h| h.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let decoded: BTreeSet<&str> = job.headers.iter().map(|(n, _)| n.as_str()).collect();
    if declared != decoded {
        return Err(format!(
            "headers: the JSON declares {declared:?}, the job has {decoded:?}"
        ));
    }
    if json.get("subject").and_then(|s| s.as_str()) != Some(job.subject.as_str()) {
        return Err("the subject changed in decoding".into());
    }
    Ok(())
}

/// Checks a message as it leaves the worker (`data`, before dot-stuffing) and the envelope's
/// recipients (`rcpt_to`, in order) against the job it was built from.
pub fn check_message(job: &Job, data: &[u8], rcpt_to: &[String]) -> Result<(), String> {
    // An address with a non-ASCII local part or domain can only be written as UTF-8 (RFC 6532,
    // sent with SMTPUTF8); everything else is encoded to 7-bit.
    let eight_bit = job
        .to
        .iter()
        .chain(&job.cc)
        .chain(&job.reply_to)
        .chain(&job.from)
        .any(|m| !m.email.to_string().is_ascii());
    check_lines(data, eight_bit)?;

    // The envelope: every declared to, cc and bcc address once, in that order, and nothing else.
    let mut expected: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    for mailbox in job.to.iter().chain(&job.cc).chain(&job.bcc) {
        let address = mailbox.email.to_string();
        if seen.insert(address.to_ascii_lowercase()) {
            expected.push(address);
        }
    }
    if rcpt_to != expected.as_slice() {
        return Err(format!(
            "envelope recipients {}, expected {}",
            summary(rcpt_to),
            summary(&expected)
        ));
    }

    // The header section as written, read strictly: every line a field or a continuation.
    let fields = header_fields(data)?;
    let allowed: BTreeSet<String> = WORKER_HEADERS
        .iter()
        .map(|h| h.to_string())
        .chain(job.headers.iter().map(|(n, _)| n.to_ascii_lowercase()))
        .collect();
    let names: Vec<String> = fields.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    for name in &names {
        if !allowed.contains(name) {
            return Err(format!(
                "the header {name:?} is neither the worker's nor declared in the job's headers"
            ));
        }
    }
    let times = |name: &str| names.iter().filter(|n| *n == name).count();
    for (name, range) in [
        ("from", 1..=1),
        ("date", 1..=1),
        ("message-id", 1..=1),
        ("mime-version", 1..=1),
        ("content-type", 1..=1),
        ("to", 0..=1),
        ("cc", 0..=1),
        ("reply-to", 0..=1),
        ("subject", 0..=1),
        ("bcc", 0..=0),
    ] {
        if !range.contains(&times(name)) {
            return Err(format!("{} {name} headers", times(name)));
        }
    }
    for (name, _) in &job.headers {
        if times(&name.to_ascii_lowercase()) != 1 {
            return Err(format!(
                "the declared header {name} appears {} times",
                times(&name.to_ascii_lowercase())
            ));
        }
    }
    for (field, present) in [("to", !job.to.is_empty()), ("cc", !job.cc.is_empty())] {
        if (times(field) == 1) != present {
            return Err(format!(
                "{field} header present: {}, declared: {present}",
                times(field) == 1
            ));
        }
    }

    // The same message through a real MIME parser, as a mail client would read it.
    let parsed = MessageParser::default()
        .parse(data)
        .ok_or("mail-parser cannot parse the message")?;
    for header in parsed.headers() {
        let name = header.name.as_str().to_ascii_lowercase();
        if !allowed.contains(&name) {
            return Err(format!("mail-parser reads an undeclared header {name:?}"));
        }
    }
    if parsed.bcc().is_some() {
        return Err("mail-parser reads a Bcc header".into());
    }
    for (field, declared, read) in [("To", &job.to, parsed.to()), ("Cc", &job.cc, parsed.cc())] {
        let declared: Vec<String> = declared
            .iter()
            .map(|m| m.email.to_string().to_ascii_lowercase())
            .collect();
        let read: Vec<String> = read
            .map(|a| {
                a.iter()
                    .map(|a| a.address().unwrap_or("").to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        if declared.len() != read.len() {
            return Err(format!(
                "mail-parser reads {} addresses in {field}, {} were declared: {} vs {}",
                read.len(),
                declared.len(),
                summary(&read),
                summary(&declared)
            ));
        }
    }

    // The subject reads as the job gave it: no encoded-word look-alike decoded into something else.
    let read = parsed.subject().unwrap_or_default();
    if squash(read) != squash(&job.subject) {
        return Err(format!(
            "mail-parser reads the subject {:?}, declared {:?}",
            cut(read),
            cut(&job.subject)
        ));
    }

    // MIME structure: one leaf per declared body and attachment, and only the worker's headers
    // on the parts below the top.
    let expected_leaves =
        usize::from(job.text.is_some()) + usize::from(job.html.is_some()) + job.attachments.len();
    let leaves = parsed
        .parts
        .iter()
        .filter(|p| !matches!(p.body, PartType::Multipart(_)))
        .count();
    if leaves != expected_leaves {
        return Err(format!(
            "{leaves} MIME leaf parts, expected {expected_leaves} (text: {}, html: {}, \
             attachments: {})",
            job.text.is_some(),
            job.html.is_some(),
            job.attachments.len()
        ));
    }
    for part in parsed.parts.iter().skip(1) {
        for header in part.headers() {
            let name = header.name.as_str().to_ascii_lowercase();
            if !PART_HEADERS.contains(&name.as_str()) {
                return Err(format!("a MIME part has the header {name:?}"));
            }
        }
    }
    let filenames: Vec<&str> = parsed
        .attachments()
        .filter_map(|a| a.attachment_name())
        .collect();
    let declared: Vec<&str> = job
        .attachments
        .iter()
        .map(|a| a.filename.as_str())
        .collect();
    if filenames != declared {
        return Err(format!(
            "mail-parser reads the attachment names {filenames:?}, declared {declared:?}"
        ));
    }
    for (attachment, read) in job.attachments.iter().zip(parsed.attachments()) {
        // Binary parts only: mail-parser turns text/* into UTF-8 and keeps message/* parsed.
        if matches!(read.body, PartType::Binary(_) | PartType::InlineBinary(_))
            && read.contents() != attachment.content.as_slice()
        {
            return Err(format!(
                "the attachment {:?} does not read back byte for byte",
                attachment.filename
            ));
        }
    }
    Ok(())
}

/// Lines of the message: CRLF only (a bare CR or LF is how SMTP smuggling starts), no NUL,
/// 7-bit (or UTF-8 where `eight_bit` allows it), none longer than RFC 5322 allows.
pub fn check_lines(data: &[u8], eight_bit: bool) -> Result<(), String> {
    if let Some(at) = data
        .iter()
        .position(|&b| b == 0 || (b >= 0x80 && !eight_bit))
    {
        return Err(format!(
            "byte {:#04x} at offset {at}: the message is not 7-bit text",
            data[at]
        ));
    }
    if let Err(e) = std::str::from_utf8(data) {
        return Err(format!("the message is not UTF-8: {e}"));
    }
    let mut start = 0;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                if i - start > MAX_LINE_BYTES {
                    return Err(format!(
                        "a line of {} bytes at offset {start}: {}",
                        i - start,
                        cut(&String::from_utf8_lossy(&data[start..i]))
                    ));
                }
                i += 2;
                start = i;
            }
            b'\r' | b'\n' => {
                return Err(format!("a bare CR or LF at offset {i}"));
            }
            _ => i += 1,
        }
    }
    if data.len() - start > MAX_LINE_BYTES {
        return Err(format!("a last line of {} bytes", data.len() - start));
    }
    Ok(())
}

/// The top header section as (name, unfolded value), read strictly: every line up to the first
/// empty one is `name: value` with a printable-ASCII name, or a continuation starting with WSP.
pub fn header_fields(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.is_empty() {
            return Ok(fields);
        }
        if line.starts_with([' ', '\t']) {
            match fields.last_mut() {
                Some((_, value)) => value.push_str(line),
                None => return Err("the message starts with a continuation line".into()),
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("a header line without a colon: {:?}", cut(line)));
        };
        if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b)) {
            return Err(format!("a header line with the name {name:?}"));
        }
        fields.push((name.to_string(), value.to_string()));
    }
    Err("the message has no end of its header section".into())
}

/// Text with its whitespace runs made one space and trimmed: folding may change whitespace.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn no_control(what: &str, text: &str) -> Result<(), String> {
    match text.chars().find(|c| c.is_control() && *c != '\t') {
        Some(c) => Err(format!(
            "{what} with the control character {c:?} was accepted"
        )),
        None => Ok(()),
    }
}

/// The first 200 bytes of `text`, for messages about huge inputs.
fn cut(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}… ({} bytes)", &text[..end], text.len())
    } else {
        text.to_string()
    }
}

fn summary(list: &[String]) -> String {
    if list.len() <= 6 {
        format!("{list:?}")
    } else {
        format!("{:?}… ({} in all)", &list[..6], list.len())
    }
}
