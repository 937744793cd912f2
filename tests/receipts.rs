//! Receipts against the real broker and the scripted SMTP server: one per settlement, to the
//! events exchange by outcome and to `reply_to`, each checked against the JSON Schema of
//! `schema/receipt.schema.json`, confirmed before the job is acked, and never a reason to send
//! a mail twice.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use amqp_mailer::pipeline::JobOutcome;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};
use serde_json::Value;
use testkit::broker::{Broker, WAIT};
use testkit::metrics::metric_sum;
use testkit::process::{WorkerProcess, free_port};
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use testkit::worker::{RunningWorker, job, test_config, wait_for_job};

const SCHEMA: &str = include_str!("../schema/receipt.schema.json");

/// Receipts as a consumer of the events exchange sees them: a server-named exclusive queue
/// bound with `binding`; each receipt checked against the schema.
struct Receipts {
    channel: Channel,
    consumer: Consumer,
    schema: jsonschema::Validator,
    pub queue: String,
}

impl Receipts {
    /// A queue of its own, bound to `exchange` with each of `bindings` (`#` for every receipt);
    /// with no binding, a queue to name as a job's `reply_to`.
    async fn bound(broker: &Broker, exchange: &str, bindings: &[&str]) -> Self {
        let channel = broker.conn.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare a server-named queue")
            .name()
            .to_string();
        for binding in bindings {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    (*binding).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind to the events exchange (declared by the worker)");
        }
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "receipts".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
        let schema = jsonschema::validator_for(&schema).expect("the schema is a valid schema");
        Self {
            channel,
            consumer,
            schema,
            queue,
        }
    }

    /// The next receipt: its routing key, properties and document, valid by the schema.
    async fn next(&mut self, timeout: Duration) -> (String, BasicProperties, Value) {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no receipt within {timeout:?}"))
            .expect("consumer open")
            .expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        let receipt: Value = serde_json::from_slice(&delivery.data).expect("a receipt is JSON");
        let errors: Vec<String> = self
            .schema
            .iter_errors(&receipt)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "receipt does not match schema/receipt.schema.json: {errors:?}\n{receipt:#}"
        );
        (
            delivery.routing_key.to_string(),
            delivery.properties,
            receipt,
        )
    }

    /// Asserts that no receipt arrives within `quiet` (a bounded negative check).
    async fn expect_none(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, self.consumer.next()).await {
            panic!(
                "unexpected receipt: {}",
                String::from_utf8_lossy(&delivery.data)
            );
        }
    }

    /// Every receipt until none arrives for `quiet`.
    async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, self.consumer.next()).await {
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(serde_json::from_slice(&delivery.data).expect("JSON"));
        }
        out
    }
}

fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("a string: {value}"))
}

/// Each recipient of a receipt: address → (status, smtp_code, enhanced_code).
fn statuses(receipt: &Value) -> BTreeMap<String, (String, Option<u64>, Option<String>)> {
    receipt["recipients"]
        .as_array()
        .expect("recipients")
        .iter()
        .map(|r| {
            (
                text(&r["address"]).to_string(),
                (
                    text(&r["status"]).to_string(),
                    r["smtp_code"].as_u64(),
                    r["enhanced_code"].as_str().map(str::to_string),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_recipients_answered_250_550_and_451_then_250_end_with_three_final_statuses() {
    let smtp = SmtpServer::start();
    smtp.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 no such user".into())).matching("gone@"),
    );
    smtp.add_rule(
        Rule::times(
            1,
            Cmd::Rcpt,
            Action::Reply(451, "4.2.0 mailbox busy".into()),
        )
        .matching("later@"),
    );
    let broker = Broker::new("receipts-three").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let mut events = Receipts::bound(&broker, &broker.names.events, &["#"]).await;
    let mut replies = Receipts::bound(&broker, &broker.names.events, &[]).await;

    let body = serde_json::json!({
        "id": "three-1",
        "to": ["ok@example.com", "gone@example.com"],
        "cc": "later@example.com",
        "subject": "Your password reset",
        "text": "the secret reset link",
        "metadata": {"tenant": "acme", "order": "A-77"},
        "tags": ["password-reset", "eu"],
    });
    broker
        .publish_with(
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_message_id("amqp-three-1".into())
                .with_correlation_id("corr-three-1".into())
                .with_reply_to(replies.queue.as_str().into()),
        )
        .await;

    let (key1, props1, first) = events.next(WAIT).await;
    let (key2, _, second) = events.next(WAIT).await;
    let messages = smtp.wait_for_messages(2, WAIT).await;

    // The first attempt: one delivered, one bounced, one deferred.
    assert_eq!(key1, "partly-delivered");
    assert_eq!(first["outcome"], "partly-delivered");
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["job_id"], "three-1");
    assert_eq!(first["message_id"], "<three-1@example.com>");
    assert_eq!(first["amqp_message_id"], "amqp-three-1");
    assert_eq!(first["correlation_id"], "corr-three-1");
    assert_eq!(first["receipt_version"], 1);
    let first_statuses = statuses(&first);
    assert_eq!(
        first_statuses,
        BTreeMap::from([
            (
                "ok@example.com".into(),
                ("delivered".into(), Some(250), Some("2.0.0".into()))
            ),
            (
                "gone@example.com".into(),
                ("bounced".into(), Some(550), Some("5.1.1".into()))
            ),
            (
                "later@example.com".into(),
                ("deferred".into(), Some(451), Some("4.2.0".into()))
            ),
        ]),
        "{first:#}"
    );
    let gone = first["recipients"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["address"] == "gone@example.com"))
        .expect("gone@ is in the receipt");
    assert!(text(&gone["reply"]).contains("no such user"), "{gone}");
    assert_eq!(first["relay"]["name"], format!("127.0.0.1:{}", smtp.port()));
    assert_eq!(first["relay"]["queue_id"], messages[0].queue_id.as_str());
    assert!(first["next_attempt_at"].is_string(), "{first:#}");
    assert_eq!(first["reason"]["kind"], "rejected");
    assert!(first["send_ms"].is_u64());
    assert_eq!(first["metadata"]["tenant"], "acme");
    assert_eq!(first["tags"], serde_json::json!(["password-reset", "eu"]));
    assert_eq!(
        props1.content_type().as_ref().map(|t| t.as_str()),
        Some("application/json")
    );
    assert_eq!(props1.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        props1.message_id().as_ref().map(|t| t.as_str()),
        first["receipt_id"].as_str()
    );

    // The retry: only the deferred recipient, now delivered.
    assert_eq!(key2, "delivered");
    assert_eq!(second["attempt"], 2);
    assert_eq!(
        statuses(&second),
        BTreeMap::from([(
            "later@example.com".into(),
            ("delivered".into(), Some(250), Some("2.0.0".into()))
        )])
    );
    assert_eq!(second["relay"]["queue_id"], messages[1].queue_id.as_str());
    assert_eq!(second["metadata"], first["metadata"]);
    assert_eq!(second["reason"], Value::Null);
    assert_eq!(second["next_attempt_at"], Value::Null);
    assert_ne!(first["receipt_id"], second["receipt_id"]);

    // Three final statuses across the receipts, one per recipient.
    let mut last: HashMap<String, String> = HashMap::new();
    for receipt in [&first, &second] {
        for (address, (status, _, _)) in statuses(receipt) {
            last.insert(address, status);
        }
    }
    assert_eq!(
        last,
        HashMap::from([
            ("ok@example.com".into(), "delivered".into()),
            ("gone@example.com".into(), "bounced".into()),
            ("later@example.com".into(), "delivered".into()),
        ])
    );

    // The same two receipts went to reply_to, with the job's correlation id.
    for expected in [&first, &second] {
        let (key, props, reply) = replies.next(WAIT).await;
        assert_eq!(
            key, replies.queue,
            "the default exchange, routed by queue name"
        );
        assert_eq!(reply["receipt_id"], expected["receipt_id"]);
        assert_eq!(
            props.correlation_id().as_ref().map(|c| c.as_str()),
            Some("corr-three-1")
        );
    }

    // Never in the mail: metadata and tags are the producer's, not the recipient's.
    for message in &messages {
        let data = String::from_utf8_lossy(&message.data);
        assert!(
            !data.contains("acme") && !data.contains("password-reset"),
            "{data}"
        );
    }
    // And never in a receipt: the subject and the body.
    for receipt in [&first, &second] {
        let json = receipt.to_string();
        assert!(!json.contains("Your password reset") && !json.contains("secret reset link"));
    }
    // A receipt reaches its queue before the broker's confirm reaches the worker, which
    // counts it then: wait for the count, then check it is not more.
    let metrics = &worker.handles.metrics;
    wait_until("both receipts are counted", WAIT, || {
        metric_sum(
            &metrics.encode(),
            "amqp_mailer_receipts_published_total",
            &[],
        ) >= 2.0
    })
    .await;
    let text = metrics.encode();
    assert_eq!(
        metric_sum(&text, "amqp_mailer_receipts_published_total", &[]),
        2.0,
        "{text}"
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_job_has_a_receipt_with_its_reason_and_the_ids_that_could_be_read() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("receipts-invalid").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    // A consumer that wants failures only: bound to `failed.#`, it never sees the delivered job.
    let mut failures = Receipts::bound(&broker, &broker.names.events, &["failed.#"]).await;
    let mut rx = worker.handles.events.subscribe();

    broker
        .publish(br#"{"id":"bad-1","to":"not an address","subject":"s","text":"t"}"#)
        .await;
    broker
        .publish_with(
            b"this is not JSON",
            BasicProperties::default().with_message_id("amqp-garbage".into()),
        )
        .await;
    broker
        .publish(job("good-1", "ann@example.com").as_bytes())
        .await;

    // Handled concurrently: in either order.
    let (key_a, _, a) = failures.next(WAIT).await;
    let (key_b, _, b) = failures.next(WAIT).await;
    assert_eq!(
        (key_a.as_str(), key_b.as_str()),
        ("failed.invalid", "failed.invalid")
    );
    let (bad, garbage) = if a["job_id"] == "bad-1" {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(bad["job_id"], "bad-1");
    assert_eq!(bad["reason"]["kind"], "invalid");
    assert!(text(&bad["reason"]["text"]).contains("to[0]"), "{bad:#}");
    assert_eq!(bad["recipients"], serde_json::json!([]));
    assert_eq!(bad["relay"], Value::Null);
    assert_eq!(bad["message_id"], Value::Null);

    assert_eq!(garbage["job_id"], Value::Null);
    assert_eq!(garbage["amqp_message_id"], "amqp-garbage");
    assert!(
        text(&garbage["reason"]["text"]).contains("not a valid JSON job"),
        "{garbage:#}"
    );

    wait_for_job(&mut rx, "good-1", WAIT).await;
    failures.expect_none(Duration::from_millis(500)).await;
    worker.stop().await.expect("clean stop");
}

/// How many of `queue`'s messages are delivered and not acked, from the broker itself.
fn unacked(queue: &str) -> u64 {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", "rabbit@localhost", "list_queues"])
        .args(["name", "messages_unacknowledged"])
        .output()
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl list_queues: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, count)| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("queue {queue} is not listed"))
}

/// Waits until the broker holds none of `queue`'s messages unacked. An ack has no reply: the
/// worker has sent it when it reports the job settled, and the broker may not have taken it yet.
async fn wait_all_acked(queue: &str) {
    wait_until(&format!("every message of {queue} acked"), WAIT, || {
        unacked(queue) == 0
    })
    .await;
}

/// Polls `condition` every 50 ms until it holds; panics after `timeout` with `what`.
async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A queue that refuses everything: the broker nacks every publish routed to it (x-overflow
/// reject-publish with room for none). Deleted at cleanup; returns its name.
async fn full_queue(broker: &Broker, suffix: &str) -> String {
    let full = format!("{}.{suffix}", broker.names.prefix);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .expect("declare the full queue");
    broker.also_delete([full.clone()]);
    full
}

/// A full queue bound to the events exchange: the broker nacks every receipt. Returns its name.
async fn refuse_receipts(broker: &Broker) -> String {
    let full = full_queue(broker, "full").await;
    broker
        .channel
        .queue_bind(
            full.as_str().into(),
            broker.names.events.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    full
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_the_broker_refuses_keeps_its_job_unacked_and_the_mail_is_sent_once() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("receipts-refused").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let mut events = Receipts::bound(&broker, &broker.names.events, &["#"]).await;
    let mut rx = worker.handles.events.subscribe();
    let full = refuse_receipts(&broker).await;

    broker
        .publish(job("refused-1", "ann@example.com").as_bytes())
        .await;
    smtp.wait_for_messages(1, WAIT).await;
    let metrics = &worker.handles.metrics;
    wait_until("the receipt is tried again", WAIT, || {
        metric_sum(&metrics.encode(), "amqp_mailer_receipts_retried_total", &[]) >= 2.0
    })
    .await;
    // Sent, and held: not acked, while its receipt is refused.
    assert_eq!(unacked(&broker.names.queue), 1, "the job waits unacked");
    assert!(rx.try_recv().is_err(), "the job is not settled yet");

    // The broker takes receipts again.
    broker
        .channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the full queue");
    let settled = wait_for_job(&mut rx, "refused-1", WAIT).await;
    assert_eq!(settled.outcome, JobOutcome::Delivered);
    // Acked once the receipt was confirmed.
    wait_all_acked(&broker.names.queue).await;

    // The copies a nacked publish still left in other queues all carry one receipt_id: a
    // consumer dedupes on it. The last one is the confirmed one.
    let (key, _, receipt) = events.next(WAIT).await;
    assert_eq!(key, "delivered");
    let mut copies = vec![receipt];
    copies.extend(events.drain(Duration::from_millis(300)).await);
    let ids: std::collections::HashSet<&str> =
        copies.iter().map(|r| text(&r["receipt_id"])).collect();
    assert_eq!(
        ids.len(),
        1,
        "one receipt, maybe in several copies: {copies:?}"
    );
    assert_eq!(smtp.messages().len(), 1, "the mail was sent once");
    assert_eq!(
        metric_sum(
            &metrics.encode(),
            "amqp_mailer_receipts_published_total",
            &[]
        ),
        1.0
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_sigkill_under_load_every_job_still_gets_its_final_receipt() {
    const JOBS: usize = 300;
    let smtp = SmtpServer::start();
    smtp.set_data_delay(Duration::from_millis(10));
    let broker = Broker::new("receipts-kill").await;
    let http = format!("127.0.0.1:{}", free_port());
    let env = || {
        [
            ("AMQP_MAILER_WORKER__CONCURRENCY", "16".to_string()),
            ("AMQP_MAILER_SMTP__FROM", "sender@example.com".to_string()),
            ("AMQP_MAILER_HTTP__LISTEN", http.clone()),
        ]
    };
    let mut first = WorkerProcess::run(&broker, smtp.port(), env());
    first.wait_for_log("consuming", WAIT).await;
    let mut receipts = Receipts::bound(&broker, &broker.names.events, &["#"]).await;
    for i in 0..JOBS {
        broker
            .publish(job(&format!("kill-{i}"), &format!("r{i}@example.com")).as_bytes())
            .await;
    }
    // Killed mid-flow, with jobs between their 250 and their receipt.
    smtp.wait_for_messages(JOBS / 3, WAIT).await;
    first.signal("KILL");
    first.wait_exit(WAIT).await;

    let mut second = WorkerProcess::run(&broker, smtp.port(), env());
    second.wait_for_log("consuming", WAIT).await;
    let mut delivered: HashMap<String, usize> = HashMap::new();
    while delivered.len() < JOBS {
        let (key, _, receipt) = receipts.next(WAIT).await;
        assert_eq!(key, "delivered", "{receipt:#}");
        *delivered
            .entry(text(&receipt["job_id"]).to_string())
            .or_default() += 1;
    }
    broker.wait_until_empty(&broker.names.queue, WAIT).await;
    wait_all_acked(&broker.names.queue).await;
    // A job the first worker sent, and published the receipt of, before it was killed unacked,
    // was sent again by the second, with a second receipt, which may come after the last job's
    // first. Every receipt was confirmed before its job's ack: all are in the queue by now.
    for receipt in receipts.drain(Duration::from_millis(500)).await {
        assert_eq!(receipt["outcome"], "delivered", "{receipt:#}");
        *delivered
            .entry(text(&receipt["job_id"]).to_string())
            .or_default() += 1;
    }

    // Mails sent twice are jobs the broker redelivered after the kill, which the second worker
    // counts; a job has at most one receipt per sending.
    let sent = smtp.deliveries();
    for (job_id, count) in &delivered {
        let sendings = sent
            .get(&format!("<{job_id}@example.com>"))
            .copied()
            .unwrap_or(0);
        assert!(
            *count <= sendings,
            "{job_id}: {count} receipts for {sendings} sendings"
        );
    }
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    let addr: std::net::SocketAddr = http.parse().expect("address");
    let metrics = amqp_mailer::http::check(addr, "/metrics")
        .await
        .expect("/metrics");
    let redelivered = metric_sum(&metrics, "amqp_mailer_jobs_redelivered_total", &[]);
    assert!(
        twice.len() as f64 <= redelivered,
        "{} mails sent twice, {redelivered} redeliveries counted: {twice:?}",
        twice.len()
    );
    assert!(sent.values().all(|n| *n <= 2), "{sent:?}");
    eprintln!(
        "kill -9 after {} of {JOBS} mails: {} sent twice, {redelivered} redeliveries counted",
        JOBS / 3,
        twice.len()
    );
    drop(receipts.channel);
    second.signal("TERM");
    second.wait_exit(WAIT).await;
}

/// `amqp-mailer events` as a child process: waits until it listens, then returns it with its
/// stdout lines.
async fn events_tool(
    broker: &Broker,
    args: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::AsyncBufReadExt as _;
    let mut command = tokio::process::Command::new(testkit::process::binary());
    command
        .arg("events")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    testkit::process::without_worker_env(&mut command);
    command.envs(testkit::process::broker_env(&broker.names));
    let mut child = command.spawn().expect("start amqp-mailer events");
    let stderr = child.stderr.take().expect("stderr");
    let mut stderr = tokio::io::BufReader::new(stderr).lines();
    let listening = tokio::time::timeout(WAIT, stderr.next_line())
        .await
        .expect("events says it listens in time")
        .expect("stderr")
        .expect("a line");
    assert!(listening.contains("listening for receipts"), "{listening}");
    let stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_tool_prints_receipts_filtered_by_outcome_and_job_id() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("receipts-tool").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let (mut failures, mut failure_lines) = events_tool(
        &broker,
        &["--json", "--outcome", "failed.#", "--count", "1"],
    )
    .await;
    let (mut one_job, mut job_lines) =
        events_tool(&broker, &["--job-id", "tool-2", "--count", "1"]).await;

    broker
        .publish(job("tool-1", "ann@example.com").as_bytes())
        .await;
    broker
        .publish(job("tool-2", "bob@example.com").as_bytes())
        .await;
    broker
        .publish(br#"{"id":"tool-3","to":"nobody","subject":"s","text":"t"}"#)
        .await;

    let line = tokio::time::timeout(WAIT, failure_lines.next_line())
        .await
        .expect("a failure in time")
        .expect("stdout")
        .expect("a line");
    let receipt: Value = serde_json::from_str(&line).expect("--json prints JSON");
    assert_eq!(receipt["outcome"], "failed.invalid");
    assert_eq!(receipt["job_id"], "tool-3");
    let line = tokio::time::timeout(WAIT, job_lines.next_line())
        .await
        .expect("tool-2's receipt in time")
        .expect("stdout")
        .expect("a line");
    assert!(
        line.contains(" delivered job=tool-2 attempt=1 | bob@example.com delivered 250 2.0.0"),
        "{line}"
    );
    // --count 1: each stops by itself after its one receipt.
    for child in [&mut failures, &mut one_job] {
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("exits after --count receipts")
            .expect("wait");
        assert!(status.success(), "{status}");
    }
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_tool_says_when_receipts_are_off() {
    let broker = Broker::new("receipts-tool-off").await;
    let mut env = testkit::process::broker_env(&broker.names);
    env.push(("AMQP_MAILER_AMQP__EVENTS_EXCHANGE", String::new()));
    let (status, _, stderr) = testkit::process::run_to_end(&["events"], &env).await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("amqp.events_exchange is empty"), "{stderr}");
    // And before the worker ever declared the exchange: a hint, exit 69.
    let (status, _, stderr) =
        testkit::process::run_to_end(&["events"], &testkit::process::broker_env(&broker.names))
            .await;
    assert_eq!(status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("the worker declares it when it starts"),
        "{stderr}"
    );
}

/// The README's example receipt is one the schema accepts.
#[test]
fn the_readme_example_receipt_matches_the_schema() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("```json\n{\n  \"receipt_version\"")
        .expect("the README shows a receipt")
        + "```json\n".len();
    let end = start + readme[start..].find("```").expect("the end of the example");
    let example: Value = serde_json::from_str(&readme[start..end]).expect("the example is JSON");
    let schema: Value = serde_json::from_str(SCHEMA).expect("JSON");
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    let errors: Vec<String> = validator
        .iter_errors(&example)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

/// Every permit held by a job whose receipt waits, and then the connection goes: the worker
/// must notice and reconnect although it has no permit to take a new delivery with, publish
/// the receipts once the broker takes them, and send nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_while_every_job_waits_for_its_receipt_is_noticed() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("receipts-cut").await;
    let proxy = testkit::proxy::Proxy::start("127.0.0.1:5672".parse().expect("address"));
    let mut config = test_config(&broker, smtp.port());
    config.amqp.url = amqp_mailer::config::Secret::new(
        testkit::broker::amqp_url().replace(":5672", &format!(":{}", proxy.port())),
    )
    .into();
    config.worker.concurrency = 2;
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = Receipts::bound(&broker, &broker.names.events, &["#"]).await;
    let mut rx = worker.handles.events.subscribe();
    let full = refuse_receipts(&broker).await;
    for i in 0..2 {
        broker
            .publish(job(&format!("cut-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    smtp.wait_for_messages(2, WAIT).await;
    let metrics = &worker.handles.metrics;
    wait_until("both receipts are tried again", WAIT, || {
        metric_sum(&metrics.encode(), "amqp_mailer_receipts_retried_total", &[]) >= 2.0
    })
    .await;

    proxy.cut_all();
    broker
        .channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the full queue");
    let mut ids = std::collections::HashSet::new();
    while ids.len() < 2 {
        let (key, _, receipt) = events.next(WAIT).await;
        assert_eq!(key, "delivered");
        ids.insert(text(&receipt["job_id"]).to_string());
    }
    // Their acks went with the connection: the broker redelivers both, and this worker, which
    // has their outcome, acks them without sending.
    let outcomes: Vec<JobOutcome> = testkit::worker::wait_events(&mut rx, 4, WAIT, |_| true)
        .await
        .into_iter()
        .map(|e| e.outcome)
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == JobOutcome::AlreadyHandled)
            .count(),
        2,
        "{outcomes:?}"
    );
    broker.wait_until_empty(&broker.names.queue, WAIT).await;
    wait_all_acked(&broker.names.queue).await;
    assert_eq!(smtp.messages().len(), 2, "each mail sent once");
    worker.stop().await.expect("clean stop");
}

/// A stop while receipts are refused: once the grace is over, each job is acked without its
/// receipt (given up, counted) rather than left for the broker to deliver again, which would
/// send the delivered one again and leave the deferred one twice, here and in its retry queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_receipts_are_refused_acks_the_jobs_without_them_and_sends_nothing_again() {
    let smtp = SmtpServer::start();
    smtp.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(451, "4.2.0 mailbox busy".into())).matching("later@"),
    );
    let broker = Broker::new("receipts-stop").await;
    let mut config = test_config(&broker, smtp.port());
    config.shutdown.grace = Duration::from_secs(1);
    // The deferred job waits in its retry queue for the rest of the test.
    config.retry.initial_delay = Duration::from_secs(600);
    config.retry.max_delay = Duration::from_secs(600);
    let retry_queue = testkit::worker::retry_queues(&config)
        .into_iter()
        .next()
        .expect("a retry queue");
    let worker = RunningWorker::start(&broker, config).await;
    let mut rx = worker.handles.events.subscribe();
    refuse_receipts(&broker).await;

    broker
        .publish(job("stop-sent", "ann@example.com").as_bytes())
        .await;
    broker
        .publish(job("stop-deferred", "later@example.com").as_bytes())
        .await;
    smtp.wait_for_messages(1, WAIT).await;
    let metrics = worker.handles.metrics.clone();
    // Both wait for their receipts: the deferred one republished (in its retry queue), both
    // unacked.
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.ready_count(&retry_queue).await < 1 || unacked(&broker.names.queue) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both jobs waiting for their receipts, not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await.expect("clean stop");

    let outcomes: Vec<_> = testkit::worker::wait_events(&mut rx, 2, WAIT, |_| true)
        .await
        .into_iter()
        .map(|e| (e.job_id.unwrap_or_default(), e.outcome))
        .collect();
    assert!(
        outcomes.contains(&("stop-sent".into(), JobOutcome::Delivered))
            && outcomes.contains(&("stop-deferred".into(), JobOutcome::Retried)),
        "{outcomes:?}"
    );
    // The worker's connections are closed: anything left unacked would be back in the queue.
    assert_eq!(
        broker.ready_count(&broker.names.queue).await,
        0,
        "none back"
    );
    assert_eq!(unacked(&broker.names.queue), 0);
    assert_eq!(
        broker.ready_count(&retry_queue).await,
        1,
        "the deferred job once, in its retry queue"
    );
    assert_eq!(smtp.messages().len(), 1, "the delivered mail was sent once");
    let text = metrics.encode();
    assert_eq!(
        metric_sum(
            &text,
            "amqp_mailer_receipts_dropped_total",
            &["reason=stop"]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "amqp_mailer_possible_duplicates_total", &[]),
        0.0,
        "{text}"
    );
}

/// A `reply_to` queue that refuses receipts (the producer's, full with `reject-publish`) does
/// not hold the job: its copy is dropped and counted; the events exchange still gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_queue_that_refuses_receipts_does_not_hold_the_job() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("receipts-replyfull").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let mut events = Receipts::bound(&broker, &broker.names.events, &["#"]).await;
    let mut rx = worker.handles.events.subscribe();
    let full = full_queue(&broker, "replyfull").await;

    broker
        .publish_with(
            job("replyfull-1", "ann@example.com").as_bytes(),
            BasicProperties::default().with_reply_to(full.as_str().into()),
        )
        .await;
    let settled = wait_for_job(&mut rx, "replyfull-1", WAIT).await;
    assert_eq!(settled.outcome, JobOutcome::Delivered);
    let (key, _, receipt) = events.next(WAIT).await;
    assert_eq!(key, "delivered");
    assert_eq!(receipt["job_id"], "replyfull-1");
    wait_all_acked(&broker.names.queue).await;
    let text = worker.handles.metrics.encode();
    assert_eq!(
        metric_sum(
            &text,
            "amqp_mailer_receipts_dropped_total",
            &["reason=reply-to-refused"]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "amqp_mailer_receipts_retried_total", &[]),
        0.0,
        "{text}"
    );
    worker.stop().await.expect("clean stop");
}

/// A `reply_to` naming the worker's own work queue: the receipt does not go there, where it
/// would be taken for a job and dead-lettered as invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_naming_the_work_queue_is_not_sent_receipts() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("receipts-replyown").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let mut events = Receipts::bound(&broker, &broker.names.events, &["#"]).await;
    let mut rx = worker.handles.events.subscribe();

    broker
        .publish_with(
            job("replyown-1", "ann@example.com").as_bytes(),
            BasicProperties::default().with_reply_to(broker.names.queue.as_str().into()),
        )
        .await;
    let (key, _, receipt) = events.next(WAIT).await;
    assert_eq!(key, "delivered");
    assert_eq!(receipt["job_id"], "replyown-1");
    wait_for_job(&mut rx, "replyown-1", WAIT).await;
    // Had the receipt gone to the work queue, the worker would take it for a job, and its
    // "failed.invalid" receipt would follow.
    events.expect_none(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "no second job");
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
    worker.stop().await.expect("clean stop");
}
