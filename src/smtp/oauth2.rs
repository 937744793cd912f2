//! XOAUTH2 access tokens for one relay: read from a file that an agent keeps fresh, or fetched
//! with the OAuth2 client-credentials flow and fetched again before they expire.
//!
//! A send asks for a fresh token before its deadline starts (`TokenSource::wait`): while there
//! is none (the endpoint is down, or answers with an error), sends wait, the relay reports its
//! authentication as failing (so `/readyz` says so), and the source tries again with a back-off.
//! Every token carries a generation; a pooled session opened with an older one is not reused.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::error::Abandoned;
use crate::config::{OAuth2Config, Secret};

/// Until a token is this close to its end (a fifth of its life, at most a minute), it is used;
/// from then on it is refreshed, and sessions opened with it are not reused.
const REFRESH_SHARE: u32 = 5;
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// When the endpoint gives no `expires_in`; and the longest believed.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Back-off between failed fetches (or unreadable token files): doubles from the first to the
/// last, with jitter.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// One request to the token endpoint, connect to body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An access token, and until when it may open sessions.
#[derive(Debug)]
pub(crate) struct Token {
    value: Secret,
    /// Bumped each time the token changes; sessions remember the one they opened with.
    pub(crate) generation: u64,
    /// From then on it is refreshed and its sessions retire. `None`: until the file changes.
    stale_at: Option<Instant>,
}

impl Token {
    pub(crate) fn value(&self) -> &str {
        self.value.expose()
    }

    fn is_fresh(&self) -> bool {
        self.stale_at.is_none_or(|at| Instant::now() < at)
    }
}

enum Kind {
    File(PathBuf),
    Endpoint {
        client: reqwest::Client,
        url: String,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
}

/// What the file looked like when it was last read.
type FileStamp = (Option<SystemTime>, u64, u64);

/// Where one relay's tokens come from, and the current one.
pub(crate) struct TokenSource {
    relay: String,
    kind: Kind,
    current: Mutex<Option<Arc<Token>>>,
    generations: AtomicU64,
    /// Only one fetch at a time; the others wait for its token. Holds the back-off.
    fetching: tokio::sync::Mutex<Backoff>,
    /// For the token file: its stamp when last read.
    stamp: Mutex<Option<FileStamp>>,
    failing: AtomicBool,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    next_try: Option<Instant>,
}

/// A start-up problem with the token source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenSetupError(pub String);

impl TokenSource {
    /// Prepares the source (the HTTP client; nothing is fetched yet).
    pub(crate) fn new(relay: &str, config: &OAuth2Config) -> Result<Self, TokenSetupError> {
        let kind = match (&config.token_file, &config.token_url) {
            (Some(path), _) => Kind::File(path.clone()),
            (None, Some(url)) => Kind::Endpoint {
                client: reqwest::Client::builder()
                    .timeout(REQUEST_TIMEOUT)
                    .connect_timeout(REQUEST_TIMEOUT)
                    .https_only(!url.starts_with("http://"))
                    .build()
                    .map_err(|e| TokenSetupError(format!("cannot set up the HTTP client: {e}")))?,
                url: url.clone(),
                client_id: config.client_id.clone().unwrap_or_default(),
                client_secret: config.client_secret.clone().unwrap_or_default(),
                scope: config.scope.clone(),
            },
            (None, None) => {
                return Err(TokenSetupError("no token source configured".into()));
            }
        };
        Ok(Self {
            relay: relay.to_string(),
            kind,
            current: Mutex::new(None),
            generations: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(Backoff::default()),
            stamp: Mutex::new(None),
            failing: AtomicBool::new(false),
        })
    }

    /// Where tokens come from, for the start-up log.
    pub(crate) fn describe(&self) -> String {
        match &self.kind {
            Kind::File(path) => format!("token from {}", path.display()),
            Kind::Endpoint { url, .. } => format!("token from {url}"),
        }
    }

    /// True while no token can be had: the last fetch (or read) failed.
    pub(crate) fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// A fresh token, waiting (and trying again with a back-off) for as long as there is none.
    /// `Err(Abandoned)` once `abandon` is cancelled.
    pub(crate) async fn wait(&self, abandon: &CancellationToken) -> Result<Arc<Token>, Abandoned> {
        loop {
            if let Some(token) = self.fresh() {
                return Ok(token);
            }
            let pause = {
                let mut backoff = tokio::select! {
                    guard = self.fetching.lock() => guard,
                    () = abandon.cancelled() => return Err(Abandoned),
                };
                // Another send may have fetched it while this one waited for the lock.
                if let Some(token) = self.fresh() {
                    return Ok(token);
                }
                match backoff.next_try {
                    Some(at) if Instant::now() < at => at,
                    _ => match self.obtain().await {
                        Ok(token) => {
                            if backoff.failures > 0 {
                                tracing::info!(
                                    relay = %self.relay,
                                    failures = backoff.failures,
                                    "OAuth2 token obtained again; sends go on"
                                );
                            }
                            *backoff = Backoff::default();
                            self.failing.store(false, Ordering::Relaxed);
                            return Ok(token);
                        }
                        Err(reason) => {
                            if backoff.failures == 0 {
                                // Once per outage; the back-off retries quietly.
                                tracing::error!(
                                    relay = %self.relay,
                                    source = %self.describe(),
                                    %reason,
                                    "cannot get an OAuth2 access token: sends through this \
                                     relay wait, and it is tried again"
                                );
                            } else {
                                tracing::debug!(relay = %self.relay, %reason, "OAuth2 token still unavailable");
                            }
                            self.failing.store(true, Ordering::Relaxed);
                            let delay = retry_delay(backoff.failures);
                            backoff.failures += 1;
                            let at = Instant::now() + delay;
                            backoff.next_try = Some(at);
                            at
                        }
                    },
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(pause.into()) => {}
                () = abandon.cancelled() => return Err(Abandoned),
            }
        }
    }

    /// The relay refused `token` (535): it is not used again; the next `wait` fetches (or
    /// re-reads) one.
    pub(crate) fn reject(&self, token: &Token) {
        let mut current = self.lock_current();
        if current
            .as_ref()
            .is_some_and(|t| t.generation == token.generation)
        {
            *current = None;
            *self.lock_stamp() = None;
        }
    }

    /// The current token while fresh. For a token file, a change of the file makes it stale.
    fn fresh(&self) -> Option<Arc<Token>> {
        let token = self.lock_current().clone()?;
        if !token.is_fresh() {
            return None;
        }
        if let Kind::File(path) = &self.kind
            && file_stamp(path) != *self.lock_stamp()
        {
            return None;
        }
        Some(token)
    }

    /// Reads or fetches a token and makes it current.
    async fn obtain(&self) -> Result<Arc<Token>, String> {
        let (value, stale_at) = match &self.kind {
            Kind::File(path) => {
                let stamp = file_stamp(path);
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let value = text.trim().to_string();
                if value.is_empty() {
                    return Err(format!("{} is empty", path.display()));
                }
                *self.lock_stamp() = stamp;
                (value, None)
            }
            Kind::Endpoint {
                client,
                url,
                client_id,
                client_secret,
                scope,
            } => {
                let asked = Instant::now();
                let (value, lifetime) =
                    fetch(client, url, client_id, client_secret, scope.as_deref()).await?;
                // A day at most: an absurd expires_in must not overflow the clock.
                let lifetime = lifetime.min(MAX_LIFETIME);
                let margin = (lifetime / REFRESH_SHARE).min(MAX_REFRESH_MARGIN);
                (value, Some(asked + lifetime.saturating_sub(margin)))
            }
        };
        let mut current = self.lock_current();
        if let Some(token) = current.as_ref()
            && token.value() == value
            && stale_at.is_none()
        {
            // The file was rewritten with the same token: its sessions stay good.
            return Ok(token.clone());
        }
        let token = Arc::new(Token {
            value: Secret::new(value),
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            stale_at,
        });
        tracing::debug!(relay = %self.relay, generation = token.generation, "new OAuth2 access token");
        *current = Some(token.clone());
        Ok(token)
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Arc<Token>>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_stamp(&self) -> std::sync::MutexGuard<'_, Option<FileStamp>> {
        self.stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Modification time, length and inode: a rewrite in place or a swapped symlink (as Kubernetes
/// updates a mounted secret) both change it.
fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len(), meta.ino()))
}

fn retry_delay(failures: u32) -> Duration {
    let base = FIRST_RETRY
        .saturating_mul(1u32 << failures.min(8))
        .min(MAX_RETRY);
    // ±20 %: instances whose endpoint failed at once do not come back in step.
    base.mul_f64(0.8 + fastrand::f64() * 0.4)
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<Seconds>,
}

/// Some endpoints send `expires_in` as a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// One client-credentials request: the token and its lifetime.
async fn fetch(
    client: &reqwest::Client,
    url: &str,
    client_id: &str,
    client_secret: &Secret,
    scope: Option<&str>,
) -> Result<(String, Duration), String> {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", client_secret.expose()),
    ];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let response = client
        .post(url)
        .header("Accept", "application/json")
        .form(&form)
        .send()
        .await
        // Without the URL: reqwest's errors carry it, and the log line names it already.
        .map_err(|e| format!("request failed: {}", e.without_url()))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("reading the answer failed: {}", e.without_url()))?;
    if !status.is_success() {
        return Err(match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(e) => format!(
                "the endpoint answered {status}: {}{}",
                e.error,
                e.error_description
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
            Err(_) => format!("the endpoint answered {status}"),
        });
    }
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|e| format!("the endpoint's answer is not a token response: {e}"))?;
    if parsed.access_token.is_empty() {
        return Err("the endpoint's answer has an empty access_token".into());
    }
    let lifetime = match parsed.expires_in {
        Some(Seconds::Number(s)) => Duration::from_secs(s),
        Some(Seconds::Text(text)) => Duration::from_secs(
            text.trim()
                .parse()
                .map_err(|_| format!("expires_in {text:?} is not a number of seconds"))?,
        ),
        None => DEFAULT_LIFETIME,
    };
    if lifetime.is_zero() {
        return Err("the endpoint's token expires at once (expires_in 0)".into());
    }
    Ok((parsed.access_token, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_off_grows_to_its_cap_with_jitter() {
        let first = retry_delay(0);
        assert!(first >= FIRST_RETRY.mul_f64(0.8) && first <= FIRST_RETRY.mul_f64(1.2));
        for failures in [5, 8, 30, 1000] {
            assert!(retry_delay(failures) <= MAX_RETRY.mul_f64(1.2));
            assert!(retry_delay(failures) >= MAX_RETRY.mul_f64(0.8));
        }
    }

    #[tokio::test]
    async fn a_token_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").expect("write");
        let source = TokenSource::new(
            "r",
            &OAuth2Config {
                token_file: Some(path.clone()),
                ..OAuth2Config::default()
            },
        )
        .expect("source");
        let never = CancellationToken::new();
        let first = source.wait(&never).await.expect("token");
        assert_eq!(first.value(), "first");
        assert_eq!(
            source.wait(&never).await.expect("token").generation,
            first.generation
        );
        // A new file swapped in, as an agent does.
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        let second = source.wait(&never).await.expect("token");
        assert_eq!(second.value(), "second");
        assert!(second.generation > first.generation);
        // Rejected: read again (the same token, as a new generation: its sessions retire).
        source.reject(&second);
        let again = source.wait(&never).await.expect("token");
        assert_eq!(again.value(), "second");
        assert!(again.generation > second.generation);
        // Gone: the wait goes on until abandoned, and the source says it is failing.
        std::fs::remove_file(&path).expect("remove");
        source.reject(&again);
        let abandon = CancellationToken::new();
        let waiting = source.wait(&abandon);
        tokio::pin!(waiting);
        tokio::select! {
            _ = &mut waiting => panic!("no token file, yet a token"),
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        assert!(source.failing());
        abandon.cancel();
        assert!(waiting.await.is_err());
    }
}
