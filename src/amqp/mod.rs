//! Everything that touches lapin: connections, topology, confirmed publishing, headers.

pub mod headers;
mod session;
mod tls;
mod topology;

use std::str::FromStr as _;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::LongString;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ConnectionStatus,
};

use crate::config::{AmqpConfig, ConfigError, redact_url};

pub use headers::{
    FailureHeaders, attempts_made, header_text, replay_properties, republish_properties, rfc3339,
};
pub use session::{BrokerSession, Connections, SessionError};
pub use tls::BrokerTls;
pub use topology::{LaneTopology, Topology, TopologyError, format_duration};

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

impl PublishError {
    /// Whether the message may have been stored although it was not confirmed: it may have
    /// reached the broker before its confirm was lost (a timeout, or the connection failing
    /// under it). Not when there was no channel, or the broker said no.
    pub fn may_have_landed(&self) -> bool {
        matches!(self, PublishError::Timeout(_) | PublishError::Broker(_))
    }
}

/// Publishes with confirms on the publishing connection's channel. The channel is replaced after
/// a reconnect; a publish in flight on the old one fails, and is never taken as confirmed.
///
/// While the broker blocks the publishing connection (`connection.blocked`: a memory or disk
/// alarm), a confirm that has not come is no failure: the message waits in the broker's socket
/// or in ours and may still be stored, so its job must not be handed back (it would be sent
/// again when the alarm clears). The wait for a confirm then goes on, and `publish_timeout`
/// starts again once the block is lifted. The state is read from lapin's connection status at
/// each check, not from an event stream.
pub struct Publisher {
    channel: RwLock<Option<(Channel, ConnectionStatus)>>,
    timeout: Duration,
    /// Whether the block in progress has been logged, so that it is said once, not per publish.
    block_reported: AtomicBool,
    /// Woken when a channel is attached (after a reconnect), for publishes waiting to try again.
    attached: tokio::sync::Notify,
}

/// How often a publish waiting for its confirm looks at whether the broker blocks it.
const BLOCKED_CHECK: Duration = Duration::from_millis(500);

impl Publisher {
    pub fn new(timeout: Duration) -> Self {
        Self {
            channel: RwLock::new(None),
            timeout,
            block_reported: AtomicBool::new(false),
            attached: tokio::sync::Notify::new(),
        }
    }

    /// Opens a confirm-mode channel on `connection` and publishes through it from now on.
    pub async fn attach(&self, connection: &Connection) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *self.write() = Some((channel, connection.status().clone()));
        self.attached.notify_waiters();
        Ok(())
    }

    pub fn detach(&self) -> Option<Channel> {
        self.write().take().map(|(channel, _)| channel)
    }

    /// Resolves at the next attach of a channel (a reconnect): a publish that failed for want of
    /// a connection may try again then rather than at the end of its pause. Only attaches after
    /// the future is enabled (`Notified::enable`) or first polled count: take it, and enable it,
    /// before the publish whose failure it is to wake.
    pub fn reattached(&self) -> tokio::sync::futures::Notified<'_> {
        self.attached.notified()
    }

    /// Whether the broker blocks the publishing connection now.
    pub fn blocked(&self) -> bool {
        self.current().is_some_and(|(_, status)| status.blocked())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<(Channel, ConnectionStatus)>> {
        self.channel
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self) -> Option<(Channel, ConnectionStatus)> {
        self.channel
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Says once when a publish finds the broker blocking it, and once when a publish finds the
    /// block lifted.
    fn report_block(&self, blocked: bool) {
        if self.block_reported.swap(blocked, Ordering::Relaxed) == blocked {
            return;
        }
        if blocked {
            tracing::warn!(
                "the broker blocks publishing (a memory or disk alarm): retries and dead \
                 letters wait for it, and their jobs stay unacked until it is lifted"
            );
        } else {
            tracing::info!("the broker accepts publishing again");
        }
    }

    /// Waits for `confirm`, for `publish_timeout`, a wait that starts again whenever the
    /// connection is found blocked. `None` on timeout.
    async fn confirmed<T>(
        &self,
        status: &ConnectionStatus,
        confirm: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let mut confirm = std::pin::pin!(confirm);
        let mut deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let check = deadline.min(tokio::time::Instant::now() + BLOCKED_CHECK);
            tokio::select! {
                outcome = &mut confirm => {
                    if self.block_reported.load(Ordering::Relaxed) {
                        self.report_block(status.blocked());
                    }
                    return Some(outcome);
                }
                () = tokio::time::sleep_until(check) => {}
            }
            if status.blocked() {
                self.report_block(true);
                deadline = tokio::time::Instant::now() + self.timeout;
            } else if tokio::time::Instant::now() >= deadline {
                return None;
            }
        }
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
        self.publish_with(exchange, routing_key, body, properties, true)
            .await
    }

    /// Publishes an event (a receipt) persistent, and waits for the broker's confirm. Not
    /// mandatory: an events exchange with nothing bound to it, or a `reply_to` queue that is
    /// gone, drops it, as an event nobody listens to should be; a queue that refuses it (full,
    /// `reject-publish`) makes the broker nack it, which is an error.
    pub async fn publish_event(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_with(exchange, routing_key, body, properties, false)
            .await
    }

    async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let (channel, status) = self.current().ok_or(PublishError::NotConnected)?;
        let confirm = async {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties.with_delivery_mode(2),
                )
                .await?;
            confirm.await
        };
        match self.confirmed(&status, confirm).await {
            None => Err(PublishError::Timeout(self.timeout)),
            Some(Err(e)) => Err(PublishError::Broker(e)),
            // A mandatory publish that could not be routed is returned, then acked: not stored.
            Some(Ok(Confirmation::Ack(Some(returned)))) => Err(PublishError::Returned(
                routing_key.to_string(),
                returned.reply_text.to_string(),
            )),
            Some(Ok(Confirmation::Ack(None))) => Ok(()),
            Some(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
            // confirm_select was done on this channel; reaching this would be a bug, and an
            // unconfirmed publish must never be taken as stored.
            Some(Ok(Confirmation::NotRequested)) => Err(PublishError::Nacked),
        }
    }
}
