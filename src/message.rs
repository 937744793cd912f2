//! Builds the MIME message and the SMTP envelope for a job. Pure: a job in, bytes out.

use std::collections::HashSet;
use std::fmt::Write as _;

use base64::Engine as _;
use lettre::address::Envelope;
use lettre::message::header::ContentTransferEncoding;
use lettre::message::header::{self, HeaderName, HeaderValue, Headers};
use lettre::message::{Attachment, Body, Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::{Address, Message};
use sha2::{Digest, Sha256};

use crate::config::is_dot_atom;
use crate::job::{InvalidJob, Job};

/// What the worker fills in when a job leaves it out.
#[derive(Debug, Clone, Default)]
pub struct MessageDefaults {
    /// Sender for jobs without `from` (`smtp.from`).
    pub from: Option<Mailbox>,
    /// Domain of Message-IDs (`smtp.message_id_domain`); else the sender's domain.
    pub message_id_domain: Option<String>,
}

impl MessageDefaults {
    /// The defaults `[smtp]` gives (`smtp.from`, `smtp.message_id_domain`); both were checked
    /// when the configuration was loaded.
    pub fn of(smtp: &crate::config::SmtpConfig) -> Self {
        Self {
            from: smtp.from.as_deref().and_then(|from| from.parse().ok()),
            message_id_domain: smtp.message_id_domain.clone(),
        }
    }
}

/// A message ready for the relay.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub envelope: Envelope,
    pub bytes: Vec<u8>,
    pub message_id: String,
    /// The From address's domain, lower case: whose DKIM keys sign it.
    pub from_domain: String,
}

/// Domain used when the sender's own cannot stand in a Message-ID (an IDN or an address literal).
const FALLBACK_ID_DOMAIN: &str = "amqp-mailer.invalid";

/// RFC 5322 2.1.1: a line is at most 998 bytes, CRLF excluded. Relays refuse longer lines, or
/// break them where they like.
const MAX_LINE: usize = 998;

/// Where a header is folded between addresses or encoded words (RFC 5322 2.1.1's "should").
const FOLD_AT: usize = 76;

/// Bytes of text per RFC 2047 encoded word: 45 bytes are 60 in base64, and with `=?utf-8?b?` and
/// `?=` the word is 72, under RFC 2047's 75.
const ENCODED_WORD_BYTES: usize = 45;

/// Builds the message. `body` is the job as published: a job without an `id` gets a Message-ID
/// derived from it, so that the same job redelivered or retried carries the same Message-ID and
/// receivers can drop the duplicate.
pub fn build(job: &Job, body: &[u8], defaults: &MessageDefaults) -> Result<Outgoing, InvalidJob> {
    let from = job
        .from
        .clone()
        .or_else(|| defaults.from.clone())
        .ok_or_else(|| {
            InvalidJob("no sender: the job has no `from` and smtp.from is unset".into())
        })?;
    let message_id = message_id(job, body, &from, defaults);

    let mut builder = Message::builder()
        .from(from.clone())
        .raw_header(subject(&job.subject))
        .message_id(Some(message_id.clone()));
    // Each address header is written once, with all its mailboxes: lettre's `to()` re-parses the
    // header it has so far on every call, which made a job of 10,000 recipients take minutes.
    for (name, mailboxes) in [
        ("Reply-To", &job.reply_to),
        ("To", &job.to),
        ("Cc", &job.cc),
    ] {
        if !mailboxes.is_empty() {
            builder = builder.raw_header(address_list(name, mailboxes));
        }
    }
    // Bcc never becomes a header: it is only in the envelope below.
    for (name, value) in &job.headers {
        let name = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| InvalidJob(format!("headers: {name:?} is not a header name")))?;
        builder = builder.raw_header(fitted(name, value));
    }
    builder = builder.envelope(envelope(job, &from)?);

    let body_part = match (&job.text, &job.html) {
        (Some(text), Some(html)) => {
            Part::Multi(MultiPart::alternative_plain_html(crlf(text), crlf(html)))
        }
        (Some(text), None) => Part::Single(SinglePart::plain(crlf(text))),
        (None, Some(html)) => Part::Single(SinglePart::html(crlf(html))),
        (None, None) => return Err(InvalidJob("no body: give text, html or both".into())),
    };
    let message = if job.attachments.is_empty() {
        match body_part {
            Part::Single(part) => builder.singlepart(part),
            Part::Multi(part) => builder.multipart(part),
        }
    } else {
        let mut mixed = match body_part {
            Part::Single(part) => MultiPart::mixed().singlepart(part),
            Part::Multi(part) => MultiPart::mixed().multipart(part),
        };
        for attachment in &job.attachments {
            mixed = mixed.singlepart(Attachment::new(attachment.filename.clone()).body(
                base64_body(&attachment.content)?,
                attachment.content_type.clone(),
            ));
        }
        builder.multipart(mixed)
    }
    .map_err(|e| InvalidJob(format!("cannot build the message: {e}")))?;

    Ok(Outgoing {
        envelope: message.envelope().clone(),
        bytes: message.formatted(),
        message_id,
        from_domain: from.email.domain().to_ascii_lowercase(),
    })
}

enum Part {
    Single(SinglePart),
    Multi(MultiPart),
}

/// An attachment's content, always base64. Left to choose, lettre sends ASCII content as 7bit and
/// byte for byte: a bare LF, a NUL, or `\n.\r\n`, which lettre's dot-stuffing (after CRLF only)
/// lets through and some relays take as the end of the data, so that what follows in the
/// attachment would be read as SMTP commands: another mail, to recipients the job never declared.
fn base64_body(content: &[u8]) -> Result<Body, InvalidJob> {
    // lettre refuses only 7bit and 8bit for content that needs more; base64 takes any bytes.
    Body::new_with_encoding(content.to_vec(), ContentTransferEncoding::Base64)
        .map_err(|_| InvalidJob("internal: an attachment could not be base64-encoded".into()))
}

/// A body with every line break CRLF. lettre turns a bare LF into CRLF but leaves a bare CR, and
/// a bare CR (or LF) in the data is what SMTP smuggling is made of: relays read them differently.
///
/// Written out as CRLF here, in one pass: lettre would otherwise insert each CR into the string one
/// at a time, which costs a copy of the rest of the body per line.
fn crlf(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + text.len() / 32 + 2);
    let mut start = 0;
    for at in memchr::memchr2_iter(b'\r', b'\n', bytes) {
        if at < start {
            continue; // the LF of a CRLF already written
        }
        out.push_str(&text[start..at]);
        out.push_str("\r\n");
        start = if bytes[at] == b'\r' && bytes.get(at + 1) == Some(&b'\n') {
            at + 2
        } else {
            at + 1
        };
    }
    out.push_str(&text[start..]);
    out
}

/// The subject as lettre writes it, unless it holds what a mail client would decode as an RFC 2047
/// encoded word (`=?utf-8?b?…?=`): then all of it is encoded, so that the reader sees the text the
/// job gave, not what the look-alike decodes to (a line break and a Bcc line, say).
fn subject(subject: &str) -> HeaderValue {
    let name = HeaderName::new_from_ascii_str("Subject");
    if subject.contains("=?") {
        return HeaderValue::dangerous_new_pre_encoded(
            name,
            subject.to_string(),
            encoded_words(subject),
        );
    }
    fitted(name, subject)
}

/// One header as lettre encodes it (RFC 2047 for non-ASCII, folded at spaces), unless that leaves
/// a line longer than RFC 5322 allows: a run of text with no space to fold at. Then the whole
/// value is written as RFC 2047 encoded words, one per line, which decode to the same text.
fn fitted(name: HeaderName, value: &str) -> HeaderValue {
    // ASCII is written as given (folding only shortens lines): nothing to check when it fits.
    if value.is_ascii() && name.len() + ": ".len() + value.len() <= MAX_LINE {
        return HeaderValue::new(name, value.to_string());
    }
    // lettre encodes each non-ASCII word on its own and writes the whitespace between them as
    // is; between two encoded words a reader drops it, so a run of more than one space (or a
    // tab) was lost whole (`–  a你好` read as `–a你好`). Encoded whole, the whitespace travels
    // inside the encoded text.
    if !value.is_ascii() && (value.contains("  ") || value.contains('\t')) {
        return HeaderValue::dangerous_new_pre_encoded(
            name,
            value.to_string(),
            encoded_words(value),
        );
    }
    let encoded = HeaderValue::new(name.clone(), value.to_string());
    let mut headers = Headers::new();
    headers.insert_raw(encoded.clone());
    if headers
        .to_string()
        .split("\r\n")
        .all(|line| line.len() <= MAX_LINE)
    {
        return encoded;
    }
    HeaderValue::dangerous_new_pre_encoded(name, value.to_string(), encoded_words(value))
}

/// `text` as RFC 2047 "B" encoded words of at most 75 bytes, folded between words (whitespace
/// between encoded words is not part of the text).
fn encoded_words(text: &str) -> String {
    let mut words = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(ENCODED_WORD_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let chunk = base64::engine::general_purpose::STANDARD.encode(&rest[..end]);
        words.push(format!("=?utf-8?b?{chunk}?="));
        rest = &rest[end..];
    }
    words.join("\r\n ")
}

/// An address header with all its mailboxes, folded between them. lettre writes a list on one
/// line, which for a hundred recipients is far past RFC 5322's 998 bytes.
fn address_list(name: &'static str, mailboxes: &[Mailbox]) -> HeaderValue {
    let mut value = String::new();
    let mut line = name.len() + ": ".len();
    for (i, mailbox) in mailboxes.iter().enumerate() {
        let encoded = encoded_mailbox(mailbox);
        let first_line = encoded.split("\r\n").next().unwrap_or_default().len();
        if i > 0 {
            value.push(',');
            line += 1;
            if line + 1 + first_line > FOLD_AT {
                value.push_str("\r\n");
                line = 0;
            }
            value.push(' ');
            line += 1;
        }
        value.push_str(&encoded);
        line = match encoded.rsplit_once("\r\n") {
            Some((_, last)) => last.len(),
            None => line + encoded.len(),
        };
    }
    let raw = Mailboxes::from_iter(mailboxes.iter().cloned()).to_string();
    HeaderValue::dangerous_new_pre_encoded(HeaderName::new_from_ascii_str(name), raw, value)
}

/// One mailbox as lettre writes it in an address header (display name quoted or RFC 2047
/// encoded as needed).
fn encoded_mailbox(mailbox: &Mailbox) -> String {
    let mut headers = Headers::new();
    headers.set(header::To::from(Mailboxes::from(mailbox.clone())));
    let line = headers.to_string();
    line.strip_prefix("To: ")
        .and_then(|rest| rest.strip_suffix("\r\n"))
        .unwrap_or_default()
        .to_string()
}

/// Envelope: the sender, and every recipient once (to, cc and bcc, in that order).
fn envelope(job: &Job, from: &Mailbox) -> Result<Envelope, InvalidJob> {
    let mut recipients: Vec<Address> = Vec::new();
    let mut seen = HashSet::new();
    for mailbox in job.to.iter().chain(&job.cc).chain(&job.bcc) {
        let address = &mailbox.email;
        // Domains are case-insensitive; local parts in practice too. One copy per mailbox.
        if seen.insert(AsRef::<str>::as_ref(address).to_ascii_lowercase()) {
            recipients.push(address.clone());
        }
    }
    Envelope::new(Some(from.email.clone()), recipients)
        .map_err(|e| InvalidJob(format!("cannot build the envelope: {e}")))
}

fn message_id(job: &Job, body: &[u8], from: &Mailbox, defaults: &MessageDefaults) -> String {
    let domain = defaults
        .message_id_domain
        .clone()
        .unwrap_or_else(|| from.email.domain().to_ascii_lowercase());
    let domain = if is_dot_atom(&domain) {
        domain
    } else {
        FALLBACK_ID_DOMAIN.to_string()
    };
    let local = match &job.id {
        Some(id) => id.clone(),
        None => {
            let digest = Sha256::digest(body);
            // 128 bits: no two different jobs will share it.
            digest[..16]
                .iter()
                .fold(String::with_capacity(32), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                })
        }
    };
    format!("<{local}@{domain}>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Limits, decode};

    fn defaults() -> MessageDefaults {
        MessageDefaults {
            from: Some("Mailer <mailer@example.org>".parse().expect("address")),
            message_id_domain: None,
        }
    }

    fn build_json(json: &str) -> Outgoing {
        let job = decode(json.as_bytes(), &Limits::default()).expect("valid job");
        build(&job, json.as_bytes(), &defaults()).expect("builds")
    }

    fn text(out: &Outgoing) -> String {
        String::from_utf8(out.bytes.clone()).expect("utf-8 message")
    }

    #[test]
    fn message_id_comes_from_job_id() {
        let out = build_json(r#"{"id":"order-1","to":"a@b.example","subject":"s","text":"t"}"#);
        assert_eq!(out.message_id, "<order-1@example.org>");
        assert!(text(&out).contains("Message-ID: <order-1@example.org>"));
    }

    #[test]
    fn message_id_without_id_is_stable_for_the_same_body() {
        let json = r#"{"to":"a@b.example","subject":"s","text":"t"}"#;
        let first = build_json(json);
        let second = build_json(json);
        assert_eq!(first.message_id, second.message_id);
        let other = build_json(r#"{"to":"a@b.example","subject":"s","text":"u"}"#);
        assert_ne!(first.message_id, other.message_id);
    }

    #[test]
    fn bcc_is_in_envelope_only() {
        let out = build_json(
            r#"{"to":"a@b.example","cc":"c@d.example","bcc":["hidden@e.example","A@b.example"],
                "subject":"s","text":"t"}"#,
        );
        let rcpts: Vec<String> = out.envelope.to().iter().map(|a| a.to_string()).collect();
        assert_eq!(rcpts, ["a@b.example", "c@d.example", "hidden@e.example"]);
        let text = text(&out);
        assert!(!text.contains("hidden"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("bcc:"), "{text}");
    }

    #[test]
    fn multipart_shapes() {
        let both = text(&build_json(
            r#"{"to":"a@b.example","subject":"s","text":"plain","html":"<p>h</p>"}"#,
        ));
        assert!(both.contains("multipart/alternative"), "{both}");
        let attached = text(&build_json(
            r#"{"to":"a@b.example","subject":"s","text":"plain",
                "attachments":[{"filename":"r.pdf","content_type":"application/pdf","content_base64":"JVBERg=="}]}"#,
        ));
        assert!(attached.contains("multipart/mixed"), "{attached}");
        assert!(attached.contains("application/pdf"), "{attached}");
        assert!(attached.contains("filename=\"r.pdf\""), "{attached}");
    }

    #[test]
    fn utf8_subject_is_encoded() {
        let out = text(&build_json(
            r#"{"to":"Zoë <z@b.example>","subject":"Grüße – 你好","text":"t"}"#,
        ));
        let subject = out
            .lines()
            .find(|l| l.starts_with("Subject:"))
            .expect("subject");
        assert!(
            subject.is_ascii() && subject.contains("=?utf-8?"),
            "{subject}"
        );
    }

    /// Every line of `out`, CRLF excluded.
    fn lines(out: &Outgoing) -> Vec<String> {
        text(out).split("\r\n").map(str::to_string).collect()
    }

    fn header<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
        let mut found = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.is_empty() {
                break;
            }
            if line.len() > name.len()
                && line[..name.len() + 1].eq_ignore_ascii_case(&format!("{name}:"))
            {
                found.push(i);
            }
        }
        found.iter().map(|&i| lines[i].as_str()).collect()
    }

    /// Regression (fuzz/regressions/decode_job/long-subject-word.json): a subject word with no
    /// space to fold at made a line past RFC 5322's 998 bytes.
    #[test]
    fn long_subject_word_is_encoded_within_the_line_limit() {
        let subject = "x".repeat(2000);
        let out = build_json(&format!(
            r#"{{"to":"a@b.example","subject":"{subject}","text":"t"}}"#
        ));
        let lines = lines(&out);
        assert!(
            lines.iter().all(|l| l.len() <= 998),
            "a line over 998 bytes"
        );
        let parsed = mail_parser::MessageParser::default()
            .parse(&out.bytes)
            .expect("parses");
        assert_eq!(parsed.subject(), Some(subject.as_str()));
    }

    /// Regression (fuzz/regressions/decode_job/hundred-recipients-on-one-line.json): lettre wrote
    /// all the To addresses on one line; 100 recipients (the default limit) made 2 kB.
    #[test]
    fn address_headers_are_folded_between_addresses() {
        let to: Vec<String> = (0..100)
            .map(|i| format!("\"User {i}\" <user{i}@example.com>"))
            .collect();
        let json = serde_json::json!({"to": to, "subject": "s", "text": "t"});
        let out = build_json(&json.to_string());
        let lines = lines(&out);
        assert!(lines.iter().all(|l| l.len() <= 78), "folded at 76");
        assert_eq!(header(&lines, "To").len(), 1, "one To header");
        let parsed = mail_parser::MessageParser::default()
            .parse(&out.bytes)
            .expect("parses");
        let read: Vec<&str> = parsed
            .to()
            .expect("To")
            .iter()
            .filter_map(|a| a.address())
            .collect();
        assert_eq!(read.len(), 100);
        assert_eq!(read[99], "user99@example.com");
    }

    /// Regression (fuzz/regressions/decode_job/ten-thousand-reply-to.json): lettre's `to()` and
    /// `reply_to()` re-parse their header on every call, so 10,000 addresses took 40 s to build
    /// (reply_to is not even bounded by limits.max_recipients).
    #[test]
    fn ten_thousand_addresses_build_quickly() {
        let many: Vec<String> = (0..10_000).map(|i| format!("u{i}@example.com")).collect();
        let json =
            serde_json::json!({"to": "a@b.example", "reply_to": many, "subject": "s", "text": "t"});
        let job = decode(json.to_string().as_bytes(), &Limits::default()).expect("valid");
        // A bound on the wait, not a speed target: before the fix this took minutes in a debug
        // build, after it milliseconds.
        let (sent, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || sent.send(Box::new(build(&job, b"", &defaults()))));
        let out = received
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("10,000 reply-to addresses built within 60 s (quadratic again?)")
            .expect("builds");
        assert!(lines(&out).iter().all(|l| l.len() <= 998));
    }

    #[test]
    fn crlf_turns_every_kind_of_line_break_into_one_crlf() {
        assert_eq!(crlf(""), "");
        assert_eq!(crlf("plain"), "plain");
        assert_eq!(crlf("a\nb"), "a\r\nb");
        assert_eq!(crlf("a\r\nb"), "a\r\nb");
        assert_eq!(crlf("a\rb"), "a\r\nb");
        assert_eq!(crlf("\n\r\r\n\n\r"), "\r\n\r\n\r\n\r\n\r\n");
        assert_eq!(crlf("é\rü\n"), "é\r\nü\r\n");
    }

    /// Regression (fuzz/regressions/decode_job/bare-cr-in-body.json): lettre turns a bare LF into
    /// CRLF but left a bare CR in the data.
    #[test]
    fn bare_cr_in_bodies_becomes_crlf() {
        let out = build_json(
            r#"{"to":"a@b.example","subject":"s","text":"a\rb\n.\rc","html":"x\r.\r\ny"}"#,
        );
        let bytes = &out.bytes;
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\r' => assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                b'\n' => assert_eq!(bytes[i - 1], b'\r', "bare LF at {i}"),
                _ => {}
            }
        }
    }

    /// Regression (fuzz/seeds/decode_job/readme-example.json): lettre sent ASCII attachments as
    /// 7bit, byte for byte, bare LF, NUL and `\n.\r\n` (an SMTP smuggling end of data) included.
    #[test]
    fn attachments_are_always_base64() {
        let content = base64::engine::general_purpose::STANDARD
            .encode(b"%PDF-1.4\n.\r\nMAIL FROM:<x@evil.example>\r\n\0");
        let out = build_json(&format!(
            r#"{{"to":"a@b.example","subject":"s","text":"t",
                "attachments":[{{"filename":"a.txt","content_type":"text/plain","content_base64":"{content}"}}]}}"#
        ));
        let text = text(&out);
        assert!(!text.contains("MAIL FROM"), "{text}");
        assert!(!text.contains('\0'));
        assert!(text.contains("Content-Transfer-Encoding: base64"), "{text}");
        let parsed = mail_parser::MessageParser::default()
            .parse(&out.bytes)
            .expect("parses");
        assert_eq!(
            parsed.attachment(0).expect("attachment").contents(),
            b"%PDF-1.4\n.\r\nMAIL FROM:<x@evil.example>\r\n\0"
        );
    }

    /// An encoded-word look-alike in the subject is encoded itself, so that readers see the text
    /// the job gave instead of what it decodes to (here a line break and a Bcc line).
    #[test]
    fn encoded_word_look_alike_subject_reads_literally() {
        let subject = "Hi =?utf-8?b?DQpCY2M6IHZpY3RpbUBldmlsLmV4YW1wbGU=?=";
        let out = build_json(&format!(
            r#"{{"to":"a@b.example","subject":"{subject}","text":"t"}}"#
        ));
        let parsed = mail_parser::MessageParser::default()
            .parse(&out.bytes)
            .expect("parses");
        assert_eq!(parsed.subject(), Some(subject));
        assert!(parsed.bcc().is_none());
    }

    /// Found by the fuzzer: lettre wrote the two spaces between two encoded words, where a
    /// reader drops them.
    #[test]
    fn spaces_between_non_ascii_words_survive() {
        for subject in ["Grüße –  a你好 📧", "ü\tü", "a  ü   b"] {
            let json = serde_json::json!({"to": "a@b.example", "subject": subject, "text": "t"});
            let out = build_json(&json.to_string());
            let parsed = mail_parser::MessageParser::default()
                .parse(&out.bytes)
                .expect("parses");
            assert_eq!(parsed.subject(), Some(subject));
        }
    }

    #[test]
    fn missing_sender_is_invalid() {
        let json = r#"{"to":"a@b.example","subject":"s","text":"t"}"#;
        let job = decode(json.as_bytes(), &Limits::default()).expect("valid");
        let error =
            build(&job, json.as_bytes(), &MessageDefaults::default()).expect_err("no sender");
        assert!(error.0.contains("smtp.from"), "{error}");
    }
}
