//! Where deliveries come from: broker sessions, one after the other for as long as it takes, and
//! in each the consume loop: qos, consume, a permit per job, a task per delivery.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;

use super::context::JobContext;
use super::delivery;
use crate::amqp::{self, BrokerSession, Connections, SessionError};
use crate::config::AmqpConfig;
use crate::shutdown::{Progress, Shutdown};
use crate::status::{Phase, Status};
use crate::systemd;

/// The first pause after a lost broker connection; it doubles up to `amqp.reconnect_max_delay`.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// How long deliveries already on their way when the consumer was cancelled are waited for,
/// to hand them straight back.
const CANCEL_FLUSH: Duration = Duration::from_secs(2);

/// Why consuming stopped other than by a shutdown request: the broker holds a topology that
/// conflicts with ours, and an operator must decide.
pub type Fatal = amqp::TopologyError;

/// The consumer side of the worker.
pub struct Consumer {
    pub ctx: Arc<JobContext>,
    pub amqp: AmqpConfig,
    pub concurrency: u16,
    pub status: Arc<Status>,
    /// How often the loop beats for the watchdog while idle.
    pub beat_every: Duration,
}

/// How a broker session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
    Fatal(Fatal),
}

impl Consumer {
    /// Consumes, reconnecting to the broker for as long as it takes, until a stop is requested
    /// (then drains) or the topology conflicts (then drains and returns the conflict).
    pub async fn run(&self, shutdown: &Shutdown) -> Result<(), Fatal> {
        // At most `concurrency` jobs at once, even while the deliveries of a lost connection
        // finish: the permits outlive the sessions.
        let permits = Arc::new(Semaphore::new(usize::from(self.concurrency)));
        let mut delay = FIRST_RECONNECT_DELAY;
        let mut first = true;
        let result = loop {
            let end = self.session(shutdown, &permits, &mut delay, first).await;
            first = false;
            match end {
                SessionEnd::Shutdown => break Ok(()),
                SessionEnd::Fatal(error) => break Err(error),
                SessionEnd::Lost(reason) => {
                    self.ctx.metrics.broker_connected.set(0);
                    self.status.set(Phase::Reconnecting, reason.clone());
                    systemd::status(&format!("reconnecting to the broker: {reason}"));
                    tracing::warn!(%reason, retry_in = ?delay, "broker connection lost; reconnecting");
                    if !self.pause(delay, shutdown).await {
                        break Ok(());
                    }
                    delay = (delay * 2).min(self.amqp.reconnect_max_delay);
                    self.ctx.metrics.broker_reconnects.inc();
                }
            }
        };
        // Whichever way it stopped, a stop while reconnecting included: once, and only once.
        if shutdown.progress() == Progress::Running {
            self.announce_stop();
        }
        shutdown.drain().await;
        result
    }

    /// Tells readiness, systemd and the log that the worker is draining.
    fn announce_stop(&self) {
        self.status
            .set(Phase::Draining, "finishing the jobs in flight");
        self.ctx.metrics.broker_connected.set(0);
        systemd::stopping("draining: finishing the jobs in flight");
        tracing::info!("stopping: no new deliveries; finishing the jobs in flight");
    }

    /// Waits `delay`, beating; false if a stop was requested meanwhile.
    async fn pause(&self, delay: Duration, shutdown: &Shutdown) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            self.status.beat();
            let step =
                tokio::time::sleep_until(until.min(tokio::time::Instant::now() + self.beat_every));
            tokio::select! {
                _ = step => if tokio::time::Instant::now() >= until { return true },
                _ = shutdown.requested() => return false,
            }
        }
    }

    /// One broker session: open it, consume until the connection is lost or a stop.
    async fn session(
        &self,
        shutdown: &Shutdown,
        permits: &Arc<Semaphore>,
        delay: &mut Duration,
        first: bool,
    ) -> SessionEnd {
        let ctx = &self.ctx;
        let connections = tokio::select! {
            opened = Connections::open(&self.amqp) => match opened {
                Ok(connections) => connections,
                Err(reason) => return SessionEnd::Lost(reason),
            },
            _ = shutdown.requested() => return SessionEnd::Shutdown,
        };
        let mut session = match connections.setup(&ctx.topology, &ctx.publisher).await {
            Ok(session) => session,
            Err(SessionError::Topology(e)) => return SessionEnd::Fatal(e),
            Err(SessionError::Broker(reason)) => return SessionEnd::Lost(reason),
        };
        // Prefetch per consumer (global = false): quorum queues refuse global QoS.
        let consumer = async {
            session
                .channel
                .basic_qos(self.concurrency, BasicQosOptions { global: false })
                .await?;
            session
                .channel
                .basic_consume(
                    ctx.topology.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        let mut consumer = match consumer.await {
            Ok(consumer) => consumer,
            Err(e) => {
                session.close(&ctx.publisher).await;
                return SessionEnd::Lost(e.to_string());
            }
        };

        *delay = FIRST_RECONNECT_DELAY;
        self.ctx.metrics.broker_connected.set(1);
        self.status.set(Phase::Consuming, "consuming");
        tracing::info!(
            queue = %ctx.topology.queue,
            concurrency = self.concurrency,
            "{}", if first { "consuming" } else { "reconnected; consuming again" }
        );
        systemd::ready(&format!(
            "consuming {} with concurrency {}",
            ctx.topology.queue, self.concurrency
        ));

        // Cancelled when this session's channel is lost: its deliveries can no longer be acked.
        let abandon = shutdown.abandon_token();
        let mut beat = tokio::time::interval(self.beat_every);
        let end = loop {
            self.status.beat();
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break SessionEnd::Shutdown,
                },
                _ = shutdown.requested() => break SessionEnd::Shutdown,
                _ = beat.tick() => continue,
            };
            let delivery = tokio::select! {
                delivery = consumer.next() => delivery,
                _ = shutdown.requested() => break SessionEnd::Shutdown,
                event = session.events.next() => match event {
                    Some(lapin::Event::Error(e)) => break SessionEnd::Lost(e.to_string()),
                    Some(_) => continue,
                    None => break SessionEnd::Lost("the broker connection closed".into()),
                },
                _ = beat.tick() => continue,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let ctx = ctx.clone();
                    let abandon = abandon.clone();
                    // Boxed, so that spawning moves a pointer rather than the whole future.
                    shutdown.spawn_job(Box::pin(async move {
                        delivery::handle(ctx, delivery, abandon).await;
                        drop(permit);
                    }));
                }
                Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                None => {
                    break SessionEnd::Lost(
                        "the broker cancelled the consumer (queue deleted?)".into(),
                    );
                }
            }
        };

        match end {
            SessionEnd::Shutdown => self.stop(session, consumer, shutdown).await,
            SessionEnd::Lost(_) | SessionEnd::Fatal(_) => {
                abandon.cancel();
                session.close(&ctx.publisher).await;
            }
        }
        end
    }

    /// A stop while consuming: cancel the consumer, hand back what was already on its way,
    /// drain while the channel can still ack, then close the session.
    async fn stop(
        &self,
        session: BrokerSession,
        mut consumer: lapin::Consumer,
        shutdown: &Shutdown,
    ) {
        self.announce_stop();
        let _ = session
            .channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        // Deliveries already on their way when the cancel went out: hand them back.
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(CANCEL_FLUSH, consumer.next()).await
        {
            let _ = delivery.acker.nack(requeue).await;
        }
        // While the channel is still open, so that the jobs in flight can be acked.
        shutdown.drain().await;
        session.close(&self.ctx.publisher).await;
        tracing::info!("stopped");
    }
}
