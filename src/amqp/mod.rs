//! Everything that touches lapin: connections, topology, confirmed publishing, headers.

pub mod headers;
mod session;
mod topology;

use std::str::FromStr as _;
use std::sync::RwLock;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::LongString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::config::{BrokerUrls, redact_url};

pub use headers::{
    FailureHeaders, attempts_made, header_text, replay_properties, republish_properties, rfc3339,
};
pub use session::{BrokerSession, Connections, SessionError};
pub use topology::{Topology, TopologyError, format_duration};

/// Largest AMQP frame we ask for, unless the URL says otherwise (`?frame_max=`).
const FRAME_MAX: u32 = 16 * 1024;

/// Opens a connection named `<name>.<role>` (shown by `rabbitmqctl list_connections name` and in
/// the management UI, and usable with `rabbitmqctl close_connection`), with `heartbeat` unless
/// the URL sets one, within `timeout`.
pub async fn connect(
    url: &str,
    name: &str,
    role: &str,
    heartbeat: Duration,
    timeout: Duration,
) -> lapin::Result<Connection> {
    // Checked when the configuration was loaded; kept as an error here all the same.
    let mut uri = lapin::uri::AMQPUri::from_str(url)
        .map_err(|e| lapin::Error::from(std::io::Error::other(e)))?;
    // lapin keeps a receive and a send buffer of 32 frames per connection, allocated and touched
    // up front: with RabbitMQ's default frame_max of 128 KiB that is 16 MiB for our two
    // connections. 16 KiB frames cut it to 2 MiB; a larger job just travels in several frames.
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(FRAME_MAX);
    }
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(heartbeat.as_secs().min(u64::from(u16::MAX)) as u16);
    }
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("{name}.{role}")));
    match tokio::time::timeout(timeout, Connection::connect_uri(uri, properties)).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {timeout:?}"),
        ))),
    }
}

/// Connects to the first broker of `urls` that answers, starting at `start` and going round the
/// list once. Returns the connection and the index of its broker. The error names every broker
/// tried, passwords redacted.
pub async fn connect_first(
    urls: &BrokerUrls,
    start: usize,
    name: &str,
    role: &str,
    heartbeat: Duration,
    timeout: Duration,
) -> Result<(Connection, usize), String> {
    let mut failures = Vec::new();
    for offset in 0..urls.len() {
        let index = (start + offset) % urls.len();
        let Some(url) = urls.get(index) else { break };
        match connect(url, name, role, heartbeat, timeout).await {
            Ok(connection) => return Ok((connection, index)),
            Err(e) => failures.push(format!("cannot connect to {}: {e}", redact_url(url))),
        }
    }
    Err(failures.join("; "))
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
