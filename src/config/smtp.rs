//! `[smtp]`: the relay (or the settings every relay of `relays.list` starts from), and what every
//! send does whatever the relay.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};

use super::duration::{self, positive};
use super::enums::{ConfigEnum, by_name};
use super::{ConfigError, OAuth2Config, Secret};

/// How the connection to a relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", remote = "Self")]
pub enum TlsMode {
    /// Plain SMTP; for a relay on the same host or network only.
    None,
    /// STARTTLS, required: a relay that does not offer it is a (transient) failure.
    Starttls,
    /// STARTTLS when the relay offers it, plain otherwise. Open to downgrade; avoid.
    Opportunistic,
    /// Implicit TLS from the first byte (SMTPS, port 465).
    Tls,
}

/// An SMTP AUTH mechanism the worker may offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", remote = "Self")]
pub enum AuthMechanism {
    /// `AUTH PLAIN`.
    Plain,
    /// `AUTH LOGIN`.
    Login,
    /// `AUTH XOAUTH2`: an OAuth2 access token from `oauth2` instead of a password.
    Xoauth2,
}

/// What to do when a send may have reached the relay (a timeout or a dropped connection after
/// the data was sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", remote = "Self")]
pub enum AmbiguousPolicy {
    /// Send again; the stable Message-ID lets receivers drop a copy.
    Retry,
    /// Dead-letter it: a person decides.
    DeadLetter,
}
/// Where messages go: to a relay over SMTP, or to a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", remote = "Self")]
pub enum TransportKind {
    /// Over SMTP, to `smtp.host` or the relays of `relays.list`.
    Smtp,
    /// Written to `smtp.outbox_dir`, one `.eml` file per message with its envelope beside it;
    /// nothing is sent. For a first try, development and tests.
    Outbox,
}
by_name!(TlsMode, AuthMechanism, AmbiguousPolicy, TransportKind);

/// `[smtp]`: the one relay, or the settings the entries of `relays.list` leave out.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// `smtp` (default) or `outbox`: write each message to `outbox_dir` instead of sending it.
    pub transport: TransportKind,
    /// The folder of `transport = "outbox"`; created if missing. Default unset.
    pub outbox_dir: Option<PathBuf>,
    /// At start, open one TCP connection to each relay (and close it) and warn when it cannot be
    /// made, rather than let the first job be the first to find out. Default `true`.
    pub check_at_start: bool,
    /// Relay host name or address. Default `localhost`.
    pub host: String,
    /// Relay port. Default: 25 with `tls = "none"`, 587 with STARTTLS, 465 with `tls = "tls"`.
    pub port: Option<u16>,
    /// `none`, `starttls` (default), `opportunistic` or `tls`.
    pub tls: TlsMode,
    /// Extra PEM file of CA certificates to trust, for a relay with a private CA. Default unset.
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification. Only for tests against a relay with a throwaway certificate.
    /// Default `false`.
    pub danger_accept_invalid_certs: bool,
    /// User for SMTP AUTH; unset (the default) means no authentication.
    pub username: Option<String>,
    /// Password for SMTP AUTH. Prefer `password_file`. Default unset.
    pub password: Option<Secret>,
    /// File holding the password (systemd credential, container secret); trailing newline ignored.
    /// Read while the configuration is loaded. Default unset.
    pub password_file: Option<PathBuf>,
    /// Mechanisms to offer, in order of preference. Default `["plain", "login"]`; in the
    /// environment a comma-separated list (`plain,login`). `xoauth2` stands alone.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub auth_mechanisms: Vec<AuthMechanism>,
    /// Where the XOAUTH2 token comes from (`[smtp.oauth2]`). Default unset.
    pub oauth2: Option<OAuth2Config>,
    /// Deadline for a whole send (connect, TLS, AUTH, envelope, data). Default `30s`.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Deadline for the TCP connect alone. Default `10s`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this; keep it below the relay's own idle timeout.
    /// Default `60s`.
    #[serde(with = "duration")]
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept open, per relay. Default: the worker's concurrency.
    pub pool_size: Option<u16>,
    /// Sender used when a job has no `from`. Default unset (a job without `from` is then invalid).
    pub from: Option<String>,
    /// Name sent in EHLO. Default: this machine's host name.
    pub hello_name: Option<String>,
    /// Domain of generated Message-IDs. Default: the sender's domain.
    pub message_id_domain: Option<String>,
    /// Most messages per second to the relay, evenly spaced (no bursts); 0 for no limit.
    /// Default 0.
    pub rate_limit: f64,
    /// Most connections open to the relay at once, capped by the worker's concurrency.
    /// Default: the worker's concurrency.
    pub max_connections: Option<u16>,
    /// Adapt to a relay that says it is overloaded (421, or a 4xx about rates or too many
    /// connections): halve the sends in flight, retry the job without counting an attempt, grow
    /// back one step per success round. Default `true`.
    pub flow_control: bool,
    /// How many overload replies one job may wait out before they count as a failed attempt.
    /// Default 5.
    pub overload_retries: u32,
    /// A timeout or dropped connection after the message was sent may mean the relay has it:
    /// `retry` (default; the stable Message-ID lets receivers drop a copy) or `dead-letter` (a
    /// person decides).
    pub ambiguous: AmbiguousPolicy,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            transport: TransportKind::Smtp,
            outbox_dir: None,
            check_at_start: true,
            host: "localhost".into(),
            port: None,
            tls: TlsMode::Starttls,
            ca_file: None,
            danger_accept_invalid_certs: false,
            username: None,
            password: None,
            password_file: None,
            auth_mechanisms: vec![AuthMechanism::Plain, AuthMechanism::Login],
            oauth2: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(60),
            pool_size: None,
            from: None,
            hello_name: None,
            message_id_domain: None,
            rate_limit: 0.0,
            max_connections: None,
            flow_control: true,
            overload_retries: 5,
            ambiguous: AmbiguousPolicy::Retry,
        }
    }
}

impl SmtpConfig {
    /// The port to connect to, defaulted from the TLS mode.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            TlsMode::None => 25,
            TlsMode::Starttls | TlsMode::Opportunistic => 587,
            TlsMode::Tls => 465,
        })
    }

    /// Checks the settings every send shares (deadlines, pool, sender, names, mechanisms) and
    /// reads `smtp.password_file`. What a relay entry can override (host, port, CA, credentials,
    /// rate, connections) is checked per resolved relay, `ResolvedRelay::validate`.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        match (&self.transport, &self.outbox_dir) {
            (TransportKind::Outbox, None) => {
                return Err(ConfigError::new(
                    "smtp.outbox_dir",
                    "is required with smtp.transport = \"outbox\": the folder to write mail to",
                ));
            }
            (TransportKind::Outbox, Some(dir)) if dir.as_os_str().is_empty() => {
                return Err(ConfigError::new("smtp.outbox_dir", "must not be empty"));
            }
            _ => {}
        }
        positive("smtp.timeout", self.timeout)?;
        positive("smtp.connect_timeout", self.connect_timeout)?;
        positive("smtp.pool_idle_timeout", self.pool_idle_timeout)?;
        if self.pool_size == Some(0) {
            return Err(ConfigError::new("smtp.pool_size", "must be at least 1"));
        }
        if let Some(from) = &self.from {
            Mailbox::from_str(from).map_err(|e| {
                ConfigError::new("smtp.from", format!("`{from}` is not an address: {e}"))
            })?;
        }
        if let Some(name) = &self.hello_name
            && (name.is_empty() || name.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            return Err(ConfigError::new(
                "smtp.hello_name",
                "must be a host name without spaces",
            ));
        }
        if let Some(domain) = &self.message_id_domain
            && !is_dot_atom(domain)
        {
            return Err(ConfigError::new(
                "smtp.message_id_domain",
                format!("`{domain}` is not a domain"),
            ));
        }
        if self.auth_mechanisms.is_empty() {
            return Err(ConfigError::new(
                "smtp.auth_mechanisms",
                format!("give at least one of {}", AuthMechanism::names().join(", ")),
            ));
        }
        if let Some(oauth2) = &mut self.oauth2 {
            oauth2.validate("smtp.oauth2")?;
        }
        read_password_file(&mut self.password, self.password_file.as_deref(), "smtp")
    }
}

/// Reads a password file into `password`, so that a missing secret fails at load, not at the
/// first send. `section` is where both keys live (`smtp`, `relays.list[1]`).
pub(super) fn read_password_file(
    password: &mut Option<Secret>,
    file: Option<&Path>,
    section: &str,
) -> Result<(), ConfigError> {
    read_secret_file(
        password,
        file,
        &format!("{section}.password"),
        &format!("{section}.password_file"),
    )
}

/// Reads a secret's file into the secret: `secret_key` and `file_key` name the two keys, one of
/// which may be set. Trailing line endings are dropped.
pub(super) fn read_secret_file(
    secret: &mut Option<Secret>,
    file: Option<&Path>,
    secret_key: &str,
    file_key: &str,
) -> Result<(), ConfigError> {
    let Some(path) = file else {
        return Ok(());
    };
    if secret.is_some() {
        return Err(ConfigError::new(
            file_key,
            format!("set either {secret_key} or {file_key}, not both"),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(file_key, format!("cannot read {}: {e}", path.display())))?;
    *secret = Some(Secret::new(text.trim_end_matches(['\r', '\n'])));
    Ok(())
}

/// RFC 5322 dot-atom: what may stand on either side of the `@` of a Message-ID unquoted.
pub fn is_dot_atom(text: &str) -> bool {
    const SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~";
    !text.is_empty()
        && !text.starts_with('.')
        && !text.ends_with('.')
        && !text.contains("..")
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || SPECIALS.contains(c))
}

/// A list from TOML, or a comma-separated string from an environment variable.
fn list_or_comma_separated<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        String(String),
    }
    let items = match ListOrString::deserialize(deserializer)? {
        ListOrString::List(items) => items,
        ListOrString::String(text) => text
            .split(',')
            .map(|item| item.trim().to_string())
            .filter(|item| !item.is_empty())
            .collect(),
    };
    items
        .into_iter()
        .map(|item| {
            T::deserialize(serde::de::value::StringDeserializer::<D::Error>::new(
                item.to_ascii_lowercase(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_failure_names_its_key() {
        assert!(SmtpConfig::default().validate().is_ok());
        type Break = fn(&mut SmtpConfig);
        let cases: [(Break, &str); 9] = [
            (|c| c.transport = TransportKind::Outbox, "smtp.outbox_dir"),
            (
                |c| {
                    c.transport = TransportKind::Outbox;
                    c.outbox_dir = Some(PathBuf::new());
                },
                "smtp.outbox_dir",
            ),
            (|c| c.timeout = Duration::ZERO, "smtp.timeout"),
            (|c| c.pool_size = Some(0), "smtp.pool_size"),
            (|c| c.from = Some("not an address".into()), "smtp.from"),
            (|c| c.hello_name = Some("a b".into()), "smtp.hello_name"),
            (
                |c| c.message_id_domain = Some("a..b".into()),
                "smtp.message_id_domain",
            ),
            (|c| c.auth_mechanisms.clear(), "smtp.auth_mechanisms"),
            (
                |c| c.password_file = Some("/nonexistent/pw".into()),
                "smtp.password_file",
            ),
        ];
        for (break_it, key) in cases {
            let mut config = SmtpConfig::default();
            break_it(&mut config);
            assert_eq!(config.validate().expect_err(key).key, key);
        }
    }

    #[test]
    fn password_and_password_file_exclude_each_other() {
        let mut password = Some(Secret::new("x"));
        let error = read_password_file(&mut password, Some(Path::new("/pw")), "relays.list[2]")
            .expect_err("both");
        assert_eq!(error.key, "relays.list[2].password_file");
    }

    #[test]
    fn ports_follow_the_tls_mode() {
        for (tls, port) in [
            (TlsMode::None, 25),
            (TlsMode::Starttls, 587),
            (TlsMode::Opportunistic, 587),
            (TlsMode::Tls, 465),
        ] {
            let config = SmtpConfig {
                tls,
                ..SmtpConfig::default()
            };
            assert_eq!(config.effective_port(), port);
        }
    }
}
