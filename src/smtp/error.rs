//! A failed send and its verdict, decided once where the failure is born: from the relay's
//! reply (basic code, then the enhanced status code of RFC 3463, then words in the text), the
//! stage the send had reached, or our own timeouts and checks. Everyone else asks the verdict:
//! the retry decision (`Verdict::job`), relay health and failover (`Verdict::is_relay_failure`)
//! and flow control (`Verdict::is_overload`).

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

/// How far a send got; an error says where it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Opening the TCP connection.
    Connect = 0,
    /// Implicit TLS or STARTTLS.
    Tls = 1,
    /// The relay's greeting and EHLO.
    Greeting = 2,
    /// AUTH.
    Auth = 3,
    /// MAIL FROM.
    Mail = 4,
    /// RCPT TO.
    Rcpt = 5,
    /// DATA, before the message was written.
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
            // Only `Stage as u8` is ever stored.
            7..=u8::MAX => Stage::DataEnd,
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

    /// Before MAIL FROM: a failure here is about the session, never about the message.
    const fn is_session(self) -> bool {
        match self {
            Stage::Connect | Stage::Tls | Stage::Greeting | Stage::Auth => true,
            Stage::Mail | Stage::Rcpt | Stage::Data | Stage::DataEnd => false,
        }
    }
}

/// The stage a send reached, readable after the send was cancelled by its deadline.
#[derive(Debug)]
pub(crate) struct StageCell(AtomicU8);

impl StageCell {
    pub(crate) fn new() -> Self {
        Self(AtomicU8::new(Stage::Connect as u8))
    }
    pub(crate) fn set(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> Stage {
        Stage::from_u8(self.0.load(Ordering::Relaxed))
    }
}

/// An enhanced status code (RFC 3463, `class.subject.detail`), e.g. `5.1.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnhancedCode {
    /// 2, 4 or 5, the same class as the basic reply code.
    pub class: u8,
    /// 0–999 (RFC 3463 2: "1*3digit").
    pub subject: u16,
    /// 0–999.
    pub detail: u16,
}

impl EnhancedCode {
    /// The enhanced code that opens a reply's text, if it is a valid one of the basic code's
    /// class. Strict on purpose: a code of the wrong class or shape is the relay's mistake, and
    /// trusting it would let a stray `5.1.1` turn a 4xx into a rejection.
    pub fn parse(code: u16, text: &str) -> Option<EnhancedCode> {
        let word = text.split_ascii_whitespace().next()?;
        let mut parts = word.split('.');
        let class = number(parts.next()?, 1)?;
        let subject = number(parts.next()?, 3)?;
        let detail = number(parts.next()?, 3)?;
        if parts.next().is_some() {
            return None;
        }
        // RFC 3463 2: the class is 2, 4 or 5, and RFC 2034 3: it matches the reply's first digit.
        let class = u8::try_from(class).ok()?;
        if !matches!(class, 2 | 4 | 5) || u16::from(class) != code / 100 {
            return None;
        }
        Some(EnhancedCode {
            class,
            subject,
            detail,
        })
    }

    const fn is(self, subject: u16, detail: u16) -> bool {
        self.subject == subject && self.detail == detail
    }
}

/// 1 to `max_digits` ASCII digits.
fn number(text: &str, max_digits: usize) -> Option<u16> {
    if text.is_empty() || text.len() > max_digits || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// What a failed send means, decided once where it was born. Each variant is one combination
/// of the three questions consumers ask (see the queries), so no consumer combines them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The relay refused this message or a recipient for good (5xx about the message).
    Rejected,
    /// Our credentials or the relay's authentication setup: retry, and tell the operator.
    Auth,
    /// The message was sent whole and the relay's verdict never came: it may have been
    /// delivered.
    Ambiguous,
    /// The relay asks us to slow down for this message; it is healthy otherwise.
    Throttled,
    /// The relay is closing or refusing sessions because it is overloaded (421, too many
    /// connections at the greeting).
    RelayOverloaded,
    /// The relay could not be reached, secured or greeted, refused us before MAIL FROM, or
    /// stopped answering before the message was sent.
    RelayUnavailable,
    /// May pass on a later attempt; says nothing about the relay.
    Deferred,
}

/// What a failure means for the job, for the retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobMeaning {
    /// Dead-letter it as rejected.
    Rejected,
    /// Retry it later.
    Retry,
    /// Sent, verdict unknown: as `smtp.ambiguous` says.
    Ambiguous,
    /// Retry it, and tell the operator: not the message's fault.
    Auth,
}

impl Verdict {
    /// What the failure means for the job.
    pub const fn job(self) -> JobMeaning {
        match self {
            Verdict::Rejected => JobMeaning::Rejected,
            Verdict::Auth => JobMeaning::Auth,
            Verdict::Ambiguous => JobMeaning::Ambiguous,
            Verdict::Throttled
            | Verdict::RelayOverloaded
            | Verdict::RelayUnavailable
            | Verdict::Deferred => JobMeaning::Retry,
        }
    }

    /// Says something about the relay, not the message: counts towards its cool-down, and
    /// passes the job to the next relay. Never true of an ambiguous send: the relay may have
    /// the message, and another relay would send it a second time.
    pub const fn is_relay_failure(self) -> bool {
        match self {
            Verdict::Auth | Verdict::RelayOverloaded | Verdict::RelayUnavailable => true,
            Verdict::Rejected | Verdict::Ambiguous | Verdict::Throttled | Verdict::Deferred => {
                false
            }
        }
    }

    /// The relay says it is overloaded: with flow control on, the job waits its turn again
    /// (the window halves) instead of spending an attempt.
    pub const fn is_overload(self) -> bool {
        match self {
            Verdict::Throttled | Verdict::RelayOverloaded => true,
            Verdict::Rejected
            | Verdict::Auth
            | Verdict::Ambiguous
            | Verdict::RelayUnavailable
            | Verdict::Deferred => false,
        }
    }

    /// A transient failure, from its two independent answers.
    const fn transient(overload: bool, relay_failure: bool) -> Verdict {
        match (overload, relay_failure) {
            (true, true) => Verdict::RelayOverloaded,
            (true, false) => Verdict::Throttled,
            (false, true) => Verdict::RelayUnavailable,
            (false, false) => Verdict::Deferred,
        }
    }

    /// The verdict on a relay's negative reply (`code` ≥ 400) at `stage`.
    fn of_reply(code: u16, text: &str, stage: Stage) -> Verdict {
        let enhanced = EnhancedCode::parse(code, text);
        if is_auth(code, enhanced, stage) {
            return Verdict::Auth;
        }
        if is_rejection(code, enhanced, stage) {
            return Verdict::Rejected;
        }
        // Before MAIL FROM every refusal is about the relay. 421, at any stage, is the relay
        // closing the session (shutdown, idle, too many connections): nothing about the
        // message, and a relay that does it is struggling.
        Verdict::transient(
            overload(code, enhanced, text),
            stage.is_session() || code == 421,
        )
    }

    /// The verdict on a failure without a reply code: the connection broke or went silent.
    const fn of_silence(stage: Stage, timed_out: bool) -> Verdict {
        match stage {
            // Sent whole, no verdict: nobody knows whether the relay took it.
            Stage::DataEnd => Verdict::Ambiguous,
            Stage::Connect | Stage::Tls | Stage::Greeting | Stage::Auth => {
                Verdict::RelayUnavailable
            }
            // A relay that stops answering in the middle of a transaction is failing; one that
            // closed the connection may only have dropped an old session.
            Stage::Mail | Stage::Rcpt | Stage::Data if timed_out => Verdict::RelayUnavailable,
            Stage::Mail | Stage::Rcpt | Stage::Data => Verdict::Deferred,
        }
    }
}

/// Authentication or the relay's authentication setup, not the message.
fn is_auth(code: u16, enhanced: Option<EnhancedCode>, stage: Stage) -> bool {
    // RFC 4954 6 and RFC 3207 4: authentication required (530), mechanism too weak (534),
    // credentials invalid (535), encryption required for the mechanism (538).
    if matches!(code, 530 | 534 | 535 | 538) {
        return true;
    }
    // Any other refusal of AUTH itself (e.g. "503 5.5.1 authentication not enabled") is the
    // relay's setup or ours, as likely as a wrong password.
    if stage == Stage::Auth && code >= 500 {
        return true;
    }
    match enhanced {
        // RFC 4954 6: X.7.8 credentials invalid, X.7.9 mechanism too weak, X.7.11 encryption
        // required for the mechanism, 4.7.12 a password transition is needed. Whatever the basic
        // code, retrying the message elsewhere would not help and an operator must act.
        Some(e) if e.subject == 7 && matches!(e.detail, 8 | 9 | 11 | 12) => true,
        Some(_) | None => false,
    }
}

/// A 5xx about this message or one of its recipients, to be dead-lettered.
fn is_rejection(code: u16, enhanced: Option<EnhancedCode>, stage: Stage) -> bool {
    if stage.is_session() || !(500..=599).contains(&code) {
        return false;
    }
    // RFC 5321 4.2.3: mailbox unavailable (550), not local (551), over quota or too big (552),
    // bad address (553), transaction failed (554); 501: a syntax error in our argument, the
    // address.
    if matches!(code, 501 | 550..=554) {
        return true;
    }
    // Any other 5xx (500, 502, 503, 555…) is a protocol mismatch or the relay's setup: retried,
    // and an operator sees the errors. Unless its enhanced code says it is about the message
    // (RFC 3463 3.2, 3.3, 3.4, 3.7): a bad address (X.1.x), a mailbox refusing it (X.2.x), too
    // big for the system (X.3.4), or its content (X.6.x).
    match enhanced {
        Some(e) => matches!(e.subject, 1 | 2 | 6) || e.is(3, 4),
        None => false,
    }
}

/// Whether a 4xx (or 421) says the relay is overloaded. The basic code first, then the
/// enhanced code, then words in the text, each only where the one before says nothing.
fn overload(code: u16, enhanced: Option<EnhancedCode>, text: &str) -> bool {
    if code == 421 {
        return true;
    }
    if !(400..=499).contains(&code) {
        return false;
    }
    match enhanced.map(|e| (e.subject, e.detail)) {
        // Gmail: "421 4.7.28 … unusual rate of unsolicited mail"; "450 4.2.1 The user you are
        // trying to contact is receiving mail at a rate that prevents additional messages".
        // Microsoft 365: "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded" and
        // "452 4.5.3 Too many recipients". RFC 3463: X.3.2 system not accepting network
        // messages, X.4.5 mail system congestion, X.5.3 too many recipients. X.2.1 is
        // "mailbox disabled" in RFC 3463; Gmail answers its per-recipient rate with it, and a
        // disabled mailbox that is only deferred (4xx, not 5xx) is waited out the same way.
        Some((7, 28) | (2, 1) | (3, 2) | (4, 5) | (5, 3)) => true,
        // RFC 3463: a mailbox that is full (X.2.2), a system out of storage (X.3.1), or an
        // address problem (X.1.x) is not a rate, whatever the text says ("Mailbox size limit
        // exceeded" would read as one).
        Some((2, 2) | (3, 1) | (1, _)) => false,
        // Policy (RFC 3463 X.7.0, X.7.1) is also how throttling is said: Postfix's anvil
        // answers its message-rate limit with "450 4.7.1 Error: too much mail from <client>"
        // (smtpd_client_message_rate_limit), and Microsoft 365 uses 4.7.0 for its limits. With
        // a policy code, "too much" counts as a rate too; without one, the words stay as they
        // always were.
        Some((7, 0 | 1)) => speaks_of_rates(text) || text.to_ascii_lowercase().contains("too much"),
        // Other generic codes (X.0.0, X.3.0…): the words decide.
        Some(_) | None => speaks_of_rates(text),
    }
}

/// A text that speaks of rates, limits or too many of something.
fn speaks_of_rates(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    [
        "rate",
        "too many",
        "throttl",
        "slow down",
        "limit exceeded",
        "try again later",
    ]
    .iter()
    .any(|word| text.contains(word))
}

/// A failed send.
#[derive(Debug, Clone)]
pub struct SendError {
    verdict: Verdict,
    code: Option<u16>,
    enhanced: Option<EnhancedCode>,
    message: String,
    stage: Stage,
}

/// Our own failures, before or around the relay's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Local {
    /// The connection could not be made, secured, or broke without a reply.
    Broken,
    /// Our deadline passed without an answer.
    TimedOut,
    /// The relay cannot take this message at all (e.g. no SMTPUTF8 for a non-ASCII address).
    Unsendable,
}

impl SendError {
    /// The relay's negative reply `code text` at `stage`.
    pub(crate) fn from_reply(code: u16, text: &str, stage: Stage) -> Self {
        Self {
            verdict: Verdict::of_reply(code, text, stage),
            code: Some(code),
            enhanced: EnhancedCode::parse(code, text),
            message: format!("{code} {text}"),
            stage,
        }
    }

    /// A reply the protocol does not expect at this point (e.g. 221 to MAIL FROM): the relay is
    /// saying goodbye, as some do to idle sessions.
    pub(crate) fn unexpected(code: u16, text: &str, stage: Stage) -> Self {
        Self {
            verdict: Verdict::transient(false, stage.is_session()),
            code: Some(code),
            enhanced: None,
            message: format!("unexpected reply {code} {text}"),
            stage,
        }
    }

    /// One of our own failures.
    pub(crate) fn local(kind: Local, message: String, stage: Stage) -> Self {
        let verdict = match kind {
            Local::Broken => Verdict::of_silence(stage, false),
            Local::TimedOut => Verdict::of_silence(stage, true),
            Local::Unsendable => Verdict::Rejected,
        };
        Self {
            verdict,
            code: None,
            enhanced: None,
            message,
            stage,
        }
    }

    /// Classifies a lettre error at `stage`.
    pub(crate) fn from_lettre(error: &lettre::transport::smtp::Error, stage: Stage) -> Self {
        if let Some(code) = error.status() {
            return Self::from_reply(u16::from(code), &reply_text(error), stage);
        }
        // lettre wraps some connection errors in a second "Connection error: ".
        let text = error.to_string().replacen(
            "Connection error: Connection error: ",
            "Connection error: ",
            1,
        );
        let mut made = if error.is_timeout() {
            Self::local(Local::TimedOut, text, stage)
        } else {
            Self::local(Local::Broken, text, stage)
        };
        if stage == Stage::Auth && !error.is_timeout() {
            // "No compatible authentication mechanism": a setup problem like a wrong password.
            made.verdict = Verdict::Auth;
        }
        made
    }

    /// Adds context to the message (e.g. which recipient); the verdict stays.
    pub(crate) fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{} ({context})", self.message);
        self
    }

    /// What this failure means; decided when it was made.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// The relay's reply code, when the failure is a reply.
    pub fn code(&self) -> Option<u16> {
        self.code
    }

    /// The enhanced status code that opened the reply, when it had a valid one.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        self.enhanced
    }

    /// The relay's reply (`550 5.1.1 …`) or our own description, without the stage.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// How far the send got.
    pub fn stage(&self) -> Stage {
        self.stage
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.stage.describe())
    }
}

/// The relay's words without lettre's "permanent error (550): " prefix.
fn reply_text(error: &lettre::transport::smtp::Error) -> String {
    use std::error::Error as _;
    match error.source() {
        Some(source) => source.to_string(),
        None => error.to_string(),
    }
}

/// A send given up before the message was written, because the job's delivery can no longer be
/// settled (broker connection lost, shutdown grace over): the broker will deliver it again. Not
/// a failure: it is never counted in metrics or relay health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

impl fmt::Display for Abandoned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("given up before sending: the delivery can no longer be acked")
    }
}

/// Why a send inside this module stopped without a result: it failed, or it was given up.
#[derive(Debug)]
pub(crate) enum Stop {
    Failed(SendError),
    Abandoned,
}

impl From<SendError> for Stop {
    fn from(error: SendError) -> Self {
        Stop::Failed(error)
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Failed(error) => fmt::Display::fmt(error, f),
            Stop::Abandoned => fmt::Display::fmt(&Abandoned, f),
        }
    }
}

/// Whether a reply says the relay is overloaded: 421 (closing, often "too many connections"), a
/// 4xx whose enhanced code says so, or a 4xx whose text speaks of rates, limits or too many of
/// something. The overload half of `Verdict::of_reply`, for the tests.
#[cfg(test)]
fn is_overload(code: Option<u16>, text: &str) -> bool {
    match code {
        Some(code) => Verdict::of_reply(code, text, Stage::Mail).is_overload(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_replies() {
        assert!(is_overload(Some(421), "4.7.0 too many connections"));
        assert!(is_overload(
            Some(450),
            "4.7.1 Rate limit exceeded, slow down"
        ));
        assert!(is_overload(Some(451), "Too many messages"));
        assert!(!is_overload(Some(451), "4.3.0 temporary failure"));
        assert!(!is_overload(Some(550), "rate limit"));
        assert!(!is_overload(None, "rate"));
    }

    /// Replies real MTAs send, with the stage they come at, and the verdict each must get.
    #[test]
    fn verdicts_on_real_replies() {
        use Stage::*;
        use Verdict::*;
        let table: &[(u16, &str, Stage, Verdict)] = &[
            // Postfix anvil, message rate: MAIL FROM, overload, the relay is fine otherwise.
            (
                450,
                "4.7.1 Error: too much mail from 127.0.0.1",
                Mail,
                Throttled,
            ),
            // Postfix anvil, connection count: at the greeting, overload and the relay failing.
            (
                421,
                "4.7.0 mx.example.com Error: too many connections from 127.0.0.1",
                Greeting,
                RelayOverloaded,
            ),
            (
                550,
                "5.1.1 <x@y>: Recipient address rejected: User unknown in local recipient table",
                Rcpt,
                Rejected,
            ),
            (
                552,
                "5.3.4 Message size exceeds fixed limit",
                DataEnd,
                Rejected,
            ),
            (554, "5.7.1 <x@y>: Relay access denied", Rcpt, Rejected),
            (
                535,
                "5.7.8 Error: authentication failed: authentication failure",
                Stage::Auth,
                Verdict::Auth,
            ),
            (
                530,
                "5.7.0 Must issue a STARTTLS command first",
                Mail,
                Verdict::Auth,
            ),
            (
                451,
                "4.3.0 Error: queue file write error",
                DataEnd,
                Deferred,
            ),
            (452, "4.2.2 Mailbox full", Rcpt, Deferred),
            // The enhanced code wins over the words: a full mailbox is not a rate.
            (452, "4.2.2 Mailbox size limit exceeded", Rcpt, Deferred),
            // Gmail's per-recipient rate.
            (
                450,
                "4.2.1 The user you are trying to contact is receiving mail at a rate that \
                 prevents additional messages from being delivered.",
                Rcpt,
                Throttled,
            ),
            (
                421,
                "4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from \
                 your IP address.",
                Mail,
                RelayOverloaded,
            ),
            // Microsoft 365 throttling.
            (
                432,
                "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
                Mail,
                Throttled,
            ),
            (452, "4.5.3 Too many recipients", Rcpt, Throttled),
            // The enhanced code says it without any word of rates.
            (
                451,
                "4.3.2 System not accepting network messages",
                Mail,
                Throttled,
            ),
            (
                554,
                "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
                DataEnd,
                Rejected,
            ),
            // No enhanced code: the words decide, as they always did.
            (
                450,
                "Requested action aborted: rate limit reached",
                Mail,
                Throttled,
            ),
            (451, "try again later", Data, Throttled),
            (451, "local error in processing", Mail, Deferred),
            // "too much" counts only beside a policy code; without one the words are as before.
            (451, "too much mail from 127.0.0.1", Mail, Deferred),
            // A policy code without a word of rates is not an overload.
            (
                450,
                "4.7.1 Client host rejected: cannot find your hostname",
                Mail,
                Deferred,
            ),
            // A 5xx at AUTH without an enhanced code is our setup or credentials.
            (
                504,
                "Unrecognized authentication type",
                Stage::Auth,
                Verdict::Auth,
            ),
            (
                454,
                "4.7.0 Temporary authentication failure",
                Stage::Auth,
                RelayUnavailable,
            ),
            // Gmail's "application-specific password required", and RFC 4954's X.7.11.
            (
                534,
                "5.7.9 Application-specific password required.",
                Stage::Auth,
                Verdict::Auth,
            ),
            (
                538,
                "5.7.11 Encryption required for requested authentication mechanism",
                Stage::Auth,
                Verdict::Auth,
            ),
            (
                554,
                "5.7.0 Authentication not permitted",
                Stage::Auth,
                Verdict::Auth,
            ),
            // Credentials invalid, whatever the basic code says.
            (
                550,
                "5.7.8 Authentication credentials invalid",
                Mail,
                Verdict::Auth,
            ),
            (
                432,
                "4.7.12 A password transition is needed",
                Stage::Auth,
                Verdict::Auth,
            ),
            // A 5xx outside 550–554 is retried, unless its enhanced code is about the message.
            (
                500,
                "5.5.2 Syntax error, command unrecognized",
                Mail,
                Deferred,
            ),
            (555, "5.5.4 Unsupported option", Mail, Deferred),
            (523, "5.3.4 Message too big for system", DataEnd, Rejected),
            (501, "5.1.3 Bad recipient address syntax", Rcpt, Rejected),
            // A 5xx before MAIL FROM is the relay's, not the message's.
            (
                554,
                "5.7.1 No SMTP service here",
                Greeting,
                RelayUnavailable,
            ),
            (421, "4.4.2 idle timeout", Mail, RelayOverloaded),
            // An enhanced code of the wrong class is ignored: the words decide.
            (452, "5.2.2 too many messages", Rcpt, Throttled),
        ];
        for &(code, text, stage, verdict) in table {
            let error = SendError::from_reply(code, text, stage);
            assert_eq!(error.verdict(), verdict, "{code} {text} at {stage:?}");
            assert_eq!(error.code(), Some(code));
        }
    }

    #[test]
    fn verdicts_on_our_own_failures() {
        let cases = [
            (Local::TimedOut, Stage::DataEnd, Verdict::Ambiguous),
            (Local::Broken, Stage::DataEnd, Verdict::Ambiguous),
            // "Connection refused".
            (Local::Broken, Stage::Connect, Verdict::RelayUnavailable),
            (Local::Broken, Stage::Tls, Verdict::RelayUnavailable),
            (Local::TimedOut, Stage::Connect, Verdict::RelayUnavailable),
            (Local::TimedOut, Stage::Mail, Verdict::RelayUnavailable),
            (Local::Broken, Stage::Rcpt, Verdict::Deferred),
            (Local::Unsendable, Stage::Mail, Verdict::Rejected),
        ];
        for (kind, stage, verdict) in cases {
            let error = SendError::local(kind, "x".into(), stage);
            assert_eq!(error.verdict(), verdict, "{kind:?} at {stage:?}");
            assert_eq!(error.code(), None);
        }
        let refused = SendError::local(
            Local::Broken,
            "cannot connect to 127.0.0.1:1: Connection refused".into(),
            Stage::Connect,
        );
        assert!(refused.verdict().is_relay_failure());
        assert_eq!(refused.verdict().job(), JobMeaning::Retry);
        assert!(!refused.verdict().is_overload());
        let goodbye = SendError::unexpected(221, "Bye", Stage::Mail);
        assert_eq!(goodbye.verdict(), Verdict::Deferred);
    }

    #[test]
    fn queries_on_each_verdict() {
        // (verdict, job, relay failure, overload)
        let table = [
            (Verdict::Rejected, JobMeaning::Rejected, false, false),
            (Verdict::Auth, JobMeaning::Auth, true, false),
            (Verdict::Ambiguous, JobMeaning::Ambiguous, false, false),
            (Verdict::Throttled, JobMeaning::Retry, false, true),
            (Verdict::RelayOverloaded, JobMeaning::Retry, true, true),
            (Verdict::RelayUnavailable, JobMeaning::Retry, true, false),
            (Verdict::Deferred, JobMeaning::Retry, false, false),
        ];
        for (verdict, job, relay, overload) in table {
            assert_eq!(verdict.job(), job, "{verdict:?}");
            assert_eq!(verdict.is_relay_failure(), relay, "{verdict:?}");
            assert_eq!(verdict.is_overload(), overload, "{verdict:?}");
        }
    }

    #[test]
    fn enhanced_code_parser_is_strict() {
        let code = |class, subject, detail| {
            Some(EnhancedCode {
                class,
                subject,
                detail,
            })
        };
        assert_eq!(EnhancedCode::parse(421, "4.7.0 too many"), code(4, 7, 0));
        assert_eq!(EnhancedCode::parse(421, "4.7.28 rate"), code(4, 7, 28));
        assert_eq!(EnhancedCode::parse(550, "5.1.1"), code(5, 1, 1));
        assert_eq!(EnhancedCode::parse(250, "2.0.0 Ok"), code(2, 0, 0));
        assert_eq!(EnhancedCode::parse(550, "5.999.999 x"), code(5, 999, 999));
        for (reply, text) in [
            (421, "4.7 too many"),
            (450, "9.1.1 x"),
            (450, "4.1000.1 x"),
            (450, "4.1.1000 x"),
            (450, "4.1.1.1 x"),
            (450, "4..1 x"),
            (450, "4.a.1 x"),
            (450, "+4.1.1 x"),
            // The class must be the basic code's.
            (450, "5.1.1 x"),
            (550, "4.1.1 x"),
            // Only the first word is the code.
            (550, "Recipient 5.1.1 unknown"),
            (550, ""),
        ] {
            assert_eq!(EnhancedCode::parse(reply, text), None, "{reply} {text}");
        }
        assert_eq!(
            code(4, 7, 28).map(|c| c.to_string()).as_deref(),
            Some("4.7.28")
        );
    }
}
