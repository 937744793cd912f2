//! Everything that touches lapin: connections, topology, confirmed publishing, headers.

pub mod headers;
mod session;
mod tls;
mod topology;

use std::str::FromStr as _;
use std::sync::RwLock;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::LongString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::config::{AmqpConfig, ConfigError, redact_url};

pub use headers::{
    FailureHeaders, attempts_made, header_text, replay_properties, republish_properties, rfc3339,
};
pub use session::{BrokerSession, Connections, SessionError};
pub use tls::BrokerTls;
pub use topology::{Topology, TopologyError, format_duration};

/// Largest AMQP frame we ask for, unless the URL says otherwise (`?frame_max=`).
const FRAME_MAX: u32 = 16 * 1024;

/// How to reach the brokers of `amqp.url`: the URLs with the connection's name, heartbeat,
/// deadline, login mechanism and TLS files, read and checked when it is made.
pub struct Broker<'a> {
    amqp: &'a AmqpConfig,
    tls: BrokerTls,
}

impl<'a> Broker<'a> {
    /// Reads the TLS files of `[amqp.tls]` (again: a renewed certificate is taken at the next
    /// connection).
    pub fn new(amqp: &'a AmqpConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            amqp,
            tls: BrokerTls::load(&amqp.tls)?,
        })
    }

    /// Opens a connection to the broker at `index` of the list (counted round it), named
    /// `<name>.<role>` (shown in the management UI and in `rabbitmqctl list_connections
    /// client_properties`), with the heartbeat and login mechanism of `[amqp]` unless the URL
    /// sets them, within `amqp.connect_timeout`. The error names the broker, password redacted,
    /// and says what a TLS failure means.
    pub async fn connect(&self, index: usize, role: &str) -> Result<Connection, String> {
        let url = self.amqp.url.get(index).unwrap_or_default();
        let client_certificate = self.tls.has_client_certificate() && url.starts_with("amqps:");
        self.open(url, role).await.map_err(|e| {
            format!(
                "cannot connect to {}: {}",
                redact_url(url),
                tls::describe(&e, client_certificate)
            )
        })
    }

    /// Connects to the first broker that answers, starting at `start` and going round the list
    /// once. Returns the connection and the index of its broker. The error names every broker
    /// tried.
    pub async fn connect_first(
        &self,
        start: usize,
        role: &str,
    ) -> Result<(Connection, usize), String> {
        let mut failures = Vec::new();
        for offset in 0..self.amqp.url.len() {
            let index = (start + offset) % self.amqp.url.len();
            match self.connect(index, role).await {
                Ok(connection) => return Ok((connection, index)),
                Err(e) => failures.push(e),
            }
        }
        if failures.is_empty() {
            failures.push("amqp.url names no broker".to_string());
        }
        Err(failures.join("; "))
    }

    async fn open(&self, url: &str, role: &str) -> lapin::Result<Connection> {
        let amqp = self.amqp;
        // Checked when the configuration was loaded; kept as an error here all the same.
        let mut uri = lapin::uri::AMQPUri::from_str(url)
            .map_err(|e| lapin::Error::from(std::io::Error::other(e)))?;
        // lapin keeps a receive and a send buffer of 32 frames per connection, allocated and
        // touched up front: with RabbitMQ's default frame_max of 128 KiB that is 16 MiB for our
        // two connections. 16 KiB frames cut it to 2 MiB; a larger job just travels in several
        // frames.
        if uri.query.frame_max.is_none() {
            uri.query.frame_max = Some(FRAME_MAX);
        }
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(amqp.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16);
        }
        if uri.query.auth_mechanism.is_none() {
            uri.query.auth_mechanism = Some(amqp.auth_mechanism.sasl());
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("{}.{role}", amqp.connection_name)));
        let timeout = amqp.connect_timeout;
        let connect = async {
            let runtime = lapin::runtime::default_runtime()?;
            Connection::connect_uri_with_config(uri, properties, self.tls.lapin(), runtime).await
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            ))),
        }
    }
}

/// Why a publish did not make it.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no publishing channel (broker connection lost)")]
    NotConnected,
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the broker could not route the message to '{0}' (returned: {1})")]
    Returned(String, String),
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

/// Publishes with confirms on the publishing connection's channel. The channel is replaced after
/// a reconnect; a publish in flight on the old one fails, and is never taken as confirmed.
pub struct Publisher {
    channel: RwLock<Option<Channel>>,
    timeout: Duration,
}

impl Publisher {
    pub fn new(timeout: Duration) -> Self {
        Self {
            channel: RwLock::new(None),
            timeout,
        }
    }

    /// Opens a confirm-mode channel on `connection` and publishes through it from now on.
    pub async fn attach(&self, connection: &Connection) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *self.write() = Some(channel);
        Ok(())
    }

    pub fn detach(&self) -> Option<Channel> {
        self.write().take()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<Channel>> {
        self.channel
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self) -> Option<Channel> {
        self.channel
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Publishes persistent and mandatory, and waits for the broker's confirm. `Ok` only when
    /// the broker acked the message and did not return it as unroutable.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let channel = self.current().ok_or(PublishError::NotConnected)?;
        let confirm = async {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties.with_delivery_mode(2),
                )
                .await?;
            confirm.await
        };
        match tokio::time::timeout(self.timeout, confirm).await {
            Err(_) => Err(PublishError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(PublishError::Broker(e)),
            // A mandatory publish that could not be routed is returned, then acked: not stored.
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(PublishError::Returned(
                routing_key.to_string(),
                returned.reply_text.to_string(),
            )),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            // confirm_select was done on this channel; reaching this would be a bug, and an
            // unconfirmed publish must never be taken as stored.
            Ok(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        }
    }
}
