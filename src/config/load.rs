//! Reading the configuration: defaults, then a TOML file, then the environment; then each
//! section's `validate`, in order. A key path in an error comes from the deserializer itself.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    AmqpConfig, ConfigError, DkimEntry, HttpConfig, Limits, LogConfig, RelaysConfig, RetryConfig,
    ShutdownConfig, SmtpConfig, WorkerConfig,
};

/// Prefix of the environment variables that override the configuration.
pub const ENV_PREFIX: &str = "AMQP_MAILER";

/// The whole configuration, one field per section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[amqp]`: the broker and the topology's names.
    pub amqp: AmqpConfig,
    /// `[worker]`: concurrency, threads, largest job.
    pub worker: WorkerConfig,
    /// `[limits]`: what one job may ask for. Its `max_job_bytes` is not read from here (the key
    /// is `worker.max_job_bytes`): decode with [`Config::job_limits`], which fills it in.
    pub limits: Limits,
    /// `[smtp]`: the relay, or what every relay of `relays.list` starts from.
    pub smtp: SmtpConfig,
    /// `[relays]`: several relays.
    pub relays: RelaysConfig,
    /// `[retry]`: the delay ladder.
    pub retry: RetryConfig,
    /// `[log]`: format and filter.
    pub log: LogConfig,
    /// `[http]`: the health and metrics listener.
    pub http: HttpConfig,
    /// `[shutdown]`: the drain's grace period.
    pub shutdown: ShutdownConfig,
    /// `[[dkim]]`: the DKIM keys, per sender domain. Last: TOML writes arrays of tables after
    /// the tables.
    pub dkim: Vec<DkimEntry>,
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
    let sources = builder.build().map_err(|e| {
        // Only a file can fail to build (the environment is strings): the file is the key.
        let message = match &e {
            config::ConfigError::FileParse { cause, uri: _ } => cause.to_string(),
            other => other.to_string(),
        };
        ConfigError::new(
            file.map_or_else(|| "configuration".into(), |p| p.display().to_string()),
            message,
        )
    })?;
    let mut config: Config = serde_path_to_error::deserialize(sources).map_err(|e| {
        let key = match e.path().to_string() {
            // The root itself: nothing more precise to name.
            root if root == "." => "configuration".to_string(),
            key => key,
        };
        ConfigError::new(key, without_key(e.inner()))
    })?;
    config.validate()?;
    Ok(config)
}

/// The `config` crate's error without the key it appends (`… for key `smtp.port``): the key is
/// the deserializer's path, named once at the front.
fn without_key(error: &config::ConfigError) -> String {
    match error {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key: _,
        } => {
            let mut text = format!("invalid type: {unexpected}, expected {expected}");
            if let Some(origin) = origin {
                text.push_str(&format!(" in {origin}"));
            }
            text
        }
        config::ConfigError::At {
            error,
            origin,
            key: _,
        } => {
            let mut text = without_key(error);
            if let Some(origin) = origin {
                text.push_str(&format!(" in {origin}"));
            }
            text
        }
        // The rest carry no key (the enum is non-exhaustive, so it cannot be matched whole).
        other => other.to_string(),
    }
}

impl Config {
    /// Fills in what is derived (passwords from their files) and checks every section, then every
    /// resolved relay once. Called by [`load`].
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.worker.validate()?;
        if self.amqp.lanes.len() > usize::from(self.worker.concurrency) {
            return Err(ConfigError::new(
                "amqp.lanes",
                format!(
                    "{} lanes need a worker.concurrency of at least {} (one slot each); it is {}",
                    self.amqp.lanes.len(),
                    self.amqp.lanes.len(),
                    self.worker.concurrency
                ),
            ));
        }
        self.limits.validate()?;
        self.smtp.validate()?;
        self.relays.validate()?;
        for relay in self.relays_to_validate() {
            relay.validate()?;
        }
        self.check_relay_names()?;
        self.retry.validate()?;
        self.log.validate()?;
        self.http.validate()?;
        self.shutdown.validate()?;
        super::dkim::validate_all(&mut self.dkim)
    }

    /// The limits a job is decoded under: `[limits]` with `worker.max_job_bytes`.
    pub fn job_limits(&self) -> Limits {
        Limits::new(self.worker.max_job_bytes, &self.limits)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::config::{
        AmbiguousPolicy, AuthMechanism, ConfigEnum, LogFormat, QueueType, RelayMode, Secret,
        TlsMode,
    };

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
    fn a_broker_list_from_the_environment_or_a_file_every_password_redacted() {
        let from_env = load(
            None,
            env(&[(
                "AMQP_MAILER_AMQP__URL",
                "amqp://a:pw1@n1:5672/%2f, amqp://b:p,w2@n2:5672/%2f,amqps://c:pw3@n3:5671/%2f",
            )]),
        )
        .expect("a comma-separated list");
        let urls: Vec<&str> = from_env.amqp.url.iter().collect();
        assert_eq!(
            urls,
            [
                "amqp://a:pw1@n1:5672/%2f",
                "amqp://b:p,w2@n2:5672/%2f",
                "amqps://c:pw3@n3:5671/%2f"
            ],
            "a comma inside a password stays in it"
        );
        let printed = from_env.to_redacted_toml();
        for secret in ["pw1", "p,w2", "pw3"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("amqp://b:***@n2:5672/%2f"), "{printed}");
        assert!(!format!("{from_env:?}").contains("pw1"));

        let (_dir, path) = write_file(
            "[amqp]\nurl = [\"amqp://a:pw1@n1:5672/%2f\", \"amqp://b:pw2@n2:5672/%2f\"]\n",
        );
        let from_file = load(Some(&path), Vec::new()).expect("a TOML array");
        assert_eq!(from_file.amqp.url.len(), 2);
        let printed = from_file.to_redacted_toml();
        assert!(
            !printed.contains("pw1") && !printed.contains("pw2"),
            "{printed}"
        );
    }

    #[test]
    fn a_bad_broker_in_the_list_is_named_by_its_index() {
        let error = load(
            None,
            env(&[(
                "AMQP_MAILER_AMQP__URL",
                "amqp://a:pw1@n1:5672/%2f,amqp://b:secret@n2:notaport/%2f",
            )]),
        )
        .expect_err("the second is bad");
        assert_eq!(error.key, "amqp.url[1]");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn a_key_is_named_once() {
        let error = load(None, env(&[("AMQP_MAILER_SMTP__TIMEOUT", "30")])).expect_err("no unit");
        assert_eq!(error.key, "smtp.timeout");
        assert_eq!(
            error.to_string(),
            "configuration error: smtp.timeout: `30` has no unit; write it like `30s` or `30ms`"
        );
        let error = load(None, env(&[("AMQP_MAILER_SMTP__PORT", "abc")])).expect_err("not a port");
        assert_eq!(error.key, "smtp.port");
        assert_eq!(error.to_string().matches("smtp.port").count(), 1, "{error}");
    }

    #[test]
    fn the_path_of_a_nested_key_comes_from_the_deserializer() {
        let (_dir, path) = write_file(
            "[[relays.list]]\nhost = \"a.example\"\n\
             [[relays.list]]\nhost = \"b.example\"\nport = \"x\"\n",
        );
        let error = load(Some(&path), env(&[])).expect_err("not a port");
        assert_eq!(error.key, "relays.list[1].port", "{error}");
        assert_eq!(error.to_string().matches("relays.list[1].port").count(), 1);

        let (_dir, path) = write_file("[[relays.list]]\nhots = \"a.example\"\n");
        let error = load(Some(&path), env(&[])).expect_err("typo");
        assert_eq!(error.key, "relays.list[0].hots", "{error}");
    }

    /// Every key that takes a name: a wrong name lists every name the enum has.
    #[test]
    fn every_enum_key_lists_all_its_names() {
        fn names<T: ConfigEnum>() -> &'static [&'static str] {
            T::names()
        }
        assert_eq!(
            names::<TlsMode>(),
            ["none", "starttls", "opportunistic", "tls"]
        );
        assert_eq!(names::<AmbiguousPolicy>(), ["retry", "dead-letter"]);
        assert_eq!(names::<RelayMode>(), ["failover", "round-robin"]);
        let cases: [(&str, &str, &[&str]); 7] = [
            (
                "[amqp]\nqueue_type = \"stream\"",
                "amqp.queue_type",
                names::<QueueType>(),
            ),
            ("[smtp]\ntls = \"maybe\"", "smtp.tls", names::<TlsMode>()),
            (
                "[smtp]\nauth_mechanisms = [\"plain\", \"cram-md5\"]",
                "smtp.auth_mechanisms",
                names::<AuthMechanism>(),
            ),
            (
                "[smtp]\nambiguous = \"drop\"",
                "smtp.ambiguous",
                names::<AmbiguousPolicy>(),
            ),
            (
                "[relays]\nmode = \"random\"",
                "relays.mode",
                names::<RelayMode>(),
            ),
            (
                "[log]\nformat = \"xml\"",
                "log.format",
                names::<LogFormat>(),
            ),
            (
                "[[relays.list]]\ntls = \"sometimes\"",
                "relays.list[0].tls",
                names::<TlsMode>(),
            ),
        ];
        for (text, key, names) in cases {
            let (_dir, path) = write_file(text);
            let error = load(Some(&path), env(&[])).expect_err(text);
            assert_eq!(error.key, key, "{error}");
            assert!(names.len() >= 2, "{key}: {names:?}");
            for name in names {
                assert!(
                    error.message.contains(name),
                    "{key} should list {name}: {error}"
                );
            }
        }
        // From the environment, and as an item of a comma-separated list, alike.
        for (var, key) in [
            ("AMQP_MAILER_SMTP__AMBIGUOUS", "smtp.ambiguous"),
            ("AMQP_MAILER_SMTP__AUTH_MECHANISMS", "smtp.auth_mechanisms"),
        ] {
            let error = load(None, env(&[(var, "nope")])).expect_err(var);
            assert_eq!(error.key, key);
            assert!(
                error.message.starts_with("`nope` is not one of: "),
                "{error}"
            );
        }
    }

    #[test]
    fn each_lane_needs_a_slot_of_the_concurrency() {
        let (_dir, path) = write_file(
            "[worker]\nconcurrency = 1\n             [[amqp.lanes]]\nname = \"a\"\nqueue = \"qa\"\nrouting_key = \"a\"\n             [[amqp.lanes]]\nname = \"b\"\nqueue = \"qb\"\nrouting_key = \"b\"\n",
        );
        let error = load(Some(&path), env(&[])).expect_err("two lanes, one slot");
        assert_eq!(error.key, "amqp.lanes", "{error}");
        let (_dir, path) = write_file(
            "[[amqp.lanes]]\nname = \"a\"\nqueue = \"qa\"\nrouting_key = \"a\"\nwieght = 2\n",
        );
        let error = load(Some(&path), env(&[])).expect_err("a misspelt key");
        assert_eq!(error.key, "amqp.lanes[0].wieght", "{error}");
        let (_dir, path) =
            write_file("[[amqp.lanes]]\nname = \"a\"\nqueue = \"qa\"\nrouting_key = \"a\"\n");
        let config = load(Some(&path), env(&[])).expect("one lane");
        assert_eq!(config.amqp.lanes[0].weight, 1);
        assert!(config.to_redacted_toml().contains("[[amqp.lanes]]"));
    }

    #[test]
    fn two_relays_may_not_share_a_name() {
        let (_dir, path) = write_file(
            "[[relays.list]]\nhost = \"smtp.office365.com\"\n\
             [[relays.list]]\nhost = \"smtp.office365.com\"\nusername = \"b\"\npassword = \"p\"\n",
        );
        let error = load(Some(&path), env(&[])).expect_err("same host:port");
        assert_eq!(error.key, "relays.list[1].name", "{error}");
    }

    #[test]
    fn xoauth2_is_per_relay_and_each_gap_names_the_entry_key() {
        let (dir, _) = write_file("");
        let token = dir.path().join("token");
        std::fs::write(&token, "tok\n").expect("write");
        let m365 = format!(
            "[[relays.list]]\nname = \"m365\"\nhost = \"smtp.office365.com\"\n\
             username = \"app@example.com\"\nauth_mechanisms = [\"xoauth2\"]\n\
             oauth2 = {{ token_file = \"{}\" }}\n",
            token.display()
        );
        let with = |m365: &str| {
            format!(
                "[smtp]\nusername = \"u\"\npassword = \"p\"\n[[relays.list]]\nname = \"own\"\n{m365}"
            )
        };
        let (_d, path) = write_file(&with(&m365));
        let config = load(Some(&path), env(&[])).expect("valid");
        let relays = config.relays();
        assert_eq!(
            relays[0].smtp.auth_mechanisms,
            [AuthMechanism::Plain, AuthMechanism::Login]
        );
        assert_eq!(relays[1].smtp.auth_mechanisms, [AuthMechanism::Xoauth2]);
        assert_eq!(relays[1].smtp.password, None, "the entry's own credentials");
        assert!(relays[1].smtp.oauth2.is_some());

        for (broken, key) in [
            (
                m365.replace("oauth2 = {", "# {"),
                "relays.list[1].oauth2.token_file",
            ),
            (
                m365.replace("username = \"app@example.com\"\n", ""),
                "relays.list[1].username",
            ),
            (
                m365.replace("[\"xoauth2\"]", "[\"xoauth2\", \"login\"]"),
                "relays.list[1].auth_mechanisms",
            ),
            (
                m365.replace("[\"xoauth2\"]", "[\"plain\"]"),
                "relays.list[1].auth_mechanisms",
            ),
            (
                m365.replace("token_file = \"", "token_file = \"/nonexistent"),
                "relays.list[1].oauth2.token_file",
            ),
        ] {
            let (_d, path) = write_file(&with(&broken));
            let error = load(Some(&path), env(&[])).expect_err(key);
            assert_eq!(error.key, key, "{broken}: {error}");
        }
    }

    #[test]
    fn relays_are_resolved_over_smtp_with_their_limits() {
        let (_dir, path) = write_file(
            "[worker]\nconcurrency = 8\n[smtp]\nhost = \"main.example\"\n\
             username = \"u\"\npassword = \"p\"\nrate_limit = 5.0\npool_size = 4\n\
             [[relays.list]]\nname = \"first\"\n\
             [[relays.list]]\nhost = \"other.example\"\ntls = \"tls\"\nmax_connections = 20\n\
             username = \"v\"\npassword = \"q\"\nrate_limit = 0.0\nweight = 3\n",
        );
        let config = load(Some(&path), env(&[])).expect("valid");
        let relays = config.relays();
        assert_eq!(relays.len(), 2);
        assert_eq!(relays[0].name, "first");
        assert_eq!(relays[0].smtp.host, "main.example");
        assert_eq!(relays[0].smtp.username.as_deref(), Some("u"));
        assert_eq!(relays[0].limits.rate, Some(5.0));
        assert_eq!(relays[0].limits.max_connections, 8);
        assert_eq!(relays[0].limits.max_idle, 4);
        assert_eq!(relays[1].name, "other.example:465");
        assert_eq!(relays[1].weight, 3);
        assert_eq!(
            relays[1].smtp.password.as_ref().map(Secret::expose),
            Some("q")
        );
        // Capped by the concurrency: no relay needs more sessions than there are jobs.
        assert_eq!(relays[1].limits.max_connections, 8);
        assert_eq!(relays[1].limits.rate, None);
        assert_eq!(relays[1].limits.cooldown, Duration::from_secs(30));
        assert_eq!(relays[1].limits.failures_to_cooldown, 3);
    }

    /// A resolved relay's error names the key its bad value came from.
    #[test]
    fn relay_errors_name_the_entry_or_smtp() {
        let cases = [
            ("[[relays.list]]\nhost = \" \"", "relays.list[0].host"),
            (
                "[[relays.list]]\n[[relays.list]]\nport = 0",
                "relays.list[1].port",
            ),
            (
                "[smtp]\nport = 0\n[[relays.list]]\nhost = \"x\"",
                "smtp.port",
            ),
            ("[[relays.list]]\nweight = 0", "relays.list[0].weight"),
            (
                "[[relays.list]]\nrate_limit = -1.0",
                "relays.list[0].rate_limit",
            ),
            ("[smtp]\nrate_limit = -1.0", "smtp.rate_limit"),
            (
                "[[relays.list]]\nmax_connections = 0",
                "relays.list[0].max_connections",
            ),
            ("[smtp]\nmax_connections = 0", "smtp.max_connections"),
            (
                "[[relays.list]]\nca_file = \"/nonexistent/ca.pem\"",
                "relays.list[0].ca_file",
            ),
            ("[smtp]\nhost = \"\"", "smtp.host"),
            (
                "[[relays.list]]\nusername = \"u\"",
                "relays.list[0].password",
            ),
            (
                "[[relays.list]]\npassword = \"p\"",
                "relays.list[0].username",
            ),
            (
                "[[relays.list]]\npassword_file = \"/nonexistent/pw\"",
                "relays.list[0].password_file",
            ),
            ("[relays]\ncooldown = \"0s\"", "relays.cooldown"),
            (
                "[relays]\nfailures_to_cooldown = 0",
                "relays.failures_to_cooldown",
            ),
        ];
        for (text, key) in cases {
            let (_dir, path) = write_file(text);
            let error = load(Some(&path), env(&[])).expect_err(text);
            assert_eq!(error.key, key, "{text}: {error}");
        }
    }

    #[test]
    fn job_limits_take_max_job_bytes_from_the_worker() {
        let (_dir, path) =
            write_file("[worker]\nmax_job_bytes = 2000\n[limits]\nmax_recipients = 3\n");
        let config = load(Some(&path), env(&[])).expect("valid");
        let limits = config.job_limits();
        assert_eq!(limits.max_job_bytes, 2000);
        assert_eq!(limits.max_recipients, 3);
        assert_eq!(limits.max_headers, Limits::default().max_headers);
        let (_dir, path) = write_file("[limits]\nmax_job_bytes = 2000\n");
        let error = load(Some(&path), env(&[])).expect_err("a worker key");
        assert_eq!(error.key, "limits.max_job_bytes");
    }
}
