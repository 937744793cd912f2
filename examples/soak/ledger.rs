//! The books of the run: publishing the jobs (each confirmed), reading the dead letters, taking in
//! what the relay received, and waiting until every job is accounted for. The books themselves
//! and the verdict on them are `testkit::soak`.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use testkit::soak::{DeadLetter, JobKind};
use tokio_util::sync::CancellationToken;

use crate::rng::Rng;
use crate::{REJECT_DOMAIN, Soak, clock, hold, lock};

/// The books' size at one moment, for the report's table over time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress {
    pub(crate) t: f64,
    pub(crate) published: usize,
    pub(crate) delivered: usize,
    pub(crate) dead: usize,
}

impl Soak {
    /// Publishes `rate` jobs per second, each confirmed, until `stop`.
    pub(crate) async fn publish(&self, mut rng: Rng, stop: CancellationToken) {
        let rate = f64::from(self.args.rate);
        let permanent = self.args.permanent_percent / 100.0;
        let invalid = self.args.invalid_percent / 100.0;
        let started = Instant::now();
        let mut sent: u64 = 0;
        let mut channel = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            if channel.is_none() {
                match open_publisher(&self.amqp_url).await {
                    Ok(c) => channel = Some(c),
                    Err(e) => {
                        self.note(format!("publisher: cannot connect: {e}"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let Some((_, ch)) = channel.as_ref() else {
                continue;
            };
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            let mut pending = Vec::new();
            while sent < due {
                sent += 1;
                let id = format!("soak-{}-{sent}", self.seed);
                let roll = rng.unit();
                let kind = if roll < permanent {
                    JobKind::Permanent
                } else if roll < permanent + invalid {
                    JobKind::Invalid
                } else {
                    JobKind::Normal
                };
                let body = job_body(&id, kind, sent, &mut rng);
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(id.as_str().into());
                let publish = ch.basic_publish(
                    self.names.exchange.as_str().into(),
                    self.names.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body.as_bytes(),
                    properties,
                );
                pending.push((id, kind, publish.await));
            }
            let mut broken = false;
            let confirms = pending.into_iter().map(|(id, kind, publish)| async move {
                let confirmed = match publish {
                    Ok(confirm) => {
                        match tokio::time::timeout(Duration::from_secs(30), confirm).await {
                            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                            Ok(Ok(other)) => Err(format!("{other:?}")),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("no confirm within 30 s".into()),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                (id, kind, confirmed)
            });
            let results = futures_util::future::join_all(confirms).await;
            let mut ledger = lock(&self.ledger);
            for (id, kind, confirmed) in results {
                match confirmed {
                    Ok(()) => {
                        ledger.published.insert(id, kind);
                    }
                    Err(e) => {
                        if ledger.unconfirmed.len() < 5 {
                            eprintln!("publisher: {id} not confirmed: {e}");
                        }
                        ledger.unconfirmed.push(id);
                        broken = true;
                    }
                }
            }
            drop(ledger);
            if broken {
                channel = None; // reconnect
            }
        }
    }

    /// Reads the dead-letter queue for the whole run (acking what it read).
    pub(crate) async fn read_dead_letters(&self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let consumer = async {
                let conn = Connection::connect(&self.amqp_url, ConnectionProperties::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
                channel
                    .basic_qos(500, BasicQosOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let consumer = channel
                    .basic_consume(
                        self.names.dead.as_str().into(),
                        "soak-dead-letters".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, consumer))
            };
            let (conn, mut consumer) = match consumer.await {
                Ok(ok) => ok,
                Err(e) => {
                    self.note(format!("dead-letter reader: {e}; retrying"));
                    hold(Duration::from_secs(1), &stop).await;
                    continue;
                }
            };
            loop {
                let delivery = tokio::select! {
                    next = consumer.next() => next,
                    _ = stop.cancelled() => break,
                };
                let delivery = match delivery {
                    Some(Ok(delivery)) => delivery,
                    other => {
                        self.note(format!("dead-letter reader: consumer ended ({other:?})"));
                        break;
                    }
                };
                let properties = &delivery.properties;
                let id = properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_string())
                    .or_else(|| {
                        serde_json::from_slice::<serde_json::Value>(&delivery.data)
                            .ok()
                            .and_then(|v| v["id"].as_str().map(str::to_string))
                    })
                    .unwrap_or_else(|| "<no id>".into());
                let header = |name: &str| {
                    amqp_mailer::amqp::header_text(properties, name).unwrap_or_default()
                };
                let letter = DeadLetter {
                    kind: header("error-kind"),
                    attempt: header("attempt"),
                    reason: header("last-error"),
                };
                lock(&self.ledger).dead.entry(id).or_default().push(letter);
                *lock(&self.last_dead_at) = Some(Instant::now());
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            let _ = conn.close(200, "bye".into()).await;
        }
    }

    /// Takes in what the relay accepted since the last call.
    pub(crate) async fn absorb_relay(&self) {
        let start = self.start;
        let mut seen = *lock(&self.relay_seen);
        let mut new: Vec<(Option<String>, f64)> = Vec::new();
        self.smtp
            .wait_until(Duration::from_secs(1), |state| {
                for message in state.messages.iter().skip(seen) {
                    let id = message
                        .header("Message-ID")
                        .and_then(|mid| {
                            mid.trim_matches(['<', '>'])
                                .rsplit_once('@')
                                .map(|(id, _)| id.to_string())
                        })
                        .filter(|id| id.starts_with("soak-"));
                    let at = message.received_at.saturating_duration_since(start);
                    new.push((id, at.as_secs_f64()));
                }
                seen = state.messages.len();
                true
            })
            .await;
        *lock(&self.relay_seen) = seen;
        let mut ledger = lock(&self.ledger);
        for (id, at) in new {
            match id {
                Some(id) => ledger.delivered.entry(id).or_default().push(at),
                None => ledger.foreign += 1,
            }
        }
    }

    pub(crate) async fn queue_counts(
        &self,
        conn: &Connection,
    ) -> Result<Vec<(String, u32)>, String> {
        let mut out = Vec::new();
        let mut queues = vec![self.names.queue.clone()];
        queues.extend(self.retry_queues.iter().cloned());
        for queue in queues {
            let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("{queue}: {e}"))?;
            out.push((queue, declared.message_count()));
            let _ = channel.close(200, "ok".into()).await;
        }
        Ok(out)
    }

    /// Waits until every job is accounted for, the queues are empty and nothing is in flight.
    pub(crate) async fn settle(&self, bound: Duration) -> Result<f64, String> {
        let since = Instant::now();
        let conn = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("cannot connect to the broker: {e}"))?;
        let mut quiet_checks = 0;
        let mut last_state = String::new();
        let mut last_print = Instant::now();
        while since.elapsed() < bound {
            self.absorb_relay().await;
            let missing = lock(&self.ledger).unaccounted();
            let counts = self.queue_counts(&conn).await.unwrap_or_default();
            let queued: u32 = counts.iter().map(|(_, n)| n).sum();
            let in_flight = match self.current() {
                Some((index, _, http)) => {
                    self.scrape(index, http).await;
                    lock(&self.generations)[index]
                        .metrics
                        .as_ref()
                        .map_or(-1.0, |m| m.sum("amqp_mailer_jobs_in_flight", &[]))
                }
                None => -1.0,
            };
            last_state = format!(
                "{} jobs unaccounted for, {queued} queued ({}), {in_flight} in flight",
                missing.len(),
                counts
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(q, n)| format!(
                        "{}: {n}",
                        q.strip_prefix(&self.names.prefix).unwrap_or(q)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if missing.is_empty() && queued == 0 && in_flight == 0.0 && !counts.is_empty() {
                quiet_checks += 1;
                if quiet_checks >= 3 {
                    let _ = conn.close(200, "bye".into()).await;
                    return Ok(since.elapsed().as_secs_f64());
                }
            } else {
                quiet_checks = 0;
            }
            if last_print.elapsed() > Duration::from_secs(10) {
                eprintln!("[{}] settling: {last_state}", clock(self.now()));
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let _ = conn.close(200, "bye".into()).await;
        Err(format!(
            "not settled within {} s: {last_state}",
            bound.as_secs()
        ))
    }

    pub(crate) async fn delete_queues(&self) {
        let Ok(conn) = Connection::connect(&self.amqp_url, ConnectionProperties::default()).await
        else {
            eprintln!(
                "cleanup: cannot connect to the broker; queues {}* remain",
                self.names.prefix
            );
            return;
        };
        let mut queues = vec![self.names.queue.clone(), self.names.dead.clone()];
        queues.extend(self.retry_queues.iter().cloned());
        let mut deleted = 0;
        for queue in &queues {
            if let Ok(channel) = conn.create_channel().await
                && channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .is_ok()
            {
                deleted += 1;
            }
        }
        for exchange in [&self.names.exchange, &self.names.events] {
            if let Ok(channel) = conn.create_channel().await {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), Default::default())
                    .await;
            }
        }
        let _ = conn.close(200, "bye".into()).await;
        eprintln!(
            "cleanup: deleted {deleted} of {} queues and the exchanges {} and {}",
            queues.len(),
            self.names.exchange,
            self.names.events
        );
    }
}

fn job_body(id: &str, kind: JobKind, n: u64, rng: &mut Rng) -> String {
    // Bodies of varied size, so that the allocator sees some churn.
    let words = 5 + rng.below(300);
    let text: String = (0..words)
        .map(|i| format!("word{} ", (i * 7 + n as usize) % 1000))
        .collect();
    match kind {
        JobKind::Normal => serde_json::json!({
            "id": id,
            "to": format!("user{}@example.com", n % 1000),
            "subject": format!("Soak job {id}"),
            "text": text,
            "headers": {"X-Soak": "1"},
        })
        .to_string(),
        JobKind::Permanent => serde_json::json!({
            "id": id,
            "to": format!("nobody{}@{REJECT_DOMAIN}", n % 100),
            "subject": format!("Soak job {id} (rejected)"),
            "text": text,
        })
        .to_string(),
        JobKind::Invalid => match rng.below(3) {
            0 => format!("{{\"id\": \"{id}\", \"to\": \"ann@example.com\", \"subject\": "),
            1 => serde_json::json!({
                "id": id, "to": "ann@example.com", "subject": "typo", "text": "x", "colour": "red",
            })
            .to_string(),
            _ => serde_json::json!({
                "id": id, "to": "bob@", "subject": "bad address", "text": "x",
            })
            .to_string(),
        },
    }
}

async fn open_publisher(url: &str) -> Result<(Connection, lapin::Channel), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, channel))
}
