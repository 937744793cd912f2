//! Lifecycle and resilience: drain on stop, broker loss, relay trouble, health, metrics, systemd.
//! Faults are injected with TCP proxies owned by each test, so other tests on the broker are
//! not disturbed. Every scenario accounts for every job: delivered or dead-lettered or back in
//! the queue, none lost, duplicates counted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use amqp_mailer::pipeline::JobOutcome;
use amqp_mailer::status::Phase;
use testkit::broker::{Broker, WAIT, amqp_url};
use testkit::metrics::{metric, metric_sum};
use testkit::process::{WorkerProcess, free_port};
use testkit::proxy::Proxy;
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use testkit::worker::{RunningWorker, job, retry_queues, test_config, wait_events};

fn broker_addr() -> SocketAddr {
    "127.0.0.1:5672".parse().expect("address")
}

/// The test broker's URL, but through `proxy`.
fn url_via(proxy: &Proxy) -> String {
    amqp_url().replace(":5672", &format!(":{}", proxy.port()))
}

async fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    amqp_mailer::http::check(addr, path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_100_jobs_in_flight_drains_them_and_exits_0() {
    let smtp = SmtpServer::start();
    smtp.set_data_delay(Duration::from_millis(1500));
    let broker = Broker::new("sigterm").await;
    let names = broker.names.clone();
    let mut worker = WorkerProcess::run(
        &broker,
        smtp.port(),
        [
            ("AMQP_MAILER_WORKER__CONCURRENCY", "100".into()),
            ("AMQP_MAILER_SMTP__FROM", "drain@example.com".into()),
        ],
    );
    worker.wait_for_log("consuming", WAIT).await;
    for i in 0..150 {
        broker
            .publish(job(&format!("drain-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    // 100 messages are with the slow relay (prefetch 100), 50 wait in the queue.
    smtp.wait_for(WAIT, "100 messages in flight", |s| s.data_commands() >= 100)
        .await;
    worker.signal("TERM");
    let status = worker.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log().join("\n"));

    let delivered = smtp.deliveries();
    assert_eq!(delivered.len(), 100, "the 100 in flight finished");
    assert!(delivered.values().all(|&n| n == 1), "no duplicates");
    // The other 50 were never started: all of them are back in the queue, ready.
    let mut reader = broker.reader(&names.queue).await;
    let mut back = Vec::new();
    for _ in 0..50 {
        back.push(String::from_utf8(reader.next(WAIT).await.data).expect("utf-8"));
    }
    reader.expect_nothing(Duration::from_millis(300)).await;
    for body in &back {
        let id: serde_json::Value = serde_json::from_str(body).expect("json");
        let id = id["id"].as_str().expect("id");
        assert!(
            !delivered.contains_key(&format!("<{id}@example.com>")),
            "{id} both delivered and back"
        );
    }
    assert_eq!(broker.ready_count(&names.dead).await, 0);
    let log = worker.log().join("\n");
    assert!(
        log.contains("finishing the jobs in flight") && log.contains("stopped"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_stops_at_once_and_unfinished_jobs_go_back_to_the_queue() {
    let smtp = SmtpServer::start();
    smtp.add_rule(Rule::always(Cmd::DataEnd, Action::Stall));
    let broker = Broker::new("twosignals").await;
    let names = broker.names.clone();
    let mut worker = WorkerProcess::run(
        &broker,
        smtp.port(),
        [
            ("AMQP_MAILER_WORKER__CONCURRENCY", "10".into()),
            ("AMQP_MAILER_SMTP__TIMEOUT", "60s".into()),
            ("AMQP_MAILER_SMTP__FROM", "drain@example.com".into()),
            ("AMQP_MAILER_SHUTDOWN__GRACE", "60s".into()),
        ],
    );
    worker.wait_for_log("consuming", WAIT).await;
    for i in 0..10 {
        broker
            .publish(job(&format!("stuck-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    smtp.wait_for(WAIT, "10 stalled sends", |s| s.data_commands() >= 10)
        .await;
    let stopping = Instant::now();
    worker.signal("TERM");
    worker
        .wait_for_log("finishing the jobs in flight", WAIT)
        .await;
    worker.signal("TERM");
    let status = worker.wait_exit(WAIT).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "stopped at once, not after the 60 s grace ({:?})",
        stopping.elapsed()
    );
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log().join("\n"));
    assert!(smtp.messages().is_empty(), "the relay accepted nothing");
    let mut reader = broker.reader(&names.queue).await;
    let mut back = Vec::new();
    for _ in 0..10 {
        let delivery = reader.next(WAIT).await;
        assert!(delivery.redelivered, "handed back unacked");
        back.push(delivery.data);
    }
    back.sort();
    back.dedup();
    assert_eq!(back.len(), 10, "all ten jobs are back, each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_unfinished_after_the_grace_period_go_back_and_waiting_ones_are_not_sent() {
    let smtp = SmtpServer::start();
    // Each session waits 3 s for its greeting: past the 1 s grace, before anything is sent.
    smtp.add_rule(Rule::always(
        Cmd::Connect,
        Action::Delay(Duration::from_secs(3)),
    ));
    let broker = Broker::new("grace").await;
    let mut config = test_config(&broker, smtp.port());
    config.shutdown.grace = Duration::from_secs(1);
    config.smtp.timeout = Duration::from_secs(10);
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    for i in 0..4 {
        broker
            .publish(job(&format!("late-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    smtp.wait_for(WAIT, "4 sessions waiting for their greeting", |s| {
        s.open_sessions >= 4
    })
    .await;
    let started = Instant::now();
    worker.stop().await.expect("clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stopped after the grace, {:?}",
        started.elapsed()
    );
    let abandoned = wait_events(&mut events, 4, WAIT, |e| e.outcome == JobOutcome::Abandoned).await;
    assert_eq!(abandoned.len(), 4);
    let mut reader = broker.reader(&broker.names.queue).await;
    for _ in 0..4 {
        reader.next(WAIT).await;
    }
    // Give the delayed greetings time to come: nothing may be sent after the stop.
    smtp.wait_until(Duration::from_secs(4), |s| !s.messages.is_empty())
        .await;
    assert!(smtp.messages().is_empty(), "abandoned jobs were not sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_cut_mid_stream_resumes_within_seconds_and_delivers_all() {
    let smtp = SmtpServer::start();
    smtp.set_data_delay(Duration::from_millis(20));
    let broker = Broker::new("cut").await;
    let proxy = Proxy::start(broker_addr());
    let mut config = test_config(&broker, smtp.port());
    config.amqp.url = amqp_mailer::config::Secret::new(url_via(&proxy)).into();
    config.worker.concurrency = 8;
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.http.listen = Some(http);
    let worker = RunningWorker::start(&broker, config).await;
    assert_eq!(get(http, "/readyz").await.as_deref(), Ok("ready"));

    for i in 0..200 {
        broker
            .publish(job(&format!("cut-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    smtp.wait_for_messages(50, WAIT).await;
    // Cut, and keep the broker unreachable until readiness has been seen to drop.
    proxy.set_refusing(true).await;
    proxy.cut_all();
    let cut_at = Instant::now();
    worker.wait_for_phase(Phase::Reconnecting, WAIT).await;
    let not_ready = get(http, "/readyz").await.expect_err("not ready while cut");
    assert!(
        not_ready.starts_with("503") && not_ready.contains("reconnecting"),
        "{not_ready}"
    );
    proxy.set_refusing(false).await;
    worker.wait_for_phase(Phase::Consuming, WAIT).await;
    assert!(
        cut_at.elapsed() < Duration::from_secs(10),
        "resumed after {:?}",
        cut_at.elapsed()
    );
    assert_eq!(get(http, "/readyz").await.as_deref(), Ok("ready"));

    smtp.wait_for_distinct(200, WAIT).await;
    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    let seen = smtp.deliveries();
    assert_eq!(seen.len(), 200, "every job delivered");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let text = metrics.encode();
    // Every duplicate is a job the broker redelivered because its ack could not be given.
    let possible = metric(&text, "amqp_mailer_possible_duplicates_total");
    let redelivered = metric(&text, "amqp_mailer_jobs_redelivered_total");
    assert!(
        duplicates as f64 <= redelivered,
        "{duplicates} duplicates, but only {redelivered} redelivered:\n{text}"
    );
    assert!(
        metric(&text, "amqp_mailer_broker_reconnects_total") >= 1.0,
        "{text}"
    );
    assert_eq!(broker.ready_count(&broker.names.queue).await, 0);
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
    eprintln!(
        "broker cut: {duplicates} duplicates of 200 ({possible} acks lost, {redelivered} redelivered)"
    );
}

/// `amqp.url` as a list: the worker connects to the first broker that answers (here the second:
/// nothing listens on the first), and when that node is lost it moves on to the next one and
/// consumes again within seconds. Each "node" is a proxy to the test broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_list_moves_on_to_the_next_node_when_its_node_is_lost() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("brokerlist").await;
    let nowhere = amqp_url().replace(":5672", &format!(":{}", free_port()));
    let (a, b) = (Proxy::start(broker_addr()), Proxy::start(broker_addr()));
    let mut config = test_config(&broker, smtp.port());
    config.amqp.url = amqp_mailer::config::BrokerUrls::new(
        [nowhere, url_via(&a), url_via(&b)].map(amqp_mailer::config::Secret::new),
    );
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    assert_eq!(
        (a.open_connections(), b.open_connections()),
        (2, 0),
        "both connections to the first broker that answers"
    );
    broker
        .publish(job("list-1", "ann@example.com").as_bytes())
        .await;
    wait_events(&mut events, 1, WAIT, |e| e.outcome == JobOutcome::Delivered).await;

    a.set_refusing(true).await;
    a.cut_all();
    let lost = Instant::now();
    assert!(
        b.wait_until(WAIT, |s| s.open_connections >= 2).await,
        "moved on to the next node"
    );
    worker.wait_for_phase(Phase::Consuming, WAIT).await;
    assert!(
        lost.elapsed() < Duration::from_secs(5),
        "consuming again after {:?}",
        lost.elapsed()
    );
    broker
        .publish(job("list-2", "bob@example.com").as_bytes())
        .await;
    // (The first job's ack may have been cut with the connection: its redelivery is then
    // acked without being sent, an event without the job's id.)
    let second = wait_events(&mut events, 1, WAIT, |e| {
        e.job_id.as_deref() == Some("list-2")
    })
    .await;
    assert_eq!(second[0].outcome, JobOutcome::Delivered);
    worker.stop().await.expect("clean stop");
    assert_eq!(smtp.messages().len(), 2, "each job sent once");
}

/// The connection is lost while a job's message is with the relay (sent whole, verdict not yet
/// given), and the worker reconnects at once: the broker redelivers the job while its first copy
/// is still being sent. The redelivery waits for that copy's outcome and is acked without
/// sending: the relay gets the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_during_the_first_copys_send_waits_for_it_instead_of_sending_again() {
    let (outcomes, avoided) = cut_while_sending("redeliverwait", 1).await;
    assert_eq!(
        outcomes,
        [JobOutcome::AlreadyHandled, JobOutcome::Delivered],
        "the first copy delivered, the redelivery acked without sending"
    );
    assert_eq!(avoided, 1.0);
}

/// A job that a producer published twice, with the connection cut while both copies are being
/// sent: both come back redelivered, and each must wait only for the copies that began before
/// it. (Waiting for "any other copy" made the two redeliveries wait for each other until the
/// shutdown grace ran out, and then left them in the queue.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redelivered_copies_of_one_job_do_not_wait_for_each_other() {
    let (outcomes, avoided) = cut_while_sending("redelivertwice", 2).await;
    assert_eq!(
        outcomes,
        [
            JobOutcome::AlreadyHandled,
            JobOutcome::AlreadyHandled,
            JobOutcome::Delivered,
            JobOutcome::Delivered
        ],
        "both first copies delivered, both redeliveries acked without sending"
    );
    assert_eq!(avoided, 2.0);
}

/// A retry whose confirm is lost: the broker stored the copy in its retry queue, but the worker,
/// with no confirm, handed the job back whole. The job lives on twice in the broker, and was sent
/// twice when the copy came back. Now the copy carries an id the worker remembers: the original
/// is delivered, the copy acked without sending, the relay gets the job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_confirm_was_lost_is_not_sent_twice() {
    let smtp = SmtpServer::start();
    // The first attempt is deferred at MAIL FROM, slowly: time to make the broker's replies
    // vanish before the worker republishes.
    smtp.add_rule(Rule::times(
        1,
        Cmd::Mail,
        Action::DelayThenReply(Duration::from_millis(1500), 451, "4.3.0 try later".into()),
    ));
    let broker = Broker::new("lostconfirm").await;
    let proxy = Proxy::start(broker_addr());
    let mut config = test_config(&broker, smtp.port());
    config.amqp.url = amqp_mailer::config::Secret::new(url_via(&proxy)).into();
    config.amqp.publish_timeout = Duration::from_secs(1);
    // Long enough for the test to see the copy in its retry queue before it comes back.
    config.retry.initial_delay = Duration::from_secs(8);
    config.retry.max_delay = Duration::from_secs(8);
    let retry_queue = retry_queues(&config)
        .into_iter()
        .next()
        .expect("a retry queue");
    broker.also_delete(retry_queues(&config));
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    broker
        .publish(job("lostconfirm-1", "ann@example.com").as_bytes())
        .await;
    smtp.wait_for(WAIT, "the first attempt at MAIL FROM", |s| {
        s.commands.iter().any(|(_, l)| l.starts_with("MAIL FROM"))
    })
    .await;
    // The worker's bytes still reach the broker; the broker's (the confirm) no longer come back.
    proxy.set_deaf(true);
    let first = wait_events(&mut events, 1, WAIT, |_| true).await;
    assert_eq!(
        first[0].outcome,
        JobOutcome::Requeued,
        "no confirm: the job is handed back whole"
    );
    assert_eq!(
        broker.ready_count(&retry_queue).await,
        1,
        "and yet the broker stored its retry copy"
    );
    let before = proxy.connections_total();
    proxy.cut_all();
    proxy.set_deaf(false);
    assert!(
        proxy
            .wait_until(WAIT, |s| s.connections_total >= before + 2)
            .await,
        "reconnected"
    );
    // The original, redelivered at once, is sent; the copy, back from its retry queue, is not.
    let later = wait_events(&mut events, 2, WAIT, |_| true).await;
    let outcomes: Vec<JobOutcome> = later.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [JobOutcome::Delivered, JobOutcome::AlreadyHandled],
        "{later:?}"
    );
    assert!(
        later
            .iter()
            .all(|e| e.job_id.as_deref() == Some("lostconfirm-1")),
        "{later:?}"
    );
    assert_eq!(smtp.messages().len(), 1, "the relay got the job once");
    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    let text = metrics.encode();
    assert_eq!(
        metric(&text, "amqp_mailer_duplicates_avoided_total"),
        1.0,
        "{text}"
    );
    assert_eq!(broker.ready_count(&broker.names.queue).await, 0);
    assert_eq!(broker.ready_count(&retry_queue).await, 0);
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
}

/// Publishes one job `copies` times and cuts the broker connections once every copy's message is
/// with the relay (sent whole, verdict not yet given); the worker reconnects at once and the
/// broker redelivers every copy while the first copies are still being sent. Checks that the
/// relay was sent each copy once, that nothing is left in flight or in the queue, and returns
/// the outcomes (sorted) and `duplicates_avoided`.
async fn cut_while_sending(test: &str, copies: usize) -> (Vec<JobOutcome>, f64) {
    let smtp = SmtpServer::start();
    smtp.set_data_delay(Duration::from_secs(3));
    let broker = Broker::new(test).await;
    let proxy = Proxy::start(broker_addr());
    let mut config = test_config(&broker, smtp.port());
    config.amqp.url = amqp_mailer::config::Secret::new(url_via(&proxy)).into();
    config.smtp.timeout = Duration::from_secs(20);
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    let body = job(&format!("{test}-1"), "ann@example.com");
    for _ in 0..copies {
        broker.publish(body.as_bytes()).await;
    }
    smtp.wait_for(WAIT, "every copy's message, whole", |s| {
        s.data_ends >= copies
    })
    .await;
    let before = proxy.connections_total();
    proxy.cut_all();
    // Reconnected (two new connections) while the first copies still wait for their verdict.
    assert!(
        proxy
            .wait_until(WAIT, |s| s.connections_total >= before + 2)
            .await,
        "reconnected"
    );
    let outcomes = wait_events(&mut events, 2 * copies, WAIT, |_| true).await;
    let mut outcomes: Vec<JobOutcome> = outcomes.into_iter().map(|e| e.outcome).collect();
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(worker.handles.metrics.jobs_in_flight(), 0);
    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    assert_eq!(
        smtp.messages().len(),
        copies,
        "the relay got each copy once"
    );
    assert_eq!(
        smtp.state().data_ends,
        copies,
        "and was sent each copy once"
    );
    assert_eq!(broker.ready_count(&broker.names.queue).await, 0);
    let avoided = metric(&metrics.encode(), "amqp_mailer_duplicates_avoided_total");
    (outcomes, avoided)
}

/// A stop that comes while the worker is reconnecting (its connect hanging on a broker that
/// accepts and never answers) still waits for the jobs in flight: `run` returns only once the
/// job that was sending has finished, not while it still runs against a closed SMTP pool.
/// With receipts on, the job's receipt then waits for a broker until the grace is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_reconnecting_still_drains_the_jobs_in_flight() {
    stop_while_reconnecting(true).await;
}

/// The same without receipts: the job settles as delivered, and only its ack is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_reconnecting_without_receipts_settles_the_job_as_delivered() {
    stop_while_reconnecting(false).await;
}

async fn stop_while_reconnecting(receipts: bool) {
    let smtp = SmtpServer::start();
    // The relay answers the end of the data after 8 s: the job is still sending when the broker
    // goes away and when the stop comes, even on a loaded machine.
    smtp.set_data_delay(Duration::from_secs(8));
    let broker = Broker::new("stopreconnect").await;
    let proxy = Proxy::start(broker_addr());
    let mut config = test_config(&broker, smtp.port());
    config.amqp.url = amqp_mailer::config::Secret::new(url_via(&proxy)).into();
    // The reconnect hangs until the stop rather than failing first.
    config.amqp.connect_timeout = Duration::from_secs(60);
    config.shutdown.grace = Duration::from_secs(15);
    config.smtp.timeout = Duration::from_secs(20);
    if !receipts {
        config.amqp.events_exchange = String::new();
    }
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    broker
        .publish(job("inflight-1", "ann@example.com").as_bytes())
        .await;
    // Sent whole, only the relay's verdict awaited: past the point where a job gives up.
    smtp.wait_for(WAIT, "the job's message, whole", |s| s.data_ends >= 1)
        .await;

    proxy.set_blackhole(true);
    let before = proxy.connections_total();
    proxy.cut_all();
    worker.wait_for_phase(Phase::Reconnecting, WAIT).await;
    assert!(
        proxy
            .wait_until(WAIT, |s| s.connections_total > before)
            .await,
        "the worker is connecting again"
    );
    assert!(
        smtp.messages().is_empty(),
        "the stop comes while the job is still sending"
    );
    let metrics = worker.handles.metrics.clone();
    let status = worker.handles.status.clone();
    worker.stop().await.expect("clean stop");
    assert_eq!(
        status.phase(),
        Phase::Draining,
        "readiness said it was draining, not reconnecting"
    );

    let event = events
        .try_recv()
        .expect("the job in flight had finished when the worker stopped");
    assert_eq!(event.job_id.as_deref(), Some("inflight-1"));
    // Sent. With receipts, its receipt could not be confirmed with no broker to take it: the
    // job is left unacked for the broker to deliver again. Without, its ack could not be sent.
    // Either way the possible duplicate is counted.
    let settled = if receipts {
        JobOutcome::ReceiptUnconfirmed
    } else {
        JobOutcome::Delivered
    };
    assert_eq!(event.outcome, settled);
    assert_eq!(smtp.messages().len(), 1, "sent once");
    let text = metrics.encode();
    assert_eq!(
        metric(&text, "amqp_mailer_jobs_delivered_total"),
        1.0,
        "counted as delivered: {text}"
    );
    assert_eq!(
        metric(&text, "amqp_mailer_possible_duplicates_total"),
        1.0,
        "its receipt and its ack were lost with the connection, and counted: {text}"
    );
    assert_eq!(metric(&text, "amqp_mailer_jobs_in_flight"), 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_blackholed_is_detected_by_heartbeat_and_consumption_resumes() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("blackhole").await;
    let proxy = Proxy::start(broker_addr());
    let mut config = test_config(&broker, smtp.port());
    config.amqp.url = amqp_mailer::config::Secret::new(url_via(&proxy)).into();
    config.amqp.heartbeat = Duration::from_secs(1);
    config.amqp.connect_timeout = Duration::from_secs(2);
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    broker
        .publish(job("before-1", "ann@example.com").as_bytes())
        .await;
    wait_events(&mut events, 1, WAIT, |e| e.outcome == JobOutcome::Delivered).await;

    proxy.set_blackhole(true);
    // Nothing closes the sockets: only the missing heartbeats tell.
    worker.wait_for_phase(Phase::Reconnecting, WAIT).await;
    proxy.set_blackhole(false);
    proxy.cut_all();
    worker.wait_for_phase(Phase::Consuming, WAIT).await;
    broker
        .publish(job("after-1", "ann@example.com").as_bytes())
        .await;
    smtp.wait_for(WAIT, "the job published after the outage", |s| {
        s.messages
            .iter()
            .any(|m| m.header("Message-ID").as_deref() == Some("<after-1@example.com>"))
    })
    .await;
    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    // An ack swallowed by the black hole makes the broker deliver the job again: allowed, but
    // only as a redelivery, which is counted.
    let seen = smtp.deliveries();
    assert_eq!(seen.len(), 2);
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let redelivered = metric(&metrics.encode(), "amqp_mailer_jobs_redelivered_total");
    assert!(
        duplicates as f64 <= redelivered,
        "{duplicates} duplicates, {redelivered} redelivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_down_longer_than_two_retry_delays_then_back_delivers_all_through_retry_queues() {
    let smtp = SmtpServer::start();
    smtp.set_refusing(true).await;
    let broker = Broker::new("relaydown").await;
    let mut config = test_config(&broker, smtp.port());
    config.retry.max_attempts = 6;
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    for i in 0..10 {
        broker
            .publish(job(&format!("down-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    // Every job fails its first and its second attempt (300 ms and 600 ms retry delays).
    wait_events(&mut events, 20, WAIT, |e| {
        e.outcome == JobOutcome::Retried && e.attempt <= 2
    })
    .await;
    smtp.set_refusing(false).await;
    let delivered = wait_events(&mut events, 10, WAIT, |e| {
        e.outcome == JobOutcome::Delivered
    })
    .await;
    assert!(
        delivered.iter().all(|e| e.attempt >= 3),
        "delivered on a later attempt: {delivered:?}"
    );
    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    let seen = smtp.deliveries();
    assert_eq!(seen.len(), 10);
    assert!(seen.values().all(|&n| n == 1), "each once: {seen:?}");
    let text = metrics.encode();
    assert_eq!(
        metric(&text, "amqp_mailer_jobs_retried_total{attempt=\"1\"}"),
        10.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "amqp_mailer_jobs_retried_total{attempt=\"2\"}"),
        10.0,
        "{text}"
    );
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_blackholed_hits_the_deadline_and_jobs_are_delivered_once_it_answers() {
    let smtp = SmtpServer::start();
    let relay_proxy = Proxy::start(smtp.addr());
    relay_proxy.set_blackhole(true);
    let broker = Broker::new("relayhole").await;
    let mut config = test_config(&broker, relay_proxy.port());
    config.smtp.timeout = Duration::from_secs(1);
    config.retry.max_attempts = 5;
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    // Before the first publish: the worker may take a job, and start its deadline, while the
    // others are still being published.
    let started = Instant::now();
    for i in 0..3 {
        broker
            .publish(job(&format!("hole-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    wait_events(&mut events, 3, WAIT, |e| e.outcome == JobOutcome::Retried).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "each waited for the 1 s deadline, not {waited:?}"
    );
    relay_proxy.set_blackhole(false);
    wait_events(&mut events, 3, WAIT, |e| e.outcome == JobOutcome::Delivered).await;
    worker.stop().await.expect("clean stop");
    assert_eq!(smtp.deliveries().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_closing_idle_pooled_connections_costs_no_attempt() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("idleclose").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let mut events = worker.handles.events.subscribe();

    broker
        .publish(job("idle-0", "ann@example.com").as_bytes())
        .await;
    wait_events(&mut events, 1, WAIT, |e| e.outcome == JobOutcome::Delivered).await;
    // 1. The relay drops the idle session (EOF).
    smtp.kill_sessions();
    smtp.wait_for(WAIT, "the idle session to be closed", |s| {
        s.open_sessions == 0
    })
    .await;
    broker
        .publish(job("idle-1", "ann@example.com").as_bytes())
        .await;
    wait_events(&mut events, 1, WAIT, |e| e.outcome == JobOutcome::Delivered).await;
    // 2. The relay answers 421 on the idle session and closes it.
    smtp.add_rule(Rule::times(
        1,
        Cmd::Mail,
        Action::Reply(421, "4.4.2 idle timeout".into()),
    ));
    broker
        .publish(job("idle-2", "ann@example.com").as_bytes())
        .await;
    wait_events(&mut events, 1, WAIT, |e| e.outcome == JobOutcome::Delivered).await;
    // 3. The relay says goodbye (221) instead of accepting MAIL.
    smtp.add_rule(Rule::times(
        1,
        Cmd::Mail,
        Action::Reply(221, "2.0.0 bye".into()),
    ));
    broker
        .publish(job("idle-3", "ann@example.com").as_bytes())
        .await;
    let last = wait_events(&mut events, 1, WAIT, |e| e.outcome == JobOutcome::Delivered).await;
    assert_eq!(last[0].attempt, 1, "delivered on its first attempt");

    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    let text = metrics.encode();
    assert!(
        !text.contains("amqp_mailer_jobs_retried_total{"),
        "no attempt was burned:\n{text}"
    );
    assert_eq!(
        metric_sum(&text, "amqp_mailer_smtp_stale_connections_total", &[]),
        3.0,
        "{text}"
    );
    assert_eq!(smtp.deliveries().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_relay_authentication_failure() {
    let smtp = SmtpServer::start();
    smtp.require_auth("mailer", "right");
    let broker = Broker::new("authfail").await;
    let mut config = test_config(&broker, smtp.port());
    config.smtp.username = Some("mailer".into());
    config.smtp.password = Some(amqp_mailer::config::Secret::new("wrong"));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.http.listen = Some(http);
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    broker
        .publish(job("auth-1", "ann@example.com").as_bytes())
        .await;
    let retried = wait_events(&mut events, 1, WAIT, |e| e.outcome == JobOutcome::Retried).await;
    assert_eq!(
        retried[0].job_id.as_deref(),
        Some("auth-1"),
        "retried, not dead-lettered"
    );
    let not_ready = get(http, "/readyz").await.expect_err("not ready");
    assert!(
        not_ready.contains("503") && not_ready.contains("authentication"),
        "{not_ready}"
    );
    assert_eq!(
        get(http, "/healthz").await.as_deref(),
        Ok("ok"),
        "still alive"
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_what_happened() {
    let smtp = SmtpServer::start();
    smtp.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 unknown".into())).matching("gone@"),
    );
    smtp.add_rule(
        Rule::times(1, Cmd::DataEnd, Action::Reply(451, "4.3.0 later".into())).matching("flaky-1"),
    );
    let broker = Broker::new("metrics").await;
    let mut config = test_config(&broker, smtp.port());
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.http.listen = Some(http);
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    for i in 0..3 {
        broker
            .publish(job(&format!("ok-{i}"), "ann@example.com").as_bytes())
            .await;
    }
    broker
        .publish(job("rejected-1", "gone@example.com").as_bytes())
        .await;
    broker.publish(b"{ not json").await;
    broker
        .publish(job("flaky-1", "ann@example.com").as_bytes())
        .await;
    // 3 + 1 delivered, 1 rejected, 1 invalid, 1 retry.
    wait_events(&mut events, 7, WAIT, |_| true).await;

    let text = get(http, "/metrics").await.expect("metrics served");
    let expect = [
        ("amqp_mailer_jobs_received_total", 7.0),
        ("amqp_mailer_jobs_delivered_total", 4.0),
        ("amqp_mailer_jobs_retried_total{attempt=\"1\"}", 1.0),
        (
            "amqp_mailer_jobs_dead_lettered_total{kind=\"rejected\"}",
            1.0,
        ),
        (
            "amqp_mailer_jobs_dead_lettered_total{kind=\"invalid\"}",
            1.0,
        ),
        (
            "amqp_mailer_jobs_dead_lettered_total{kind=\"exhausted\"}",
            0.0,
        ),
        ("amqp_mailer_jobs_in_flight", 0.0),
        ("amqp_mailer_broker_connected", 1.0),
        ("amqp_mailer_possible_duplicates_total", 0.0),
    ];
    for (series, value) in expect {
        assert_eq!(metric(&text, series), value, "{series} in:\n{text}");
    }
    // Per relay: the one relay of this test is named after its address.
    let relay = format!("relay=\"127.0.0.1:{}\"", smtp.port());
    for (outcome, count) in [("delivered", 4.0), ("rejected", 1.0), ("failed", 1.0)] {
        let outcome = format!("outcome=\"{outcome}\"");
        assert_eq!(
            metric_sum(
                &text,
                "amqp_mailer_smtp_send_duration_seconds_count",
                &[&relay, &outcome]
            ),
            count,
            "{outcome} sends in:\n{text}"
        );
    }
    let sessions = metric_sum(&text, "amqp_mailer_smtp_sessions_open", &[&relay]);
    assert!((1.0..=4.0).contains(&sessions), "sessions open {sessions}");
    assert!(
        text.contains("# TYPE amqp_mailer_smtp_send_duration_seconds histogram"),
        "{text}"
    );
    assert_eq!(get(http, "/healthz").await.as_deref(), Ok("ok"));
    assert!(
        get(http, "/nope")
            .await
            .expect_err("404")
            .starts_with("404")
    );
    worker.stop().await.expect("clean stop");
    broker.also_delete(retry_queues(&test_config(&broker, 1)));
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_ready_watchdog_status_and_stopping() {
    use tokio::net::UnixDatagram;

    let smtp = SmtpServer::start();
    let broker = Broker::new("systemd").await;
    let socket_path =
        std::env::temp_dir().join(format!("amqp-mailer-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket_path);
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let mut worker = WorkerProcess::run(
        &broker,
        smtp.port(),
        [
            ("NOTIFY_SOCKET", socket_path.to_string_lossy().into_owned()),
            ("WATCHDOG_USEC", "400000".into()),
        ],
    );
    let mut buf = vec![0u8; 4096];
    let mut recv = async || -> String {
        let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
            .await
            .expect("a notification in time")
            .expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // Watchdog pings may come first: the watchdog runs from the start.
    let ready = loop {
        let message = recv().await;
        if message.contains("READY=1") {
            break message;
        }
        assert_eq!(message, "WATCHDOG=1\n", "only pings before READY");
    };
    assert!(ready.contains("STATUS=consuming"), "{ready:?}");
    let mut watchdogs = 0;
    while watchdogs < 3 {
        let message = recv().await;
        if message.contains("WATCHDOG=1") {
            watchdogs += 1;
        }
    }
    worker.signal("TERM");
    loop {
        let message = recv().await;
        if message.contains("STOPPING=1") {
            assert!(message.contains("STATUS=draining"), "{message:?}");
            break;
        }
    }
    assert_eq!(worker.wait_exit(WAIT).await.code(), Some(0));
    let _ = std::fs::remove_file(&socket_path);
}
