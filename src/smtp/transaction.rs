//! One mail transaction on an open session: the envelope (MAIL, RCPT for each recipient, DATA),
//! then the message. Each recipient's reply is kept: a relay that refuses one recipient still
//! gets the message for the others.

use std::fmt::{self, Write as _};
use std::time::Duration;

use lettre::Address;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio_util::sync::CancellationToken;

use super::connect::Offers;
use super::error::{JobMeaning, Local, SendError, Stage, StageCell, Stop, Verdict};
use crate::message::Outgoing;

/// What a relay did with a message.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The relay's final reply, e.g. `250 2.0.0 Ok: queued as 4F1`, when at least one recipient
    /// took the message.
    pub reply: Option<String>,
    /// Recipients that have the message.
    pub accepted: Vec<Address>,
    /// Recipients the relay refused, each with its reply.
    pub refused: Vec<Refusal>,
}

/// A recipient the relay would not take.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The recipient refused.
    pub recipient: Address,
    /// The relay's reply code.
    pub code: Option<u16>,
    /// The reply, e.g. `550 5.1.1 no such user`.
    pub reply: String,
    /// For good (the reply's verdict is `Verdict::Rejected`), or for now.
    pub permanent: bool,
}

pub(super) struct TransactionFailure {
    pub(super) error: Stop,
    /// The relay closed a reused session before the transaction started: try a new one.
    pub(super) stale_session: bool,
    /// The session is in a clean state (after RSET) and can go back to the pool.
    pub(super) session_reusable: bool,
}

/// A group of commands written at once (RFC 2920 pipelining); lettre writes it as one command.
struct Pipelined(String);

impl fmt::Display for Pipelined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The DATA payload of RFC 5321 4.5.2: every line that starts with "." gets another one, and the
/// data ends with CRLF "." CRLF.
pub(super) struct MessageData<'a>(pub(super) &'a str);

impl fmt::Display for MessageData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.starts_with('.') {
            f.write_char('.')?;
        }
        let mut start = 0;
        for found in memchr::memmem::find_iter(text.as_bytes(), b"\r\n.") {
            // Up to and including the CRLF, then the extra dot; the line's own dot follows.
            f.write_str(&text[start..found + 2])?;
            f.write_char('.')?;
            start = found + 2;
        }
        f.write_str(&text[start..])?;
        if !text.ends_with("\r\n") {
            f.write_str("\r\n")?;
        }
        f.write_str(".\r\n")
    }
}

type Reply = Result<Response, lettre::transport::smtp::Error>;

/// The replies to MAIL, each RCPT and DATA. Without pipelining DATA is sent only when some
/// recipient was taken, and nothing follows a refused MAIL.
struct EnvelopeReplies {
    mail: Reply,
    rcpts: Vec<Reply>,
    data: Option<Reply>,
    /// A reply could not be read: the session is gone.
    broken: bool,
}

fn no_code(reply: &Reply) -> bool {
    matches!(reply, Err(e) if e.status().is_none())
}

/// A refusal that ends the session for every recipient: the relay closing (421).
fn closing(reply: &Reply) -> bool {
    matches!(reply, Err(e) if e.status().map(u16::from) == Some(421))
}

/// MAIL, RCPT for each recipient and DATA: in one write when the relay offers PIPELINING, which
/// saves two round trips per message, else one at a time.
async fn envelope(
    conn: &mut AsyncSmtpConnection,
    mail: Mail,
    rcpts: Vec<Rcpt>,
    pipelining: bool,
) -> EnvelopeReplies {
    if pipelining {
        let mut group = String::with_capacity(64 * (rcpts.len() + 2));
        let _ = write!(group, "{mail}");
        for rcpt in &rcpts {
            let _ = write!(group, "{rcpt}");
        }
        let _ = write!(group, "{Data}");
        let mail = conn.command(Pipelined(group)).await;
        let mut replies = EnvelopeReplies {
            broken: no_code(&mail),
            mail,
            rcpts: Vec::with_capacity(rcpts.len()),
            data: None,
        };
        // Every command of the group gets a reply, refused or not; read them all to stay in step.
        for _ in &rcpts {
            if replies.broken {
                return replies;
            }
            let reply = conn.read_response().await;
            replies.broken = no_code(&reply);
            replies.rcpts.push(reply);
        }
        if !replies.broken {
            let reply = conn.read_response().await;
            replies.broken = no_code(&reply);
            replies.data = Some(reply);
        }
        return replies;
    }
    let mail = conn.command(mail).await;
    let mut replies = EnvelopeReplies {
        broken: no_code(&mail),
        mail,
        rcpts: Vec::with_capacity(rcpts.len()),
        data: None,
    };
    if replies.mail.is_err() {
        return replies;
    }
    for rcpt in rcpts {
        let reply = conn.command(rcpt).await;
        replies.broken = no_code(&reply);
        let stop = replies.broken || closing(&reply);
        replies.rcpts.push(reply);
        if stop {
            return replies;
        }
    }
    if replies.rcpts.iter().any(Result::is_ok) {
        let reply = conn.command(Data).await;
        replies.broken = no_code(&reply);
        replies.data = Some(reply);
    }
    replies
}

/// The envelope, then the message to the recipients the relay took; with it, whether the
/// session can go back to the pool. On a refusal the session is reset (RSET) and kept when it can
/// be; a relay closing the session at MAIL FROM marks it stale.
pub(super) async fn transaction(
    conn: &mut AsyncSmtpConnection,
    offers: Offers,
    out: &Outgoing,
    stage: &StageCell,
    abandon: &CancellationToken,
) -> Result<(Sent, bool), TransactionFailure> {
    let envelope_ = &out.envelope;
    let mut parameters = Vec::new();
    let non_ascii_addresses = envelope_
        .from()
        .into_iter()
        .chain(envelope_.to())
        .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii_addresses {
        if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err(TransactionFailure {
                error: SendError::local(
                    Local::Unsendable,
                    "an address is not ASCII and the relay does not support SMTPUTF8".into(),
                    Stage::Mail,
                )
                .into(),
                stale_session: false,
                session_reusable: true,
            });
        }
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if !out.bytes.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    if let Some(limit) = offers.size {
        let size = out.bytes.len();
        // RFC 1870: over the advertised limit, the relay would refuse it after the whole
        // message was sent; say so now, and never send it.
        if limit > 0 && size as u64 > limit {
            return Err(TransactionFailure {
                error: SendError::local(
                    Local::Unsendable,
                    format!(
                        "the message is {size} bytes and the relay takes at most {limit} (its \
                         EHLO SIZE): not sent"
                    ),
                    Stage::Mail,
                )
                .into(),
                stale_session: false,
                session_reusable: true,
            });
        }
        parameters.push(MailParameter::Size(size));
    }

    stage.set(Stage::Mail);
    let mail = Mail::new(envelope_.from().cloned(), parameters);
    let rcpts: Vec<Rcpt> = envelope_
        .to()
        .iter()
        .map(|r| Rcpt::new(r.clone(), vec![]))
        .collect();
    let replies = envelope(conn, mail, rcpts, offers.pipelining).await;
    // Whether the relay took DATA (354) and now waits for the message.
    let in_data = matches!(replies.data, Some(Ok(_)));

    match &replies.mail {
        Ok(reply) if u16::from(reply.code()) == 250 => {}
        // 221 and the like: the relay is saying goodbye, as some do to idle sessions.
        Ok(reply) => {
            return Err(TransactionFailure {
                error: SendError::unexpected(
                    u16::from(reply.code()),
                    &reply.message().collect::<Vec<_>>().join(" "),
                    Stage::Mail,
                )
                .into(),
                stale_session: true,
                session_reusable: false,
            });
        }
        Err(e) => {
            let error = SendError::from_lettre(e, Stage::Mail);
            // No reply code: the socket is gone. 421: the relay is closing it.
            let gone = replies.broken || error.code() == Some(421);
            return Err(TransactionFailure {
                stale_session: gone,
                session_reusable: !gone && !in_data && reset(conn).await,
                error: error.into(),
            });
        }
    }

    stage.set(Stage::Rcpt);
    let mut accepted = Vec::with_capacity(replies.rcpts.len());
    let mut refused = Vec::new();
    for (reply, recipient) in replies.rcpts.iter().zip(envelope_.to()) {
        match reply {
            Ok(_) => accepted.push(recipient.clone()),
            Err(e) => {
                let error = SendError::from_lettre(e, Stage::Rcpt);
                match error.verdict() {
                    // A reply about this recipient alone: the others still get the message.
                    Verdict::Rejected | Verdict::Throttled | Verdict::Deferred
                        if error.code().is_some() =>
                    {
                        refused.push(Refusal {
                            recipient: recipient.clone(),
                            code: error.code(),
                            reply: error.message().to_string(),
                            permanent: error.verdict().job() == JobMeaning::Rejected,
                        });
                    }
                    // No reply, the relay closing or failing, or wanting authentication: not
                    // about this recipient, so the whole message failed.
                    Verdict::Rejected
                    | Verdict::Throttled
                    | Verdict::Deferred
                    | Verdict::Auth
                    | Verdict::Ambiguous
                    | Verdict::RelayOverloaded
                    | Verdict::RelayUnavailable => {
                        let reusable = !replies.broken && !in_data && error.code() != Some(421);
                        return Err(TransactionFailure {
                            session_reusable: reusable && reset(conn).await,
                            stale_session: false,
                            error: error.context(format_args!("recipient {recipient}")).into(),
                        });
                    }
                }
            }
        }
    }
    if replies.broken {
        return Err(TransactionFailure {
            error: SendError::local(
                Local::Broken,
                "the relay closed the connection during the envelope".into(),
                Stage::Rcpt,
            )
            .into(),
            stale_session: false,
            session_reusable: false,
        });
    }
    if accepted.is_empty() {
        // Nobody to send to. Pipelined, DATA was refused too; an odd relay that took it anyway
        // waits for a message, and the only way out of that without one is to drop the session.
        let reusable = !in_data && reset(conn).await;
        return Ok((
            Sent {
                reply: None,
                accepted,
                refused,
            },
            reusable,
        ));
    }

    stage.set(Stage::Data);
    match replies.data {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            let error = SendError::from_lettre(&e, Stage::Data);
            let reusable = error.code() != Some(421);
            return Err(TransactionFailure {
                session_reusable: reusable && reset(conn).await,
                stale_session: false,
                error: error.into(),
            });
        }
        None => {
            return Err(TransactionFailure {
                error: SendError::local(
                    Local::Broken,
                    "the relay did not answer every command".into(),
                    Stage::Data,
                )
                .into(),
                stale_session: false,
                session_reusable: false,
            });
        }
    }
    // Last moment to give up without the relay having the message.
    if abandon.is_cancelled() {
        return Err(TransactionFailure {
            error: Stop::Abandoned,
            stale_session: false,
            session_reusable: false,
        });
    }
    stage.set(Stage::DataEnd);
    // The message, dot-stuffed and terminated, in one write (lettre's own `message` stuffs byte
    // by byte and writes the final dot separately: two syscalls and a slow loop per message).
    // The built message is UTF-8 (lettre encodes bodies as 7bit, quoted-printable, base64 or
    // UTF-8 text), which lettre's command API needs; anything else takes lettre's path.
    let result = match std::str::from_utf8(&out.bytes) {
        Ok(text) => conn.command(MessageData(text)).await,
        Err(_) => {
            // lettre ends the data with CRLF "." CRLF whatever it ends with.
            let data = out.bytes.strip_suffix(b"\r\n").unwrap_or(&out.bytes);
            conn.message(data).await
        }
    };
    match result {
        Ok(response) => Ok((
            Sent {
                reply: Some(format!(
                    "{} {}",
                    u16::from(response.code()),
                    response.message().collect::<Vec<_>>().join(" ")
                )),
                accepted,
                refused,
            },
            true,
        )),
        Err(e) => {
            let error = SendError::from_lettre(&e, Stage::DataEnd);
            // After the final reply the transaction is over; no RSET needed.
            let reusable = error.code().is_some() && error.code() != Some(421);
            Err(TransactionFailure {
                error: error.into(),
                stale_session: false,
                session_reusable: reusable,
            })
        }
    }
}

/// RSET after a refused command; true if the session is clean again.
pub(super) async fn reset(conn: &mut AsyncSmtpConnection) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(5), conn.command(Rset)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::MessageData;

    #[test]
    fn message_data_is_dot_stuffed_and_terminated() {
        let cases = [
            ("a\r\nb\r\n", "a\r\nb\r\n.\r\n"),
            ("a\r\nb", "a\r\nb\r\n.\r\n"),
            (
                ".x\r\n.\r\n..y\r\nz.\r\n",
                "..x\r\n..\r\n...y\r\nz.\r\n.\r\n",
            ),
            ("", "\r\n.\r\n"),
            ("no dot\r\n. ", "no dot\r\n.. \r\n.\r\n"),
        ];
        for (data, wire) in cases {
            assert_eq!(MessageData(data).to_string(), wire, "{data:?}");
        }
    }
}
