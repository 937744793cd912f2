//! Prometheus metrics. One `Metrics` per worker, shared by reference; the counters are atomics,
//! so updating them on the hot path costs a few nanoseconds.

use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

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
    /// Behind a lock so that the job metrics can be registered once the lanes are known.
    registry: Mutex<Registry>,
    /// The job metrics of each lane (one entry for a worker without lanes), once registered.
    lanes: OnceLock<Vec<LaneMetrics>>,
    pub smtp_send_duration: Family<RelayOutcomeLabel, Histogram>,
    pub smtp_sessions_open: Family<RelayLabel, Gauge>,
    pub smtp_stale_connections: Family<RelayLabel, Counter>,
    pub relay_overloads: Family<RelayLabel, Counter>,
    pub relay_window: Family<RelayLabel, Gauge>,
    pub relay_connection_limit: Family<RelayLabel, Gauge>,
    pub relay_healthy: Family<RelayLabel, Gauge>,
    pub broker_connected: Gauge,
    pub broker_blocked: Gauge,
    pub broker_reconnects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("amqp_mailer");
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
        let broker_reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Times the worker reconnected to the broker after losing it",
            broker_reconnects.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            lanes: OnceLock::new(),
            smtp_send_duration,
            smtp_sessions_open,
            smtp_stale_connections,
            relay_overloads,
            relay_window,
            relay_connection_limit,
            relay_healthy,
            broker_connected,
            broker_blocked,
            broker_reconnects,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            out = format!("# encoding failed: {e}\n");
        }
        out
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

    /// The job metrics of each lane, in the order of `lanes` (`[None]` for a worker without
    /// lanes: the series carry no lane label, as before lanes existed). Registered on the
    /// first call; later calls get the same handles.
    pub fn lanes(&self, lanes: &[Option<&str>]) -> Vec<LaneMetrics> {
        self.lanes
            .get_or_init(|| {
                let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
                LaneMetrics::register(&mut registry, lanes)
            })
            .clone()
    }

    /// Jobs in flight, every lane together.
    pub fn jobs_in_flight(&self) -> i64 {
        self.lanes
            .get()
            .map_or(0, |lanes| lanes.iter().map(|l| l.in_flight.get()).sum())
    }
}

/// The `lane` label; absent (encodes nothing) for a worker without lanes.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LaneLabel(Option<Arc<str>>);

impl EncodeLabelSet for LaneLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(lane) => [("lane", lane.as_ref())].encode(encoder),
            None => Ok(()),
        }
    }
}

/// One lane's job metrics, looked up once: the hot path updates them without hashing a label
/// (the families keyed by attempt, kind, outcome or reason still hash those).
#[derive(Clone, Debug)]
pub struct LaneMetrics {
    label: LaneLabel,
    pub received: Counter,
    pub delivered: Counter,
    pub requeued: Counter,
    pub abandoned: Counter,
    pub in_flight: Gauge,
    pub ambiguous: Counter,
    pub possible_duplicates: Counter,
    pub redelivered: Counter,
    pub duplicates_avoided: Counter,
    pub receipts_retried: Counter,
    retried: Family<(LaneLabel, AttemptLabel), Counter>,
    dead_lettered: Family<(LaneLabel, KindLabel), Counter>,
    recipients_refused: Family<(LaneLabel, KindLabel), Counter>,
    receipts_published: Family<(LaneLabel, OutcomeLabel), Counter>,
    receipts_dropped: Family<(LaneLabel, ReasonLabel), Counter>,
}

/// Registers a metric that has no label but the lane's: a plain one without lanes, a family
/// keyed by lane with them. Returns each lane's handle.
fn per_lane<M>(registry: &mut Registry, name: &str, help: &str, labels: &[LaneLabel]) -> Vec<M>
where
    M: Metric + Default + Clone,
    Family<LaneLabel, M>: Metric,
{
    if let [LaneLabel(None)] = labels {
        let metric = M::default();
        registry.register(name, help, metric.clone());
        vec![metric]
    } else {
        let family = Family::<LaneLabel, M>::default();
        registry.register(name, help, family.clone());
        labels
            .iter()
            .map(|label| family.get_or_create(label).clone())
            .collect()
    }
}

impl LaneMetrics {
    fn register(registry: &mut Registry, lanes: &[Option<&str>]) -> Vec<Self> {
        let labels: Vec<LaneLabel> = lanes
            .iter()
            .map(|lane| LaneLabel(lane.map(Arc::from)))
            .collect();
        let mut counter =
            |name: &str, help: &str| per_lane::<Counter>(registry, name, help, &labels);
        let received = counter("jobs_received", "Deliveries taken from the work queue");
        let delivered = counter("jobs_delivered", "Jobs accepted by the relay and acked");
        let requeued = counter(
            "jobs_requeued",
            "Deliveries handed back to the work queue because a retry or dead-letter publish \
             was not confirmed",
        );
        let abandoned = counter(
            "jobs_abandoned",
            "Jobs stopped before their message was sent because their delivery could no longer \
             be acked (broker connection lost, shutdown grace over); the broker redelivers them",
        );
        let ambiguous = counter(
            "jobs_ambiguous",
            "Sends whose outcome is unknown: the message was sent, then the connection dropped or \
             timed out before the relay's verdict",
        );
        let possible_duplicates = counter(
            "possible_duplicates",
            "Deliveries handled but not acked because the broker connection was lost; the \
             broker redelivers them",
        );
        let redelivered = counter(
            "jobs_redelivered",
            "Deliveries the broker marked as redelivered: handled before by this or another \
             worker whose ack never arrived, so possibly sent before",
        );
        let duplicates_avoided = counter(
            "duplicates_avoided",
            "Redeliveries of jobs this worker had already handled (their ack was lost with the \
             connection), acked without sending again",
        );
        let receipts_retried = counter(
            "receipts_retried",
            "Receipt publishes that were not confirmed and had to be tried again (their jobs \
             wait unacked meanwhile)",
        );
        let in_flight = per_lane::<Gauge>(
            registry,
            "jobs_in_flight",
            "Deliveries being processed now",
            &labels,
        );
        let retried = Family::<(LaneLabel, AttemptLabel), Counter>::default();
        registry.register(
            "jobs_retried",
            "Jobs published to a retry queue, by the attempt that failed",
            retried.clone(),
        );
        let dead_lettered = Family::<(LaneLabel, KindLabel), Counter>::default();
        registry.register(
            "jobs_dead_lettered",
            "Jobs published to the dead-letter queue, by error kind",
            dead_lettered.clone(),
        );
        let recipients_refused = Family::<(LaneLabel, KindLabel), Counter>::default();
        registry.register(
            "recipients_refused",
            "Recipients a relay refused while others of the same job were taken, by kind \
             (permanent: dead-lettered alone; temporary: retried alone)",
            recipients_refused.clone(),
        );
        let receipts_published = Family::<(LaneLabel, OutcomeLabel), Counter>::default();
        registry.register(
            "receipts_published",
            "Receipts published to the events exchange and confirmed by the broker, by outcome",
            receipts_published.clone(),
        );
        let receipts_dropped = Family::<(LaneLabel, ReasonLabel), Counter>::default();
        registry.register(
            "receipts_dropped",
            "Receipts given up: at a stop, unconfirmed when the grace was over (their jobs acked \
             without them), or refused by the job's reply_to queue",
            receipts_dropped.clone(),
        );
        labels
            .iter()
            .enumerate()
            .map(|(i, label)| {
                // Present from the start at 0, so that rate() and alerts see the series.
                for kind in ErrorKind::ALL {
                    if kind != ErrorKind::Transient {
                        let _ = dead_lettered.get_or_create(&(
                            label.clone(),
                            KindLabel {
                                kind: kind.as_str(),
                            },
                        ));
                    }
                }
                for reason in [RECEIPT_DROPPED_AT_STOP, RECEIPT_REFUSED_BY_REPLY_TO] {
                    let _ =
                        receipts_dropped.get_or_create(&(label.clone(), ReasonLabel { reason }));
                }
                Self {
                    label: label.clone(),
                    received: received[i].clone(),
                    delivered: delivered[i].clone(),
                    requeued: requeued[i].clone(),
                    abandoned: abandoned[i].clone(),
                    in_flight: in_flight[i].clone(),
                    ambiguous: ambiguous[i].clone(),
                    possible_duplicates: possible_duplicates[i].clone(),
                    redelivered: redelivered[i].clone(),
                    duplicates_avoided: duplicates_avoided[i].clone(),
                    receipts_retried: receipts_retried[i].clone(),
                    retried: retried.clone(),
                    dead_lettered: dead_lettered.clone(),
                    recipients_refused: recipients_refused.clone(),
                    receipts_published: receipts_published.clone(),
                    receipts_dropped: receipts_dropped.clone(),
                }
            })
            .collect()
    }

    pub fn retried(&self, attempt: u32) {
        self.retried
            .get_or_create(&(self.label.clone(), AttemptLabel { attempt }))
            .inc();
    }

    pub fn dead_lettered(&self, kind: ErrorKind) {
        self.dead_lettered
            .get_or_create(&(
                self.label.clone(),
                KindLabel {
                    kind: kind.as_str(),
                },
            ))
            .inc();
    }

    pub fn recipients_refused(&self, kind: &'static str, count: u64) {
        self.recipients_refused
            .get_or_create(&(self.label.clone(), KindLabel { kind }))
            .inc_by(count);
    }

    pub fn receipt_published(&self, outcome: &'static str) {
        self.receipts_published
            .get_or_create(&(self.label.clone(), OutcomeLabel { outcome }))
            .inc();
    }

    pub fn receipt_dropped(&self, reason: &'static str) {
        self.receipts_dropped
            .get_or_create(&(self.label.clone(), ReasonLabel { reason }))
            .inc();
    }
}
