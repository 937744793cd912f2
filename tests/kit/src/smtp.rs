//! A scripted SMTP server for integration tests.
//!
//! It speaks enough plain-text ESMTP for lettre 0.11 (no TLS), records every
//! accepted message, and can be told at run time to misbehave (rules), to refuse
//! connections, to drop every session, or to require AUTH. Waiting is done on a
//! `tokio::sync::watch` channel that carries the whole observable state, so tests
//! never sleep-poll.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The point of the dialogue a [`Rule`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// The 220 greeting.
    Connect,
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    /// The DATA command (normally answered 354).
    Data,
    /// The reply after the message body (normally 250).
    DataEnd,
    Rset,
    Noop,
    Quit,
    Auth,
}

#[derive(Debug, Clone)]
pub enum Action {
    /// Send this reply instead of the normal one. Side effects only happen when the
    /// reply is positive: a non-2xx on `DataEnd` means the message is not recorded,
    /// on `Rcpt` that the recipient is not added. `\n` in the text makes a multi-line
    /// reply; code 421 also closes the connection (as RFC 5321 requires).
    Reply(u16, String),
    /// Wait, then behave normally.
    Delay(Duration),
    DelayThenReply(Duration, u16, String),
    /// Never answer; keep the socket open until the client closes it or the server goes.
    Stall,
    /// Close the TCP connection without replying.
    Drop,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub cmd: Cmd,
    /// Case-insensitive substring of the command line (of the message data for `DataEnd`;
    /// `Connect` has no line, so only an empty needle matches it).
    pub matching: Option<String>,
    pub action: Action,
    /// Apply to the first N matches only; `None` = always.
    pub times: Option<usize>,
    /// Apply to every N-th match only (the N-th, 2N-th, …); `None` = each one.
    pub every: Option<usize>,
}

impl Rule {
    /// `action` on every `cmd`.
    pub fn always(cmd: Cmd, action: Action) -> Rule {
        Rule {
            cmd,
            matching: None,
            action,
            times: None,
            every: None,
        }
    }
    /// `action` on the first `n` of `cmd`.
    pub fn times(n: usize, cmd: Cmd, action: Action) -> Rule {
        Rule {
            times: Some(n),
            ..Rule::always(cmd, action)
        }
    }
    /// Only where the command line (or the data) contains `needle`.
    pub fn matching(mut self, needle: impl Into<String>) -> Rule {
        self.matching = Some(needle.into());
        self
    }
    /// Only every `n`-th matching command gets the action, e.g. every second connection.
    pub fn every(mut self, n: usize) -> Rule {
        self.every = Some(n.max(1));
        self
    }
}

#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub session: u64,
    pub mail_from: String,
    /// Only the recipients that got a 2xx.
    pub rcpt_to: Vec<String>,
    /// The message after un-dot-stuffing, without the final ".\r\n".
    pub data: Vec<u8>,
    pub received_at: Instant,
    pub auth_user: Option<String>,
    /// The id this relay gave the message in its 250 (`queued as <id>`), unique per message.
    pub queue_id: String,
}

impl ReceivedMessage {
    /// All header fields in order as (name, raw value): folding undone, not decoded.
    pub fn headers(&self) -> Vec<(String, String)> {
        unfolded_headers(&self.data)
    }

    /// Every value of the header `name` (case-insensitive), in order.
    pub fn headers_named(&self, name: &str) -> Vec<String> {
        let found = self.headers().into_iter();
        found
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// First occurrence of the header, case-insensitive name.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers_named(name).into_iter().next()
    }

    /// The message through mail-parser; panics if it cannot be parsed.
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.data)
            .unwrap_or_else(|| {
                panic!(
                    "mail-parser could not parse the message of session {} ({} bytes):\n{}",
                    self.session,
                    self.data.len(),
                    String::from_utf8_lossy(&self.data)
                )
            })
    }
}

/// The header fields of a message as any relay recorded it, in order, as (name, raw value):
/// folding undone, not decoded, names and values trimmed. Lenient (bare LF, lines without a
/// colon skipped): `invariants::header_fields` is the strict reading.
pub fn unfolded_headers(data: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(data);
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break; // end of the header section
        }
        if line.starts_with([' ', '\t']) {
            // RFC 5322 2.2.3: unfolding removes only the line break, keeps the WSP.
            if let Some((_, value)) = out.last_mut() {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_string(), value.to_string()));
        }
    }
    out.into_iter()
        .map(|(n, v)| (n, v.trim().to_string()))
        .collect()
}

/// Everything a test may want to wait on, published through a `watch` channel.
#[derive(Debug, Default, Clone)]
pub struct SmtpState {
    pub messages: Vec<ReceivedMessage>,
    /// (session, command line); AUTH lines are logged as `AUTH <redacted>` and the
    /// base64 lines of the AUTH exchange are not logged at all.
    pub commands: Vec<(u64, String)>,
    pub open_sessions: usize,
    pub max_concurrent_sessions: usize,
    pub sessions_total: u64,
    /// Messages whose final dot has arrived, counted before the reply to it (which
    /// `set_data_delay` holds back): the client has sent the message whole.
    pub data_ends: usize,
    /// Connections refused at the greeting by `limit_sessions`.
    pub refused_connections: usize,
    /// MAIL FROMs refused by `limit_message_rate`.
    pub rate_refusals: usize,
}

impl SmtpState {
    /// How many DATA commands the server has seen: one per attempt that got as far as the data.
    pub fn data_commands(&self) -> usize {
        self.commands
            .iter()
            .filter(|(_, l)| l.eq_ignore_ascii_case("DATA"))
            .count()
    }
}

/// Says whether an XOAUTH2 bearer token is valid now.
type TokenCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Default)]
struct Config {
    rules: Vec<(Rule, usize)>, // rule and how many times it has been used
    data_delay: Duration,
    auth: Option<(String, String)>,
    xoauth2: Option<(String, TokenCheck)>,
    /// Postfix's anvil, connection count: sessions beyond this get 421 at the greeting.
    max_sessions: Option<usize>,
    /// Postfix's anvil, message rate: MAIL FROMs beyond this many in this time get 450 4.7.1.
    message_rate: Option<(usize, Duration)>,
    /// When the MAIL FROMs of the rate's window were accepted.
    mails: std::collections::VecDeque<Instant>,
}

struct Shared {
    state: watch::Sender<SmtpState>,
    config: Mutex<Config>,
}

/// A poisoned lock only means another test thread panicked; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn config(&self) -> MutexGuard<'_, Config> {
        lock(&self.config)
    }

    /// Under the message rate (or none set): counts this MAIL FROM and says true.
    fn take_mail_rate(&self) -> bool {
        let mut config = self.config();
        let Some((max, per)) = config.message_rate else {
            return true;
        };
        let now = Instant::now();
        while config.mails.front().is_some_and(|at| now - *at >= per) {
            config.mails.pop_front();
        }
        if config.mails.len() >= max {
            return false;
        }
        config.mails.push_back(now);
        true
    }

    /// First rule for `cmd` that matches and has uses left; counts the use.
    fn take_action(&self, cmd: Cmd, subject: &[u8]) -> Option<Action> {
        let subject = subject.to_ascii_lowercase();
        let mut config = self.config();
        for (rule, used) in config.rules.iter_mut() {
            let matches = rule.cmd == cmd
                && rule.times.is_none_or(|n| *used < n)
                && rule.matching.as_ref().is_none_or(|m| {
                    let m = m.to_ascii_lowercase().into_bytes();
                    m.is_empty() || subject.windows(m.len()).any(|w| w == m)
                });
            if !matches {
                continue;
            }
            *used += 1;
            match rule.every {
                // Counted, but only every n-th match acts; the others fall through.
                Some(n) if *used % n != 0 => continue,
                _ => return Some(rule.action.clone()),
            }
        }
        None
    }
}

/// The scripted SMTP relay on 127.0.0.1 (see the module's documentation).
pub struct SmtpServer {
    shared: Arc<Shared>,
    acceptor: Acceptor,
    /// Generation counter: bumping it ends every open session; dropping it (with the
    /// server) ends them too, because their `changed()` then returns an error.
    kill: watch::Sender<u64>,
}

impl SmtpServer {
    /// Binds 127.0.0.1:0. Must be called inside a tokio runtime.
    pub fn start() -> SmtpServer {
        let shared = Arc::new(Shared {
            state: watch::Sender::new(SmtpState::default()),
            config: Mutex::new(Config::default()),
        });
        let (kill, kill_rx) = watch::channel(0u64);
        let sh = shared.clone();
        let acceptor = Acceptor::start(move |stream| {
            let mut kill = kill_rx.clone();
            // Only kills issued from now on concern this session.
            kill.borrow_and_update();
            tokio::spawn(run_session(sh.clone(), stream, kill));
        })
        .expect("bind the test SMTP server");
        SmtpServer {
            shared,
            acceptor,
            kill,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }
    /// The port it listens on (stable across `set_refusing`).
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// Adds a rule after the others (the first rule that matches acts).
    pub fn add_rule(&self, rule: Rule) {
        self.shared.config().rules.push((rule, 0));
    }
    /// Removes every rule: normal behaviour again.
    pub fn clear_rules(&self) {
        self.shared.config().rules.clear();
    }
    /// Delay before the reply to the end of DATA (a slow relay).
    pub fn set_data_delay(&self, delay: Duration) {
        self.shared.config().data_delay = delay;
    }
    /// Advertise AUTH PLAIN LOGIN; MAIL without a successful AUTH then gets 530.
    pub fn require_auth(&self, user: &str, password: &str) {
        self.shared.config().auth = Some((user.to_string(), password.to_string()));
    }
    /// Like Postfix's `smtpd_client_connection_count_limit`: a session beyond `max` open at
    /// once gets `421 4.7.0 … Error: too many connections from 127.0.0.1` at the greeting.
    pub fn limit_sessions(&self, max: usize) {
        self.shared.config().max_sessions = Some(max);
    }
    /// Like Postfix's `smtpd_client_message_rate_limit`: a MAIL FROM beyond `max` accepted in
    /// the last `per` gets `450 4.7.1 Error: too much mail from 127.0.0.1`.
    pub fn limit_message_rate(&self, max: usize, per: Duration) {
        self.shared.config().message_rate = Some((max, per));
    }
    /// Advertise AUTH XOAUTH2 only: AUTH succeeds for `user` with a token `valid` accepts
    /// (535 otherwise), and every MAIL FROM checks the session's token again: once it has
    /// expired the session gets `454 4.7.0` (as a relay that enforces token lifetimes would).
    pub fn require_xoauth2(
        &self,
        user: &str,
        valid: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) {
        self.shared.config().xoauth2 = Some((user.to_string(), Arc::new(valid)));
    }

    /// true: close the listener (connections get ECONNREFUSED); false: re-bind the
    /// same port. Async so that on return the change has really happened.
    /// Open sessions are not affected (see `kill_sessions`).
    pub async fn set_refusing(&self, refusing: bool) {
        self.acceptor.set_refusing(refusing).await;
    }

    /// Close every open client connection. The sessions end asynchronously; wait for
    /// `open_sessions == 0` with `wait_for` if that matters.
    pub fn kill_sessions(&self) {
        self.kill.send_modify(|generation| *generation += 1);
    }

    /// Like dropping the server, but on return the port is already closed (a plain
    /// drop closes the listener asynchronously, at the runtime's next turn).
    pub async fn shutdown(self) {
        self.acceptor.set_refusing(true).await;
    }

    /// A copy of everything observed so far.
    pub fn state(&self) -> SmtpState {
        self.shared.state.borrow().clone()
    }
    /// The messages accepted so far.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.shared.state.borrow().messages.clone()
    }
    /// How many times each Message-ID was received: a count above 1 is a duplicate.
    pub fn deliveries(&self) -> std::collections::HashMap<String, usize> {
        let mut seen = std::collections::HashMap::new();
        for m in self.shared.state.borrow().messages.iter() {
            let id = m.header("Message-ID").unwrap_or_default();
            *seen.entry(id).or_default() += 1;
        }
        seen
    }
    /// The command lines received so far, by session.
    pub fn commands(&self) -> Vec<(u64, String)> {
        self.shared.state.borrow().commands.clone()
    }
    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.shared.state.borrow().open_sessions
    }
    /// The most sessions that were open at once.
    pub fn max_concurrent_sessions(&self) -> usize {
        self.shared.state.borrow().max_concurrent_sessions
    }
    /// Sessions accepted so far.
    pub fn sessions_total(&self) -> u64 {
        self.shared.state.borrow().sessions_total
    }

    /// Waits until `pred` holds; false on timeout. `pred` runs on every state change.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&SmtpState) -> bool,
    ) -> bool {
        let mut rx = self.shared.state.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| pred(s))).await,
            Ok(Ok(_))
        )
    }

    /// Like `wait_until` but panics on timeout, naming `what` was awaited.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl FnMut(&SmtpState) -> bool,
    ) {
        if !self.wait_until(timeout, pred).await {
            let s = self.state();
            panic!(
                "timed out after {timeout:?} waiting for {what} (SMTP server: {} messages, \
                 {} open sessions, {} sessions total)",
                s.messages.len(),
                s.open_sessions,
                s.sessions_total
            );
        }
    }

    /// Returns all messages as soon as at least `n` are recorded.
    /// Waits until messages with `n` distinct Message-IDs have arrived (copies counted once).
    pub async fn wait_for_distinct(&self, n: usize, timeout: Duration) {
        let distinct = |s: &SmtpState| {
            let mut ids: Vec<_> = s
                .messages
                .iter()
                .filter_map(|m| m.header("Message-ID"))
                .collect();
            ids.sort();
            ids.dedup();
            ids.len()
        };
        if !self.wait_until(timeout, |s| distinct(s) >= n).await {
            let got = distinct(&self.state());
            panic!("timed out after {timeout:?} waiting for {n} distinct messages: {got} arrived");
        }
    }

    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        if !self.wait_until(timeout, |s| s.messages.len() >= n).await {
            let got = self.messages().len();
            panic!("timed out after {timeout:?} waiting for SMTP messages: {got} of {n} arrived");
        }
        self.messages()
    }
}

/// Decrements `open_sessions` however the session ends (including task abort).
struct SessionGuard(Arc<Shared>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.state.send_modify(|s| s.open_sessions -= 1);
    }
}

async fn run_session(shared: Arc<Shared>, stream: TcpStream, mut kill: watch::Receiver<u64>) {
    let mut id = 0;
    shared.state.send_modify(|s| {
        s.sessions_total += 1;
        s.open_sessions += 1;
        s.max_concurrent_sessions = s.max_concurrent_sessions.max(s.open_sessions);
        id = s.sessions_total;
    });
    let _guard = SessionGuard(shared.clone());
    // Replies are small separate writes; Nagle + delayed ACK would add 40 ms stalls.
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut session = Session {
        id,
        shared,
        rd: BufReader::new(rd),
        wr,
        mail_from: None,
        rcpts: Vec::new(),
        authed: false,
        auth_user: None,
        bearer: None,
    };
    // Any I/O error (or a scripted Drop/Stall end) just ends the session quietly.
    tokio::select! {
        _ = session.run() => {}
        _ = kill.changed() => {} // kill_sessions() (Ok) or server dropped (Err)
    }
    // `session` (the socket) is dropped before `_guard`, so open_sessions == 0 implies
    // the sockets are closed.
}

type Reply = (u16, String);

fn r(code: u16, text: &str) -> Reply {
    (code, text.to_string())
}

fn ended() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "session ended")
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line) // tolerate bare LF
}

/// `MAIL FROM:<a@b> BODY=8BITMIME` → `a@b` (no brackets, no parameters).
fn parse_path(line: &str, prefix: &str) -> Option<String> {
    let head = line.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = line[prefix.len()..].trim_start();
    match rest.strip_prefix('<') {
        Some(inner) => inner.split_once('>').map(|(addr, _)| addr.to_string()),
        None => rest.split_whitespace().next().map(str::to_string),
    }
}

fn is_2xx(code: u16) -> bool {
    (200..300).contains(&code)
}

struct Session {
    id: u64,
    shared: Arc<Shared>,
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    mail_from: Option<String>,
    rcpts: Vec<String>,
    authed: bool,
    auth_user: Option<String>,
    /// The XOAUTH2 token the session authenticated with.
    bearer: Option<String>,
}

impl Session {
    async fn run(&mut self) -> io::Result<()> {
        let too_many = self
            .shared
            .config()
            .max_sessions
            .is_some_and(|max| self.shared.state.borrow().open_sessions > max);
        if too_many {
            self.shared
                .state
                .send_modify(|s| s.refused_connections += 1);
            // 421 ends the session.
            return self
                .reply(r(
                    421,
                    "4.7.0 localhost Error: too many connections from 127.0.0.1",
                ))
                .await;
        }
        let greeting = r(220, "localhost ESMTP test server");
        let greeting = self.scripted(Cmd::Connect, b"", greeting).await?;
        self.reply(greeting).await?;
        loop {
            let Some(raw) = self.read_line().await? else {
                return Ok(());
            };
            let line = String::from_utf8_lossy(trim_eol(&raw)).into_owned();
            let verb = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let logged = if verb == "AUTH" {
                "AUTH <redacted>".to_string()
            } else {
                line.clone()
            };
            let id = self.id;
            self.shared
                .state
                .send_modify(|s| s.commands.push((id, logged)));
            let subject = line.as_bytes();
            let reply = match verb.as_str() {
                "EHLO" => {
                    let arg = line.get(4..).unwrap_or("").trim();
                    let mut text =
                        format!("localhost greets {arg}\n8BITMIME\nSMTPUTF8\nPIPELINING\nSIZE 0");
                    if self.shared.config().auth.is_some() {
                        text.push_str("\nAUTH PLAIN LOGIN");
                    } else if self.shared.config().xoauth2.is_some() {
                        text.push_str("\nAUTH XOAUTH2");
                    }
                    let reply = self.scripted(Cmd::Ehlo, subject, (250, text)).await?;
                    self.reset_if(is_2xx(reply.0));
                    reply
                }
                "HELO" => {
                    let reply = self
                        .scripted(Cmd::Helo, subject, r(250, "localhost"))
                        .await?;
                    self.reset_if(is_2xx(reply.0));
                    reply
                }
                "MAIL" => match parse_path(&line, "MAIL FROM:") {
                    None => r(501, "5.5.4 Syntax: MAIL FROM:<address>"),
                    Some(addr) => {
                        let needs_auth = {
                            let config = self.shared.config();
                            config.auth.is_some() || config.xoauth2.is_some()
                        };
                        let default = if needs_auth && !self.authed {
                            r(530, "5.7.0 Authentication required")
                        } else if !self.bearer_still_valid() {
                            r(454, "4.7.0 The access token of this session has expired")
                        } else if !self.shared.take_mail_rate() {
                            self.shared.state.send_modify(|s| s.rate_refusals += 1);
                            r(450, "4.7.1 Error: too much mail from 127.0.0.1")
                        } else if self.mail_from.is_some() {
                            r(503, "5.5.1 Nested MAIL command")
                        } else {
                            r(250, "2.1.0 Ok")
                        };
                        let reply = self.scripted(Cmd::Mail, subject, default).await?;
                        if is_2xx(reply.0) {
                            self.mail_from = Some(addr);
                            self.rcpts.clear();
                        }
                        reply
                    }
                },
                "RCPT" => match parse_path(&line, "RCPT TO:") {
                    None => r(501, "5.5.4 Syntax: RCPT TO:<address>"),
                    Some(addr) => {
                        let default = match self.mail_from {
                            None => r(503, "5.5.1 Need MAIL command"),
                            Some(_) => r(250, "2.1.5 Ok"),
                        };
                        let reply = self.scripted(Cmd::Rcpt, subject, default).await?;
                        if is_2xx(reply.0) && self.mail_from.is_some() {
                            self.rcpts.push(addr);
                        }
                        reply
                    }
                },
                "DATA" => {
                    let default = if self.mail_from.is_none() {
                        r(503, "5.5.1 Need MAIL command")
                    } else if self.rcpts.is_empty() {
                        r(554, "5.5.1 No valid recipients")
                    } else {
                        r(354, "End data with <CR><LF>.<CR><LF>")
                    };
                    let reply = self.scripted(Cmd::Data, subject, default).await?;
                    if reply.0 != 354 {
                        reply
                    } else {
                        self.reply(reply).await?;
                        let Some(reply) = self.receive_data().await? else {
                            return Ok(());
                        };
                        reply
                    }
                }
                "RSET" => {
                    let reply = self
                        .scripted(Cmd::Rset, subject, r(250, "2.0.0 Ok"))
                        .await?;
                    self.reset_if(true);
                    reply
                }
                "NOOP" => {
                    self.scripted(Cmd::Noop, subject, r(250, "2.0.0 Ok"))
                        .await?
                }
                "QUIT" => {
                    let reply = self
                        .scripted(Cmd::Quit, subject, r(221, "2.0.0 Bye"))
                        .await?;
                    self.reply(reply).await?;
                    let _ = self.wr.shutdown().await;
                    return Ok(());
                }
                "AUTH" => self.auth(&line).await?,
                _ => r(500, "5.5.2 Command not recognized"),
            };
            self.reply(reply).await?;
        }
    }

    /// Reads the body after 354; None if the client went away before the final dot.
    async fn receive_data(&mut self) -> io::Result<Option<Reply>> {
        let mut data = Vec::new();
        loop {
            let Some(raw) = self.read_line().await? else {
                return Ok(None);
            };
            if trim_eol(&raw) == b"." {
                break;
            }
            // RFC 5321 4.5.2: a leading dot on any other line was added by the client.
            // Line endings are kept as sent.
            data.extend_from_slice(raw.strip_prefix(b".").unwrap_or(&raw));
        }
        let mut ends = 0;
        self.shared.state.send_modify(|s| {
            s.data_ends += 1;
            ends = s.data_ends;
        });
        let queue_id = format!("Q{:X}N{ends:X}", self.id);
        let delay = self.shared.config().data_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let reply = self
            .scripted(
                Cmd::DataEnd,
                &data,
                r(250, &format!("2.0.0 Ok: queued as {queue_id}")),
            )
            .await?;
        if is_2xx(reply.0) {
            let msg = ReceivedMessage {
                session: self.id,
                mail_from: self.mail_from.clone().unwrap_or_default(),
                rcpt_to: self.rcpts.clone(),
                data,
                received_at: Instant::now(),
                auth_user: self.auth_user.clone(),
                queue_id,
            };
            // Recorded before the 250 goes out: once the client has its answer the
            // message is visible to the test.
            self.shared.state.send_modify(|s| s.messages.push(msg));
        }
        self.reset_if(true);
        Ok(Some(reply))
    }

    async fn auth(&mut self, line: &str) -> io::Result<Reply> {
        if let Some(reply) = self.script(Cmd::Auth, line.as_bytes()).await? {
            // A scripted reply replaces the whole exchange.
            self.authed |= is_2xx(reply.0);
            return Ok(reply);
        }
        let xoauth2 = self.shared.config().xoauth2.clone();
        if let Some((user, valid)) = xoauth2 {
            return Ok(self.auth_xoauth2(line, &user, &*valid));
        }
        let Some(expected) = self.shared.config().auth.clone() else {
            return Ok(r(503, "5.5.1 AUTH not enabled"));
        };
        if self.authed {
            return Ok(r(503, "5.5.1 Already authenticated"));
        }
        let cancelled = r(501, "5.7.0 Authentication cancelled");
        let bad = r(501, "5.5.2 Cannot decode response");
        let mut words = line.split_whitespace().skip(1);
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let (user, password) = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(response) => response,
                    None => match self.challenge("").await? {
                        Some(response) => response,
                        None => return Ok(cancelled),
                    },
                };
                // authzid NUL authcid NUL passwd
                let Some(decoded) = b64_decode(&response) else {
                    return Ok(bad);
                };
                let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
                let [_, user, password] = parts[..] else {
                    return Ok(bad);
                };
                (lossy(user), lossy(password))
            }
            "LOGIN" => {
                let user = match initial {
                    Some(user) => user,
                    None => match self.challenge("VXNlcm5hbWU6").await? {
                        Some(user) => user, // "Username:" ^
                        None => return Ok(cancelled),
                    },
                };
                let Some(password) = self.challenge("UGFzc3dvcmQ6").await? else {
                    return Ok(cancelled); // "Password:" ^
                };
                match (b64_decode(&user), b64_decode(&password)) {
                    (Some(u), Some(p)) => (lossy(&u), lossy(&p)),
                    _ => return Ok(bad),
                }
            }
            _ => return Ok(r(504, "5.5.4 Unrecognized authentication mechanism")),
        };
        if (&user, &password) != (&expected.0, &expected.1) {
            return Ok(r(535, "5.7.8 Authentication credentials invalid"));
        }
        self.authed = true;
        self.auth_user = Some(user);
        Ok(r(235, "2.7.0 Authentication successful"))
    }

    /// `AUTH XOAUTH2 <base64 of "user=U\x01auth=Bearer T\x01\x01">`, initial response only.
    fn auth_xoauth2(
        &mut self,
        line: &str,
        user: &str,
        valid: &(dyn Fn(&str) -> bool + Send + Sync),
    ) -> Reply {
        if self.authed {
            return r(503, "5.5.1 Already authenticated");
        }
        let mut words = line.split_whitespace().skip(1);
        if !words.next().unwrap_or("").eq_ignore_ascii_case("XOAUTH2") {
            return r(504, "5.5.4 Unrecognized authentication mechanism");
        }
        let Some(decoded) = words.next().and_then(b64_decode) else {
            return r(501, "5.5.2 Cannot decode response");
        };
        let text = lossy(&decoded);
        let mut given_user = None;
        let mut token = None;
        for part in text.split('\x01') {
            if let Some(u) = part.strip_prefix("user=") {
                given_user = Some(u.to_string());
            } else if let Some(t) = part.strip_prefix("auth=Bearer ") {
                token = Some(t.to_string());
            }
        }
        match (given_user, token) {
            (Some(u), Some(t)) if u == user && valid(&t) => {
                self.authed = true;
                self.auth_user = Some(u);
                self.bearer = Some(t);
                r(235, "2.7.0 Authentication successful")
            }
            _ => r(535, "5.7.8 Username and Password not accepted"),
        }
    }

    /// False once the XOAUTH2 token this session authenticated with has expired.
    fn bearer_still_valid(&self) -> bool {
        let Some(token) = &self.bearer else {
            return true;
        };
        let check = self
            .shared
            .config()
            .xoauth2
            .as_ref()
            .map(|(_, valid)| valid.clone());
        check.is_none_or(|valid| valid(token))
    }

    /// Sends a 334 challenge and reads the answer; None if the client cancels ("*").
    async fn challenge(&mut self, text: &str) -> io::Result<Option<String>> {
        self.reply(r(334, text)).await?;
        let raw = self.read_line().await?.ok_or_else(ended)?;
        let answer = String::from_utf8_lossy(trim_eol(&raw)).trim().to_string();
        Ok((answer != "*").then_some(answer))
    }

    /// Applies the first matching rule. Ok(Some) overrides the normal reply, Ok(None)
    /// means behave normally, Err ends the session (Drop, or Stall once the peer hangs up).
    async fn script(&mut self, cmd: Cmd, subject: &[u8]) -> io::Result<Option<Reply>> {
        match self.shared.take_action(cmd, subject) {
            None => Ok(None),
            Some(Action::Reply(code, text)) => Ok(Some((code, text))),
            Some(Action::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                Ok(None)
            }
            Some(Action::DelayThenReply(delay, code, text)) => {
                tokio::time::sleep(delay).await;
                Ok(Some((code, text)))
            }
            Some(Action::Stall) => {
                // Keep reading and discarding, so the session ends when the client
                // closes instead of holding a dead socket forever.
                let mut sink = [0u8; 1024];
                while self.rd.read(&mut sink).await? > 0 {}
                Err(ended())
            }
            Some(Action::Drop) => Err(ended()),
        }
    }

    async fn scripted(&mut self, cmd: Cmd, subject: &[u8], default: Reply) -> io::Result<Reply> {
        Ok(self.script(cmd, subject).await?.unwrap_or(default))
    }

    fn reset_if(&mut self, reset: bool) {
        if reset {
            self.mail_from = None;
            self.rcpts.clear();
        }
    }

    async fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let n = self.rd.read_until(b'\n', &mut line).await?;
        Ok((n > 0).then_some(line))
    }

    /// Writes a (possibly multi-line, split on '\n') reply. 421 closes the connection.
    async fn reply(&mut self, (code, text): Reply) -> io::Result<()> {
        let lines: Vec<&str> = text.split('\n').collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("{code}{sep}{}\r\n", line.trim_end_matches('\r')));
        }
        self.wr.write_all(out.as_bytes()).await?;
        if code == 421 {
            return Err(ended());
        }
        Ok(())
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Minimal lenient base64 decoder (avoids depending on the crate's own deps).
fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Binds with SO_REUSEADDR so the same port can be bound again after a close even
/// while accepted connections (or TIME_WAIT entries) still use it.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

type OnConn = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// A listener on a fixed 127.0.0.1 port that can be closed (connections refused) and
/// re-opened. Shared with `proxy.rs`. Dropping it stops listening.
pub struct Acceptor {
    addr: SocketAddr,
    on_conn: OnConn,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Acceptor {
    /// `on_conn` is called synchronously for each accepted connection; it should spawn.
    pub fn start(on_conn: impl Fn(TcpStream) + Send + Sync + 'static) -> io::Result<Acceptor> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let acceptor = Acceptor {
            addr: listener.local_addr()?,
            on_conn: Arc::new(on_conn),
            task: Mutex::new(None),
        };
        acceptor.spawn(listener);
        Ok(acceptor)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn(&self, listener: TcpListener) {
        let on_conn = self.on_conn.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => on_conn(stream),
                    // Per-connection failures (ECONNABORTED, EMFILE): keep listening,
                    // but don't spin hot if the error persists.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        *lock(&self.task) = Some(task);
    }

    /// true: stop listening (connections refused); false: listen on the same port again.
    pub async fn set_refusing(&self, refusing: bool) {
        if refusing {
            let task = lock(&self.task).take();
            if let Some(task) = task {
                task.abort();
                // The JoinHandle completes only after the task's future (and thus the
                // listener) is dropped, so the port is closed when we return.
                let _ = task.await;
            }
        } else if lock(&self.task).is_none() {
            // Retrying is needed, not a sync hack: the kernel may briefly refuse the bind.
            let deadline = Instant::now() + Duration::from_secs(5);
            let listener = loop {
                match bind(self.addr) {
                    Ok(listener) => break listener,
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("could not re-bind {} within 5 s: {e}", self.addr),
                }
            };
            self.spawn(listener);
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}
