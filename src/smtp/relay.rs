//! One relay: its pool of sessions, its limits (rate, connections, the overload window), its
//! health, and a deadline on every send.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::transport::smtp::client::AsyncSmtpConnection;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

use super::connect::{Connector, Offers, TlsSetupError};
use super::error::{Abandoned, JobMeaning, Local, SendError, Stage, StageCell, Stop, Verdict};
use super::flow::{RateLimit, Window};
use super::oauth2::{Token, TokenSource};
use super::transaction::{Sent, transaction};
use crate::config::{AuthMechanism, RelayLimits, SmtpConfig};
use crate::message::Outgoing;
use crate::metrics::RelayMetrics;

/// A pooled SMTP session. Holds one of the relay's session permits while it lives.
struct Session {
    conn: AsyncSmtpConnection,
    /// What its EHLO offered beyond what lettre keeps (PIPELINING, SIZE).
    offers: Offers,
    /// The generation of the XOAUTH2 token it authenticated with.
    token: Option<u64>,
    last_used: Instant,
    open: OpenSessions,
    _permit: OwnedSemaphorePermit,
}

/// A relay's open sessions: its own count (two relays may share a name, and so a gauge),
/// mirrored to the `smtp_sessions_open` gauge.
#[derive(Clone)]
struct OpenSessions {
    count: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl OpenSessions {
    fn get(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl Session {
    fn new(
        (conn, offers): (AsyncSmtpConnection, Offers),
        token: Option<u64>,
        permit: OwnedSemaphorePermit,
        open: OpenSessions,
    ) -> Self {
        open.count.fetch_add(1, Ordering::Relaxed);
        open.gauge.inc();
        Self {
            conn,
            offers,
            token,
            last_used: Instant::now(),
            open,
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
        self.open.count.fetch_sub(1, Ordering::Relaxed);
        self.open.gauge.dec();
    }
}

/// Connections opened at once while fewer are open: a relay that greets slowly still gets a few
/// sessions going at once, and a connection limit costs a refused connection or two.
const FIRST_WAVE: usize = 4;

/// After a refused connection, one more is allowed this long after the last change.
const CONNECTION_PROBE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Default)]
struct ConnectionCap {
    parked: Vec<OwnedSemaphorePermit>,
    changed: Option<Instant>,
}

/// A relay: where to connect, how, and the pool of sessions to it.
pub struct Relay {
    name: String,
    weight: u32,
    connector: Connector,
    /// Where its XOAUTH2 tokens come from, if it takes them.
    tokens: Option<TokenSource>,
    /// One permit per open session: never more than `max_connections` open at once.
    sessions: Arc<Semaphore>,
    max_connections: usize,
    /// Permits taken out of use because the relay refused a connection beyond what it allows
    /// (421 at the greeting): the pool settles at what the relay accepts.
    connection_cap: Mutex<ConnectionCap>,
    /// A session came back to the pool: a send waiting for a connection may take it.
    returned: Notify,
    /// Connections being opened now. At most as many as are open (`FIRST_WAVE` while fewer
    /// are): new connections come in doubling waves, so that a relay's connection limit is met
    /// by a refused connection or two, not by a burst of them.
    connecting: Mutex<usize>,
    connected: Notify,
    open: OpenSessions,
    idle: Mutex<Vec<Session>>,
    max_idle: usize,
    idle_timeout: Duration,
    deadline: Duration,
    rate: Option<RateLimit>,
    window: Window,
    flow_control: bool,
    overload_retries: u32,
    failures: AtomicU32,
    failures_to_cooldown: u32,
    cooldown: Duration,
    cooling_until: Mutex<Option<Instant>>,
    auth_failing: AtomicBool,
    metrics: RelayMetrics,
}

impl Relay {
    /// Prepares the relay (TLS settings, credentials); opens no connection.
    pub fn new(
        name: String,
        weight: u32,
        config: &SmtpConfig,
        limits: RelayLimits,
        metrics: RelayMetrics,
    ) -> Result<Self, TlsSetupError> {
        metrics.window.set(limits.max_connections as i64);
        metrics.connection_limit.set(limits.max_connections as i64);
        metrics.healthy.set(1);
        let tokens = match &config.oauth2 {
            Some(oauth2) if config.auth_mechanisms.contains(&AuthMechanism::Xoauth2) => {
                Some(TokenSource::new(&name, oauth2).map_err(|e| TlsSetupError {
                    key: "smtp.oauth2",
                    message: e.to_string(),
                })?)
            }
            Some(_) | None => None,
        };
        Ok(Self {
            connector: Connector::new(config)?,
            tokens,
            name,
            weight: weight.max(1),
            sessions: Arc::new(Semaphore::new(limits.max_connections)),
            max_connections: limits.max_connections,
            connection_cap: Mutex::new(ConnectionCap::default()),
            returned: Notify::new(),
            connecting: Mutex::new(0),
            connected: Notify::new(),
            open: OpenSessions {
                count: Arc::new(AtomicUsize::new(0)),
                gauge: metrics.sessions_open.clone(),
            },
            idle: Mutex::new(Vec::new()),
            max_idle: limits.max_idle,
            idle_timeout: config.pool_idle_timeout,
            deadline: config.timeout,
            rate: limits.rate.map(RateLimit::new),
            window: Window::new(limits.max_connections),
            flow_control: limits.flow_control,
            overload_retries: limits.overload_retries,
            failures: AtomicU32::new(0),
            failures_to_cooldown: limits.failures_to_cooldown.max(1),
            cooldown: limits.cooldown,
            cooling_until: Mutex::new(None),
            auth_failing: AtomicBool::new(false),
            metrics,
        })
    }

    /// The relay's name, for logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its share in round-robin mode (at least 1).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Whether the relay accepts a TCP connection (see `Connector::reachable`).
    pub async fn reachable(&self) -> Result<(), String> {
        self.connector.reachable().await
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        match &self.tokens {
            Some(tokens) => format!("{}, {}", self.connector.describe(), tokens.describe()),
            None => self.connector.describe(),
        }
    }

    /// True after an authentication failure, until a session authenticates again, and while no
    /// XOAUTH2 token can be had.
    pub fn auth_failing(&self) -> bool {
        self.auth_failing.load(Ordering::Relaxed) || self.tokens_failing()
    }

    fn tokens_failing(&self) -> bool {
        self.tokens.as_ref().is_some_and(TokenSource::failing)
    }

    /// False while the relay cools down after repeated failures, or has no XOAUTH2 token.
    pub fn healthy(&self) -> bool {
        if self.tokens_failing() {
            return false;
        }
        let mut until = self.cooling_until.lock().unwrap_or_else(|e| e.into_inner());
        match *until {
            Some(at) if Instant::now() < at => false,
            Some(_) => {
                // Cooled down: give it another chance (one failure puts it back).
                *until = None;
                self.metrics.healthy.set(1);
                true
            }
            None => true,
        }
    }

    /// When the relay will be tried again, if it is cooling down.
    pub fn cooling_until(&self) -> Option<Instant> {
        *self.cooling_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_health(&self, result: &Result<Sent, SendError>) {
        match result {
            Ok(_) => {
                self.failures.store(0, Ordering::Relaxed);
            }
            Err(e) if e.verdict().is_relay_failure() => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= self.failures_to_cooldown {
                    let mut until = self.cooling_until.lock().unwrap_or_else(|e| e.into_inner());
                    if until.is_none() {
                        tracing::warn!(
                            relay = %self.name,
                            failures,
                            cooldown = ?self.cooldown,
                            error = %e,
                            "relay failing; skipping it for a while"
                        );
                    }
                    *until = Some(Instant::now() + self.cooldown);
                    self.metrics.healthy.set(0);
                }
            }
            Err(_) => {}
        }
    }

    /// Sends one message: waits for an XOAUTH2 token (if the relay takes them), the rate limit
    /// and the overload window, then sends within the deadline (`smtp.timeout`). An overload
    /// reply makes the job wait its turn again instead of failing, `overload_retries` times at
    /// most; a token the relay refuses is replaced once. Once `abandon` is cancelled, a send that
    /// has not yet started writing the message gives up: `Err(Abandoned)`, which counts in
    /// neither the metrics nor the relay's health.
    pub async fn send(
        &self,
        out: &Outgoing,
        abandon: &CancellationToken,
    ) -> Result<Result<Sent, SendError>, Abandoned> {
        let mut overloads = 0;
        let mut token_refused = false;
        loop {
            if let Some(rate) = &self.rate {
                rate.acquire().await;
            }
            let slot = self.window.acquire().await;
            // Before the deadline: a token endpoint that is down makes jobs wait, not fail.
            // After the window's wait, so that the token is the freshest when the send starts.
            let token = match &self.tokens {
                Some(tokens) => Some(tokens.wait(abandon).await?),
                None => None,
            };
            let result = match self.send_once(out, abandon, token.as_deref()).await {
                Ok(sent) => Ok(sent),
                Err(Stop::Failed(error)) => Err(error),
                Err(Stop::Abandoned) => return Err(Abandoned),
            };
            match &result {
                Ok(_) => {
                    slot.succeeded();
                    self.probe_one_more_connection();
                }
                Err(e) if !token_refused && e.verdict().job() == JobMeaning::Auth => {
                    if let (Some(tokens), Some(token)) = (&self.tokens, &token) {
                        // Revoked or expired early: a new token before it counts as a failure.
                        tracing::info!(relay = %self.name, error = %e, "the relay refused the OAuth2 token; getting a new one");
                        tokens.reject(token);
                        token_refused = true;
                        drop(slot);
                        continue;
                    }
                    drop(slot);
                }
                Err(e) if self.flow_control && e.verdict().is_overload() => {
                    slot.overloaded();
                    self.metrics.overloads.inc();
                    self.metrics.window.set(self.window.limit() as i64);
                    if overloads < self.overload_retries {
                        overloads += 1;
                        tracing::debug!(relay = %self.name, error = %e, "relay overloaded; slowing down");
                        continue;
                    }
                }
                Err(_) => drop(slot),
            }
            self.metrics.window.set(self.window.limit() as i64);
            self.record_health(&result);
            return Ok(result);
        }
    }

    async fn send_once(
        &self,
        out: &Outgoing,
        abandon: &CancellationToken,
        token: Option<&Token>,
    ) -> Result<Sent, Stop> {
        let started = Instant::now();
        let stage = StageCell::new();
        let send = self.send_inner(out, &stage, abandon, token);
        let result = match tokio::time::timeout(self.deadline, send).await {
            Ok(result) => result,
            // The cancelled send's session was dropped, never returned to the pool half-done.
            Err(_) => Err(Stop::Failed(SendError::local(
                Local::TimedOut,
                format!(
                    "no answer from {} within smtp.timeout = {:?}",
                    self.connector.endpoint(),
                    self.deadline
                ),
                stage.get(),
            ))),
        };
        let histogram = match &result {
            Ok(sent) if !sent.accepted.is_empty() => &self.metrics.delivered,
            Ok(sent) if sent.refused.iter().all(|r| r.permanent) => &self.metrics.rejected,
            Ok(_) => &self.metrics.failed,
            Err(Stop::Abandoned) => return result,
            Err(Stop::Failed(e)) => match e.verdict().job() {
                JobMeaning::Rejected => &self.metrics.rejected,
                JobMeaning::Retry | JobMeaning::Ambiguous | JobMeaning::Auth => {
                    &self.metrics.failed
                }
            },
        };
        histogram.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.auth_failing.store(false, Ordering::Relaxed),
            Err(Stop::Failed(e)) if e.verdict().job() == JobMeaning::Auth => {
                self.auth_failing.store(true, Ordering::Relaxed)
            }
            Err(Stop::Failed(_) | Stop::Abandoned) => {}
        }
        result
    }

    async fn send_inner(
        &self,
        out: &Outgoing,
        stage: &StageCell,
        abandon: &CancellationToken,
        token: Option<&Token>,
    ) -> Result<Sent, Stop> {
        // A pooled session may have been closed by the relay while idle; that shows at MAIL
        // FROM, before anything about the message was said. One fresh session is tried then.
        let mut fresh_only = false;
        loop {
            if abandon.is_cancelled() {
                return Err(Stop::Abandoned);
            }
            let (mut session, reused) = self.checkout(stage, fresh_only, token).await?;
            match transaction(&mut session.conn, session.offers, out, stage, abandon).await {
                Ok((sent, reusable)) => {
                    if reusable {
                        session.last_used = Instant::now();
                        self.checkin(session);
                    }
                    return Ok(sent);
                }
                Err(failure) if reused && !fresh_only && failure.stale_session => {
                    tracing::debug!(error = %failure.error, "pooled SMTP session was closed by the relay; opening a new one");
                    self.metrics.stale_connections.inc();
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
        token: Option<&Token>,
    ) -> Result<(Session, bool), SendError> {
        let generation = token.map(|t| t.generation);
        let (wave, permit) = loop {
            // The common case first, without registering for wake-ups.
            if !fresh_only && let Some(session) = self.take_idle(generation) {
                return Ok((session, true));
            }
            match self.wait_to_connect(fresh_only, generation).await? {
                Ready::Reuse(session) => return Ok((*session, true)),
                Ready::Connect(wave, permit) => break (wave, permit),
                Ready::LookAgain => continue,
            }
        };
        match self.connector.connect(stage, token).await {
            Ok(conn) => {
                // Counted open before the wave's place is given back.
                let session = Session::new(conn, generation, permit, self.open.clone());
                drop(wave);
                Ok((session, false))
            }
            Err(e) => {
                if e.verdict() == Verdict::RelayOverloaded
                    && e.stage() == Stage::Greeting
                    && speaks_of_connection_limits(e.message())
                {
                    self.cap_connections(permit, &e);
                }
                // After the cap: a waiter it wakes sees the new limit.
                drop(wave);
                Err(e)
            }
        }
    }

    /// One look for a way to send: an idle session, or a place in the wave and a permit to
    /// connect. `LookAgain` when a session came back meanwhile. The wake-up registration ends
    /// here, before any connecting, so that a session coming back goes to a send still waiting.
    async fn wait_to_connect(
        &self,
        fresh_only: bool,
        generation: Option<u64>,
    ) -> Result<Ready<'_>, SendError> {
        // Registered before looking, so that a session returned meanwhile is not missed.
        let returned = self.returned.notified();
        tokio::pin!(returned);
        returned.as_mut().enable();
        if !fresh_only && let Some(session) = self.take_idle(generation) {
            // Came back between the first look and the registration: rare.
            return Ok(Ready::Reuse(Box::new(session)));
        }
        // A place in the wave first, then a permit: the permits held are those of open
        // sessions and of connections being made, which is what a refusal teaches about. A
        // send that must not reuse a session (the pooled one was stale) takes no wake-up meant
        // for the others.
        let wave = tokio::select! {
            wave = self.connect_wave() => wave,
            () = &mut returned, if !fresh_only => return Ok(Ready::LookAgain),
        };
        let permit = match self.sessions.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(pool_closed()),
            // As many sessions open as the relay allows: the first one back, or the first
            // permit freed, whichever comes first.
            Err(TryAcquireError::NoPermits) => tokio::select! {
                permit = self.sessions.clone().acquire_owned() => {
                    permit.map_err(|_| pool_closed())?
                }
                () = &mut returned, if !fresh_only => return Ok(Ready::LookAgain),
            },
        };
        Ok(Ready::Connect(wave, permit))
    }

    /// Waits for a place in the current wave of connections (see `connecting`).
    async fn connect_wave(&self) -> ConnectWave<'_> {
        loop {
            let connected = self.connected.notified();
            tokio::pin!(connected);
            connected.as_mut().enable();
            {
                let open = self.open.get();
                let mut connecting = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
                if *connecting < open.max(FIRST_WAVE) {
                    *connecting += 1;
                    return ConnectWave(self);
                }
            }
            connected.await;
        }
    }

    /// An idle session to reuse: opened with the current token and not idle too long.
    fn take_idle(&self, generation: Option<u64>) -> Option<Session> {
        loop {
            let candidate = self.lock_idle().pop();
            match candidate {
                Some(session)
                    if session.last_used.elapsed() < self.idle_timeout
                        && session.token == generation =>
                {
                    return Some(session);
                }
                // Past our idle timeout: the relay may be about to close it; don't risk it.
                // Or opened with a token that has since been replaced (it expires soon).
                Some(expired) => {
                    tokio::spawn(expired.quit());
                }
                None => return None,
            }
        }
    }

    /// The relay refused a connection at the greeting, with some of ours open: from now on at
    /// most those already open, one more tried now and then.
    fn cap_connections(&self, refused: OwnedSemaphorePermit, error: &SendError) {
        let mut cap = self.lock_cap();
        let before = self.connection_limit(&cap);
        // Ours open. None: not about how many we have (a relay refusing everyone,
        // restarting): nothing to learn.
        let open = self.open.get();
        if open == 0 {
            return;
        }
        cap.parked.push(refused);
        while let Ok(permit) = self.sessions.clone().try_acquire_owned() {
            cap.parked.push(permit);
        }
        cap.changed = Some(Instant::now());
        let limit = self.connection_limit(&cap);
        self.metrics.connection_limit.set(limit as i64);
        // No more sends in flight than connections: the others would wait for a session
        // within their deadline.
        self.window.set_ceiling(limit);
        self.metrics.window.set(self.window.limit() as i64);
        if limit < before {
            tracing::info!(
                relay = %self.name,
                connections = limit,
                error = %error,
                "the relay refuses more connections: keeping at most this many open, one more \
                 tried every {}s",
                CONNECTION_PROBE_INTERVAL.as_secs()
            );
        }
    }

    /// After a quiet while at a capped connection count, allows one more.
    fn probe_one_more_connection(&self) {
        let mut cap = self.lock_cap();
        if cap.parked.is_empty()
            || cap
                .changed
                .is_some_and(|at| at.elapsed() < CONNECTION_PROBE_INTERVAL)
        {
            return;
        }
        cap.parked.pop();
        cap.changed = Some(Instant::now());
        let limit = self.connection_limit(&cap);
        self.metrics.connection_limit.set(limit as i64);
        self.window.set_ceiling(limit);
    }

    fn connection_limit(&self, cap: &ConnectionCap) -> usize {
        self.max_connections.saturating_sub(cap.parked.len())
    }

    fn lock_cap(&self) -> std::sync::MutexGuard<'_, ConnectionCap> {
        self.connection_cap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn checkin(&self, session: Session) {
        let mut idle = self.lock_idle();
        if idle.len() < self.max_idle && !self.sessions.is_closed() {
            idle.push(session);
            drop(idle);
            self.returned.notify_one();
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

/// What `Relay::wait_to_connect` found.
enum Ready<'a> {
    Reuse(Box<Session>),
    Connect(ConnectWave<'a>, OwnedSemaphorePermit),
    LookAgain,
}

/// A refusal about how many connections we have (Postfix's "too many connections from",
/// Exim's "too many concurrent SMTP connections", Microsoft 365's "maximum number of concurrent
/// server connections"), not a relay closing for everyone.
fn speaks_of_connection_limits(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("connection")
        && ["too many", "limit", "maximum", "exceeded"]
            .iter()
            .any(|w| text.contains(w))
}

/// A place in a wave of connections, given back when the connection is made or failed.
struct ConnectWave<'a>(&'a Relay);

impl Drop for ConnectWave<'_> {
    fn drop(&mut self) {
        let relay = self.0;
        let mut connecting = relay.connecting.lock().unwrap_or_else(|e| e.into_inner());
        *connecting = connecting.saturating_sub(1);
        drop(connecting);
        relay.connected.notify_waiters();
    }
}

fn pool_closed() -> SendError {
    SendError::local(
        Local::Broken,
        "the SMTP pool is shut down".into(),
        Stage::Connect,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_about_our_connections_lowers_the_cap() {
        for text in [
            "421 4.7.0 mx.example Error: too many connections from 127.0.0.1",
            "421 Too many concurrent SMTP connections from this IP address; please try again later",
            "421 4.3.2 The maximum number of concurrent server connections has exceeded a limit",
            "421 4.7.0 connection limit reached",
        ] {
            assert!(speaks_of_connection_limits(text), "{text}");
        }
        for text in [
            "421 4.3.2 Service shutting down",
            "421 4.7.0 Try again later, closing connection.",
            "421 mx.example Service not available",
        ] {
            assert!(!speaks_of_connection_limits(text), "{text}");
        }
    }
}
