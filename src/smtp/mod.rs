//! Sending over SMTP: a pool of lettre client sessions, a deadline on every send, and the
//! classification of every failure where it is born.
//!
//! The pool is ours rather than lettre's `AsyncSmtpTransport` pool, for three reasons measured or
//! read in lettre 0.11: its sockets have Nagle's algorithm on, which costs ~45 ms per message
//! against a delayed-ACK peer (we measured 45 ms vs 1 ms); a send cancelled by a deadline returns
//! its half-finished session to the pool; and it checks every pooled session with a NOOP round
//! trip. Here a session that hit the deadline is dropped, sessions are reused without NOOP, and a
//! pooled session the relay closed while idle is replaced at once without costing the job an
//! attempt.

mod connect;

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use connect::Connector;
pub use connect::TlsSetupError;

use crate::config::SmtpConfig;
use crate::message::Outgoing;
use crate::metrics::Metrics;

/// How far a send got; an error says where it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Connect = 0,
    Tls = 1,
    Greeting = 2,
    Auth = 3,
    Mail = 4,
    Rcpt = 5,
    Data = 6,
    /// The message and its final dot were sent; the relay's verdict was awaited.
    DataEnd = 7,
}

impl Stage {
    fn from_u8(value: u8) -> Stage {
        match value {
            0 => Stage::Connect,
            1 => Stage::Tls,
            2 => Stage::Greeting,
            3 => Stage::Auth,
            4 => Stage::Mail,
            5 => Stage::Rcpt,
            6 => Stage::Data,
            _ => Stage::DataEnd,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Stage::Connect => "connecting",
            Stage::Tls => "during TLS setup",
            Stage::Greeting => "at the greeting",
            Stage::Auth => "during AUTH",
            Stage::Mail => "after MAIL FROM",
            Stage::Rcpt => "after RCPT TO",
            Stage::Data => "after DATA",
            Stage::DataEnd => "after the message was sent",
        }
    }
}

/// The stage a send reached, readable after the send was cancelled by its deadline.
#[derive(Debug)]
pub(crate) struct StageCell(AtomicU8);

impl StageCell {
    fn new() -> Self {
        Self(AtomicU8::new(Stage::Connect as u8))
    }
    fn set(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::Relaxed);
    }
    fn get(&self) -> Stage {
        Stage::from_u8(self.0.load(Ordering::Relaxed))
    }
}

/// What kind of failure, for the retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// May pass: 4xx, network, TLS, a relay refusing service.
    Transient,
    /// The relay refused this message or a recipient for good.
    Permanent,
    /// Our credentials or the relay's authentication setup: retry, and tell the operator.
    Auth,
    /// No answer within the deadline.
    Timeout,
    /// Given up before the message was sent, because the job's delivery can no longer be settled
    /// (broker connection lost, shutdown grace over): the broker will deliver it again.
    Abandoned,
}

/// A failed send.
#[derive(Debug, Clone)]
pub struct SendError {
    pub class: FailureClass,
    /// The relay's reply code, when the failure is a reply.
    pub code: Option<u16>,
    /// The relay's reply text or the local error, with the stage it happened at.
    pub message: String,
    pub stage: Stage,
}

impl SendError {
    fn new(class: FailureClass, code: Option<u16>, message: String, stage: Stage) -> Self {
        Self {
            class,
            code,
            message,
            stage,
        }
    }

    /// The relay may have accepted the message: it was sent, and the verdict never came.
    pub fn is_ambiguous(&self) -> bool {
        self.stage == Stage::DataEnd && self.code.is_none()
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.stage.describe())
    }
}

/// Classifies a lettre error. Exhaustive on purpose: each code range is a decision.
pub(crate) fn classify(error: &lettre::transport::smtp::Error, stage: Stage) -> SendError {
    let text = error_text(error);
    if let Some(code) = error.status() {
        let code = u16::from(code);
        let about_message = matches!(
            stage,
            Stage::Mail | Stage::Rcpt | Stage::Data | Stage::DataEnd
        );
        let class = match code {
            // The relay is closing the session (shutdown, idle, too many connections).
            421 => FailureClass::Transient,
            400..=499 => FailureClass::Transient,
            // Authentication required, too weak, refused, or needs encryption first.
            530 | 534 | 535 | 538 => FailureClass::Auth,
            _ if stage == Stage::Auth => FailureClass::Auth,
            // Mailbox unavailable, not local, over quota or too big, bad address, refused.
            501 | 550..=554 if about_message => FailureClass::Permanent,
            // Anything else negative is the relay's setup or a protocol mismatch, not the
            // message: retrying is right and an operator sees the errors.
            500..=599 => FailureClass::Transient,
            // lettre only raises errors for 4xx and 5xx.
            0..=399 | 600..=u16::MAX => FailureClass::Transient,
        };
        return SendError::new(class, Some(code), format!("{code} {text}"), stage);
    }
    let class = if error.is_timeout() {
        FailureClass::Timeout
    } else if stage == Stage::Auth {
        // "No compatible authentication mechanism": a setup problem like a wrong password.
        FailureClass::Auth
    } else {
        FailureClass::Transient
    };
    // lettre wraps some connection errors in a second "Connection error: ".
    let text = error.to_string().replacen(
        "Connection error: Connection error: ",
        "Connection error: ",
        1,
    );
    SendError::new(class, None, text, stage)
}

/// The relay's words without lettre's "permanent error (550): " prefix.
fn error_text(error: &lettre::transport::smtp::Error) -> String {
    use std::error::Error as _;
    match error.source() {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}

/// A pooled SMTP session. Holds one of the relay's session permits while it lives.
struct Session {
    conn: AsyncSmtpConnection,
    /// The relay offered PIPELINING.
    pipelining: bool,
    last_used: Instant,
    gauge: Gauge,
    _permit: OwnedSemaphorePermit,
}

impl Session {
    fn new(
        (conn, pipelining): (AsyncSmtpConnection, bool),
        permit: OwnedSemaphorePermit,
        gauge: Gauge,
    ) -> Self {
        gauge.inc();
        Self {
            conn,
            pipelining,
            last_used: Instant::now(),
            gauge,
            _permit: permit,
        }
    }

    /// Says QUIT and closes, without waiting long on a relay that does not answer.
    async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.abort()).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A relay: where to connect, how, and the pool of sessions to it.
pub struct Relay {
    connector: Connector,
    /// One permit per open session: never more than the concurrency open at once.
    sessions: Arc<Semaphore>,
    idle: Mutex<Vec<Session>>,
    max_idle: usize,
    idle_timeout: Duration,
    deadline: Duration,
    auth_failing: AtomicBool,
    metrics: Arc<Metrics>,
}

/// An accepted message.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The relay's final reply, e.g. `250 2.0.0 Ok: queued as 4F1`.
    pub reply: String,
}

impl Relay {
    /// Prepares the relay (TLS settings, credentials); opens no connection.
    pub fn new(
        config: &SmtpConfig,
        max_sessions: usize,
        max_idle: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsSetupError> {
        Ok(Self {
            connector: Connector::new(config)?,
            sessions: Arc::new(Semaphore::new(max_sessions)),
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout: config.pool_idle_timeout,
            deadline: config.timeout,
            auth_failing: AtomicBool::new(false),
            metrics,
        })
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        self.connector.describe()
    }

    /// True after an authentication failure, until a session authenticates again.
    pub fn auth_failing(&self) -> bool {
        self.auth_failing.load(Ordering::Relaxed)
    }

    /// Sends one message, within the deadline (`smtp.timeout`) for the whole of it. Once
    /// `abandon` is cancelled, a send that has not yet started writing the message gives up.
    pub async fn send(
        &self,
        out: &Outgoing,
        abandon: &CancellationToken,
    ) -> Result<Accepted, SendError> {
        let started = Instant::now();
        let stage = StageCell::new();
        let send = self.send_inner(out, &stage, abandon);
        let result = match tokio::time::timeout(self.deadline, send).await {
            Ok(result) => result,
            // The cancelled send's session was dropped, never returned to the pool half-done.
            Err(_) => Err(SendError::new(
                FailureClass::Timeout,
                None,
                format!(
                    "no answer from {} within smtp.timeout = {:?}",
                    self.connector.endpoint(),
                    self.deadline
                ),
                stage.get(),
            )),
        };
        let outcome = match &result {
            Ok(_) => "delivered",
            Err(e) if e.class == FailureClass::Abandoned => return result,
            Err(e) if e.class == FailureClass::Permanent => "rejected",
            Err(_) => "failed",
        };
        self.metrics
            .smtp_send_duration
            .get_or_create(&crate::metrics::OutcomeLabel { outcome })
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Err(e) if e.class == FailureClass::Auth => {
                self.auth_failing.store(true, Ordering::Relaxed)
            }
            Ok(_) => self.auth_failing.store(false, Ordering::Relaxed),
            Err(_) => {}
        }
        result
    }

    async fn send_inner(
        &self,
        out: &Outgoing,
        stage: &StageCell,
        abandon: &CancellationToken,
    ) -> Result<Accepted, SendError> {
        // A pooled session may have been closed by the relay while idle; that shows at MAIL
        // FROM, before anything about the message was said. One fresh session is tried then.
        let mut fresh_only = false;
        loop {
            if abandon.is_cancelled() {
                return Err(abandoned(stage.get()));
            }
            let (mut session, reused) = self.checkout(stage, fresh_only).await?;
            match transaction(&mut session.conn, session.pipelining, out, stage, abandon).await {
                Ok(accepted) => {
                    session.last_used = Instant::now();
                    self.checkin(session);
                    return Ok(accepted);
                }
                Err(failure) if reused && !fresh_only && failure.stale_session => {
                    tracing::debug!(error = %failure.error, "pooled SMTP session was closed by the relay; opening a new one");
                    self.metrics.smtp_stale_connections.inc();
                    drop(session);
                    fresh_only = true;
                }
                Err(failure) => {
                    if failure.session_reusable {
                        session.last_used = Instant::now();
                        self.checkin(session);
                    }
                    return Err(failure.error);
                }
            }
        }
    }

    async fn checkout(
        &self,
        stage: &StageCell,
        fresh_only: bool,
    ) -> Result<(Session, bool), SendError> {
        if !fresh_only {
            loop {
                let candidate = self.lock_idle().pop();
                match candidate {
                    Some(session) if session.last_used.elapsed() < self.idle_timeout => {
                        return Ok((session, true));
                    }
                    // Past our idle timeout: the relay may be about to close it; don't risk it.
                    Some(expired) => {
                        tokio::spawn(expired.quit());
                    }
                    None => break,
                }
            }
        }
        let permit = match self.sessions.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => {
                return Err(SendError::new(
                    FailureClass::Transient,
                    None,
                    "the SMTP pool is shut down".into(),
                    Stage::Connect,
                ));
            }
        };
        let conn = self.connector.connect(stage).await?;
        Ok((
            Session::new(conn, permit, self.metrics.smtp_sessions_open.clone()),
            false,
        ))
    }

    fn checkin(&self, session: Session) {
        let mut idle = self.lock_idle();
        if idle.len() < self.max_idle && !self.sessions.is_closed() {
            idle.push(session);
        } else {
            drop(idle);
            tokio::spawn(session.quit());
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes (QUIT) the sessions idle longer than `smtp.pool_idle_timeout`. Called periodically.
    pub async fn reap_idle(&self) {
        let expired: Vec<Session> = {
            let mut idle = self.lock_idle();
            let (keep, expired) = idle
                .drain(..)
                .partition(|s: &Session| s.last_used.elapsed() < self.idle_timeout);
            *idle = keep;
            expired
        };
        futures_util::future::join_all(expired.into_iter().map(Session::quit)).await;
    }

    /// Stops opening sessions and closes the idle ones with QUIT. Sends in flight finish first
    /// (the caller waits for them); their sessions are closed when they come back.
    pub async fn close(&self) {
        self.sessions.close();
        let idle: Vec<Session> = self.lock_idle().drain(..).collect();
        futures_util::future::join_all(idle.into_iter().map(Session::quit)).await;
    }
}

struct TransactionFailure {
    error: SendError,
    /// The relay closed a reused session before the transaction started: try a new one.
    stale_session: bool,
    /// The session is in a clean state (after RSET) and can go back to the pool.
    session_reusable: bool,
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
struct MessageData<'a>(&'a str);

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

/// The replies to MAIL, each RCPT and DATA. Without pipelining the commands stop at the first
/// refusal, so later replies are missing.
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
        let refused = reply.is_err();
        replies.broken = no_code(&reply);
        replies.rcpts.push(reply);
        if refused {
            return replies;
        }
    }
    let reply = conn.command(Data).await;
    replies.broken = no_code(&reply);
    replies.data = Some(reply);
    replies
}

/// The envelope, then the message. On a refusal the session is reset (RSET) and kept when it can
/// be; a relay closing the session at MAIL FROM marks it stale.
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    pipelining: bool,
    out: &Outgoing,
    stage: &StageCell,
    abandon: &CancellationToken,
) -> Result<Accepted, TransactionFailure> {
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
                error: SendError::new(
                    FailureClass::Permanent,
                    None,
                    "an address is not ASCII and the relay does not support SMTPUTF8".into(),
                    Stage::Mail,
                ),
                stale_session: false,
                session_reusable: true,
            });
        }
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if !out.bytes.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }

    stage.set(Stage::Mail);
    let mail = Mail::new(envelope_.from().cloned(), parameters);
    let rcpts: Vec<Rcpt> = envelope_
        .to()
        .iter()
        .map(|r| Rcpt::new(r.clone(), vec![]))
        .collect();
    let replies = envelope(conn, mail, rcpts, pipelining).await;
    // Whether the relay took DATA (354) and now waits for the message.
    let in_data = matches!(replies.data, Some(Ok(_)));

    match &replies.mail {
        Ok(reply) if u16::from(reply.code()) == 250 => {}
        // 221 and the like: the relay is saying goodbye, as some do to idle sessions.
        Ok(reply) => {
            return Err(TransactionFailure {
                error: SendError::new(
                    FailureClass::Transient,
                    Some(u16::from(reply.code())),
                    format!(
                        "unexpected reply {} {}",
                        u16::from(reply.code()),
                        reply.message().collect::<Vec<_>>().join(" ")
                    ),
                    Stage::Mail,
                ),
                stale_session: true,
                session_reusable: false,
            });
        }
        Err(e) => {
            let error = classify(e, Stage::Mail);
            // No reply code: the socket is gone. 421: the relay is closing it.
            let gone = replies.broken || error.code == Some(421);
            return Err(TransactionFailure {
                stale_session: gone,
                session_reusable: !gone && !in_data && reset(conn).await,
                error,
            });
        }
    }
    stage.set(Stage::Rcpt);
    for (reply, recipient) in replies.rcpts.iter().zip(envelope_.to()) {
        if let Err(e) = reply {
            let mut error = classify(e, Stage::Rcpt);
            error.message = format!("{} (recipient {recipient})", error.message);
            // Pipelined, the relay may have taken DATA for the other recipients: the only way
            // out of the data phase without sending a message is to drop the session.
            let reusable = !replies.broken && !in_data && error.code != Some(421);
            return Err(TransactionFailure {
                session_reusable: reusable && reset(conn).await,
                stale_session: false,
                error,
            });
        }
    }
    stage.set(Stage::Data);
    match replies.data {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            let error = classify(&e, Stage::Data);
            let reusable = !replies.broken && error.code != Some(421);
            return Err(TransactionFailure {
                session_reusable: reusable && reset(conn).await,
                stale_session: false,
                error,
            });
        }
        None => {
            return Err(TransactionFailure {
                error: SendError::new(
                    FailureClass::Transient,
                    None,
                    "the relay did not answer every command".into(),
                    Stage::Data,
                ),
                stale_session: false,
                session_reusable: false,
            });
        }
    }
    // Last moment to give up without the relay having the message.
    if abandon.is_cancelled() {
        return Err(TransactionFailure {
            error: abandoned(Stage::Data),
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
        Ok(response) => Ok(Accepted {
            reply: format!(
                "{} {}",
                u16::from(response.code()),
                response.message().collect::<Vec<_>>().join(" ")
            ),
        }),
        Err(e) => {
            let error = classify(&e, Stage::DataEnd);
            // After the final reply the transaction is over; no RSET needed.
            let reusable = error.code.is_some() && error.code != Some(421);
            Err(TransactionFailure {
                error,
                stale_session: false,
                session_reusable: reusable,
            })
        }
    }
}

fn abandoned(stage: Stage) -> SendError {
    SendError::new(
        FailureClass::Abandoned,
        None,
        "given up before sending: the delivery can no longer be acked".into(),
        stage,
    )
}

/// RSET after a refused command; true if the session is clean again.
async fn reset(conn: &mut AsyncSmtpConnection) -> bool {
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
