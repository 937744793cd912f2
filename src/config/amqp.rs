//! `[amqp]`: the broker, and the names of everything the worker declares on it.

use std::path::PathBuf;
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

/// How the worker logs in to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", remote = "Self")]
pub enum BrokerAuth {
    /// User name and password from the URL (SASL PLAIN).
    Plain,
    /// SASL EXTERNAL: the broker takes the user name from the client certificate
    /// (`amqp.tls.cert_file`); the URL's user and password are not sent.
    External,
}
by_name!(BrokerAuth);

impl BrokerAuth {
    /// The mechanism as lapin names it.
    pub fn sasl(self) -> lapin::uri::SASLMechanism {
        match self {
            Self::Plain => lapin::uri::SASLMechanism::Plain,
            Self::External => lapin::uri::SASLMechanism::External,
        }
    }
}

/// `[amqp.tls]`: TLS for `amqps://` URLs. The broker's certificate is always verified, with its
/// host name; these keys add a private CA and a client certificate.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerTlsConfig {
    /// PEM bundle of extra CA certificates to trust besides the system's roots (for a private
    /// CA). Default unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM, the chain from the leaf), for brokers with `verify_peer`, and
    /// for `auth_mechanism = "external"`. Needs `key_file`. Default unset.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM, unencrypted). Default unset.
    pub key_file: Option<PathBuf>,
}

impl BrokerTlsConfig {
    /// Whether any key of `[amqp.tls]` is set.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// The brokers to connect to, in order: one URL, or one per node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<Secret>);

impl BrokerUrls {
    /// The brokers, in the order they are tried.
    pub fn new(urls: impl IntoIterator<Item = Secret>) -> Self {
        Self(urls.into_iter().collect())
    }

    /// The URLs, in order, with their passwords: only for connecting.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(Secret::expose)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The URL at `index`, counted round the list.
    pub fn get(&self, index: usize) -> Option<&str> {
        let n = self.0.len();
        (n > 0).then(|| self.0[index % n].expose())
    }

    /// Splits a list written as one string. A comma separates two URLs only where the next one
    /// begins with its scheme, so that a comma inside a password is kept.
    fn split(text: &str) -> Vec<Secret> {
        let mut urls = Vec::new();
        let mut current = String::new();
        for part in text.split(',') {
            let trimmed = part.trim_start();
            if !current.is_empty()
                && (trimmed.starts_with("amqp://") || trimmed.starts_with("amqps://"))
            {
                urls.push(Secret::new(current.trim()));
                current = String::new();
            } else if !current.is_empty() {
                current.push(',');
            }
            current.push_str(part);
        }
        if !current.trim().is_empty() {
            urls.push(Secret::new(current.trim()));
        }
        urls
    }
}

impl From<Secret> for BrokerUrls {
    fn from(url: Secret) -> Self {
        Self(vec![url])
    }
}

impl Serialize for BrokerUrls {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(serializer),
            many => many.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for BrokerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            One(String),
            List(Vec<String>),
        }
        Ok(match Written::deserialize(deserializer)? {
            Written::One(text) => Self(Self::split(&text)),
            Written::List(list) => Self(list.iter().flat_map(|text| Self::split(text)).collect()),
        })
    }
}

/// `[amqp]`: the broker connection and the topology's names.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// Broker URL, `amqp://user:password@host:5672/vhost` (or `amqps://`), or a list of them, one
    /// per node of a cluster: a TOML array, or in the environment a comma-separated list. The
    /// worker connects to the first node that answers, and moves on to the next when its node is
    /// lost. Passwords are redacted wherever the configuration is printed. Default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: BrokerUrls,
    /// Exchange producers publish to (direct, durable). Default `email`.
    pub exchange: String,
    /// Topic exchange (durable) that receipts are published to, one per settled delivery, with
    /// the outcome as routing key (`delivered`, `deferred`, `failed.rejected`, …); each is
    /// confirmed by the broker before its job is acked. Empty: no receipts. Default
    /// `email.events`.
    pub events_exchange: String,
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
    /// Longest wait between two rounds of reconnection attempts after the broker is lost; each
    /// wait is drawn at random between half of it and all of it, so that many instances do not
    /// reconnect in step. Default `2s`: a node that answers again is consumed from within
    /// seconds, whatever the length of the outage.
    #[serde(with = "duration")]
    pub reconnect_max_delay: Duration,
    /// AMQP heartbeat: a broker silent for twice this is taken as lost (a cut that TCP does not
    /// report). Whole seconds, at least `1s`. Default `10s`; a `heartbeat=` in the URL wins.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// Deadline for opening a broker connection (TCP, TLS, AMQP handshake). Default `10s`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// `plain` (default: user and password from the URL) or `external` (the client certificate
    /// says who we are; needs `amqp.tls.cert_file`). An `auth_mechanism=` in a URL wins for
    /// that URL.
    pub auth_mechanism: BrokerAuth,
    /// TLS for `amqps://` URLs.
    pub tls: BrokerTlsConfig,
    /// `[[amqp.lanes]]`: several work queues consumed by one worker, each with its share of
    /// `worker.concurrency`. Empty (default): the one queue `amqp.queue`. With lanes,
    /// `amqp.queue` and `amqp.routing_key` are not used. Read from the file only. Last: TOML
    /// writes arrays of tables after the other keys.
    pub lanes: Vec<LaneConfig>,
}

/// One lane of `[[amqp.lanes]]`: a work queue of its own, bound to the exchange with its own
/// routing key, with retry queues of its own (`<retry_queue_prefix><name>.10s`), and a share of
/// the concurrency in proportion to its weight.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// The lane's name: a label on the metrics, a field in logs and receipts. Lower-case
    /// letters, digits, `-` and `_`.
    pub name: String,
    /// The lane's work queue.
    pub queue: String,
    /// The routing key binding the queue to `amqp.exchange`.
    pub routing_key: String,
    /// Its share of `worker.concurrency` against the other lanes' weights. Default 1.
    #[serde(default = "one")]
    pub weight: u16,
}

fn one() -> u16 {
    1
}

/// Splits `total` slots between `weights` in proportion (largest remainder), each at least 1
/// when `total` allows it; the shares add up to `total`.
pub fn shares(weights: &[u16], total: u16) -> Vec<u16> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let total = u64::from(total);
    let sum: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum();
    // Each lane first gets one slot (when there are enough), the rest by weight.
    let floor = u64::from(total >= n as u64);
    let rest = total - floor * n as u64;
    let mut out: Vec<u64> = Vec::with_capacity(n);
    let mut remainders: Vec<(u64, usize)> = Vec::with_capacity(n);
    for (i, &w) in weights.iter().enumerate() {
        let exact = rest * u64::from(w.max(1));
        out.push(floor + exact / sum);
        remainders.push((exact % sum, i));
    }
    let given: u64 = out.iter().sum();
    // Largest remainders first; ties to the earlier lane.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take((total - given) as usize) {
        out[i] += 1;
    }
    out.into_iter().map(|s| s as u16).collect()
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f").into(),
            exchange: "email".into(),
            events_exchange: "email.events".into(),
            queue: "email.send".into(),
            routing_key: "email.send".into(),
            retry_queue_prefix: "email.retry.".into(),
            dead_letter_queue: "email.dead".into(),
            queue_type: QueueType::Quorum,
            publish_timeout: Duration::from_secs(10),
            connection_name: "amqp-mailer".into(),
            reconnect_max_delay: Duration::from_secs(2),
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            auth_mechanism: BrokerAuth::Plain,
            tls: BrokerTlsConfig::default(),
            lanes: Vec::new(),
        }
    }
}

impl AmqpConfig {
    /// Checks the URL, the names and the timeouts of `[amqp]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.0.is_empty() {
            return Err(ConfigError::new("amqp.url", "names no broker"));
        }
        for (i, url) in self.url.iter().enumerate() {
            let key = if self.url.0.len() == 1 {
                "amqp.url".to_string()
            } else {
                format!("amqp.url[{i}]")
            };
            let uri = lapin::uri::AMQPUri::from_str(url).map_err(|e| {
                ConfigError::new(
                    key.clone(),
                    format!("`{}` is not an AMQP URL: {e}", redact_url(url)),
                )
            })?;
            let tls = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
            let mechanism = uri
                .query
                .auth_mechanism
                .unwrap_or(self.auth_mechanism.sasl());
            if mechanism == lapin::uri::SASLMechanism::External && !tls {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "`{}` logs in with EXTERNAL, which takes the user from a TLS client \
                         certificate: use an amqps:// URL",
                        redact_url(url)
                    ),
                ));
            }
            if mechanism == lapin::uri::SASLMechanism::External && self.tls.cert_file.is_none() {
                return Err(ConfigError::new(
                    "amqp.tls.cert_file",
                    "the EXTERNAL mechanism (amqp.auth_mechanism) needs a client certificate: \
                     set amqp.tls.cert_file and amqp.tls.key_file",
                ));
            }
            if self.tls.is_set() && !tls {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "`{}` is not amqps://, but [amqp.tls] is set: the connection would not \
                         use it",
                        redact_url(url)
                    ),
                ));
            }
        }
        crate::amqp::BrokerTls::load(&self.tls)?;
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
        if self.events_exchange.len() > 200 {
            return Err(ConfigError::new(
                "amqp.events_exchange",
                "longer than 200 bytes",
            ));
        }
        if !self.events_exchange.is_empty() && self.events_exchange == self.exchange {
            return Err(ConfigError::new(
                "amqp.events_exchange",
                "must differ from amqp.exchange (a topic exchange of its own)",
            ));
        }
        if self.events_exchange.starts_with("amq.") {
            return Err(ConfigError::new(
                "amqp.events_exchange",
                "names starting with amq. are reserved by the broker",
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
        self.validate_lanes()?;
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

impl AmqpConfig {
    /// The retry queues of lane `name` are named this followed by their delay.
    pub fn lane_retry_prefix(&self, name: &str) -> String {
        format!("{}{name}.", self.retry_queue_prefix)
    }

    fn validate_lanes(&self) -> Result<(), ConfigError> {
        for (i, lane) in self.lanes.iter().enumerate() {
            let key = |field: &str| format!("amqp.lanes[{i}].{field}");
            if lane.name.is_empty() || lane.name.len() > 64 {
                return Err(ConfigError::new(key("name"), "must be 1 to 64 characters"));
            }
            if !lane
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(ConfigError::new(
                    key("name"),
                    format!(
                        "`{}` may hold only lower-case letters, digits, - and _",
                        lane.name
                    ),
                ));
            }
            if lane.queue.is_empty() || lane.queue.len() > 200 {
                return Err(ConfigError::new(key("queue"), "must be 1 to 200 bytes"));
            }
            if lane.routing_key.len() > 200 {
                return Err(ConfigError::new(
                    key("routing_key"),
                    "longer than 200 bytes",
                ));
            }
            if lane.weight == 0 {
                return Err(ConfigError::new(key("weight"), "must be at least 1"));
            }
            if lane.queue == self.dead_letter_queue {
                return Err(ConfigError::new(
                    key("queue"),
                    "must differ from amqp.dead_letter_queue",
                ));
            }
            if lane.queue.starts_with(&self.retry_queue_prefix) {
                return Err(ConfigError::new(
                    key("queue"),
                    format!(
                        "must not start with the retry prefix `{}`",
                        self.retry_queue_prefix
                    ),
                ));
            }
            for (j, other) in self.lanes[..i].iter().enumerate() {
                if other.name == lane.name {
                    return Err(ConfigError::new(
                        key("name"),
                        format!("`{}` is also the name of amqp.lanes[{j}]", lane.name),
                    ));
                }
                if other.queue == lane.queue {
                    return Err(ConfigError::new(
                        key("queue"),
                        format!("`{}` is also the queue of amqp.lanes[{j}]", lane.queue),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_weights_and_add_up() {
        assert_eq!(shares(&[3, 1], 16), [12, 4]);
        assert_eq!(shares(&[3, 1], 32), [24, 8]);
        assert_eq!(shares(&[1], 32), [32]);
        assert_eq!(shares(&[1, 1, 1], 10), [4, 3, 3]);
        // Each lane gets a slot, however small its weight.
        assert_eq!(shares(&[100, 1], 4), [3, 1]);
        assert_eq!(shares(&[1, 1], 2), [1, 1]);
        for total in 2..64 {
            for weights in [[1u16, 1], [3, 1], [1, 9], [7, 5]] {
                let s = shares(&weights, total);
                assert_eq!(s.iter().sum::<u16>(), total, "{weights:?} of {total}");
                assert!(s.iter().all(|&x| x >= 1));
            }
        }
    }

    #[test]
    fn lanes_are_checked_naming_their_entry() {
        let lane = |name: &str, queue: &str| LaneConfig {
            name: name.into(),
            queue: queue.into(),
            routing_key: name.into(),
            weight: 1,
        };
        let ok = AmqpConfig {
            lanes: vec![
                lane("transactional", "email.tx"),
                lane("bulk", "email.bulk"),
            ],
            ..AmqpConfig::default()
        };
        assert!(ok.validate().is_ok());
        assert_eq!(ok.lane_retry_prefix("bulk"), "email.retry.bulk.");
        type Break = fn(&mut AmqpConfig);
        let cases: [(Break, &str); 6] = [
            (|c| c.lanes[1].name = "Bulk".into(), "amqp.lanes[1].name"),
            (
                |c| c.lanes[1].name = "transactional".into(),
                "amqp.lanes[1].name",
            ),
            (
                |c| c.lanes[1].queue = "email.tx".into(),
                "amqp.lanes[1].queue",
            ),
            (
                |c| c.lanes[0].queue = "email.dead".into(),
                "amqp.lanes[0].queue",
            ),
            (
                |c| c.lanes[0].queue = "email.retry.q".into(),
                "amqp.lanes[0].queue",
            ),
            (|c| c.lanes[0].weight = 0, "amqp.lanes[0].weight"),
        ];
        for (break_it, key) in cases {
            let mut config = ok.clone();
            break_it(&mut config);
            assert_eq!(config.validate().expect_err(key).key, key);
        }
    }

    #[test]
    fn defaults_are_valid_and_each_failure_names_its_key() {
        assert!(AmqpConfig::default().validate().is_ok());
        type Break = fn(&mut AmqpConfig);
        let cases: [(Break, &str); 5] = [
            (|c| c.url = Secret::new("http://x").into(), "amqp.url"),
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
            url: Secret::new("http://u:hunter2@x").into(),
            ..AmqpConfig::default()
        };
        let error = config.validate().expect_err("not amqp");
        assert!(!error.message.contains("hunter2"), "{error}");
    }
}
