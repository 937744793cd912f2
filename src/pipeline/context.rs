//! What every job needs, built once by the composition root and shared by all of them; and what
//! a job tells whoever listens when it is settled.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::broadcast;

use super::recent::RecentlySettled;
use crate::amqp::{LaneTopology, Publisher, Topology};
use crate::dkim::Signers;
use crate::job::Limits;
use crate::message::MessageDefaults;
use crate::metrics::{LaneMetrics, Metrics};
use crate::policy::{ErrorKind, Schedule};
use crate::smtp::Transport;

/// The shared job context: the transport (relays or outbox), the publisher, the topology and the rules every job of
/// this worker is handled with.
pub struct JobContext {
    pub transport: Transport,
    pub publisher: Publisher,
    pub topology: Topology,
    /// The work queues, each with its retry tiers and its metrics: one without `amqp.lanes`.
    pub lanes: Vec<Lane>,
    pub schedule: Schedule,
    pub limits: Limits,
    pub defaults: MessageDefaults,
    /// The DKIM keys, per sender domain (`[[dkim]]`).
    pub dkim: Signers,
    /// `retry.max_age`: a job unsent this long after its first failure is not sent late.
    pub max_age: Option<Duration>,
    pub metrics: Arc<Metrics>,
    pub events: broadcast::Sender<JobEvent>,
    pub settled: RecentlySettled,
    /// The events exchange receipts are published to (`amqp.events_exchange`); `None` when
    /// receipts are off.
    pub receipts: Option<String>,
    /// Jobs whose receipt waits to be tried again: the first says so, not every one.
    pub receipts_waiting: AtomicUsize,
    /// The jobs past their send, settling (republishes, receipt, ack): after a grace that ran
    /// out, the stop waits a moment for them before closing the channel.
    pub settling: tokio_util::task::TaskTracker,
}

/// One work queue of the worker: the queue and its retry tiers, and the job metrics with its
/// label.
pub struct Lane {
    pub topology: LaneTopology,
    pub metrics: LaneMetrics,
}

impl Lane {
    /// Each lane of `topology`, its metrics registered with `metrics`.
    pub fn all(topology: &Topology, metrics: &Metrics) -> Vec<Lane> {
        let names: Vec<Option<&str>> = topology.lanes.iter().map(|l| l.name.as_deref()).collect();
        topology
            .lanes
            .iter()
            .zip(metrics.lanes(&names))
            .map(|(topology, metrics)| Lane {
                topology: topology.clone(),
                metrics,
            })
            .collect()
    }

    /// The lane's name; `None` for a worker without lanes.
    pub fn name(&self) -> Option<&str> {
        self.topology.name.as_deref()
    }
}

/// How a delivery was settled, for whoever listens (tests, tools). Sent once the job is done
/// (settled, and no longer counted in flight). Costs next to nothing when nobody listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// The job's `id`, else the AMQP message id.
    pub job_id: Option<String>,
    /// The attempt this was, 1-based.
    pub attempt: u32,
    pub outcome: JobOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Delivered,
    /// Delivered to some recipients; the others were retried or dead-lettered on their own.
    PartlyDelivered,
    /// Republished to a retry queue (confirmed) and acked.
    Retried,
    /// Republished to the dead-letter queue (confirmed) and acked.
    DeadLettered(ErrorKind),
    /// Handed back to the work queue because the republish was not confirmed.
    Requeued,
    /// Stopped before sending; the broker delivers it again.
    Abandoned,
    /// A redelivery of a delivery this worker had settled but could not ack: acked, not sent.
    AlreadyHandled,
    /// Handled, but neither its receipt was confirmed before the worker stopped nor its ack
    /// given (the connection was gone): the broker delivers it again (a possible duplicate,
    /// counted).
    ReceiptUnconfirmed,
}

impl JobOutcome {
    /// The `outcome` field of the job's log lines.
    pub fn name(self) -> &'static str {
        match self {
            JobOutcome::Delivered => "delivered",
            JobOutcome::PartlyDelivered => "partly-delivered",
            JobOutcome::Retried => "retry",
            JobOutcome::DeadLettered(kind) => kind.as_str(),
            JobOutcome::Requeued => "requeued",
            JobOutcome::Abandoned => "abandoned",
            JobOutcome::AlreadyHandled => "already-handled",
            JobOutcome::ReceiptUnconfirmed => "receipt-unconfirmed",
        }
    }

    /// The broker has this delivery's final word (acked): a redelivery of it was handled already.
    pub fn is_settled(self) -> bool {
        match self {
            JobOutcome::Delivered
            | JobOutcome::PartlyDelivered
            | JobOutcome::Retried
            | JobOutcome::DeadLettered(_)
            | JobOutcome::AlreadyHandled => true,
            JobOutcome::Requeued | JobOutcome::Abandoned | JobOutcome::ReceiptUnconfirmed => false,
        }
    }
}
