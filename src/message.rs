//! Builds the MIME message and the SMTP envelope for a job. Pure: a job in, bytes out.

use std::fmt::Write as _;

use lettre::address::Envelope;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
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

/// A message ready for the relay.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub envelope: Envelope,
    pub bytes: Vec<u8>,
    pub message_id: String,
}

/// Domain used when the sender's own cannot stand in a Message-ID (an IDN or an address literal).
const FALLBACK_ID_DOMAIN: &str = "amqp-mailer.invalid";

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
        .subject(job.subject.clone())
        .message_id(Some(message_id.clone()));
    for mailbox in &job.reply_to {
        builder = builder.reply_to(mailbox.clone());
    }
    for mailbox in &job.to {
        builder = builder.to(mailbox.clone());
    }
    for mailbox in &job.cc {
        builder = builder.cc(mailbox.clone());
    }
    // Bcc never becomes a header: it is only in the envelope below.
    for (name, value) in &job.headers {
        let name = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| InvalidJob(format!("headers: {name:?} is not a header name")))?;
        builder = builder.raw_header(HeaderValue::new(name, value.clone()));
    }
    builder = builder.envelope(envelope(job, &from)?);

    let body_part = match (&job.text, &job.html) {
        (Some(text), Some(html)) => Part::Multi(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        )),
        (Some(text), None) => Part::Single(SinglePart::plain(text.clone())),
        (None, Some(html)) => Part::Single(SinglePart::html(html.clone())),
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
            mixed = mixed.singlepart(
                Attachment::new(attachment.filename.clone())
                    .body(attachment.content.clone(), attachment.content_type.clone()),
            );
        }
        builder.multipart(mixed)
    }
    .map_err(|e| InvalidJob(format!("cannot build the message: {e}")))?;

    Ok(Outgoing {
        envelope: message.envelope().clone(),
        bytes: message.formatted(),
        message_id,
    })
}

enum Part {
    Single(SinglePart),
    Multi(MultiPart),
}

/// Envelope: the sender, and every recipient once (to, cc and bcc, in that order).
fn envelope(job: &Job, from: &Mailbox) -> Result<Envelope, InvalidJob> {
    let mut recipients: Vec<Address> = Vec::new();
    for mailbox in job.to.iter().chain(&job.cc).chain(&job.bcc) {
        let address = &mailbox.email;
        // Domains are case-insensitive; local parts in practice too. One copy per mailbox.
        if !recipients
            .iter()
            .any(|known| AsRef::<str>::as_ref(known).eq_ignore_ascii_case(address.as_ref()))
        {
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

    #[test]
    fn missing_sender_is_invalid() {
        let json = r#"{"to":"a@b.example","subject":"s","text":"t"}"#;
        let job = decode(json.as_bytes(), &Limits::default()).expect("valid");
        let error =
            build(&job, json.as_bytes(), &MessageDefaults::default()).expect_err("no sender");
        assert!(error.0.contains("smtp.from"), "{error}");
    }
}
