//! End to end on a real three-node RabbitMQ cluster (`.ci/rabbitmq-cluster`), the real binary,
//! quorum queues and the list of the three nodes in `amqp.url`:
//! - the worker's node is stopped, killed or cut off from the other two while 1,000 jobs flow:
//!   the worker consumes again through a surviving node within 10 s, losing nothing, with
//!   duplicates bounded by the deliveries it could not ack;
//! - the three nodes are restarted in turn while jobs flow at a steady rate;
//! - the whole cluster is stopped for a minute: consuming again within 5 s of its return.
//!
//! The tests stop nodes of one shared cluster: they run one at a time (`SERIAL`), and each one
//! leaves the cluster whole (a stopped node is started again even when the test fails).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation};
use testkit::broker::{
    Broker, Names, Reader, WAIT, connect_to, reader_on, ready_count_on, wait_until_empty_on,
};
use testkit::cluster::{self, DownNode};
use testkit::metrics::metric;
use testkit::process::{WorkerProcess, free_port, worker_env};
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
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
    start_worker_with(broker, smtp, urls, order, [])
}

/// [`start_worker`] with `extra` settings.
fn start_worker_with(
    broker: &Broker,
    smtp: &SmtpServer,
    urls: &[String; 3],
    order: [usize; 3],
    extra: impl IntoIterator<Item = (&'static str, String)>,
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
    env.extend(extra);
    (WorkerProcess::start(&["run"], &env), http)
}

/// Publishes one job as a producer would: persistent, mandatory, to the work exchange; the
/// returned confirm is to be awaited.
async fn publish_job(
    channel: &lapin::Channel,
    names: &Names,
    body: &str,
) -> lapin::Result<lapin::PublisherConfirm> {
    channel
        .basic_publish(
            names.exchange.as_str().into(),
            names.routing_key.as_str().into(),
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
            let confirm = publish_job(&broker.channel, &broker.names, &body)
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

/// Jobs left in `queue` once the worker has stopped, with what the worker logged about each:
/// empty when nothing was left behind. (A job left there is one the worker took and never
/// settled.)
async fn left_behind(mut reader: Reader, log: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for delivery in reader.drain(Duration::from_millis(500)).await {
        let body = String::from_utf8_lossy(&delivery.data).into_owned();
        let id = body
            .split("\"id\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("?")
            .to_owned();
        let lines: Vec<&String> = log.iter().filter(|l| l.contains(&id)).collect();
        found.push(format!(
            "{id} (redelivered {}; headers {:?}): {lines:#?}",
            delivery.redelivered,
            delivery.properties.headers()
        ));
    }
    found
}

/// The worker's log says nothing was left unfinished when it stopped.
fn drained_cleanly(log: &[String]) {
    let forced: Vec<&String> = log.iter().filter(|l| l.contains("unfinished")).collect();
    assert!(forced.is_empty(), "the drain left jobs behind: {forced:#?}");
}

/// What a run came to, once every job was delivered and the worker had stopped.
struct Ending {
    /// Deliveries at the relay, by Message-ID.
    seen: HashMap<String, usize>,
    /// `/metrics` just before the stop, with nothing in flight.
    metrics: String,
    log: Vec<String>,
}

impl Ending {
    fn duplicates(&self) -> usize {
        self.seen.values().map(|n| n - 1).sum()
    }

    fn counter(&self, name: &str) -> f64 {
        metric(&self.metrics, &format!("amqp_mailer_{name}_total"))
    }

    /// Every duplicate is one the worker counted: a redelivery sent again rather than
    /// recognised (redelivered minus avoided), or a job the producer published twice. (An ack
    /// can be lost after it was written, so "possible duplicates" counts only acks that failed.)
    fn assert_duplicates_counted(&self, published_twice: usize) {
        let (redelivered, avoided) = (
            self.counter("jobs_redelivered"),
            self.counter("duplicates_avoided"),
        );
        let duplicates = self.duplicates();
        assert!(
            duplicates as f64 <= redelivered - avoided + published_twice as f64,
            "{duplicates} duplicates, but {redelivered} redelivered of which {avoided} avoided, \
             and {published_twice} published twice:\n{}",
            self.metrics
        );
    }

    /// The counters a test prints.
    fn counted(&self) -> String {
        format!(
            "{} duplicates ({} redelivered, {} possible duplicates, {} avoided)",
            self.duplicates(),
            self.counter("jobs_redelivered"),
            self.counter("possible_duplicates"),
            self.counter("duplicates_avoided")
        )
    }
}

/// The end of every cluster test: waits until the relay has the `jobs` jobs of `test`, the work
/// queue is empty and nothing is in flight; stops the worker (exit 0, nothing left unfinished);
/// then checks that no job was lost, none other delivered, and nothing left in the work queue or
/// the dead-letter queue. `conn` reaches a node that is up.
async fn finish(
    worker: &mut WorkerProcess,
    http: SocketAddr,
    smtp: &SmtpServer,
    conn: &lapin::Connection,
    names: &Names,
    test: &str,
    jobs: usize,
) -> Ending {
    smtp.wait_for_distinct(jobs, WAIT * 2).await;
    wait_until_empty_on(conn, &names.queue, WAIT).await;
    let metrics = wait_idle(http).await;
    worker.signal("TERM");
    let status = worker.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log().join("\n"));
    let log = worker.log();
    drained_cleanly(&log);

    let seen = smtp.deliveries();
    let mut missing: Vec<String> = (0..jobs)
        .map(|i| message_id(i, test))
        .filter(|id| !seen.contains_key(id))
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{} jobs lost: {missing:?}",
        missing.len()
    );
    assert_eq!(seen.len(), jobs, "only the published jobs were delivered");
    // With the worker stopped nothing is unacked: what is not delivered would be ready here.
    let left = left_behind(reader_on(conn, &names.queue).await, &log).await;
    assert!(left.is_empty(), "left in the work queue: {left:#?}");
    assert_eq!(ready_count_on(conn, &names.dead).await, 0);
    Ending { seen, metrics, log }
}

/// 1,000 jobs through node 3 while the worker consumes through node 1; after `MIDWAY`
/// deliveries node 1 goes (`command`: `stop-node`, `kill-node` or `partition`). Node 1 also
/// leads the queue (it was declared through node 1).
async fn worker_node_lost_midway(test: &'static str, command: &'static str) {
    let _serial = SERIAL.lock().await;
    let urls = cluster::all_up().await;
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
    // Waited for longer than BACK_WITHIN: the script's own start-up (an Erlang VM for
    // rabbitmqctl) can take seconds on a loaded machine before the node goes at all; the bound
    // is checked below from the moment the script has done its work.
    let taking_down = tokio::spawn(DownNode::take_down(command, 1));
    let again = worker
        .wait_for_log("reconnected; consuming again", WAIT)
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
    let gap = longest_gap_since(&smtp, lost_at - Duration::from_secs(1));
    let end = finish(
        &mut worker,
        http,
        &smtp,
        &broker.conn,
        &broker.names,
        test,
        JOBS,
    )
    .await;
    // Every line about a redelivery names its job.
    let unnamed: Vec<&String> = end
        .log
        .iter()
        .filter(|l| l.contains("redelivered") && !l.contains(&format!("job_id=\"{test}-")))
        .collect();
    assert!(
        unnamed.is_empty(),
        "redeliveries logged without their job: {unnamed:#?}"
    );
    assert!(
        end.duplicates() <= CONCURRENCY,
        "{} duplicates, more than the {CONCURRENCY} jobs in flight",
        end.duplicates()
    );
    end.assert_duplicates_counted(nacks as usize);
    assert!(end.counter("broker_reconnects") >= 1.0, "{}", end.metrics);
    // Without a consumer: from the command (which counts the script's own `rabbitmqctl`
    // start-up before the node goes), and from the lost connection to consuming again, by the
    // worker's log. Without a delivery: a measure from the relay, which also counts the producer's
    // own stall while its node re-elects the queue's leader, and, for a partition, the broker's
    // own time to notice it and pause the minority node (the worker can only move once its node
    // closes the connection): bounded from the end of the script, as `back_after` is. Seen on a
    // loaded machine: a partition script of 11.8 s, no delivery for 11.5 s, and the worker
    // consuming again 0.19 s after its node closed the connection.
    // The log's outage starts only when the worker notices the loss: from the command too.
    let outages = outages(&end.log);
    assert_eq!(outages.len(), 1, "one outage: {outages:?}");
    assert!(
        back_after < script_took + BACK_WITHIN
            && outages[0] < BACK_WITHIN
            && gap < script_took + BACK_WITHIN,
        "consuming again {back_after:?} after the command (which took {script_took:?}), {:?} \
         after the lost connection; {gap:?} without a delivery",
        outages[0]
    );

    let restart_took = down.start_again().await;
    eprintln!(
        "{test}: {command} 1 took {script_took:?}; consuming again through node {} after \
         {back_after:?} from the command, {:?} from the lost connection; longest time without \
         a delivery {gap:?}; {} of {JOBS} ({delivered_before} delivered when node 1 went); \
         {nacks} publish nacks; undoing it took {restart_took:?}",
        through.unwrap_or_default(),
        outages[0],
        end.counted()
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

/// With `pause_minority`, a node cut off from the other two pauses and closes its clients'
/// connections: the worker goes on through the majority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_node_partitioned_from_the_majority_midway() {
    worker_node_lost_midway("partitioned", "partition").await;
}

/// `/metrics` once the worker has nothing in flight (every delivery settled, every permit
/// back): the in-flight gauge and the drain must agree.
async fn wait_idle(http: SocketAddr) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = amqp_mailer::http::check(http, "/metrics")
            .await
            .expect("/metrics");
        if metric(&text, "amqp_mailer_jobs_in_flight") == 0.0 {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "jobs still in flight with nothing left to do:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A producer that outlives node restarts: publishes `{test}-{i}` one every `every` until
/// `stop` says so, through the first node of `urls` that answers, moving on to the next node
/// when its own is lost and publishing again whatever was not confirmed. Returns how many jobs
/// it published and how many it had to publish again (each a possible duplicate at the broker).
async fn steady_publisher(
    urls: &'static [String; 3],
    names: testkit::broker::Names,
    test: &'static str,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (usize, usize) {
    let mut published = 0;
    let mut again = 0;
    let mut node = 2; // node 3 first: the worker starts on node 1
    let mut channel: Option<(lapin::Connection, lapin::Channel)> = None;
    let mut tick = tokio::time::interval(every);
    let deadline = Instant::now() + Duration::from_secs(150);
    while !*stop.borrow() {
        tick.tick().await;
        let body = job(&format!("{test}-{published}"), "ann@example.com");
        loop {
            assert!(
                Instant::now() < deadline,
                "the publisher could not publish job {published} through any node"
            );
            if channel.is_none() {
                let url = &urls[node % 3];
                node += 1;
                let opened = async {
                    let conn =
                        lapin::Connection::connect(url, lapin::ConnectionProperties::default())
                            .await?;
                    let ch = conn.create_channel().await?;
                    ch.confirm_select(Default::default()).await?;
                    Ok::<_, lapin::Error>((conn, ch))
                };
                match tokio::time::timeout(Duration::from_secs(5), opened).await {
                    Ok(Ok(c)) => channel = Some(c),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let Some((_, ch)) = &channel else { continue };
            let sent = async { publish_job(ch, &names, &body).await?.await };
            match tokio::time::timeout(Duration::from_secs(10), sent).await {
                Ok(Ok(Confirmation::Ack(None))) => break,
                // The queue's leader is being re-elected: the broker did not take the job.
                Ok(Ok(Confirmation::Nack(_))) => {
                    again += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Ok(other)) => panic!("job {published} not accepted: {other:?}"),
                _ => {
                    // The node went (or the confirm did not come): publish again elsewhere.
                    again += 1;
                    channel = None;
                }
            }
        }
        published += 1;
    }
    (published, again)
}

/// Every node restarted in turn (`restart-node 1`, 2, 3) while jobs flow at a steady rate:
/// none lost, and the worker never without a consumer for more than 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_the_three_nodes_loses_nothing() {
    const TEST: &str = "rolling";
    let _serial = SERIAL.lock().await;
    let urls = cluster::all_up().await;
    let smtp = SmtpServer::start();
    smtp.set_data_delay(Duration::from_millis(2));
    let broker = Broker::on(TEST, &urls[2], urls.to_vec()).await;
    let (mut worker, http) = start_worker(&broker, &smtp, urls, [1, 2, 3]);
    worker.wait_for_log("consuming", WAIT).await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(steady_publisher(
        urls,
        broker.names.clone(),
        TEST,
        Duration::from_millis(25),
        stopped,
    ));
    smtp.wait_for_messages(100, WAIT).await;
    let began = Instant::now();
    let mut took = Vec::new();
    for n in 1..=3 {
        // If the script fails half-way, the guard starts the node again.
        let (down, stop_took) = DownNode::take_down("stop-node", n).await;
        let start_took = down.start_again().await;
        took.push((n, stop_took, start_took));
    }
    // A few more seconds of jobs through the whole cluster, then the producer stops.
    let settled = smtp.messages().len();
    smtp.wait_for_messages(settled + 100, WAIT).await;
    let _ = stop.send(true);
    let (published, republished) = tokio::time::timeout(WAIT, publisher)
        .await
        .expect("the publisher stops")
        .expect("the publisher");

    let gap = longest_gap_since(&smtp, began);
    // The broker's own connection went with node 3: a new one, to the node restarted first.
    let conn = connect_to(&urls[0]).await;
    let end = finish(
        &mut worker,
        http,
        &smtp,
        &conn,
        &broker.names,
        TEST,
        published,
    )
    .await;
    let _ = conn.close(200, "bye".into()).await;
    let outages = outages(&end.log);
    assert!(
        outages.len() >= 3,
        "the worker moved at least once per restart (its node was restarted each time): \
         {outages:?}"
    );
    assert!(
        outages.iter().all(|o| *o < BACK_WITHIN) && gap < BACK_WITHIN,
        "without a consumer for {outages:?}; {gap:?} without a delivery while jobs flowed"
    );
    // Each node loss may repeat at most the jobs then in flight; each job the producer had to
    // publish again may be at the broker twice.
    assert!(
        end.duplicates() <= 3 * CONCURRENCY + republished,
        "{} duplicates: more than 3 × {CONCURRENCY} in flight + {republished} published again",
        end.duplicates()
    );
    end.assert_duplicates_counted(republished);
    eprintln!(
        "{TEST}: {published} jobs at 40/s, {republished} published again by the producer; \
         restarts (node, stop, start) {took:?}; without a consumer {outages:?}; longest time \
         without a delivery {gap:?}; {}; {} reconnects",
        end.counted(),
        end.counter("broker_reconnects")
    );
}

/// Whether a majority of the nodes of `urls` complete an AMQP handshake now: a cluster of
/// quorum queues serves its queues again only once a majority of its nodes is up.
async fn majority_accepts(urls: &[String; 3]) -> bool {
    let mut up = 0;
    for url in urls {
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
        )
        .await;
        if let Ok(Ok(conn)) = attempt {
            let _ = conn.close(200, "probe".into()).await;
            up += 1;
        }
    }
    up * 2 > urls.len()
}

/// The three nodes stopped together for a minute and started again (the cluster comes back
/// from the node that stopped last): while no node answers `/readyz` is 503 and the log says so
/// once; the worker consumes again within 5 s of a majority of the nodes accepting connections
/// (before that, no quorum queue can be served), and every
/// job, those queued before the stop included, is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_stopped_for_a_minute_consumes_within_5_s_of_its_return() {
    const TEST: &str = "wholestop";
    const JOBS: usize = 800;
    const OUTAGE: Duration = Duration::from_secs(60);
    const BACK: Duration = Duration::from_secs(5);
    let _serial = SERIAL.lock().await;
    let urls = cluster::all_up().await;
    let smtp = SmtpServer::start();
    // Slow enough that most jobs are still queued when the cluster goes.
    smtp.set_data_delay(Duration::from_millis(500));
    let broker = Arc::new(Broker::on(TEST, &urls[2], urls.to_vec()).await);
    let (mut worker, http) = start_worker(&broker, &smtp, urls, [1, 2, 3]);
    worker.wait_for_log("consuming", WAIT).await;
    let nacks = publish_all(broker.clone(), TEST, 0..JOBS).await;
    smtp.wait_for_messages(50, WAIT).await;

    let (down, stop_took) = DownNode::take_down_all("stop-node", &[1, 2, 3]).await;
    // The nodes stop one after the other: the worker may move to a node that is still up and
    // lose that one too. The outage without any node starts now.
    let log_at_stop = worker.log().len();
    let delivered_before = smtp.deliveries().len();
    assert!(
        delivered_before < JOBS - CONCURRENCY,
        "the cluster went with jobs queued ({delivered_before} of {JOBS} delivered)"
    );
    worker.wait_for_log("broker connection lost", WAIT).await;
    assert_eq!(
        amqp_mailer::http::check(http, "/readyz").await.ok(),
        None,
        "/readyz fails while no node answers"
    );
    // The outage itself is the scenario: a minute without any node.
    tokio::time::sleep(OUTAGE).await;
    assert_eq!(amqp_mailer::http::check(http, "/readyz").await.ok(), None);

    let starting = tokio::spawn(down.start_again());
    // The moment the cluster accepts connections again, from outside the worker: a majority
    // of its nodes.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !majority_accepts(urls).await {
        assert!(Instant::now() < deadline, "the cluster did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepting = Instant::now();
    let again = worker
        .wait_for_log("reconnected; consuming again", BACK + WAIT)
        .await;
    let back_after = accepting.elapsed();
    let start_took = starting.await.expect("the cluster script");

    // The broker's own connection went with node 3.
    let conn = connect_to(&urls[0]).await;
    let end = finish(&mut worker, http, &smtp, &conn, &broker.names, TEST, JOBS).await;
    let _ = conn.close(200, "bye".into()).await;

    let warnings = end.log[log_at_stop..]
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("broker connection lost"))
        .count();
    assert!(
        warnings <= 1,
        "at most one warning for the minute without any node:\n{}",
        end.log[log_at_stop..].join("\n")
    );
    end.assert_duplicates_counted(nacks as usize);
    assert!(
        back_after < BACK,
        "consuming again {back_after:?} after a majority of the nodes accepted connections: {again}"
    );
    eprintln!(
        "{TEST}: stop-node 1 2 3 took {stop_took:?}, start-node 1 2 3 {start_took:?}; consuming \
         again {back_after:?} after a majority accepted connections, through node {}; \
         {delivered_before} of {JOBS} delivered before the stop; {}",
        node_in(&again, urls).unwrap_or_default(),
        end.counted()
    );
}

/// A memory alarm on node 1, which blocks publishing on the whole cluster; lifted when dropped
/// (the test ended, or failed).
struct MemoryAlarm;

impl MemoryAlarm {
    fn set_watermark(value: &str) {
        let output = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "-n",
                "hare1@localhost",
                "set_vm_memory_high_watermark",
            ])
            .args(value.split(' '))
            .output()
            .expect("run rabbitmqctl");
        assert!(
            output.status.success(),
            "rabbitmqctl set_vm_memory_high_watermark {value}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Sets the alarm, and returns once a connection that publishes is blocked by it.
    async fn raise(probe: &lapin::Connection) -> Self {
        tokio::task::spawn_blocking(|| Self::set_watermark("absolute 1"))
            .await
            .expect("rabbitmqctl");
        let alarm = Self;
        // The broker raises the alarm at its memory monitor's next check, and blocks a
        // connection when it next publishes: publish until the probe is told it is blocked.
        let channel = probe.create_channel().await.expect("probe channel");
        let mut events = probe.events_listener();
        let deadline = Instant::now() + WAIT;
        loop {
            let _ = channel
                .basic_publish(
                    "".into(),
                    "amqp-mailer.test.nowhere".into(),
                    BasicPublishOptions::default(),
                    b"probe",
                    BasicProperties::default(),
                )
                .await;
            let blocked = tokio::time::timeout(Duration::from_millis(500), async {
                while let Some(event) = futures_util::StreamExt::next(&mut events).await {
                    if matches!(event, lapin::Event::ConnectionBlocked(_)) {
                        return true;
                    }
                }
                false
            })
            .await;
            if blocked == Ok(true) {
                return alarm;
            }
            assert!(
                Instant::now() < deadline,
                "the memory alarm did not block publishing within {WAIT:?}"
            );
        }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        // From a thread of its own: this may run inside a runtime, during a panic.
        let _ = std::thread::spawn(|| Self::set_watermark("0.4")).join();
    }
}

/// The broker blocks publishing (a memory alarm) while every job in flight needs a retry: the
/// worker waits for the confirms as long as the broker says it is blocked, well past
/// `amqp.publish_timeout`, says so once in the log, in `/readyz` and in a metric, and hands no
/// job back; when the alarm is lifted the retries land and each job is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_blocks_publishing_holds_retries_without_sending_twice() {
    const JOBS: usize = CONCURRENCY;
    const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
    let _serial = SERIAL.lock().await;
    let test = "blocked";
    let urls = cluster::all_up().await;
    let smtp = SmtpServer::start();
    // Every job's first attempt is deferred: each one needs a retry publish.
    smtp.add_rule(Rule::times(
        JOBS,
        Cmd::DataEnd,
        Action::Reply(451, "4.3.0 try later".into()),
    ));
    let broker = Arc::new(Broker::on(test, &urls[1], urls.to_vec()).await);
    let extra = || {
        [(
            "AMQP_MAILER_AMQP__PUBLISH_TIMEOUT",
            format!("{}s", PUBLISH_TIMEOUT.as_secs()),
        )]
    };
    // A first worker declares the topology, and stops: the jobs wait in the queue meanwhile.
    let (mut first, _) = start_worker_with(&broker, &smtp, urls, [1, 2, 3], extra());
    first.wait_for_log("consuming", WAIT).await;
    first.signal("TERM");
    assert_eq!(first.wait_exit(WAIT).await.code(), Some(0));
    publish_all(broker.clone(), test, 0..JOBS).await;

    let probe = connect_to(&urls[1]).await;
    let alarm = MemoryAlarm::raise(&probe).await;
    let (mut worker, http) = start_worker_with(&broker, &smtp, urls, [1, 2, 3], extra());
    worker
        .wait_for_log("the broker blocks publishing", WAIT)
        .await;
    smtp.wait_until(WAIT, |s| s.data_commands() >= JOBS).await;
    let readiness = amqp_mailer::http::check(http, "/readyz").await;
    assert!(
        readiness
            .as_ref()
            .is_err_and(|e| e.starts_with("503") && e.contains("the broker blocks publishing")),
        "{readiness:?}"
    );
    let metrics = amqp_mailer::http::check(http, "/metrics")
        .await
        .expect("/metrics");
    assert_eq!(
        metric(&metrics, "amqp_mailer_broker_blocked"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "amqp_mailer_jobs_in_flight"),
        JOBS as f64,
        "every job waits for its retry's confirm, none handed back:\n{metrics}"
    );
    // The scenario itself: the alarm outlasts the publish timeout twice over, which a worker
    // that took a missing confirm for a failure would not survive without handing jobs back.
    tokio::time::sleep(PUBLISH_TIMEOUT * 2).await;
    drop(alarm);
    worker
        .wait_for_log("the broker accepts publishing again", WAIT)
        .await;

    let conn = connect_to(&urls[1]).await;
    let ending = finish(&mut worker, http, &smtp, &conn, &broker.names, test, JOBS).await;
    assert_eq!(
        ending.duplicates(),
        0,
        "no job sent twice: {}:\n{}",
        ending.counted(),
        ending.log.join("\n")
    );
    let warned = ending
        .log
        .iter()
        .filter(|l| l.contains("the broker blocks publishing"))
        .count();
    assert_eq!(warned, 1, "said once:\n{}", ending.log.join("\n"));
    assert!(
        !ending
            .log
            .iter()
            .any(|l| l.contains("no confirm from the broker")),
        "no publish taken as failed:\n{}",
        ending.log.join("\n")
    );
}
