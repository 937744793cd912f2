//! Prometheus metrics. One `Metrics` per worker, shared by reference; the counters are atomics,
//! so updating them on the hot path costs a few nanoseconds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::policy::ErrorKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabel {
    pub attempt: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabel {
    pub relay: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayOutcomeLabel {
    pub relay: String,
    pub outcome: &'static str,
}

/// `receipts_dropped{reason}`: unconfirmed when the shutdown grace was over.
pub const RECEIPT_DROPPED_AT_STOP: &str = "stop";
/// `receipts_dropped{reason}`: the job's `reply_to` queue refused it (the broker nacked it).
pub const RECEIPT_REFUSED_BY_REPLY_TO: &str = "reply-to-refused";

/// One relay's metrics, looked up once: the hot path updates them without hashing a label.
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    pub delivered: Histogram,
    pub rejected: Histogram,
    pub failed: Histogram,
    pub sessions_open: Gauge,
    pub stale_connections: Counter,
    pub overloads: Counter,
    pub window: Gauge,
    pub connection_limit: Gauge,
    pub healthy: Gauge,
}

pub struct Metrics {
    registry: Registry,
    pub jobs_received: Counter,
    pub jobs_delivered: Counter,
    pub jobs_retried: Family<AttemptLabel, Counter>,
    pub jobs_dead_lettered: Family<KindLabel, Counter>,
    pub jobs_requeued: Counter,
    pub jobs_abandoned: Counter,
    pub jobs_in_flight: Gauge,
    pub smtp_send_duration: Family<RelayOutcomeLabel, Histogram>,
    pub smtp_sessions_open: Family<RelayLabel, Gauge>,
    pub smtp_stale_connections: Family<RelayLabel, Counter>,
    pub relay_overloads: Family<RelayLabel, Counter>,
    pub relay_window: Family<RelayLabel, Gauge>,
    pub relay_connection_limit: Family<RelayLabel, Gauge>,
    pub relay_healthy: Family<RelayLabel, Gauge>,
    pub recipients_refused: Family<KindLabel, Counter>,
    pub jobs_ambiguous: Counter,
    pub broker_connected: Gauge,
    pub broker_blocked: Gauge,
    pub possible_duplicates: Counter,
    pub jobs_redelivered: Counter,
    pub duplicates_avoided: Counter,
    pub broker_reconnects: Counter,
    pub receipts_published: Family<OutcomeLabel, Counter>,
    pub receipts_retried: Counter,
    pub receipts_dropped: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("amqp_mailer");
        let jobs_received = Counter::default();
        registry.register(
            "jobs_received",
            "Deliveries taken from the work queue",
            jobs_received.clone(),
        );
        let jobs_delivered = Counter::default();
        registry.register(
            "jobs_delivered",
            "Jobs accepted by the relay and acked",
            jobs_delivered.clone(),
        );
        let jobs_retried = Family::<AttemptLabel, Counter>::default();
        registry.register(
            "jobs_retried",
            "Jobs published to a retry queue, by the attempt that failed",
            jobs_retried.clone(),
        );
        let jobs_dead_lettered = Family::<KindLabel, Counter>::default();
        registry.register(
            "jobs_dead_lettered",
            "Jobs published to the dead-letter queue, by error kind",
            jobs_dead_lettered.clone(),
        );
        for kind in ErrorKind::ALL {
            if kind != ErrorKind::Transient {
                // Present from the start at 0, so that rate() and alerts see the series.
                let _ = jobs_dead_lettered.get_or_create(&KindLabel {
                    kind: kind.as_str(),
                });
            }
        }
        let jobs_requeued = Counter::default();
        registry.register(
            "jobs_requeued",
            "Deliveries handed back to the work queue because a retry or dead-letter publish \
             was not confirmed",
            jobs_requeued.clone(),
        );
        let jobs_abandoned = Counter::default();
        registry.register(
            "jobs_abandoned",
            "Jobs stopped before their message was sent because their delivery could no longer \
             be acked (broker connection lost, shutdown grace over); the broker redelivers them",
            jobs_abandoned.clone(),
        );
        let jobs_in_flight = Gauge::default();
        registry.register(
            "jobs_in_flight",
            "Deliveries being processed now",
            jobs_in_flight.clone(),
        );
        let smtp_send_duration =
            Family::<RelayOutcomeLabel, Histogram>::new_with_constructor(|| {
                // 1 ms to about 65 s.
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            });
        registry.register(
            "smtp_send_duration_seconds",
            "Time to hand one message to a relay, by relay and outcome (delivered: at least one \
             recipient took it; rejected: refused for good; failed: anything else)",
            smtp_send_duration.clone(),
        );
        let smtp_sessions_open = Family::<RelayLabel, Gauge>::default();
        registry.register(
            "smtp_sessions_open",
            "SMTP connections open, busy or idle in the pool, by relay",
            smtp_sessions_open.clone(),
        );
        let smtp_stale_connections = Family::<RelayLabel, Counter>::default();
        registry.register(
            "smtp_stale_connections",
            "Pooled SMTP connections found closed by the relay and replaced without costing \
             an attempt, by relay",
            smtp_stale_connections.clone(),
        );
        let relay_overloads = Family::<RelayLabel, Counter>::default();
        registry.register(
            "relay_overloads",
            "Overload replies from a relay (421, or a 4xx about rates or too many connections) \
             that made the worker slow down instead of counting an attempt",
            relay_overloads.clone(),
        );
        let relay_window = Family::<RelayLabel, Gauge>::default();
        registry.register(
            "relay_window",
            "Sends a relay may have in flight now: smtp.max_connections, halved on overload, \
             growing back by one",
            relay_window.clone(),
        );
        let relay_connection_limit = Family::<RelayLabel, Gauge>::default();
        registry.register(
            "relay_connection_limit",
            "Connections the worker may open to a relay now: smtp.max_connections, lowered to \
             what the relay accepts after it refused one (421 at the greeting), one more tried \
             every 30 s",
            relay_connection_limit.clone(),
        );
        let relay_healthy = Family::<RelayLabel, Gauge>::default();
        registry.register(
            "relay_healthy",
            "1 while a relay is in use, 0 while it cools down after repeated failures",
            relay_healthy.clone(),
        );
        let recipients_refused = Family::<KindLabel, Counter>::default();
        registry.register(
            "recipients_refused",
            "Recipients a relay refused while others of the same job were taken, by kind \
             (permanent: dead-lettered alone; temporary: retried alone)",
            recipients_refused.clone(),
        );
        let jobs_ambiguous = Counter::default();
        registry.register(
            "jobs_ambiguous",
            "Sends whose outcome is unknown: the message was sent, then the connection dropped or \
             timed out before the relay's verdict",
            jobs_ambiguous.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 while connected to the broker and consuming, else 0",
            broker_connected.clone(),
        );
        let broker_blocked = Gauge::default();
        registry.register(
            "broker_blocked",
            "1 while the broker blocks the publishing connection (connection.blocked: a memory or \
             disk alarm); retries and dead letters wait for it",
            broker_blocked.clone(),
        );
        let possible_duplicates = Counter::default();
        registry.register(
            "possible_duplicates",
            "Deliveries handled but not acked because the broker connection was lost; the \
             broker redelivers them",
            possible_duplicates.clone(),
        );
        let jobs_redelivered = Counter::default();
        registry.register(
            "jobs_redelivered",
            "Deliveries the broker marked as redelivered: handled before by this or another \
             worker whose ack never arrived, so possibly sent before",
            jobs_redelivered.clone(),
        );
        let duplicates_avoided = Counter::default();
        registry.register(
            "duplicates_avoided",
            "Redeliveries of jobs this worker had already handled (their ack was lost with the \
             connection), acked without sending again",
            duplicates_avoided.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Times the worker reconnected to the broker after losing it",
            broker_reconnects.clone(),
        );
        let receipts_published = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "receipts_published",
            "Receipts published to the events exchange and confirmed by the broker, by outcome",
            receipts_published.clone(),
        );
        let receipts_retried = Counter::default();
        registry.register(
            "receipts_retried",
            "Receipt publishes that were not confirmed and had to be tried again (their jobs \
             wait unacked meanwhile)",
            receipts_retried.clone(),
        );
        let receipts_dropped = Family::<ReasonLabel, Counter>::default();
        for reason in [RECEIPT_DROPPED_AT_STOP, RECEIPT_REFUSED_BY_REPLY_TO] {
            let _ = receipts_dropped.get_or_create(&ReasonLabel { reason });
        }
        registry.register(
            "receipts_dropped",
            "Receipts given up: at a stop, unconfirmed when the grace was over (their jobs acked \
             without them), or refused by the job's reply_to queue",
            receipts_dropped.clone(),
        );
        Self {
            registry,
            jobs_received,
            jobs_delivered,
            jobs_retried,
            jobs_dead_lettered,
            jobs_requeued,
            jobs_abandoned,
            jobs_in_flight,
            smtp_send_duration,
            smtp_sessions_open,
            smtp_stale_connections,
            relay_overloads,
            relay_window,
            relay_connection_limit,
            relay_healthy,
            recipients_refused,
            jobs_ambiguous,
            broker_connected,
            broker_blocked,
            possible_duplicates,
            jobs_redelivered,
            duplicates_avoided,
            broker_reconnects,
            receipts_published,
            receipts_retried,
            receipts_dropped,
        }
    }

    pub fn receipt_dropped(&self, reason: &'static str) {
        self.receipts_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn receipt_published(&self, outcome: &'static str) {
        self.receipts_published
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# encoding failed: {e}\n");
        }
        out
    }

    pub fn dead_lettered(&self, kind: ErrorKind) {
        self.jobs_dead_lettered
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// The handles of one relay's metrics.
    pub fn relay(&self, relay: &str) -> RelayMetrics {
        let label = RelayLabel {
            relay: relay.to_string(),
        };
        let outcome = |outcome| {
            self.smtp_send_duration
                .get_or_create(&RelayOutcomeLabel {
                    relay: relay.to_string(),
                    outcome,
                })
                .clone()
        };
        RelayMetrics {
            delivered: outcome("delivered"),
            rejected: outcome("rejected"),
            failed: outcome("failed"),
            sessions_open: self.smtp_sessions_open.get_or_create(&label).clone(),
            stale_connections: self.smtp_stale_connections.get_or_create(&label).clone(),
            overloads: self.relay_overloads.get_or_create(&label).clone(),
            window: self.relay_window.get_or_create(&label).clone(),
            connection_limit: self.relay_connection_limit.get_or_create(&label).clone(),
            healthy: self.relay_healthy.get_or_create(&label).clone(),
        }
    }

    pub fn retried(&self, attempt: u32) {
        self.jobs_retried
            .get_or_create(&AttemptLabel { attempt })
            .inc();
    }
}
