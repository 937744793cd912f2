//! The exchange and queues the worker needs, declared idempotently on every (re)connect.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{AmqpConfig, QueueType};
use crate::policy::Schedule;

/// The shortest exact rendering of a delay: `1h`, `90s`, `250ms`. It names the retry queues
/// (`email.retry.10s`), so a change here renames queues on the broker: the names are pinned by
/// the tests below. The worker's log lines use it too, so a delay in a log reads as its queue
/// is named.
pub fn format_duration(value: Duration) -> String {
    let ms = value.as_millis();
    if ms == 0 {
        "0s".to_string()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms < 3_600_000 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Names and arguments of everything the worker declares.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    /// The work queues: `amqp.queue` alone, or one per lane of `amqp.lanes`.
    pub lanes: Vec<LaneTopology>,
    pub dead_letter_queue: String,
    /// Every retry queue starts with this (`amqp.retry_queue_prefix`).
    pub retry_queue_prefix: String,
    pub queue_type: QueueType,
    /// The topic exchange receipts go to (`amqp.events_exchange`); `None` when they are off.
    pub events_exchange: Option<String>,
}

/// One work queue with its binding and its retry tiers.
#[derive(Debug, Clone)]
pub struct LaneTopology {
    /// The lane's name; `None` for the one queue of a worker without lanes.
    pub name: Option<String>,
    pub queue: String,
    pub routing_key: String,
    /// Its share of the concurrency against the other lanes.
    pub weight: u16,
    /// One queue per distinct delay of the schedule, in order.
    pub retry_queues: Vec<(Duration, String)>,
    /// Its retry queues are named this followed by their delay (`email.retry.` + `10s`, or
    /// `email.retry.bulk.` + `10s` for lane `bulk`).
    pub retry_queue_prefix: String,
}

impl LaneTopology {
    /// The retry queue for a delay. Named, not looked up, so that there is always one: every
    /// delay the schedule produces was declared with the same name, and a publish to a queue that
    /// does not exist is returned by the broker (mandatory), never taken as stored.
    pub fn retry_queue(&self, delay: Duration) -> String {
        retry_queue_name(&self.retry_queue_prefix, delay)
    }
}

fn retry_queue_name(prefix: &str, delay: Duration) -> String {
    format!("{prefix}{}", format_duration(delay))
}

/// Declares a durable exchange of `kind`.
async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), TopologyError> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| declare_error(format!("exchange '{name}'"), e))
}

/// A declaration failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Exists with other arguments: an operator must act; retrying cannot help.
    #[error(
        "{what} already exists with other arguments: {detail}. Either change the configuration \
         to match it, or move its messages away and delete it so that it can be declared anew"
    )]
    Mismatch { what: String, detail: String },
    /// The connection or channel failed: retry after reconnecting.
    #[error("declaring {what} failed: {source}")]
    Broker {
        what: String,
        #[source]
        source: lapin::Error,
    },
}

impl Topology {
    pub fn new(config: &AmqpConfig, schedule: &Schedule) -> Self {
        let lane = |name: Option<&str>, queue: &str, routing_key: &str, weight: u16| {
            let prefix = match name {
                Some(name) => config.lane_retry_prefix(name),
                None => config.retry_queue_prefix.clone(),
            };
            let retry_queues = schedule
                .delays()
                .into_iter()
                .map(|delay| (delay, retry_queue_name(&prefix, delay)))
                .collect();
            LaneTopology {
                name: name.map(str::to_string),
                queue: queue.to_string(),
                routing_key: routing_key.to_string(),
                weight,
                retry_queues,
                retry_queue_prefix: prefix,
            }
        };
        let lanes = if config.lanes.is_empty() {
            vec![lane(None, &config.queue, &config.routing_key, 1)]
        } else {
            config
                .lanes
                .iter()
                .map(|l| lane(Some(&l.name), &l.queue, &l.routing_key, l.weight))
                .collect()
        };
        Self {
            retry_queue_prefix: config.retry_queue_prefix.clone(),
            exchange: config.exchange.clone(),
            lanes,
            dead_letter_queue: config.dead_letter_queue.clone(),
            queue_type: config.queue_type,
            events_exchange: Some(config.events_exchange.clone()).filter(|name| !name.is_empty()),
        }
    }

    /// The work queues, for the log: `email.send`, or `email.tx, email.bulk`.
    pub fn queues(&self) -> String {
        let names: Vec<&str> = self.lanes.iter().map(|l| l.queue.as_str()).collect();
        names.join(", ")
    }

    /// Whether `queue` is one of the worker's own: a work queue, the dead-letter queue or a
    /// retry queue. A receipt sent there would be taken for a job.
    pub fn is_own_queue(&self, queue: &str) -> bool {
        self.lanes.iter().any(|lane| lane.queue == queue)
            || queue == self.dead_letter_queue
            || (!self.retry_queue_prefix.is_empty() && queue.starts_with(&self.retry_queue_prefix))
    }

    /// Declares the exchange, the work queue and its binding, the retry queues and the
    /// dead-letter queue. Idempotent; a queue that exists with other arguments is a `Mismatch`.
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
        if !self.exchange.is_empty() {
            declare_exchange(channel, &self.exchange, ExchangeKind::Direct).await?;
        }
        if let Some(events) = &self.events_exchange {
            declare_exchange(channel, events, ExchangeKind::Topic).await?;
        }

        for lane in &self.lanes {
            self.declare_lane(channel, lane).await?;
        }
        let dead = self.base_arguments();
        self.declare_queue(channel, &self.dead_letter_queue, dead)
            .await?;
        Ok(())
    }

    /// A work queue, its binding and its retry queues.
    async fn declare_lane(
        &self,
        channel: &Channel,
        lane: &LaneTopology,
    ) -> Result<(), TopologyError> {
        // Work queue. Anything the broker itself dead-letters from it (a quorum queue's
        // delivery limit on RabbitMQ 4) lands in the dead-letter queue instead of vanishing.
        let mut work = self.base_arguments();
        dead_letter_to(&mut work, &self.dead_letter_queue);
        self.at_least_once(&mut work);
        self.declare_queue(channel, &lane.queue, work).await?;
        if !self.exchange.is_empty() {
            channel
                .queue_bind(
                    lane.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    lane.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(format!("binding of queue '{}'", lane.queue), e))?;
        }
        for (delay, name) in &lane.retry_queues {
            let mut args = self.base_arguments();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            );
            dead_letter_to(&mut args, &lane.queue);
            self.at_least_once(&mut args);
            self.declare_queue(channel, name, args).await?;
        }
        Ok(())
    }

    fn base_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        // Classic is the broker's default; leaving it implicit keeps queues that operators
        // declared without `x-queue-type` equivalent.
        if self.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), long_string("quorum"));
        }
        args
    }

    /// Quorum queues can dead-letter with confirms inside the broker (RabbitMQ 3.10+), so that
    /// a job moving from a retry queue back to the work queue cannot be lost on the way.
    fn at_least_once(&self, args: &mut FieldTable) {
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            args.insert("x-overflow".into(), long_string("reject-publish"));
        }
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        args: FieldTable,
    ) -> Result<(), TopologyError> {
        channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map(|_| ())
            .map_err(|e| declare_error(format!("queue '{name}'"), e))
    }
}

fn dead_letter_to(args: &mut FieldTable, queue: &str) {
    // The default exchange routes by queue name: no extra exchange to declare or bind.
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    args.insert("x-dead-letter-routing-key".into(), long_string(queue));
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

fn declare_error(what: String, error: lapin::Error) -> TopologyError {
    let text = error.to_string();
    // 406 PRECONDITION_FAILED on declare means "exists with other arguments/type".
    if text.contains("PRECONDITION_FAILED") {
        let detail = text
            .split_once("PRECONDITION_FAILED - ")
            .map(|(_, rest)| rest.to_string())
            .unwrap_or(text);
        TopologyError::Mismatch { what, detail }
    } else {
        TopologyError::Broker {
            what,
            source: error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RetryConfig, duration};

    #[test]
    fn durations_round_trip() {
        for (text, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1h", 3_600_000),
            ("2m", 120_000),
            ("90s", 90_000),
            ("1280s", 1_280_000),
        ] {
            let parsed = duration::parse(text).expect(text);
            assert_eq!(parsed, Duration::from_millis(ms));
            assert_eq!(format_duration(parsed), text);
        }
        assert!(duration::parse("30").is_err());
    }

    #[test]
    fn retry_queues_are_named_after_their_delay() {
        let schedule = Schedule::new(&RetryConfig::default());
        let topology = Topology::new(&AmqpConfig::default(), &schedule);
        let names: Vec<&str> = topology.lanes[0]
            .retry_queues
            .iter()
            .map(|(_, name)| name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "email.retry.10s",
                "email.retry.20s",
                "email.retry.40s",
                "email.retry.80s",
                "email.retry.160s",
                "email.retry.320s",
                "email.retry.640s",
                "email.retry.1280s",
                "email.retry.2560s",
            ]
        );
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_secs(5400)), "5400s");
    }
}
