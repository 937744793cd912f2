//! Lanes (`[[amqp.lanes]]`), the real binary against the real broker and the scripted relay:
//! password resets published behind a queued newsletter are delivered within seconds while the
//! newsletter keeps flowing; a newsletter alone gets the whole concurrency; and the lane is a
//! label on the metrics, a field of the log lines and of the receipts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use amqp_mailer::config::LaneConfig;
use futures_util::StreamExt as _;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use testkit::broker::{Broker, WAIT, header};
use testkit::metrics::Metrics;
use testkit::process::{WorkerProcess, free_port, run_to_end, worker_env};
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use testkit::worker::{job, retry_queues};

/// Two lanes on the test's exchange: `transactional` (weight 3) and `bulk` (weight 1), each
/// with its queue, routing key and retry tiers (deleted at the end).
struct Lanes {
    _dir: tempfile::TempDir,
    config: PathBuf,
    tx_queue: String,
    bulk_queue: String,
}

fn lanes(broker: &Broker) -> Lanes {
    let names = &broker.names;
    let tx_queue = format!("{}.tx", names.prefix);
    let bulk_queue = format!("{}.bulk", names.prefix);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[amqp.lanes]]\nname = \"transactional\"\nqueue = \"{tx_queue}\"\n\
             routing_key = \"{tx_queue}\"\nweight = 3\n\
             [[amqp.lanes]]\nname = \"bulk\"\nqueue = \"{bulk_queue}\"\n\
             routing_key = \"{bulk_queue}\"\n"
        ),
    )
    .expect("write the configuration");
    // Each lane's work queue and retry tiers, as the worker names them.
    let mut amqp = amqp_mailer::config::Config::default();
    amqp.amqp.retry_queue_prefix = names.retry_prefix.clone();
    amqp.amqp.lanes = [("transactional", &tx_queue), ("bulk", &bulk_queue)]
        .into_iter()
        .map(|(name, queue)| LaneConfig {
            name: name.into(),
            queue: queue.clone(),
            routing_key: queue.clone(),
            weight: 1,
        })
        .collect();
    let mut extra = retry_queues(&amqp);
    extra.extend([tx_queue.clone(), bulk_queue.clone()]);
    broker.also_delete(extra);
    Lanes {
        _dir: dir,
        config,
        tx_queue,
        bulk_queue,
    }
}

/// The worker's environment: the relay, `concurrency`, health and metrics on `http`.
fn env(
    broker: &Broker,
    smtp: &SmtpServer,
    concurrency: u16,
    http: SocketAddr,
) -> Vec<(&'static str, String)> {
    let mut env = worker_env(&broker.names, smtp.port());
    env.extend([
        ("AMQP_MAILER_WORKER__CONCURRENCY", concurrency.to_string()),
        ("AMQP_MAILER_SMTP__MAX_CONNECTIONS", concurrency.to_string()),
        ("AMQP_MAILER_SMTP__FROM", "sender@example.com".into()),
        ("AMQP_MAILER_HTTP__LISTEN", http.to_string()),
    ]);
    env
}

/// Publishes `ids` to the exchange with `routing_key`, every publish in flight at once, and
/// waits for the broker to confirm them all.
async fn publish_all(broker: &Broker, routing_key: &str, ids: impl Iterator<Item = String>) {
    let mut confirms = Vec::new();
    for id in ids {
        let confirm = broker
            .channel
            .basic_publish(
                broker.names.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                job(&id, "reader@example.com").as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        let confirmation = tokio::time::timeout(WAIT, confirm)
            .await
            .expect("confirmed in time")
            .expect("confirm");
        assert!(
            matches!(confirmation, lapin::Confirmation::Ack(None)),
            "routed to the lane: {confirmation:?}"
        );
    }
}

/// The job id of a message the relay received (its subject is `Job <id>`).
fn subject_id(message: &testkit::smtp::ReceivedMessage) -> String {
    message
        .header("Subject")
        .unwrap_or_default()
        .trim()
        .trim_start_matches("Job ")
        .to_string()
}

/// The first message of `queue`, left in it (got, then handed back).
async fn peek(broker: &Broker, queue: &str) -> lapin::message::Delivery {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = broker
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get");
        if let Some(message) = got {
            message
                .delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .expect("hand it back");
            return message.delivery;
        }
        assert!(Instant::now() < deadline, "nothing arrived in {queue}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(http: SocketAddr) -> Metrics {
    let text = amqp_mailer::http::check(http, "/metrics")
        .await
        .expect("/metrics");
    Metrics::parse(&text).expect("Prometheus text")
}

/// Waits until the worker has nothing in flight in any lane.
async fn wait_idle(http: SocketAddr) -> Metrics {
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = metrics(http).await;
        if metrics.sum("amqp_mailer_jobs_in_flight", &[]) == 0.0 {
            return metrics;
        }
        assert!(Instant::now() < deadline, "jobs still in flight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_resets_overtake_a_queued_newsletter_which_keeps_flowing() {
    const BULK: usize = 5000;
    const TX: usize = 20;
    let smtp = SmtpServer::start();
    // Slow enough that the newsletter lasts well beyond the resets: 16 at a time, 20 ms each.
    smtp.set_data_delay(Duration::from_millis(20));
    let broker = Broker::new("lanes").await;
    let lanes = lanes(&broker);
    let http: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let env = env(&broker, &smtp, 16, http);
    let config = lanes.config.to_string_lossy().to_string();
    let mut worker = WorkerProcess::start(&["--config", &config, "run"], &env);
    worker.wait_for_log("consuming", WAIT).await;

    publish_all(
        &broker,
        &lanes.bulk_queue,
        (0..BULK).map(|i| format!("bulk-{i}")),
    )
    .await;
    // The newsletter is flowing, and most of it still queued.
    smtp.wait_for(WAIT, "the newsletter flowing", |s| s.messages.len() >= 200)
        .await;
    let queued = broker.ready_count(&lanes.bulk_queue).await;
    assert!(
        queued as usize > BULK / 2,
        "the newsletter is still queued: {queued}"
    );

    // The resets, one every 50 ms, each timed from its publish to the relay's receipt of it.
    let mut published = Vec::new();
    for i in 0..TX {
        let id = format!("reset-{i}");
        publish_all(&broker, &lanes.tx_queue, std::iter::once(id.clone())).await;
        published.push((id, Instant::now()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Looks at each message once: the predicate runs on every change of the relay's state.
    let (mut seen, mut resets) = (0, 0);
    smtp.wait_for(WAIT, "every reset", |s| {
        resets += s.messages[seen..]
            .iter()
            .filter(|m| subject_id(m).starts_with("reset-"))
            .count();
        seen = s.messages.len();
        resets >= TX
    })
    .await;
    let messages = smtp.messages();
    let mut latencies: Vec<Duration> = published
        .iter()
        .map(|(id, at)| {
            let received = messages
                .iter()
                .find(|m| subject_id(m) == *id)
                .unwrap_or_else(|| panic!("{id} delivered"));
            received.received_at.saturating_duration_since(*at)
        })
        .collect();
    latencies.sort();
    eprintln!("reset latencies, publish to relay: {latencies:?}");
    // p99 of 20 is the slowest but one... of 20 samples, the 99th percentile is the largest.
    let p99 = latencies[latencies.len() - 1];
    assert!(
        p99 <= Duration::from_secs(2),
        "every reset within 2 s of its publish: {latencies:?}"
    );
    // The newsletter kept flowing while the resets went through, and is not done yet.
    let first_reset = published[0].1;
    let last_reset = messages
        .iter()
        .filter(|m| subject_id(m).starts_with("reset-"))
        .map(|m| m.received_at)
        .max()
        .expect("resets");
    let bulk_meanwhile = messages
        .iter()
        .filter(|m| {
            subject_id(m).starts_with("bulk-")
                && m.received_at >= first_reset
                && m.received_at <= last_reset
        })
        .count();
    assert!(
        bulk_meanwhile >= 20,
        "bulk went on while the resets went through: {bulk_meanwhile} meanwhile"
    );
    let left = broker.ready_count(&lanes.bulk_queue).await;
    assert!(left > 0, "the newsletter outlasted the resets");

    // All of it, each once, counted per lane.
    smtp.wait_for(Duration::from_secs(120), "the whole newsletter", |s| {
        s.messages.len() >= BULK + TX
    })
    .await;
    let metrics = wait_idle(http).await;
    let delivered = |lane: &str| {
        metrics
            .get("amqp_mailer_jobs_delivered_total", &[("lane", lane)])
            .unwrap_or_else(|| panic!("a delivered series for lane {lane}"))
    };
    assert_eq!(delivered("bulk"), BULK as f64);
    assert_eq!(delivered("transactional"), TX as f64);
    let deliveries = smtp.deliveries();
    assert_eq!(smtp.messages().len(), BULK + TX, "each job once");
    assert!(deliveries.values().all(|&n| n == 1), "no job twice");
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newsletter_alone_gets_the_whole_concurrency_and_says_its_lane() {
    const CONCURRENCY: u16 = 8;
    const BULK: usize = 80;
    let smtp = SmtpServer::start();
    // Each send takes long enough that every slot in use shows as an open session.
    smtp.set_data_delay(Duration::from_millis(300));
    let broker = Broker::new("lanes-alone").await;
    let lanes = lanes(&broker);
    let http: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let env = env(&broker, &smtp, CONCURRENCY, http);
    let config = lanes.config.to_string_lossy().to_string();
    let mut worker = WorkerProcess::start(&["--config", &config, "run"], &env);
    worker.wait_for_log("consuming", WAIT).await;

    // Receipts: a queue of the test's own on the events exchange.
    let receipts = broker
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("receipt queue");
    broker
        .channel
        .queue_bind(
            receipts.name().as_str().into(),
            broker.names.events.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind to the events exchange");

    publish_all(
        &broker,
        &lanes.bulk_queue,
        (0..BULK).map(|i| format!("news-{i}")),
    )
    .await;
    smtp.wait_for(Duration::from_secs(60), "the newsletter", |s| {
        s.messages.len() >= BULK
    })
    .await;
    // Its own share is 2 of 8; with nothing transactional to do, it used all 8.
    assert_eq!(
        smtp.max_concurrent_sessions(),
        usize::from(CONCURRENCY),
        "the newsletter used the whole concurrency"
    );

    let metrics = wait_idle(http).await;
    assert_eq!(
        metrics.get("amqp_mailer_jobs_delivered_total", &[("lane", "bulk")]),
        Some(BULK as f64)
    );
    assert_eq!(
        metrics.get(
            "amqp_mailer_jobs_delivered_total",
            &[("lane", "transactional")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metrics.get("amqp_mailer_jobs_received_total", &[("lane", "bulk")]),
        Some(BULK as f64)
    );
    // Every job metric carries the lane; the relay's are the worker's, shared by the lanes.
    for sample in metrics.samples() {
        let job_metric = [
            "amqp_mailer_jobs_",
            "amqp_mailer_receipts_",
            "amqp_mailer_possible_duplicates",
            "amqp_mailer_duplicates_avoided",
            "amqp_mailer_recipients_refused",
        ]
        .iter()
        .any(|prefix| sample.name.starts_with(prefix));
        if job_metric {
            assert!(sample.label("lane").is_some(), "{sample:?} has a lane");
        }
    }
    assert!(
        metrics
            .get(
                "amqp_mailer_jobs_dead_lettered_total",
                &[("lane", "transactional"), ("kind", "rejected")]
            )
            .is_some(),
        "the dead-letter series are there per lane from the start"
    );

    // The receipts and the log lines name the lane.
    let mut consumer = broker
        .channel
        .basic_consume(
            receipts.name().as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume receipts");
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a receipt in time")
        .expect("a receipt")
        .expect("a receipt");
    let receipt: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON");
    assert_eq!(receipt["lane"], "bulk", "{receipt}");
    assert_eq!(receipt["outcome"], "delivered", "{receipt}");
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
    let log = worker.log().join("\n");
    assert!(
        log.contains("lane=\"bulk\""),
        "the job's log lines name its lane:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_takes_a_lane_and_a_dead_letter_is_replayed_into_its_own_lane() {
    let smtp = SmtpServer::start();
    smtp.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 no such user".into())).matching("gone@"),
    );
    let broker = Broker::new("lanes-replay").await;
    let lanes = lanes(&broker);
    let http: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let env = env(&broker, &smtp, 4, http);
    let config = lanes.config.to_string_lossy().to_string();
    let with_config = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_string).collect::<Vec<_>>()
    };

    // An unknown lane is refused before anything is published.
    let args = with_config(&["publish", "--lane", "nope", "--to", "a@example.com"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, _, stderr) = run_to_end(&args, &env).await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("no such lane; the lanes are transactional, bulk"),
        "{stderr}"
    );

    let mut worker = WorkerProcess::start(&["--config", &config, "run"], &env);
    worker.wait_for_log("consuming", WAIT).await;
    // `status` shows each lane, with its own retry tiers, each consumed.
    let args = with_config(&["status", "--json"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, stdout, stderr) = run_to_end(&args, &env).await;
    assert!(status.success(), "every lane consumed: {stdout}{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("status JSON");
    assert_eq!(doc["lanes"][0]["name"], "transactional", "{doc}");
    assert_eq!(doc["lanes"][1]["name"], "bulk", "{doc}");
    assert_eq!(
        doc["lanes"][1]["work_queue"]["name"],
        lanes.bulk_queue.as_str()
    );
    assert_eq!(doc["lanes"][1]["work_queue"]["consumers"], 1);
    assert_eq!(doc["lanes"][0]["work_queue"]["consumers"], 1);
    assert_eq!(
        doc["lanes"][1]["retry"][0]["name"],
        format!("{}bulk.10s", broker.names.retry_prefix)
    );
    // A job for a recipient the relay refuses, through the bulk lane: dead-lettered, with its
    // lane in a header.
    let args = with_config(&[
        "publish",
        "--lane",
        "bulk",
        "--id",
        "gone-1",
        "--to",
        "gone@example.com",
        "--subject",
        "Job gone-1",
        "--text",
        "hello",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, _, stderr) = run_to_end(&args, &env).await;
    assert!(status.success(), "{stderr}");
    let letter = peek(&broker, &broker.names.dead).await;
    assert_eq!(header(&letter, "lane").as_deref(), Some("bulk"));
    assert_eq!(header(&letter, "error-kind").as_deref(), Some("rejected"));

    // The recipient exists now: replayed, it goes back to the bulk lane and is delivered.
    smtp.clear_rules();
    let args = with_config(&["dead-letters", "replay"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, stdout, stderr) = run_to_end(&args, &env).await;
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("replayed gone-1"), "{stdout}");
    smtp.wait_for(WAIT, "the replayed job", |s| s.messages.len() == 1)
        .await;
    let metrics = wait_idle(http).await;
    assert_eq!(
        metrics.get("amqp_mailer_jobs_delivered_total", &[("lane", "bulk")]),
        Some(1.0)
    );
    assert_eq!(
        metrics.get(
            "amqp_mailer_jobs_dead_lettered_total",
            &[("lane", "bulk"), ("kind", "rejected")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metrics.get(
            "amqp_mailer_jobs_received_total",
            &[("lane", "transactional")]
        ),
        Some(0.0)
    );
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
}
