//! End to end on a real three-node RabbitMQ cluster (`.ci/rabbitmq-cluster`), the real binary,
//! quorum queues and the list of the three nodes in `amqp.url`: the worker's node is stopped or
//! killed while 1,000 jobs flow, and the worker must consume again through a surviving node
//! within 10 s, losing nothing, with duplicates bounded by the jobs in flight.
//!
//! The tests stop nodes of one shared cluster: they run one at a time (`SERIAL`), and each one
//! leaves the cluster whole (a stopped node is started again even when the test fails).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation};
use testkit::broker::{Broker, WAIT};
use testkit::cluster::{self, DownNode};
use testkit::metrics::metric;
use testkit::process::{WorkerProcess, free_port, worker_env};
use testkit::smtp::SmtpServer;
use testkit::worker::job;

/// The tests stop nodes of the one cluster: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const JOBS: usize = 1000;
/// The worker's concurrency and prefetch: the most jobs in flight at once.
const CONCURRENCY: usize = 16;
/// Delivered by the relay before the worker's node goes.
const MIDWAY: usize = 300;
/// The longest the worker may be without consuming.
const BACK_WITHIN: Duration = Duration::from_secs(10);

fn message_id(i: usize, test: &str) -> String {
    format!("<{test}-{i}@example.com>")
}

/// The worker on the cluster: quorum queues, the URL list in `order` (node numbers), the relay
/// on `smtp`, and `/metrics` and `/readyz` on the returned address.
fn start_worker(
    broker: &Broker,
    smtp: &SmtpServer,
    urls: &[String; 3],
    order: [usize; 3],
) -> (WorkerProcess, SocketAddr) {
    let names = &broker.names;
    broker.also_delete([format!("{}10s", names.retry_prefix)]);
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let list = order.map(|n| urls[n - 1].clone()).join(",");
    let mut env = worker_env(names, smtp.port());
    env.extend([
        ("AMQP_MAILER_AMQP__URL", list),
        ("AMQP_MAILER_AMQP__QUEUE_TYPE", "quorum".into()),
        ("AMQP_MAILER_WORKER__CONCURRENCY", CONCURRENCY.to_string()),
        ("AMQP_MAILER_SMTP__FROM", "cluster@example.com".into()),
        ("AMQP_MAILER_HTTP__LISTEN", http.to_string()),
    ]);
    (WorkerProcess::start(&["run"], &env), http)
}

/// Publishes `ids` through `broker` (one node) as a producer would: persistent, mandatory,
/// each confirmed; a nack (the queue's leader is being re-elected) is published again.
/// Returns how many nacks were seen.
async fn publish_all(broker: Arc<Broker>, test: &'static str, ids: std::ops::Range<usize>) -> u32 {
    let mut nacks = 0;
    for i in ids {
        let body = job(&format!("{test}-{i}"), "ann@example.com");
        let deadline = Instant::now() + WAIT;
        loop {
            let confirm = broker
                .channel
                .basic_publish(
                    broker.names.exchange.as_str().into(),
                    broker.names.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                )
                .await
                .expect("publish through the publisher's node");
            let confirmation = tokio::time::timeout(WAIT, confirm)
                .await
                .expect("a confirm within the wait")
                .expect("a confirm");
            match confirmation {
                Confirmation::Ack(None) => break,
                Confirmation::Nack(_) if Instant::now() < deadline => {
                    nacks += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("job {i} not accepted by the broker: {other:?}"),
            }
        }
    }
    nacks
}

/// The node (1..=3) that a "consuming" log line names.
fn node_in(line: &str, urls: &[String; 3]) -> Option<usize> {
    (1..=3).find(|&n| line.contains(&format!("127.0.0.1:{}", cluster::port_of(&urls[n - 1]))))
}

/// The seconds of the day of a log line (`2026-12-02T06:05:35.604876Z  WARN …`).
fn second_of_day(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let mut parts = time.trim_end_matches('Z').split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Each time the worker was without a consumer, by its own log: from "broker connection
/// lost" to the next "consuming again", by the timestamps of the lines.
fn outages(log: &[String]) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut lost = None;
    for line in log {
        if line.contains("broker connection lost") {
            lost = lost.or_else(|| second_of_day(line));
        } else if line.contains("consuming again")
            && let (Some(from), Some(to)) = (lost.take(), second_of_day(line))
        {
            let secs = if to >= from {
                to - from
            } else {
                to + 86_400.0 - from
            };
            out.push(Duration::from_secs_f64(secs));
        }
    }
    out
}

/// The longest time between two deliveries at the relay from `since` on.
fn longest_gap_since(smtp: &SmtpServer, since: Instant) -> Duration {
    let mut times: Vec<Instant> = smtp.messages().iter().map(|m| m.received_at).collect();
    times.sort();
    let mut gap = Duration::ZERO;
    let mut previous = since;
    for t in times.into_iter().filter(|t| *t >= since) {
        gap = gap.max(t - previous);
        previous = t;
    }
    gap
}

/// 1,000 jobs through node 3 while the worker consumes through node 1; after `MIDWAY`
/// deliveries node 1 goes (`command`: `stop-node` or `kill-node`). Node 1 also leads the queue
/// (it was declared through node 1).
async fn worker_node_lost_midway(test: &'static str, command: &'static str) {
    let _serial = SERIAL.lock().await;
    let urls = cluster::urls().await;
    let smtp = SmtpServer::start();
    smtp.set_data_delay(Duration::from_millis(2));
    let broker = Arc::new(Broker::on(test, &urls[2], urls.to_vec()).await);
    let (mut worker, http) = start_worker(&broker, &smtp, urls, [1, 2, 3]);
    let consuming = worker.wait_for_log("consuming", WAIT).await;
    assert_eq!(
        node_in(&consuming, urls),
        Some(1),
        "the worker consumes through node 1, the first of its list: {consuming}"
    );
    assert_eq!(
        amqp_mailer::http::check(http, "/readyz").await.as_deref(),
        Ok("ready")
    );

    let publisher = tokio::spawn(publish_all(broker.clone(), test, 0..JOBS));
    smtp.wait_for_messages(MIDWAY, WAIT).await;

    let delivered_before = smtp.messages().len();
    let lost_at = Instant::now();
    // The script runs while the worker's log is watched: the reconnection is seen when it
    // happens, not when the script returns.
    let taking_down = tokio::spawn(DownNode::take_down(command, 1));
    let again = worker
        .wait_for_log("reconnected; consuming again", BACK_WITHIN)
        .await;
    let back_after = lost_at.elapsed();
    let (down, script_took) = taking_down.await.expect("the cluster script");
    assert!(
        delivered_before < JOBS - CONCURRENCY,
        "node 1 went midway ({delivered_before} of {JOBS} delivered by then)"
    );
    let through = node_in(&again, urls);
    assert!(
        matches!(through, Some(2 | 3)),
        "consuming again through a surviving node: {again}"
    );
    assert_eq!(
        amqp_mailer::http::check(http, "/readyz").await.as_deref(),
        Ok("ready")
    );

    let nacks = tokio::time::timeout(WAIT * 2, publisher)
        .await
        .expect("the 1,000 jobs published in time")
        .expect("the publisher");
    smtp.wait_for(WAIT * 2, "every job delivered", |s| {
        let mut ids: Vec<_> = s
            .messages
            .iter()
            .filter_map(|m| m.header("Message-ID"))
            .collect();
        ids.sort();
        ids.dedup();
        ids.len() >= JOBS
    })
    .await;
    let gap = longest_gap_since(&smtp, lost_at - Duration::from_secs(1));
    let metrics = amqp_mailer::http::check(http, "/metrics")
        .await
        .expect("/metrics");
    worker.signal("TERM");
    let status = worker.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log().join("\n"));

    // Nothing lost, nothing else delivered.
    let seen = smtp.deliveries();
    let mut missing: Vec<String> = (0..JOBS)
        .map(|i| message_id(i, test))
        .filter(|id| !seen.contains_key(id))
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{} jobs lost: {missing:?}",
        missing.len()
    );
    assert_eq!(seen.len(), JOBS, "only the published jobs were delivered");
    // With the worker stopped nothing is unacked: what is not delivered would be ready here.
    assert_eq!(broker.ready_count(&broker.names.queue).await, 0);
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);

    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let possible = metric(&metrics, "amqp_mailer_possible_duplicates_total");
    let redelivered = metric(&metrics, "amqp_mailer_jobs_redelivered_total");
    assert!(
        duplicates <= CONCURRENCY,
        "{duplicates} duplicates, more than the {CONCURRENCY} jobs in flight"
    );
    assert!(
        duplicates as f64 <= redelivered,
        "{duplicates} duplicates, but only {redelivered} redelivered:\n{metrics}"
    );
    assert!(
        metric(&metrics, "amqp_mailer_broker_reconnects_total") >= 1.0,
        "{metrics}"
    );
    // Without a consumer: from the command (which counts the script's own `rabbitmqctl`
    // start-up before the node goes), and from the lost connection to consuming again, by the
    // worker's log. Without a delivery: a measure from the relay, which also counts the producer's
    // own stall while its node re-elects the queue's leader.
    // The log's outage starts only when the worker notices the loss: from the command too.
    let outages = outages(&worker.log());
    assert_eq!(outages.len(), 1, "one outage: {outages:?}");
    assert!(
        back_after < BACK_WITHIN && outages[0] < BACK_WITHIN && gap < BACK_WITHIN,
        "consuming again {back_after:?} after the command, {:?} after the lost connection; \
         {gap:?} without a delivery",
        outages[0]
    );

    let restart_took = down.start_again().await;
    eprintln!(
        "{test}: {command} 1 took {script_took:?}; consuming again through node {} after \
         {back_after:?} from the command, {:?} from the lost connection; longest time without a delivery {gap:?}; {duplicates} duplicates of \
         {JOBS} ({delivered_before} delivered when node 1 went; {redelivered} redelivered, {possible} possible duplicates); {nacks} publish \
         nacks; start-node 1 took {restart_took:?}",
        through.unwrap_or_default(),
        outages[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_node_stopped_gracefully_midway() {
    worker_node_lost_midway("stopped", "stop-node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_node_killed_midway() {
    worker_node_lost_midway("killed", "kill-node").await;
}
