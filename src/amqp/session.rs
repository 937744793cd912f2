//! One broker session: the consuming and the publishing connection, the topology declared, the
//! publisher attached, and a channel to consume on.

use std::time::Duration;

use futures_util::stream::BoxStream;
use lapin::{Channel, Connection, Event};

use super::{Broker, Publisher, Topology, TopologyError};
use crate::config::AmqpConfig;

/// How long closing a session may take: a broker that does not answer must not hold up a
/// reconnect or a stop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session could not be opened.
#[derive(Debug)]
pub enum SessionError {
    /// The broker holds a topology that conflicts with ours: retrying cannot help.
    Topology(TopologyError),
    /// Unreachable, refused, or lost while opening: try again.
    Broker(String),
}

/// An open session. Losing either connection means starting over: `events` reports both.
pub struct BrokerSession {
    consume: Connection,
    publish: Connection,
    /// The consuming channel.
    pub channel: Channel,
    /// Both connections' events.
    pub events: BoxStream<'static, Event>,
}

/// The two connections of a session, before anything is declared on them.
pub struct Connections {
    consume: Connection,
    publish: Connection,
}

impl Connections {
    /// Opens the consuming and the publishing connection, both to the first broker of
    /// `amqp.url` that answers, from `start` on round the list; returns the broker's index too.
    /// The only step a stop may cut short: nothing is declared or attached yet, and a connection
    /// that did open is closed on error.
    pub async fn open(amqp: &AmqpConfig, start: usize) -> Result<(Self, usize), String> {
        let broker = Broker::new(amqp).map_err(|e| e.to_string())?;
        let (consume, index) = broker.connect_first(start, "consume").await?;
        // Separate connections, to the same node: broker flow control blocks publishers, and
        // must not stall the acks and deliveries of the consumer.
        match broker.connect(index, "publish").await {
            Ok(publish) => Ok((Self { consume, publish }, index)),
            Err(e) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, consume.close(200, "bye".into())).await;
                Err(e)
            }
        }
    }

    /// Declares the topology and attaches `publisher` to the publishing connection.
    pub async fn setup(
        self,
        topology: &Topology,
        publisher: &Publisher,
    ) -> Result<BrokerSession, SessionError> {
        let Self { consume, publish } = self;
        let events = Box::pin(futures_util::stream::select(
            consume.events_listener(),
            publish.events_listener(),
        ));
        let setup = async {
            let channel = consume.create_channel().await.map_err(broker)?;
            topology.declare(&channel).await.map_err(|e| match e {
                TopologyError::Mismatch { .. } => SessionError::Topology(e),
                TopologyError::Broker { .. } => SessionError::Broker(e.to_string()),
            })?;
            publisher.attach(&publish).await.map_err(broker)?;
            Ok(channel)
        };
        match setup.await {
            Ok(channel) => Ok(BrokerSession {
                consume,
                publish,
                channel,
                events,
            }),
            Err(e) => {
                close(&consume, &publish).await;
                Err(e)
            }
        }
    }
}

impl BrokerSession {
    /// Detaches the publisher and closes the channel and both connections.
    pub async fn close(self, publisher: &Publisher) {
        let _ = publisher.detach();
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            self.channel.close(200, "shutting down".into()),
        )
        .await;
        close(&self.consume, &self.publish).await;
    }

    /// After the session was lost: detaches the publisher at once and closes what is left in the
    /// background, so that a dead connection's close (up to its timeout) never delays the next
    /// session.
    pub fn abandon(self, publisher: &Publisher) {
        let _ = publisher.detach();
        tokio::spawn(async move {
            close(&self.consume, &self.publish).await;
        });
    }
}

fn broker(error: lapin::Error) -> SessionError {
    SessionError::Broker(error.to_string())
}

async fn close(consume: &Connection, publish: &Connection) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = consume.close(200, "bye".into()).await;
        let _ = publish.close(200, "bye".into()).await;
    })
    .await;
}
