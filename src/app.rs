//! The composition root: builds the parts from the configuration and runs the consume loop,
//! reconnecting to the broker for as long as it takes, until `shutdown` is cancelled.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::Connection;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::{self, Publisher, Topology, TopologyError};
use crate::config::{AmbiguousPolicy, Config};
use crate::message::MessageDefaults;
use crate::metrics::Metrics;
use crate::pipeline::{JobEvent, RecentlySettled, Worker};
use crate::policy::Schedule;
use crate::smtp::{Relay, RelaySet};
use crate::status::{Phase, Status};
use crate::{http, systemd};

/// Why the worker stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting that only shows as wrong once used (TLS files, the listen address).
    #[error("configuration error: {0}")]
    Config(String),
    /// The broker holds a topology that conflicts with ours; an operator must decide.
    #[error(transparent)]
    Topology(TopologyError),
}

/// Handles shared with whoever started the worker (the binary, or a test).
#[derive(Clone)]
pub struct Handles {
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    /// Every settled delivery; subscribe to follow them.
    pub events: broadcast::Sender<JobEvent>,
}

impl Default for Handles {
    fn default() -> Self {
        Self {
            metrics: Arc::default(),
            status: Arc::default(),
            // A listener that falls this far behind misses events; the worker never waits for it.
            events: broadcast::channel(4096).0,
        }
    }
}

/// Runs the worker until `shutdown` is cancelled, then drains: stops consuming, lets the jobs in
/// flight finish within `shutdown.grace`, closes SMTP and AMQP cleanly. A second cancellation of
/// `force` stops the drain at once (jobs not finished go back to the queue, unacked).
pub async fn run(
    config: Config,
    handles: Handles,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> Result<(), RunError> {
    let Handles {
        metrics,
        status,
        events,
    } = handles;
    let concurrency = usize::from(config.worker.concurrency);
    let schedule = Schedule::new(&config.retry)
        .dead_letter_ambiguous(config.smtp.ambiguous == AmbiguousPolicy::DeadLetter);
    let topology = Topology::new(&config.amqp, &schedule);
    let mut relays = Vec::new();
    for relay in config.relays() {
        let built = Relay::new(
            relay.name.clone(),
            relay.weight,
            &relay.smtp,
            relay.limits.clone(),
            metrics.relay(&relay.name),
        )
        .map_err(|e| RunError::Config(e.to_string()))?;
        tracing::info!(relay = %built.describe(), name = %relay.name, "SMTP relay");
        relays.push(built);
    }
    let relays = RelaySet::new(relays, config.relays.mode);
    let defaults = MessageDefaults {
        from: config
            .smtp
            .from
            .as_deref()
            .and_then(|from| from.parse().ok()),
        message_id_domain: config.smtp.message_id_domain.clone(),
    };
    let worker = Arc::new(Worker {
        relays,
        max_age: config.retry.max_age,
        publisher: Publisher::new(config.amqp.publish_timeout),
        topology,
        schedule,
        limits: config.job_limits(),
        defaults,
        metrics: metrics.clone(),
        events,
        // Enough for the deliveries of several prefetch windows; 16 bytes or so each.
        settled: RecentlySettled::new(16 * 1024),
    });

    // Background tasks end with `background`, after the drain.
    let background = CancellationToken::new();
    if let Some(addr) = config.http.listen {
        let listener = http::bind(addr)
            .await
            .map_err(|e| RunError::Config(format!("http.listen: cannot listen on {addr}: {e}")))?;
        tracing::info!(%addr, "health and metrics on http://{addr}/readyz and /metrics");
        let relay_worker = worker.clone();
        let health = Arc::new(http::Health {
            status: status.clone(),
            metrics: metrics.clone(),
            relay_auth_failing: Box::new(move || relay_worker.relays.auth_failing()),
        });
        tokio::spawn(http::serve(listener, health, background.clone()));
    }
    let mut beat_every = Duration::from_secs(1);
    if let Some(interval) = systemd::watchdog_interval() {
        beat_every = beat_every.min(interval / 4);
        tokio::spawn(systemd::watchdog(
            interval,
            status.clone(),
            background.clone(),
        ));
    }
    {
        let worker = worker.clone();
        let background = background.clone();
        let period = (config.smtp.pool_idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => worker.relays.reap_idle().await,
                    _ = background.cancelled() => return,
                }
            }
        });
    }

    let supervisor = Supervisor {
        config: &config,
        worker: worker.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        tracker: TaskTracker::new(),
        jobs: Arc::new(Semaphore::new(concurrency)),
        abandon_all: CancellationToken::new(),
        beat_every,
    };
    let result = supervisor.run(&shutdown, &force).await;
    worker.relays.close().await;
    background.cancel();
    result
}

struct Supervisor<'a> {
    config: &'a Config,
    worker: Arc<Worker>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    /// Every job task, across reconnections.
    tracker: TaskTracker,
    /// At most `concurrency` jobs at once, even while the deliveries of a lost connection finish.
    jobs: Arc<Semaphore>,
    /// Cancelled when the shutdown grace is over: jobs not yet sending give up.
    abandon_all: CancellationToken,
    beat_every: Duration,
}

/// How a broker session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
    Fatal(RunError),
}

impl Supervisor<'_> {
    async fn run(
        &self,
        shutdown: &CancellationToken,
        force: &CancellationToken,
    ) -> Result<(), RunError> {
        let mut delay = Duration::from_millis(200);
        let max_delay = self.config.amqp.reconnect_max_delay;
        let mut first = true;
        loop {
            let end = self.session(shutdown, force, &mut delay, first).await;
            first = false;
            match end {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Fatal(error) => {
                    self.drain(force).await;
                    return Err(error);
                }
                SessionEnd::Lost(reason) => {
                    self.metrics.broker_connected.set(0);
                    self.status.set(Phase::Reconnecting, reason.clone());
                    systemd::status(&format!("reconnecting to the broker: {reason}"));
                    tracing::warn!(%reason, retry_in = ?delay, "broker connection lost; reconnecting");
                    if !self.pause(delay, shutdown).await {
                        self.drain(force).await;
                        return Ok(());
                    }
                    delay = (delay * 2).min(max_delay);
                    self.metrics.broker_reconnects.inc();
                }
            }
        }
    }

    /// Waits `delay`, beating; false if shutdown was requested meanwhile.
    async fn pause(&self, delay: Duration, shutdown: &CancellationToken) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            self.status.beat();
            let step =
                tokio::time::sleep_until(until.min(tokio::time::Instant::now() + self.beat_every));
            tokio::select! {
                _ = step => if tokio::time::Instant::now() >= until { return true },
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// One broker session: connect, declare, consume until the connection is lost or shutdown.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        force: &CancellationToken,
        delay: &mut Duration,
        first: bool,
    ) -> SessionEnd {
        let amqp = &self.config.amqp;
        let url = amqp.url.expose();
        let connect = async {
            // Separate connections: broker flow control blocks publishers, and must not stall
            // the acks and deliveries of the consumer.
            let (name, heartbeat, timeout) =
                (&amqp.connection_name, amqp.heartbeat, amqp.connect_timeout);
            let consume = amqp::connect(url, name, "consume", heartbeat, timeout).await?;
            let publish = amqp::connect(url, name, "publish", heartbeat, timeout).await?;
            Ok::<_, lapin::Error>((consume, publish))
        };
        let (consume_conn, publish_conn) = tokio::select! {
            connected = connect => match connected {
                Ok(connections) => connections,
                Err(e) => return SessionEnd::Lost(format!("cannot connect to {}: {e}", crate::config::redact_url(url))),
            },
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        };
        // Watch both connections: losing either one means starting over.
        let mut events = futures_util::stream::select(
            consume_conn.events_listener(),
            publish_conn.events_listener(),
        );

        let setup = async {
            let channel = consume_conn.create_channel().await.map_err(lost)?;
            self.worker
                .topology
                .declare(&channel)
                .await
                .map_err(|e| match e {
                    TopologyError::Mismatch { .. } => SessionEnd::Fatal(RunError::Topology(e)),
                    TopologyError::Broker { .. } => SessionEnd::Lost(e.to_string()),
                })?;
            self.worker
                .publisher
                .attach(&publish_conn)
                .await
                .map_err(lost)?;
            // Prefetch per consumer (global = false): quorum queues refuse global QoS.
            channel
                .basic_qos(
                    self.config.worker.concurrency,
                    BasicQosOptions { global: false },
                )
                .await
                .map_err(lost)?;
            let consumer = channel
                .basic_consume(
                    self.worker.topology.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(lost)?;
            Ok::<_, SessionEnd>((channel, consumer))
        };
        let (channel, mut consumer) = match setup.await {
            Ok(ok) => ok,
            Err(end) => {
                close(&consume_conn, &publish_conn).await;
                return end;
            }
        };

        *delay = Duration::from_millis(200);
        self.metrics.broker_connected.set(1);
        self.status.set(Phase::Consuming, "consuming");
        let summary = format!(
            "consuming {} with concurrency {}",
            self.worker.topology.queue, self.config.worker.concurrency
        );
        tracing::info!(
            queue = %self.worker.topology.queue,
            concurrency = self.config.worker.concurrency,
            "{}", if first { "consuming" } else { "reconnected; consuming again" }
        );
        systemd::ready(&summary);

        // Cancelled when this session's channel is lost: its deliveries can no longer be acked.
        let abandon = self.abandon_all.child_token();
        let mut beat = tokio::time::interval(self.beat_every);
        let end = loop {
            self.status.beat();
            let permit = tokio::select! {
                permit = self.jobs.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break SessionEnd::Shutdown,
                },
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                _ = beat.tick() => continue,
            };
            let delivery = tokio::select! {
                delivery = consumer.next() => delivery,
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => break SessionEnd::Lost(e.to_string()),
                    Some(_) => continue,
                    None => break SessionEnd::Lost("the broker connection closed".into()),
                },
                _ = beat.tick() => continue,
            };
            match delivery {
                Some(Ok(delivery)) => {
                    let worker = self.worker.clone();
                    let abandon = abandon.clone();
                    // Boxed, so that spawning moves a pointer rather than the whole future.
                    self.tracker.spawn(Box::pin(async move {
                        worker.handle(delivery, abandon).await;
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

        if let SessionEnd::Shutdown = end {
            self.status
                .set(Phase::Draining, "finishing the jobs in flight");
            self.metrics.broker_connected.set(0);
            systemd::stopping("draining: finishing the jobs in flight");
            tracing::info!("stopping: no new deliveries; finishing the jobs in flight");
            let tag = consumer.tag();
            let _ = channel
                .basic_cancel(tag, BasicCancelOptions::default())
                .await;
            // Deliveries already on their way when the cancel went out: hand them straight back.
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            while let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
            {
                let _ = delivery.acker.nack(requeue).await;
            }
            self.drain(force).await;
            let _ = self.worker.publisher.detach();
            let _ = channel.close(200, "shutting down".into()).await;
            close(&consume_conn, &publish_conn).await;
            tracing::info!("stopped");
        } else {
            abandon.cancel();
            let _ = self.worker.publisher.detach();
            close(&consume_conn, &publish_conn).await;
        }
        end
    }

    /// Waits for the jobs in flight, at most `shutdown.grace`, or until `force`.
    async fn drain(&self, force: &CancellationToken) {
        self.tracker.close();
        let grace = self.config.shutdown.grace;
        tokio::select! {
            _ = self.tracker.wait() => {}
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(
                    unfinished = self.tracker.len(),
                    ?grace,
                    "jobs still running after shutdown.grace; they go back to the queue unacked"
                );
            }
            _ = force.cancelled() => {
                tracing::warn!(
                    unfinished = self.tracker.len(),
                    "stopping at once; unfinished jobs go back to the queue unacked"
                );
            }
        }
        // Whatever has not started sending must not start now: it is going back to the queue.
        self.abandon_all.cancel();
    }
}

fn lost(error: lapin::Error) -> SessionEnd {
    SessionEnd::Lost(error.to_string())
}

async fn close(consume: &Connection, publish: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = consume.close(200, "bye".into()).await;
        let _ = publish.close(200, "bye".into()).await;
    })
    .await;
}
