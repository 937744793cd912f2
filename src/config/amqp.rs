//! `[amqp]`: the broker, and the names of everything the worker declares on it.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::{self, positive};
use super::enums::by_name;
use super::{ConfigError, Secret, redact_url};

/// The type of every queue the worker declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", remote = "Self")]
pub enum QueueType {
    /// Classic queues: dead-lettering (retries) at most once.
    Classic,
    /// Quorum queues: replicated, and the retry tiers dead-letter at least once.
    Quorum,
}
by_name!(QueueType);

/// `[amqp]`: the broker connection and the topology's names.
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

impl AmqpConfig {
    /// Checks the URL, the names and the timeouts of `[amqp]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        lapin::uri::AMQPUri::from_str(url).map_err(|e| {
            ConfigError::new(
                "amqp.url",
                format!("`{}` is not an AMQP URL: {e}", redact_url(url)),
            )
        })?;
        for (key, name) in [
            ("amqp.queue", &self.queue),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
            ("amqp.retry_queue_prefix", &self.retry_queue_prefix),
            ("amqp.connection_name", &self.connection_name),
        ] {
            if name.is_empty() {
                return Err(ConfigError::new(key, "must not be empty"));
            }
            // AMQP short strings; the retry prefix gets a delay appended.
            if name.len() > 200 {
                return Err(ConfigError::new(key, "longer than 200 bytes"));
            }
        }
        if self.exchange.len() > 200 || self.routing_key.len() > 200 {
            return Err(ConfigError::new(
                "amqp.exchange",
                "exchange and routing key must be at most 200 bytes",
            ));
        }
        if self.queue == self.dead_letter_queue {
            return Err(ConfigError::new(
                "amqp.dead_letter_queue",
                "must differ from amqp.queue",
            ));
        }
        if self.dead_letter_queue.starts_with(&self.retry_queue_prefix)
            || self.queue.starts_with(&self.retry_queue_prefix)
        {
            return Err(ConfigError::new(
                "amqp.retry_queue_prefix",
                "the work and dead-letter queues must not start with the retry prefix",
            ));
        }
        positive("amqp.publish_timeout", self.publish_timeout)?;
        positive("amqp.reconnect_max_delay", self.reconnect_max_delay)?;
        positive("amqp.connect_timeout", self.connect_timeout)?;
        if self.heartbeat < Duration::from_secs(1)
            || self.heartbeat > Duration::from_secs(3600)
            || self.heartbeat.subsec_nanos() != 0
        {
            return Err(ConfigError::new(
                "amqp.heartbeat",
                "must be whole seconds between 1s and 1h",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_failure_names_its_key() {
        assert!(AmqpConfig::default().validate().is_ok());
        type Break = fn(&mut AmqpConfig);
        let cases: [(Break, &str); 5] = [
            (|c| c.url = Secret::new("http://x"), "amqp.url"),
            (|c| c.queue = String::new(), "amqp.queue"),
            (
                |c| c.dead_letter_queue = c.queue.clone(),
                "amqp.dead_letter_queue",
            ),
            (
                |c| c.queue = "email.retry.x".into(),
                "amqp.retry_queue_prefix",
            ),
            (
                |c| c.heartbeat = Duration::from_millis(1500),
                "amqp.heartbeat",
            ),
        ];
        for (break_it, key) in cases {
            let mut config = AmqpConfig::default();
            break_it(&mut config);
            assert_eq!(config.validate().expect_err(key).key, key);
        }
    }

    #[test]
    fn a_bad_url_is_shown_redacted() {
        let config = AmqpConfig {
            url: Secret::new("http://u:hunter2@x"),
            ..AmqpConfig::default()
        };
        let error = config.validate().expect_err("not amqp");
        assert!(!error.message.contains("hunter2"), "{error}");
    }
}
