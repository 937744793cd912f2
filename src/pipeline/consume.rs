//! Where deliveries come from: broker sessions, one after the other for as long as it takes, and
//! in each the consume loop: a consumer per lane with its share as prefetch, a slot per job, a
//! task per delivery.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use super::context::{JobContext, Lane};
use super::delivery;
use super::slots::{Plan, Slots};
use crate::amqp::{self, BrokerSession, Connections, SessionError};
use crate::config::AmqpConfig;
use crate::config::redact_url;
use crate::shutdown::{Progress, Shutdown};
use crate::status::{Phase, Status};
use crate::systemd;

/// The first pause after a lost broker connection; it doubles up to `amqp.reconnect_max_delay`.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// The longest pause once a node has answered during an outage: the broker is there and only
/// settling, so it is asked again within a second, not after a grown back-off (a whole-cluster
/// restart missed the 5 s mark by the back-off's 2 s). Still a pause: a broker that keeps
/// refusing the session is asked about once a second, not hammered.
const ANSWERED_MAX_DELAY: Duration = Duration::from_secs(1);

/// Where reconnecting stands: the back-off, the node to try first, and the outage so far.
struct Reconnect {
    delay: Duration,
    max: Duration,
    /// The index in `amqp.url` of the node to try first.
    node: usize,
    /// Since when nothing is consumed, and how many attempts failed; `None` while consuming.
    outage: Option<(Instant, u32)>,
    consumed_before: bool,
    /// A node answered during this outage (see `answered`).
    answered: bool,
}

impl Reconnect {
    fn new(max: Duration) -> Self {
        Self {
            delay: FIRST_RECONNECT_DELAY,
            max,
            node: 0,
            outage: None,
            consumed_before: false,
            answered: false,
        }
    }

    /// A node answered: its connection opened, whatever becomes of the session. When that
    /// happens during an outage, the broker is back and only settling (just after a cluster
    /// restart, a quorum queue may have no leader yet and refuse the declare or the consume):
    /// the back-off starts again from its first pause, once per outage, and grows no further
    /// than `ANSWERED_MAX_DELAY` for the rest of it, so that the worker does not sit out whole
    /// pauses of the grown back-off while the broker is there.
    fn answered(&mut self) {
        if self.outage.is_some() && !self.answered {
            self.answered = true;
            self.delay = FIRST_RECONNECT_DELAY;
        }
    }

    /// A session ended or could not start: says so once per outage, moves on from a node that
    /// was lost, and returns the pause before the next round. The pause is drawn between half
    /// the back-off and all of it, so that many instances do not reconnect in step.
    fn lost(&mut self, reason: &str, nodes: usize) -> Duration {
        match &mut self.outage {
            None => {
                tracing::warn!(%reason, "broker connection lost; reconnecting");
                self.outage = Some((Instant::now(), 1));
                // The node that was lost is tried last; a failed round starts where it started.
                if self.consumed_before && nodes > 1 {
                    self.node = (self.node + 1) % nodes;
                }
            }
            Some((_, attempts)) => {
                *attempts += 1;
                tracing::debug!(%reason, attempts = *attempts, "still no broker");
            }
        }
        let max = if self.answered {
            self.max.min(ANSWERED_MAX_DELAY)
        } else {
            self.max
        };
        let pause = jittered(self.delay.min(max));
        self.delay = (self.delay * 2).min(max);
        pause
    }

    /// A session consumes again, from node `node`.
    fn consuming(&mut self, node: usize, broker: &str, queue: &str, concurrency: u16) {
        match self.outage.take() {
            Some((since, attempts)) => tracing::info!(
                broker,
                queue,
                concurrency,
                outage = ?since.elapsed(),
                attempts,
                "reconnected; consuming again"
            ),
            None if self.consumed_before => {
                tracing::info!(broker, queue, concurrency, "reconnected; consuming again")
            }
            None => tracing::info!(broker, queue, concurrency, "consuming"),
        }
        self.node = node;
        self.delay = FIRST_RECONNECT_DELAY;
        self.consumed_before = true;
        self.answered = false;
    }
}

/// A pause drawn uniformly between half of `delay` and all of it.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.5 + fastrand::f64() / 2.0)
}

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
        // finish: the slots outlive the sessions.
        let slots = Slots::new(self.ctx.lanes.len());
        let mut reconnect = Reconnect::new(self.amqp.reconnect_max_delay);
        let result = loop {
            match self.session(shutdown, &slots, &mut reconnect).await {
                SessionEnd::Shutdown => break Ok(()),
                SessionEnd::Fatal(error) => break Err(error),
                SessionEnd::Lost(reason) => {
                    self.ctx.metrics.broker_connected.set(0);
                    self.status.set(Phase::Reconnecting, reason.clone());
                    systemd::status(&format!("reconnecting to the broker: {reason}"));
                    let pause = reconnect.lost(&reason, self.amqp.url.len());
                    if !self.pause(pause, shutdown).await {
                        break Ok(());
                    }
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
        slots: &Arc<Slots>,
        reconnect: &mut Reconnect,
    ) -> SessionEnd {
        let ctx = &self.ctx;
        let (connections, node) = tokio::select! {
            opened = Connections::open(&self.amqp, reconnect.node) => match opened {
                Ok(opened) => opened,
                Err(reason) => return SessionEnd::Lost(reason),
            },
            _ = shutdown.requested() => return SessionEnd::Shutdown,
        };
        reconnect.answered();
        let session = match connections.setup(&ctx.topology, &ctx.publisher).await {
            Ok(session) => session,
            Err(SessionError::Topology(e)) => return SessionEnd::Fatal(e),
            Err(SessionError::Broker(reason)) => return SessionEnd::Lost(reason),
        };
        let weights = ctx.lanes.iter().map(|l| l.topology.weight).collect();
        let plan = Plan::new(weights, self.concurrency, Instant::now());
        let mut lanes = Vec::with_capacity(ctx.lanes.len());
        for (i, lane) in ctx.lanes.iter().enumerate() {
            match consume(&session.channel, &lane.topology.queue, plan.entitled(i)).await {
                Ok(active) => lanes.push(LaneConsumer::new(active, plan.entitled(i))),
                Err(e) => {
                    session.close(&ctx.publisher).await;
                    return SessionEnd::Lost(e.to_string());
                }
            }
        }
        let mut consuming = Consuming {
            session,
            order: (0..ctx.lanes.len()).collect(),
            lanes,
            plan,
        };

        self.ctx.metrics.broker_connected.set(1);
        self.status.set(Phase::Consuming, "consuming");
        let broker = self.amqp.url.get(node).map(redact_url).unwrap_or_default();
        let queues = ctx.topology.queues();
        reconnect.consuming(node, &broker, &queues, self.concurrency);
        systemd::ready(&format!(
            "consuming {queues} with concurrency {}",
            self.concurrency
        ));

        // Cancelled when this session's channel is lost: its deliveries can no longer be acked.
        let abandon = shutdown.abandon_token();
        let drain_over = shutdown.drain_over();
        let mut beat = tokio::time::interval(self.beat_every);
        let concurrency = usize::from(self.concurrency);
        let end = loop {
            self.status.beat();
            // A delivery that waited for a slot goes first.
            while slots.total() < concurrency {
                let Some((lane, delivery)) = consuming.take_parked(slots) else {
                    break;
                };
                self.start(lane, delivery, slots, &abandon, &drain_over, shutdown);
            }
            if let Err(e) = consuming.replan(slots, &ctx.lanes).await {
                break SessionEnd::Lost(e.to_string());
            }
            // The connection is watched while every slot is taken too: they may all be held
            // by jobs waiting for the publisher (a receipt to confirm), which only a reconnect
            // gives back.
            consuming.sort(slots);
            let next = tokio::select! {
                next = next_delivery(&mut consuming.lanes, &consuming.plan, &consuming.order, slots) => next,
                _ = slots.freed() => continue,
                _ = shutdown.requested() => break SessionEnd::Shutdown,
                event = consuming.session.events.next() => match event {
                    Some(lapin::Event::Error(e)) => break SessionEnd::Lost(e.to_string()),
                    Some(_) => continue,
                    None => break SessionEnd::Lost("the broker connection closed".into()),
                },
                _ = beat.tick() => continue,
            };
            match next {
                Next::Delivery(lane, delivery) => {
                    consuming.plan.delivered(lane, Instant::now());
                    if slots.total() < concurrency {
                        self.start(lane, delivery, slots, &abandon, &drain_over, shutdown);
                    } else {
                        consuming.lanes[lane].parked = Some(delivery);
                    }
                }
                Next::Lost(reason) => break SessionEnd::Lost(reason),
            }
        };

        match end {
            SessionEnd::Shutdown => self.stop(consuming, shutdown).await,
            SessionEnd::Lost(_) | SessionEnd::Fatal(_) => {
                abandon.cancel();
                consuming.session.abandon(&ctx.publisher);
            }
        }
        end
    }

    /// Starts the job of a delivery of `lane` in a slot of its own.
    fn start(
        &self,
        lane: usize,
        delivery: Delivery,
        slots: &Arc<Slots>,
        abandon: &CancellationToken,
        drain_over: &CancellationToken,
        shutdown: &Shutdown,
    ) {
        let slot = slots.take(lane);
        let ctx = self.ctx.clone();
        let abandon = abandon.clone();
        let drain_over = drain_over.clone();
        // Boxed, so that spawning moves a pointer rather than the whole future.
        shutdown.spawn_job(Box::pin(async move {
            delivery::handle(ctx, lane, delivery, abandon, drain_over).await;
            drop(slot);
        }));
    }

    /// A stop while consuming: cancel the consumers, hand back what was already on its way,
    /// drain while the channel can still ack, then close the session.
    async fn stop(&self, consuming: Consuming, shutdown: &Shutdown) {
        self.announce_stop();
        let Consuming { session, lanes, .. } = consuming;
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        let mut flushing = Vec::new();
        for lane in lanes {
            let _ = session
                .channel
                .basic_cancel(lane.active.tag(), BasicCancelOptions::default())
                .await;
            if let Some(delivery) = lane.parked {
                let _ = tokio::time::timeout(super::settle::ACK_WAIT, delivery.acker.nack(requeue))
                    .await;
            }
            flushing.push(lane.active);
            flushing.extend(lane.retiring);
        }
        // Deliveries already on their way when the cancel went out: hand them back.
        for mut consumer in flushing {
            while let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(CANCEL_FLUSH, consumer.next()).await
            {
                let _ = tokio::time::timeout(super::settle::ACK_WAIT, delivery.acker.nack(requeue))
                    .await;
            }
        }
        // While the channel is still open, so that the jobs in flight can be acked.
        shutdown.drain().await;
        shutdown.last_acks(&self.ctx.settling).await;
        session.close(&self.ctx.publisher).await;
        tracing::info!("stopped");
    }
}

/// Asks for `prefetch` deliveries at most and consumes `queue`. Prefetch per consumer
/// (global = false): quorum queues refuse global QoS; and RabbitMQ applies it to the consumers
/// created after it, so a new prefetch needs a new consumer.
async fn consume(
    channel: &lapin::Channel,
    queue: &str,
    prefetch: u16,
) -> Result<lapin::Consumer, lapin::Error> {
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// One lane's consumers in a session.
struct LaneConsumer {
    active: lapin::Consumer,
    /// The prefetch `active` was created with.
    prefetch: u16,
    /// Consumers cancelled for a new prefetch: what they had buffered is still handled, then
    /// they end.
    retiring: Vec<lapin::Consumer>,
    /// A delivery taken while every slot was in use (a lender's first job, which takes its
    /// share back): it starts at the next free slot, before anything else.
    parked: Option<Delivery>,
}

impl LaneConsumer {
    fn new(active: lapin::Consumer, prefetch: u16) -> Self {
        Self {
            active,
            prefetch,
            retiring: Vec::new(),
            parked: None,
        }
    }
}

/// What the consumers gave. Not boxed: it lives for one step of the loop, and a box would cost
/// an allocation per delivery.
#[allow(clippy::large_enum_variant)]
enum Next {
    Delivery(usize, Delivery),
    Lost(String),
}

/// A session that consumes: its channel, each lane's consumers, and the plan of their shares.
struct Consuming {
    session: BrokerSession,
    /// The lanes, furthest below their entitlement first: sorted anew before each delivery is
    /// taken, in place (no allocation on the hot path).
    order: Vec<usize>,
    lanes: Vec<LaneConsumer>,
    plan: Plan,
}

impl Consuming {
    /// A parked delivery, from the lane furthest below what it is entitled to.
    fn take_parked(&mut self, slots: &Slots) -> Option<(usize, Delivery)> {
        if self.lanes.iter().all(|lane| lane.parked.is_none()) {
            return None;
        }
        self.sort(slots);
        let lane = *self
            .order
            .iter()
            .find(|&&i| self.lanes[i].parked.is_some())?;
        self.lanes[lane].parked.take().map(|d| (lane, d))
    }

    /// Lends the slots of idle lanes, or takes them back; a lane whose share changed consumes
    /// anew with its new prefetch.
    async fn replan(&mut self, slots: &Slots, worker_lanes: &[Lane]) -> Result<(), lapin::Error> {
        let lanes = &self.lanes;
        self.plan.update(
            Instant::now(),
            |i| slots.of(i),
            |i| slots.of(i) > 0 || lanes[i].parked.is_some(),
        );
        for (i, worker_lane) in worker_lanes.iter().enumerate() {
            let entitled = self.plan.entitled(i);
            if self.lanes[i].prefetch == entitled {
                continue;
            }
            let lane = &mut self.lanes[i];
            let queue = &worker_lane.topology.queue;
            let fresh = consume(&self.session.channel, queue, entitled).await?;
            let old = std::mem::replace(&mut lane.active, fresh);
            lane.prefetch = entitled;
            self.session
                .channel
                .basic_cancel(old.tag(), BasicCancelOptions::default())
                .await?;
            lane.retiring.push(old);
            tracing::debug!(
                queue = %queue,
                prefetch = entitled,
                lending = self.plan.lending(i),
                "lane consumes with a new prefetch"
            );
        }
        Ok(())
    }

    /// Sorts `order`: the lanes furthest below their entitlement first (ties: the order of
    /// `amqp.lanes`).
    fn sort(&mut self, slots: &Slots) {
        if self.order.len() > 1 {
            let plan = &self.plan;
            self.order.sort_unstable_by_key(|&i| {
                let used = slots.of(i) as u64 * 1024 / u64::from(plan.entitled(i).max(1));
                (used, i)
            });
        }
    }
}

/// The next delivery of a lane that may take one, retiring consumers first.
async fn next_delivery(
    lanes: &mut [LaneConsumer],
    plan: &Plan,
    order: &[usize],
    slots: &Slots,
) -> Next {
    std::future::poll_fn(|cx| {
        for &i in order {
            let lane = &mut lanes[i];
            if lane.parked.is_some() || slots.of(i) >= usize::from(plan.entitled(i)) {
                continue;
            }
            let mut k = 0;
            while k < lane.retiring.len() {
                match lane.retiring[k].poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(delivery))) => {
                        return Poll::Ready(Next::Delivery(i, delivery));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Next::Lost(e.to_string())),
                    // Cancelled and emptied.
                    Poll::Ready(None) => {
                        lane.retiring.swap_remove(k);
                    }
                    Poll::Pending => k += 1,
                }
            }
            match lane.active.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(delivery))) => {
                    return Poll::Ready(Next::Delivery(i, delivery));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Next::Lost(e.to_string())),
                Poll::Ready(None) => {
                    return Poll::Ready(Next::Lost(
                        "the broker cancelled the consumer (queue deleted?)".into(),
                    ));
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_to_its_cap_with_jitter_and_moves_on_from_a_lost_node() {
        let mut r = Reconnect::new(Duration::from_secs(2));
        r.consuming(0, "node 0", "q", 1);
        let mut caps = Vec::new();
        for _ in 0..6 {
            let cap = r.delay;
            let pause = r.lost("cut", 3);
            assert!(
                pause >= cap / 2 && pause <= cap,
                "{pause:?} within [{cap:?}/2, {cap:?}]"
            );
            caps.push(cap.as_millis());
        }
        assert_eq!(caps, [200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(r.node, 1, "the lost node is tried last, once per outage");
        r.consuming(1, "node 1", "q", 1);
        assert_eq!((r.delay, r.outage), (FIRST_RECONNECT_DELAY, None));
        r.lost("cut", 3);
        assert_eq!(r.node, 2);
        r.consuming(2, "node 2", "q", 1);
        r.lost("cut", 3);
        assert_eq!(r.node, 0, "round the list");
    }

    #[test]
    fn a_node_that_answers_during_an_outage_restarts_the_back_off_once() {
        let mut r = Reconnect::new(Duration::from_secs(2));
        r.consuming(0, "node 0", "q", 1);
        for _ in 0..5 {
            r.lost("refused", 3);
        }
        assert_eq!(r.delay, Duration::from_secs(2), "grown to its cap");
        // The cluster is back: a connection opens, the declare is refused (no leader yet).
        r.answered();
        assert_eq!(r.delay, FIRST_RECONNECT_DELAY);
        let pause = r.lost("queue has no leader yet", 3);
        assert!(pause <= FIRST_RECONNECT_DELAY, "{pause:?}");
        // Answering again in the same outage does not reset it again; but while it answers,
        // the back-off grows to a second at most, not to its cap.
        r.lost("queue has no leader yet", 3);
        r.answered();
        assert_eq!(r.delay, FIRST_RECONNECT_DELAY * 4);
        for _ in 0..5 {
            let pause = r.lost("queue has no leader yet", 3);
            assert!(pause <= ANSWERED_MAX_DELAY, "{pause:?}");
        }
        assert_eq!(r.delay, ANSWERED_MAX_DELAY);
        // A new outage may reset it again.
        r.consuming(0, "node 0", "q", 1);
        for _ in 0..5 {
            r.lost("refused", 3);
        }
        r.answered();
        assert_eq!(r.delay, FIRST_RECONNECT_DELAY);
        // Outside an outage (the first connection), nothing to reset.
        let mut first = Reconnect::new(Duration::from_secs(2));
        first.answered();
        assert!(!first.answered);
    }

    #[test]
    fn a_first_connection_that_fails_does_not_skip_a_node() {
        let mut r = Reconnect::new(Duration::from_secs(2));
        r.lost("refused", 3);
        r.lost("refused", 3);
        assert_eq!(r.node, 0);
        assert_eq!(r.outage.map(|(_, n)| n), Some(2));
    }
}
