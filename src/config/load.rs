//! Typed configuration: built-in defaults, then a TOML file, then `AMQP_MAILER_<SECTION>__<KEY>`
//! environment variables. Everything is validated here, before any connection is made, and every
//! error names the key it is about.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override the configuration.
pub const ENV_PREFIX: &str = "AMQP_MAILER";

/// A configuration problem, always about one key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {key}: {message}")]
pub struct ConfigError {
    /// The dotted key, e.g. `smtp.port`, or the file when the file itself is the problem.
    pub key: String,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub worker: WorkerConfig,
    pub limits: LimitsConfig,
    pub smtp: SmtpConfig,
    pub relays: RelaysConfig,
    pub retry: RetryConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// Broker URL, `amqp://user:password@host:5672/vhost` (or `amqps://`). The password is redacted
    /// wherever the configuration is printed. Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: Secret,
    /// Exchange producers publish to (direct, durable). Default `email`.
    pub exchange: String,
    /// Work queue consumed by the worker. Default `email.send`.
    pub queue: String,
    /// Routing key binding the work queue to the exchange. Default `email.send`.
    pub routing_key: String,
    /// Prefix of the retry queues; the delay is appended (`email.retry.10s`). Default `email.retry.`.
    pub retry_queue_prefix: String,
    /// Dead-letter queue. Default `email.dead`.
    pub dead_letter_queue: String,
    /// `classic` or `quorum` (default). Applies to every queue the worker declares.
    pub queue_type: QueueType,
    /// How long to wait for the broker to confirm a publish (retry or dead letter). Default `10s`.
    #[serde(with = "duration")]
    pub publish_timeout: Duration,
    /// Name shown for the worker's connections in the management UI and `rabbitmqctl`.
    /// Default `amqp-mailer`; the role (`consume`, `publish`) is appended.
    pub connection_name: String,
    /// Longest wait between two reconnection attempts after the broker is lost. Default `30s`.
    #[serde(with = "duration")]
    pub reconnect_max_delay: Duration,
    /// AMQP heartbeat: a broker silent for twice this is taken as lost (a cut that TCP does not
    /// report). Whole seconds, at least `1s`. Default `10s`; a `heartbeat=` in the URL wins.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// Deadline for opening a broker connection (TCP, TLS, AMQP handshake). Default `10s`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: "email".into(),
            queue: "email.send".into(),
            routing_key: "email.send".into(),
            retry_queue_prefix: "email.retry.".into(),
            dead_letter_queue: "email.dead".into(),
            queue_type: QueueType::Quorum,
            publish_timeout: Duration::from_secs(10),
            connection_name: "amqp-mailer".into(),
            reconnect_max_delay: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs processed at once; also the prefetch and the most SMTP sessions open. Default 32.
    pub concurrency: u16,
    /// Largest job accepted, in bytes; a larger one is dead-lettered as invalid. Default 5 MiB.
    pub max_job_bytes: usize,
    /// Threads running the worker. Default 1: one thread moves thousands of jobs a second, and
    /// saves the cross-thread wake-ups of a larger pool on a machine shared with the broker.
    pub threads: u16,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 32,
            max_job_bytes: 5 * 1024 * 1024,
            threads: 1,
        }
    }
}

/// Limits on what one job may ask for; a job over a limit is dead-lettered as invalid, naming it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Recipients (to + cc + bcc) in one job. Default 100.
    pub max_recipients: usize,
    /// Attachments in one job. Default 20.
    pub max_attachments: usize,
    /// Decoded size of all attachments together, in bytes. Default 4 MiB.
    pub max_attachment_bytes: usize,
    /// Entries in the job's `headers`. Default 50.
    pub max_headers: usize,
    /// Length of one custom header (name + value), in bytes. Default 998 (RFC 5322's line limit).
    pub max_header_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_recipients: 100,
            max_attachments: 20,
            max_attachment_bytes: 4 * 1024 * 1024,
            max_headers: 50,
            max_header_bytes: 998,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMechanism {
    Plain,
    Login,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Relay host name or address. Default `localhost`.
    pub host: String,
    /// Relay port. Default: 25 with `tls = "none"`, 587 with STARTTLS, 465 with `tls = "tls"`.
    pub port: Option<u16>,
    /// `none`, `starttls` (default), `opportunistic` or `tls`.
    pub tls: TlsMode,
    /// Extra PEM file of CA certificates to trust, for a relay with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification. Only for tests against a relay with a throwaway certificate.
    pub danger_accept_invalid_certs: bool,
    /// User for SMTP AUTH; unset means no authentication.
    pub username: Option<String>,
    /// Password for SMTP AUTH. Prefer `password_file`.
    pub password: Option<Secret>,
    /// File holding the password (systemd credential, container secret); trailing newline ignored.
    pub password_file: Option<PathBuf>,
    /// Mechanisms to offer, in order of preference. Default `["plain", "login"]`; in the
    /// environment a comma-separated list (`plain,login`).
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub auth_mechanisms: Vec<AuthMechanism>,
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
    /// Most idle connections kept open. Default: the worker's concurrency.
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
    /// Most connections open to the relay at once. Default: the worker's concurrency.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AmbiguousPolicy {
    Retry,
    DeadLetter,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: None,
            tls: TlsMode::Starttls,
            ca_file: None,
            danger_accept_invalid_certs: false,
            username: None,
            password: None,
            password_file: None,
            auth_mechanisms: vec![AuthMechanism::Plain, AuthMechanism::Login],
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayMode {
    /// The first healthy relay of the list; the others only while it is cooling down.
    Failover,
    /// Every healthy relay in turn, in proportion to its weight.
    RoundRobin,
}

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
    /// give itself.
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
    pub host: Option<String>,
    pub port: Option<u16>,
    pub tls: Option<TlsMode>,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// Share of the jobs in `round-robin` mode. Default 1.
    pub weight: Option<u32>,
    pub rate_limit: Option<f64>,
    pub max_connections: Option<u16>,
}

/// A relay with every setting resolved.
#[derive(Debug, Clone)]
pub struct ResolvedRelay {
    pub name: String,
    pub weight: u32,
    pub smtp: SmtpConfig,
}

impl Config {
    /// The relays to send through, each with its full settings: `relays.list` over `[smtp]`, or
    /// `[smtp]` alone.
    pub fn relays(&self) -> Vec<ResolvedRelay> {
        let named = |smtp: &SmtpConfig| format!("{}:{}", smtp.host, smtp.effective_port());
        if self.relays.list.is_empty() {
            return vec![ResolvedRelay {
                name: named(&self.smtp),
                weight: 1,
                smtp: self.smtp.clone(),
            }];
        }
        self.relays
            .list
            .iter()
            .map(|entry| {
                let mut smtp = self.smtp.clone();
                if let Some(host) = &entry.host {
                    smtp.host = host.clone();
                    // Another host: its port follows its TLS mode unless given.
                    smtp.port = None;
                }
                if entry.port.is_some() {
                    smtp.port = entry.port;
                }
                if let Some(tls) = entry.tls {
                    smtp.tls = tls;
                }
                if entry.ca_file.is_some() {
                    smtp.ca_file = entry.ca_file.clone();
                }
                if entry.username.is_some() {
                    smtp.username = entry.username.clone();
                    smtp.password = entry.password.clone();
                }
                if let Some(rate) = entry.rate_limit {
                    smtp.rate_limit = rate;
                }
                if entry.max_connections.is_some() {
                    smtp.max_connections = entry.max_connections;
                }
                ResolvedRelay {
                    name: entry.name.clone().unwrap_or_else(|| named(&smtp)),
                    weight: entry.weight.unwrap_or(1),
                    smtp,
                }
            })
            .collect()
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
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay before the second attempt. Default `10s`.
    #[serde(with = "duration")]
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this. Default 2.
    pub multiplier: f64,
    /// Longest delay. Default `1h`.
    #[serde(with = "duration")]
    pub max_delay: Duration,
    /// Attempts in all, the first included; after the last one the job is dead-lettered
    /// as `exhausted`. Default 10.
    pub max_attempts: u32,
    /// A job still unsent this long after its first failed attempt is dead-lettered as
    /// `expired` instead of being sent late. Unset (the default): no limit. A job can also carry
    /// its own `not_after` time.
    #[serde(with = "optional_duration")]
    pub max_age: Option<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_secs(10),
            multiplier: 2.0,
            max_delay: Duration::from_secs(3600),
            max_attempts: 10,
            max_age: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter: `info` (default), `debug`, or per target like `amqp_mailer=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the health and metrics listener, e.g. `127.0.0.1:9464`. Off when unset.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM, how long jobs in flight may take to finish before they are handed back to the
    /// broker. Default `25s`.
    #[serde(with = "duration")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(25),
        }
    }
}

/// A value that must never be logged or printed: `Debug` and `Serialize` show it redacted.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&redact_url(&self.0))
    }
}

/// Redacts a secret for display. A URL keeps everything but the password of its user info, so that
/// `amqp.url` stays readable; anything else is replaced whole.
pub fn redact_url(value: &str) -> String {
    const REDACTED: &str = "***";
    let Some(scheme_end) = value.find("://") else {
        return REDACTED.to_string();
    };
    let rest = &value[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            let redacted_userinfo = if userinfo.contains(':') {
                format!("{user}:{REDACTED}")
            } else {
                user.to_string()
            };
            format!(
                "{}://{}@{}",
                &value[..scheme_end],
                redacted_userinfo,
                &rest[at + 1..]
            )
        }
        None => value.to_string(),
    }
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

/// An optional duration: absent, or written like `10s`.
pub mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&super::duration::format(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| super::duration::parse(&t).map_err(D::Error::custom))
            .transpose()
    }
}

/// Durations written like `10s`, `500ms`, `1h`, `1m 30s`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map_err(D::Error::custom)
    }

    /// Parses `10s`, `500ms`, `1h`, `1m30s`. A bare number is refused: its unit would be a guess.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "`{text}` has no unit; write it like `{text}s` or `{text}ms`"
            ));
        }
        humantime::parse_duration(text)
            .map_err(|e| format!("`{text}` is not a duration like `10s`, `500ms` or `1h`: {e}"))
    }

    /// The shortest exact rendering: `1h`, `90s`, `250ms`. Also names the retry queues.
    pub fn format(value: Duration) -> String {
        let ms = value.as_millis();
        if ms == 0 {
            "0s".to_string()
        } else if ms.is_multiple_of(3_600_000) {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms < 3_600_000 {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }
}

/// Loads the configuration: defaults, then `file` (if given), then the environment variables in
/// `env` that start with `AMQP_MAILER_` and contain `__` (e.g. `AMQP_MAILER_SMTP__PORT`); then
/// validates it. Reads `smtp.password_file` so that a missing secret fails here, not at first send.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::new(
                path.display().to_string(),
                "configuration file not found",
            ));
        }
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    // Only `<PREFIX>_<SECTION>__<KEY>` variables are configuration; others that share the prefix
    // (`AMQP_MAILER_CONFIG` names the file) must not be read as unknown keys.
    let prefix = format!("{ENV_PREFIX}_");
    let env: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix) && k[prefix.len()..].contains("__"))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            // Never `try_parsing(true)`: it would turn a password `0123` into the number 123.
            .source(Some(env)),
    );
    let raw = builder.build().map_err(from_config_error)?;
    let mut config: Config = raw.try_deserialize().map_err(from_config_error)?;
    config.resolve_and_validate()?;
    Ok(config)
}

/// Turns the `config` crate's message into one that starts with the key, as every error here does.
fn from_config_error(error: config::ConfigError) -> ConfigError {
    let text = error.to_string();
    // The crate phrases it "... for key `smtp.port` in ..." or "... (key `smtp.port`)".
    let key = text
        .split("key `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    // "unknown field `hots`, expected one of … for key `smtp`": the key is `smtp.hots`.
    let unknown = text
        .split("unknown field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next());
    match (key, unknown) {
        (Some(section), Some(field)) => ConfigError::new(
            format!("{section}.{field}"),
            format!("unknown key (a typo?); {text}"),
        ),
        (Some(key), None) if text.contains("does not have variant constructor") => {
            let allowed = match key.as_str() {
                "smtp.tls" => "none, starttls, opportunistic, tls",
                "amqp.queue_type" => "classic, quorum",
                "log.format" => "text, json",
                "smtp.auth_mechanisms" => "plain, login",
                _ => "",
            };
            let value = text
                .split("variant constructor ")
                .nth(1)
                .and_then(|rest| rest.split(" for key").next())
                .unwrap_or("?");
            ConfigError::new(key, format!("`{value}` is not one of: {allowed}"))
        }
        (Some(key), None) => ConfigError::new(key, text),
        (None, _) => ConfigError::new("configuration", text),
    }
}

impl Config {
    /// Fills in derived defaults (the password from its file) and checks every value.
    fn resolve_and_validate(&mut self) -> Result<(), ConfigError> {
        let amqp = &self.amqp;
        amqp_mailer_uri(amqp.url.expose())?;
        for (key, name) in [
            ("amqp.queue", &amqp.queue),
            ("amqp.dead_letter_queue", &amqp.dead_letter_queue),
            ("amqp.retry_queue_prefix", &amqp.retry_queue_prefix),
            ("amqp.connection_name", &amqp.connection_name),
        ] {
            if name.is_empty() {
                return Err(ConfigError::new(key, "must not be empty"));
            }
            // AMQP short strings; the retry prefix gets a delay appended.
            if name.len() > 200 {
                return Err(ConfigError::new(key, "longer than 200 bytes"));
            }
        }
        if amqp.exchange.len() > 200 || amqp.routing_key.len() > 200 {
            return Err(ConfigError::new(
                "amqp.exchange",
                "exchange and routing key must be at most 200 bytes",
            ));
        }
        if amqp.queue == amqp.dead_letter_queue {
            return Err(ConfigError::new(
                "amqp.dead_letter_queue",
                "must differ from amqp.queue",
            ));
        }
        if amqp.dead_letter_queue.starts_with(&amqp.retry_queue_prefix)
            || amqp.queue.starts_with(&amqp.retry_queue_prefix)
        {
            return Err(ConfigError::new(
                "amqp.retry_queue_prefix",
                "the work and dead-letter queues must not start with the retry prefix",
            ));
        }
        positive("amqp.publish_timeout", amqp.publish_timeout)?;
        positive("amqp.reconnect_max_delay", amqp.reconnect_max_delay)?;
        positive("amqp.connect_timeout", amqp.connect_timeout)?;
        if amqp.heartbeat < Duration::from_secs(1)
            || amqp.heartbeat > Duration::from_secs(3600)
            || amqp.heartbeat.subsec_nanos() != 0
        {
            return Err(ConfigError::new(
                "amqp.heartbeat",
                "must be whole seconds between 1s and 1h",
            ));
        }

        if self.worker.threads == 0 || self.worker.threads > 256 {
            return Err(ConfigError::new(
                "worker.threads",
                "must be between 1 and 256",
            ));
        }
        if self.worker.concurrency == 0 {
            return Err(ConfigError::new("worker.concurrency", "must be at least 1"));
        }
        // RabbitMQ refuses messages over 128 MiB by default (max_message_size).
        if self.worker.max_job_bytes == 0 || self.worker.max_job_bytes > 128 * 1024 * 1024 {
            return Err(ConfigError::new(
                "worker.max_job_bytes",
                "must be between 1 and 134217728 (128 MiB, the broker's limit)",
            ));
        }
        for (key, value) in [
            ("limits.max_recipients", self.limits.max_recipients),
            ("limits.max_attachments", self.limits.max_attachments),
            ("limits.max_headers", self.limits.max_headers),
            ("limits.max_header_bytes", self.limits.max_header_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }

        let smtp = &mut self.smtp;
        if smtp.host.trim().is_empty() {
            return Err(ConfigError::new("smtp.host", "must not be empty"));
        }
        if smtp.port == Some(0) {
            return Err(ConfigError::new("smtp.port", "must be between 1 and 65535"));
        }
        positive("smtp.timeout", smtp.timeout)?;
        positive("smtp.connect_timeout", smtp.connect_timeout)?;
        positive("smtp.pool_idle_timeout", smtp.pool_idle_timeout)?;
        if smtp.pool_size == Some(0) {
            return Err(ConfigError::new("smtp.pool_size", "must be at least 1"));
        }
        if let Some(from) = &smtp.from {
            Mailbox::from_str(from).map_err(|e| {
                ConfigError::new("smtp.from", format!("`{from}` is not an address: {e}"))
            })?;
        }
        if let Some(name) = &smtp.hello_name
            && (name.is_empty() || name.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            return Err(ConfigError::new(
                "smtp.hello_name",
                "must be a host name without spaces",
            ));
        }
        if let Some(domain) = &smtp.message_id_domain
            && !is_dot_atom(domain)
        {
            return Err(ConfigError::new(
                "smtp.message_id_domain",
                format!("`{domain}` is not a domain"),
            ));
        }
        if let Some(ca) = &smtp.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError::new(
                "smtp.ca_file",
                format!("{} is not a readable file", ca.display()),
            ));
        }
        if smtp.auth_mechanisms.is_empty() {
            return Err(ConfigError::new(
                "smtp.auth_mechanisms",
                "give at least one of plain, login",
            ));
        }
        match (&smtp.password, &smtp.password_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "smtp.password_file",
                    "set either smtp.password or smtp.password_file, not both",
                ));
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(
                        "smtp.password_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                smtp.password = Some(Secret::new(text.trim_end_matches(['\r', '\n'])));
            }
            _ => {}
        }
        if smtp.username.is_some() != smtp.password.is_some() {
            return Err(ConfigError::new(
                if smtp.username.is_some() {
                    "smtp.password"
                } else {
                    "smtp.username"
                },
                "smtp.username and a password (smtp.password or smtp.password_file) go together",
            ));
        }

        let retry = &self.retry;
        positive("retry.initial_delay", retry.initial_delay)?;
        if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0 && retry.multiplier <= 100.0) {
            return Err(ConfigError::new(
                "retry.multiplier",
                "must be a number between 1 and 100",
            ));
        }
        if retry.max_delay < retry.initial_delay {
            return Err(ConfigError::new(
                "retry.max_delay",
                "must not be shorter than retry.initial_delay",
            ));
        }
        // A TTL is a 32-bit number of milliseconds.
        if retry.max_delay > Duration::from_millis(u64::from(u32::MAX)) {
            return Err(ConfigError::new("retry.max_delay", "must be under 49 days"));
        }
        if retry.max_attempts == 0 || retry.max_attempts > 1000 {
            return Err(ConfigError::new(
                "retry.max_attempts",
                "must be between 1 and 1000",
            ));
        }

        if !(self.smtp.rate_limit.is_finite() && self.smtp.rate_limit >= 0.0) {
            return Err(ConfigError::new(
                "smtp.rate_limit",
                "must be a number of messages per second, 0 for none",
            ));
        }
        if self.smtp.max_connections == Some(0) {
            return Err(ConfigError::new(
                "smtp.max_connections",
                "must be at least 1",
            ));
        }
        positive("relays.cooldown", self.relays.cooldown)?;
        if self.relays.failures_to_cooldown == 0 {
            return Err(ConfigError::new(
                "relays.failures_to_cooldown",
                "must be at least 1",
            ));
        }
        for (i, entry) in self.relays.list.iter_mut().enumerate() {
            let key = |field: &str| format!("relays.list[{i}].{field}");
            if entry.host.as_deref().is_some_and(|h| h.trim().is_empty()) {
                return Err(ConfigError::new(key("host"), "must not be empty"));
            }
            if entry.port == Some(0) {
                return Err(ConfigError::new(key("port"), "must be between 1 and 65535"));
            }
            if entry.weight == Some(0) {
                return Err(ConfigError::new(key("weight"), "must be at least 1"));
            }
            if entry
                .rate_limit
                .is_some_and(|r| !(r.is_finite() && r >= 0.0))
            {
                return Err(ConfigError::new(key("rate_limit"), "must be 0 or more"));
            }
            if entry.max_connections == Some(0) {
                return Err(ConfigError::new(
                    key("max_connections"),
                    "must be at least 1",
                ));
            }
            if let Some(ca) = &entry.ca_file
                && !ca.is_file()
            {
                return Err(ConfigError::new(
                    key("ca_file"),
                    format!("{} is not a readable file", ca.display()),
                ));
            }
            match (&entry.password, &entry.password_file) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        key("password_file"),
                        "set either password or password_file, not both",
                    ));
                }
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        ConfigError::new(
                            key("password_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    entry.password = Some(Secret::new(text.trim_end_matches(['\r', '\n'])));
                }
                _ => {}
            }
            if entry.username.is_some() != entry.password.is_some() {
                return Err(ConfigError::new(
                    key("password"),
                    "a relay's username and password go together",
                ));
            }
        }
        if let Some(age) = self.retry.max_age {
            positive("retry.max_age", age)?;
        }

        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::new(
                "log.level",
                format!("`{}` is not a filter: {e}", self.log.level),
            )
        })?;
        positive("shutdown.grace", self.shutdown.grace)?;
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }

    /// Idle SMTP connections kept: `smtp.pool_size`, else the concurrency.
    pub fn pool_size(&self) -> usize {
        usize::from(self.smtp.pool_size.unwrap_or(self.worker.concurrency))
    }
}

fn positive(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(ConfigError::new(key, "must be longer than 0"))
    } else {
        Ok(())
    }
}

fn amqp_mailer_uri(url: &str) -> Result<lapin::uri::AMQPUri, ConfigError> {
    lapin::uri::AMQPUri::from_str(url).map_err(|e| {
        ConfigError::new(
            "amqp.url",
            format!("`{}` is not an AMQP URL: {e}", redact_url(url)),
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).expect("write config file");
        (dir, path)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = load(None, env(&[])).expect("defaults are valid");
        assert_eq!(config.amqp.exchange, "email");
        assert_eq!(config.amqp.queue, "email.send");
        assert_eq!(config.amqp.queue_type, QueueType::Quorum);
        assert_eq!(config.worker.concurrency, 32);
        assert_eq!(config.retry.initial_delay, Duration::from_secs(10));
        assert_eq!(config.retry.max_delay, Duration::from_secs(3600));
        assert_eq!(config.retry.max_attempts, 10);
        assert_eq!(config.smtp.effective_port(), 587);
        assert_eq!(config.shutdown.grace, Duration::from_secs(25));
        assert_eq!(config.pool_size(), 32);
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let (_dir, path) = write_file(
            "[smtp]\nhost = \"relay.example.com\"\nport = 2525\ntimeout = \"5s\"\n\
             [worker]\nconcurrency = 8\n",
        );
        let config = load(
            Some(&path),
            env(&[
                ("AMQP_MAILER_SMTP__PORT", "2600"),
                ("AMQP_MAILER_RETRY__INITIAL_DELAY", "250ms"),
                ("AMQP_MAILER_SMTP__AUTH_MECHANISMS", "login,plain"),
                ("AMQP_MAILER_CONFIG", "/ignored/because/it/names/the/file"),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(config.smtp.host, "relay.example.com");
        assert_eq!(config.smtp.port, Some(2600));
        assert_eq!(config.smtp.timeout, Duration::from_secs(5));
        assert_eq!(config.worker.concurrency, 8);
        assert_eq!(config.retry.initial_delay, Duration::from_millis(250));
        assert_eq!(
            config.smtp.auth_mechanisms,
            vec![AuthMechanism::Login, AuthMechanism::Plain]
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("AMQP_MAILER_SMTP__PORT", "abc")], "smtp.port"),
            (&[("AMQP_MAILER_SMTP__PORT", "0")], "smtp.port"),
            (&[("AMQP_MAILER_SMTP__TIMEOUT", "30")], "smtp.timeout"),
            (&[("AMQP_MAILER_SMTP__TIMEOUT", "soon")], "smtp.timeout"),
            (&[("AMQP_MAILER_SMTP__TLS", "maybe")], "smtp.tls"),
            (
                &[("AMQP_MAILER_WORKER__CONCURRENCY", "0")],
                "worker.concurrency",
            ),
            (
                &[("AMQP_MAILER_WORKER__CONCURRENCY", "70000")],
                "worker.concurrency",
            ),
            (&[("AMQP_MAILER_AMQP__URL", "http://x")], "amqp.url"),
            (
                &[("AMQP_MAILER_AMQP__QUEUE_TYPE", "stream")],
                "amqp.queue_type",
            ),
            (
                &[("AMQP_MAILER_RETRY__MULTIPLIER", "0.5")],
                "retry.multiplier",
            ),
            (&[("AMQP_MAILER_RETRY__MAX_DELAY", "1s")], "retry.max_delay"),
            (&[("AMQP_MAILER_SMTP__FROM", "not an address")], "smtp.from"),
            (&[("AMQP_MAILER_SMTP__USERNAME", "u")], "smtp.password"),
            (
                &[("AMQP_MAILER_SMTP__PASSWORD_FILE", "/nonexistent/pw")],
                "smtp.password_file",
            ),
            (&[("AMQP_MAILER_SMTP__PROT", "25")], "smtp.prot"),
            (&[("AMQP_MAILER_LOG__LEVEL", "info,[[[")], "log.level"),
        ];
        for (vars, key) in cases {
            let error = load(None, env(vars)).expect_err(&format!("{vars:?} must be refused"));
            assert!(
                error.key.contains(key) || error.message.contains(key),
                "{vars:?}: error should name {key}: {error}"
            );
        }
    }

    #[test]
    fn unknown_key_in_file_is_refused() {
        let (_dir, path) = write_file("[smtp]\nhots = \"x\"\n");
        let error = load(Some(&path), env(&[])).expect_err("typo must be refused");
        assert!(error.to_string().contains("hots"), "{error}");
    }

    #[test]
    fn password_file_is_read_and_trimmed() {
        let (dir, _) = write_file("");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "0123secret\n").expect("write");
        let config = load(
            None,
            env(&[
                ("AMQP_MAILER_SMTP__USERNAME", "mailer"),
                (
                    "AMQP_MAILER_SMTP__PASSWORD_FILE",
                    pw.to_str().expect("utf-8"),
                ),
            ]),
        )
        .expect("valid");
        assert_eq!(
            config.smtp.password.as_ref().map(Secret::expose),
            Some("0123secret")
        );
    }

    #[test]
    fn numeric_looking_password_is_kept_as_written() {
        let config = load(
            None,
            env(&[
                ("AMQP_MAILER_SMTP__USERNAME", "mailer"),
                ("AMQP_MAILER_SMTP__PASSWORD", "0123"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            config.smtp.password.as_ref().map(Secret::expose),
            Some("0123")
        );
    }

    #[test]
    fn printed_configuration_has_no_secrets() {
        let config = load(
            None,
            env(&[
                (
                    "AMQP_MAILER_AMQP__URL",
                    "amqp://app:brokerpass@rabbit:5672/%2f",
                ),
                ("AMQP_MAILER_SMTP__USERNAME", "mailer"),
                ("AMQP_MAILER_SMTP__PASSWORD", "smtppass"),
            ]),
        )
        .expect("valid");
        let printed = config.to_redacted_toml();
        assert!(!printed.contains("brokerpass"), "{printed}");
        assert!(!printed.contains("smtppass"), "{printed}");
        assert!(
            printed.contains("amqp://app:***@rabbit:5672/%2f"),
            "{printed}"
        );
        let debugged = format!("{config:?}");
        assert!(!debugged.contains("brokerpass") && !debugged.contains("smtppass"));
    }

    #[test]
    fn durations_round_trip() {
        for (text, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1h", 3_600_000),
            ("2m", 120_000),
            ("90s", 90_000),
            ("1280s", 1_280_000),
        ] {
            let parsed = duration::parse(text).expect(text);
            assert_eq!(parsed, Duration::from_millis(ms));
            assert_eq!(duration::format(parsed), text);
        }
        assert!(duration::parse("30").is_err());
    }

    #[test]
    fn redaction_keeps_url_readable() {
        assert_eq!(redact_url("amqp://u:p@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact_url("amqp://h:1/v"), "amqp://h:1/v");
        assert_eq!(redact_url("amqp://u@h"), "amqp://u@h");
        assert_eq!(redact_url("plain secret"), "***");
    }
}
