//! The composition root: builds the parts from the configuration, starts the background tasks
//! (health and metrics, the watchdog, the idle-session reaper) and runs the consumer until
//! `shutdown` is cancelled.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::amqp::{Publisher, Topology, TopologyError};
use crate::config::{AmbiguousPolicy, Config, TransportKind};
use crate::dkim::Signers;
use crate::message::MessageDefaults;
use crate::metrics::Metrics;
use crate::pipeline::{Consumer, JobContext, JobEvent, Lane, RecentlySettled};
use crate::policy::Schedule;
use crate::shutdown::Shutdown;
use crate::smtp::{OUTBOX, Outbox, Relay, RelaySet, Transport};
use crate::status::Status;
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
    let schedule = Schedule::new(&config.retry)
        .dead_letter_ambiguous(config.smtp.ambiguous == AmbiguousPolicy::DeadLetter);
    let topology = Topology::new(&config.amqp, &schedule);
    let transport = transport(&config, &metrics)?;
    let defaults = MessageDefaults::of(&config.smtp);
    // Read before any connection: a key that cannot sign exits 64, naming its entry.
    let dkim = Signers::new(&config.dkim).map_err(|e| RunError::Config(e.to_string()))?;
    let receipts = topology.events_exchange.clone();
    let lanes = Lane::all(&topology, &metrics);
    let ctx = Arc::new(JobContext {
        lanes,
        dkim,
        receipts,
        receipts_waiting: Default::default(),
        settling: Default::default(),
        transport,
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
        let relay_ctx = ctx.clone();
        let health = Arc::new(http::Health {
            status: status.clone(),
            metrics: metrics.clone(),
            relay_auth_failing: Box::new(move || relay_ctx.transport.auth_failing()),
            broker_blocked: {
                let ctx = ctx.clone();
                Box::new(move || ctx.publisher.blocked())
            },
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
        let ctx = ctx.clone();
        let background = background.clone();
        let period = (config.smtp.pool_idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => ctx.transport.reap_idle().await,
                    _ = background.cancelled() => return,
                }
            }
        });
    }

    if config.smtp.from.is_none() {
        tracing::warn!(
            "smtp.from is not set: a job without its own `from` is dead-lettered as invalid. \
             Set smtp.from (AMQP_MAILER_SMTP__FROM) to the sender such jobs should have"
        );
    }
    if config.smtp.check_at_start || config.smtp.transport == TransportKind::Outbox {
        // In the background: a relay that does not answer must not delay consuming.
        let ctx = ctx.clone();
        tokio::spawn(async move { ctx.transport.check_at_start().await });
    }

    let consumer = Consumer {
        ctx: ctx.clone(),
        amqp: config.amqp.clone(),
        concurrency: config.worker.concurrency,
        status,
        beat_every,
    };
    let shutdown = Shutdown::new(shutdown, force, config.shutdown.grace);
    let result = consumer.run(&shutdown).await.map_err(RunError::Topology);
    ctx.transport.close().await;
    background.cancel();
    result
}

/// The relays of the configuration, or the outbox (`smtp.transport`).
fn transport(config: &Config, metrics: &Metrics) -> Result<Transport, RunError> {
    if let (TransportKind::Outbox, Some(dir)) = (config.smtp.transport, &config.smtp.outbox_dir) {
        tracing::info!(
            dir = %dir.display(),
            "writing each message to the outbox folder (smtp.transport = outbox): nothing is sent"
        );
        if !config.relays.list.is_empty() {
            tracing::info!("relays.list is not used while smtp.transport = outbox");
        }
        return Ok(Transport::Outbox(Outbox::new(
            dir.clone(),
            metrics.relay(OUTBOX),
        )));
    }
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
    Ok(Transport::Relays(RelaySet::new(relays, config.relays.mode)))
}
