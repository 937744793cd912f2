//! `[relays]`: several relays, and the resolution of each one: its entry of `relays.list` over
//! `[smtp]`, checked once, with the limits the worker applies to it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::{self, positive};
use super::enums::by_name;
use super::smtp::read_password_file;
use super::{AuthMechanism, Config, ConfigError, OAuth2Config, Secret, SmtpConfig, TlsMode};

/// How jobs are spread over the relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", remote = "Self")]
pub enum RelayMode {
    /// The first healthy relay of the list; the others only while it is cooling down.
    Failover,
    /// Every healthy relay in turn, in proportion to its weight.
    RoundRobin,
}
by_name!(RelayMode);

/// Several relays. Without `list`, `[smtp]` is the one relay.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaysConfig {
    /// `failover` (default) or `round-robin`.
    pub mode: RelayMode,
    /// A relay that failed this many times in a row (connecting, TLS, AUTH, 421, timeouts) is
    /// skipped for `cooldown`. Default 3.
    pub failures_to_cooldown: u32,
    /// How long a failing relay is skipped. Default `30s`.
    #[serde(with = "duration")]
    pub cooldown: Duration,
    /// The relays, in order of preference. Each entry takes the `[smtp]` settings it does not
    /// give itself. Default empty.
    pub list: Vec<RelayEntry>,
}

impl Default for RelaysConfig {
    fn default() -> Self {
        Self {
            mode: RelayMode::Failover,
            failures_to_cooldown: 3,
            cooldown: Duration::from_secs(30),
            list: Vec::new(),
        }
    }
}

/// One relay of `relays.list`; what it leaves out comes from `[smtp]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayEntry {
    /// The relay's name in logs and metrics. Default `host:port`.
    pub name: Option<String>,
    /// Host name or address. Default `smtp.host`.
    pub host: Option<String>,
    /// Port. Default `smtp.port` for `smtp.host`; for another host, from its TLS mode.
    pub port: Option<u16>,
    /// TLS mode, as `smtp.tls`. Default `smtp.tls`.
    pub tls: Option<TlsMode>,
    /// Extra CA certificates, as `smtp.ca_file`. Default `smtp.ca_file`.
    pub ca_file: Option<PathBuf>,
    /// User for SMTP AUTH. With any of `username`, `password`, `password_file`, `oauth2` the
    /// entry has its own credentials; without, it uses `[smtp]`'s.
    pub username: Option<String>,
    /// Password for SMTP AUTH. Prefer `password_file`.
    pub password: Option<Secret>,
    /// File holding the password; trailing newline ignored. Read while loading.
    pub password_file: Option<PathBuf>,
    /// Its XOAUTH2 token source, as `[smtp.oauth2]`; part of the entry's own credentials.
    pub oauth2: Option<OAuth2Config>,
    /// Mechanisms to offer, as `smtp.auth_mechanisms`. Default `smtp.auth_mechanisms`.
    pub auth_mechanisms: Option<Vec<AuthMechanism>>,
    /// Share of the jobs in `round-robin` mode. Default 1.
    pub weight: Option<u32>,
    /// Messages per second, 0 for no limit. Default `smtp.rate_limit`.
    pub rate_limit: Option<f64>,
    /// Connections open at once, capped by the concurrency. Default `smtp.max_connections`.
    pub max_connections: Option<u16>,
}

impl RelayEntry {
    /// The entry brings its own credentials rather than `[smtp]`'s.
    fn has_credentials(&self) -> bool {
        self.username.is_some()
            || self.password.is_some()
            || self.password_file.is_some()
            || self.oauth2.is_some()
    }
}

impl RelaysConfig {
    /// Checks the section's own keys and reads each entry's password file. The settings an entry
    /// shares with `[smtp]` are checked once resolved (`ResolvedRelay::validate`).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        positive("relays.cooldown", self.cooldown)?;
        if self.failures_to_cooldown == 0 {
            return Err(ConfigError::new(
                "relays.failures_to_cooldown",
                "must be at least 1",
            ));
        }
        for (i, entry) in self.list.iter_mut().enumerate() {
            let section = format!("relays.list[{i}]");
            if entry.weight == Some(0) {
                return Err(ConfigError::new(
                    format!("{section}.weight"),
                    "must be at least 1",
                ));
            }
            read_password_file(
                &mut entry.password,
                entry.password_file.as_deref(),
                &section,
            )?;
            if let Some(oauth2) = &mut entry.oauth2 {
                oauth2.validate(&format!("{section}.oauth2"))?;
            }
        }
        Ok(())
    }
}

/// Limits and health settings of one relay, computed from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayLimits {
    /// Sessions open at once (and the largest overload window).
    pub max_connections: usize,
    /// Idle sessions kept.
    pub max_idle: usize,
    /// Messages per second, evenly spaced; `None` for no limit.
    pub rate: Option<f64>,
    /// Adapt the sends in flight to overload replies (`smtp.flow_control`).
    pub flow_control: bool,
    /// Overload replies one job may wait out (`smtp.overload_retries`).
    pub overload_retries: u32,
    /// Failures in a row before a cooldown (`relays.failures_to_cooldown`).
    pub failures_to_cooldown: u32,
    /// How long a failing relay is skipped (`relays.cooldown`).
    pub cooldown: Duration,
}

/// A relay with every setting resolved.
#[derive(Debug, Clone)]
pub struct ResolvedRelay {
    /// The name in logs and metrics.
    pub name: String,
    /// Share of the jobs in `round-robin` mode.
    pub weight: u32,
    /// Its settings: the entry's over `[smtp]`.
    pub smtp: SmtpConfig,
    /// What the worker allows it.
    pub limits: RelayLimits,
    /// Where each setting came from, to name the right key in an error.
    origin: Origin,
}

/// Where a resolved relay's settings came from: its entry of `relays.list` for the fields it
/// gave, `[smtp]` for the rest.
#[derive(Debug, Clone, Default)]
struct Origin {
    entry: Option<usize>,
    given: Vec<&'static str>,
}

impl Origin {
    fn key(&self, field: &str) -> String {
        match self.entry {
            Some(i) if self.given.contains(&field) => format!("relays.list[{i}].{field}"),
            Some(_) | None => format!("smtp.{field}"),
        }
    }
}

impl ResolvedRelay {
    /// Checks what a relay entry can override, naming the key it came from: the entry's if the
    /// entry gave it, else `[smtp]`'s.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let smtp = &self.smtp;
        let key = |field| self.origin.key(field);
        if smtp.host.trim().is_empty() {
            return Err(ConfigError::new(key("host"), "must not be empty"));
        }
        if smtp.port == Some(0) {
            return Err(ConfigError::new(key("port"), "must be between 1 and 65535"));
        }
        if let Some(ca) = &smtp.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError::new(
                key("ca_file"),
                format!("{} is not a readable file", ca.display()),
            ));
        }
        if smtp.auth_mechanisms.contains(&AuthMechanism::Xoauth2) {
            self.validate_xoauth2()?;
        } else {
            if smtp.oauth2.is_some() {
                return Err(ConfigError::new(
                    key("auth_mechanisms"),
                    format!(
                        "{} is set, but xoauth2 is not among the mechanisms: add it",
                        key("oauth2")
                    ),
                ));
            }
            match (&smtp.username, &smtp.password) {
                (Some(_), None) => {
                    return Err(ConfigError::new(
                        key("password"),
                        format!(
                            "{} is set, so a password is needed ({} or {})",
                            key("username"),
                            key("password"),
                            key("password_file")
                        ),
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        key("username"),
                        "a password is set, so a user name is needed too",
                    ));
                }
                (Some(_), Some(_)) | (None, None) => {}
            }
        }
        if !(smtp.rate_limit.is_finite() && smtp.rate_limit >= 0.0) {
            return Err(ConfigError::new(
                key("rate_limit"),
                "must be a number of messages per second, 0 for none",
            ));
        }
        if smtp.max_connections == Some(0) {
            return Err(ConfigError::new(
                key("max_connections"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl ResolvedRelay {
    /// XOAUTH2: alone among the mechanisms, with a user name and a token source, no password.
    fn validate_xoauth2(&self) -> Result<(), ConfigError> {
        let smtp = &self.smtp;
        let key = |field| self.origin.key(field);
        if smtp.auth_mechanisms.len() > 1 {
            return Err(ConfigError::new(
                key("auth_mechanisms"),
                "xoauth2 authenticates with a token, the others with a password: give xoauth2 \
                 alone",
            ));
        }
        if smtp.username.is_none() {
            return Err(ConfigError::new(
                key("username"),
                "XOAUTH2 needs the user name (the mailbox the token is for)",
            ));
        }
        if smtp.password.is_some() {
            return Err(ConfigError::new(
                key("password"),
                "with xoauth2 the token replaces the password: remove it",
            ));
        }
        if smtp.oauth2.is_none() {
            return Err(ConfigError::new(
                format!("{}.token_file", key("oauth2")),
                format!(
                    "{} has xoauth2: give its token source ({}.token_file or {}.token_url)",
                    key("auth_mechanisms"),
                    key("oauth2"),
                    key("oauth2")
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The relays to send through, each with its full settings and limits: `relays.list` over
    /// `[smtp]`, or `[smtp]` alone.
    pub fn relays(&self) -> Vec<ResolvedRelay> {
        if self.relays.list.is_empty() {
            return vec![self.resolve(None)];
        }
        (0..self.relays.list.len())
            .map(|i| self.resolve(Some(i)))
            .collect()
    }

    /// Each relay's name is its own: the metrics and logs of two relays must not mix.
    pub(super) fn check_relay_names(&self) -> Result<(), ConfigError> {
        let relays = self.relays();
        for (i, relay) in relays.iter().enumerate() {
            if let Some(first) = relays[..i].iter().position(|r| r.name == relay.name) {
                return Err(ConfigError::new(
                    format!("relays.list[{i}].name"),
                    format!(
                        "`{}` is also the name of relays.list[{first}]: give each relay its own \
                         name (the default is host:port)",
                        relay.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every relay to check: `[smtp]` itself (the one relay, or what the entries start from),
    /// then each entry resolved over it.
    pub(super) fn relays_to_validate(&self) -> Vec<ResolvedRelay> {
        let mut relays = vec![self.resolve(None)];
        if !self.relays.list.is_empty() {
            relays.extend(self.relays());
        }
        relays
    }

    /// `[smtp]` alone (`None`), or entry `i` of `relays.list` over it.
    fn resolve(&self, index: Option<usize>) -> ResolvedRelay {
        let mut smtp = self.smtp.clone();
        let mut origin = Origin {
            entry: index,
            given: Vec::new(),
        };
        let mut weight = 1;
        let mut name = None;
        if let Some(entry) = index.and_then(|i| self.relays.list.get(i)) {
            let given = &mut origin.given;
            if let Some(host) = &entry.host {
                smtp.host = host.clone();
                // Another host: its port follows its TLS mode unless given.
                smtp.port = None;
                given.push("host");
            }
            if entry.port.is_some() {
                smtp.port = entry.port;
                given.push("port");
            }
            if let Some(tls) = entry.tls {
                smtp.tls = tls;
            }
            if entry.ca_file.is_some() {
                smtp.ca_file = entry.ca_file.clone();
                given.push("ca_file");
            }
            if entry.has_credentials() {
                smtp.username = entry.username.clone();
                smtp.password = entry.password.clone();
                smtp.password_file = entry.password_file.clone();
                smtp.oauth2 = entry.oauth2.clone();
                given.extend(["username", "password", "password_file", "oauth2"]);
            }
            if let Some(mechanisms) = &entry.auth_mechanisms {
                smtp.auth_mechanisms = mechanisms.clone();
                given.push("auth_mechanisms");
            }
            if let Some(rate) = entry.rate_limit {
                smtp.rate_limit = rate;
                given.push("rate_limit");
            }
            if entry.max_connections.is_some() {
                smtp.max_connections = entry.max_connections;
                given.push("max_connections");
            }
            weight = entry.weight.unwrap_or(1);
            name = entry.name.clone();
        }
        let limits = self.relay_limits(&smtp);
        ResolvedRelay {
            name: name.unwrap_or_else(|| format!("{}:{}", smtp.host, smtp.effective_port())),
            weight,
            smtp,
            limits,
            origin,
        }
    }

    /// What the worker allows one relay with these settings.
    fn relay_limits(&self, smtp: &SmtpConfig) -> RelayLimits {
        // No relay can use more sessions than there are jobs at once.
        let concurrency = usize::from(self.worker.concurrency);
        let max_connections = smtp
            .max_connections
            .map_or(concurrency, |m| usize::from(m).min(concurrency));
        RelayLimits {
            max_connections,
            max_idle: self.pool_size().min(max_connections),
            rate: (smtp.rate_limit > 0.0).then_some(smtp.rate_limit),
            flow_control: smtp.flow_control,
            overload_retries: smtp.overload_retries,
            failures_to_cooldown: self.relays.failures_to_cooldown,
            cooldown: self.relays.cooldown,
        }
    }

    /// Idle SMTP connections kept: `smtp.pool_size`, else the concurrency.
    pub fn pool_size(&self) -> usize {
        usize::from(self.smtp.pool_size.unwrap_or(self.worker.concurrency))
    }
}
