//! Sending over SMTP: a pool of lettre client sessions, a deadline on every send, and the
//! classification of every failure where it is born.
//!
//! Several relays (failover or weighted round-robin, `relays.rs`) each have a pool of sessions,
//! a rate limit and an overload window (`pool.rs`, `flow.rs`); a transaction keeps each
//! recipient's reply (`transaction.rs`).
//!
//! The pool is ours rather than lettre's `AsyncSmtpTransport` pool, for three reasons measured or
//! read in lettre 0.11: its sockets have Nagle's algorithm on, which costs ~45 ms per message
//! against a delayed-ACK peer (we measured 45 ms vs 1 ms); a send cancelled by a deadline returns
//! its half-finished session to the pool; and it checks every pooled session with a NOOP round
//! trip. Here a session that hit the deadline is dropped, sessions are reused without NOOP, and a
//! pooled session the relay closed while idle is replaced at once without costing the job an
//! attempt.

mod connect;
pub mod flow;
mod pool;
mod relays;
mod transaction;

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

pub use crate::config::RelayLimits;
pub use connect::TlsSetupError;
pub use pool::{Relay, is_relay_failure};
pub use relays::RelaySet;
pub use transaction::{Refusal, Sent};

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
