//! The pipeline against the real broker and the scripted SMTP server: delivery, concurrency,
//! retries, dead letters, invalid jobs, deadlines, and the republish-then-ack rule.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use amqp_mailer::app::RunError;
use amqp_mailer::config::QueueType;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use mail_parser::MimeHeaders as _;
use testkit::broker::{Broker, WAIT, header};
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use testkit::worker::{RunningWorker, SAMPLE_PDF, job, sample_jobs, test_config};

fn count_commands(server: &SmtpServer, verb: &str) -> usize {
    server
        .commands()
        .iter()
        .filter(|(_, line)| line.to_ascii_uppercase().starts_with(verb))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_plain_html_alternative_and_attachment_with_right_envelope_and_headers() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("deliver").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;

    let pdf = SAMPLE_PDF;
    let jobs = sample_jobs();
    for job in &jobs {
        broker.publish(job.to_string().as_bytes()).await;
    }
    let messages = smtp.wait_for_messages(jobs.len(), WAIT).await;
    let by_id: HashMap<String, _> = messages
        .iter()
        .map(|m| (m.header("Message-ID").expect("Message-ID"), m))
        .collect();

    let plain = by_id["<plain-1@example.com>"];
    assert_eq!(plain.mail_from, "sender@example.com");
    assert_eq!(
        plain.rcpt_to,
        ["ann@example.com", "carl@example.com", "hidden@example.net"]
    );
    let parsed = plain.parsed();
    assert_eq!(parsed.subject(), Some("Grüße aus Köln – 你好"));
    assert_eq!(
        parsed
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address()),
        Some("sender@example.com")
    );
    assert_eq!(
        parsed.to().and_then(|a| a.first()).and_then(|a| a.name()),
        Some("Ann Example")
    );
    assert_eq!(
        parsed
            .reply_to()
            .and_then(|a| a.first())
            .and_then(|a| a.address()),
        Some("help@example.com")
    );
    // Lines travel as CRLF in SMTP; the text is the producer's.
    assert_eq!(
        parsed
            .body_text(0)
            .map(|t| t.trim_end().replace("\r\n", "\n"))
            .as_deref(),
        Some("Hello Ann,\n.leading dot line\nbye")
    );
    assert_eq!(plain.header("X-Campaign").as_deref(), Some("spring"));
    assert!(plain.header("Date").is_some(), "a Date header");
    let raw = String::from_utf8_lossy(&plain.data).to_ascii_lowercase();
    assert!(
        !raw.contains("hidden@example.net") && !raw.contains("bcc"),
        "Bcc leaked: {raw}"
    );

    let html = by_id["<html-1@shop.example>"];
    assert_eq!(html.mail_from, "shop@shop.example");
    let parsed = html.parsed();
    assert_eq!(
        parsed.body_html(0).as_deref().map(str::trim_end),
        Some("<p>Hi <b>Bob</b></p>")
    );
    assert!(
        parsed
            .content_type()
            .map(|c| c.ctype() == "text" && c.subtype() == Some("html"))
            .unwrap_or(false),
        "html-only is a single text/html part"
    );

    let both = by_id["<both-1@example.com>"];
    let parsed = both.parsed();
    let ct = parsed.content_type().expect("content type");
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("alternative"))
    );
    assert_eq!(parsed.body_text(0).as_deref(), Some("plain version"));
    assert_eq!(parsed.body_html(0).as_deref(), Some("<p>html version</p>"));

    let attach = by_id["<attach-1@example.com>"];
    let parsed = attach.parsed();
    let ct = parsed.content_type().expect("content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("mixed")));
    let attachment = parsed.attachment(0).expect("one attachment");
    assert_eq!(attachment.attachment_name(), Some("rechnung-ä.pdf"));
    assert_eq!(attachment.contents(), pdf);
    assert_eq!(parsed.body_text(0).as_deref(), Some("see attached"));

    worker.stop().await.expect("clean stop");
    assert_eq!(broker.ready_count(&broker.names.queue).await, 0);
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_at_concurrency_16_each_delivered_once_within_16_sessions() {
    let smtp = SmtpServer::start();
    // A slow relay keeps sessions busy, so that the cap is exercised, not just respected.
    smtp.set_data_delay(Duration::from_millis(20));
    let broker = Broker::new("concurrency").await;
    let mut config = test_config(&broker, smtp.port());
    config.worker.concurrency = 16;
    let worker = RunningWorker::start(&broker, config).await;

    for i in 0..200 {
        broker
            .publish(job(&format!("bulk-{i}"), &format!("user{i}@example.com")).as_bytes())
            .await;
    }
    let messages = smtp.wait_for_messages(200, WAIT).await;
    worker.stop().await.expect("clean stop");

    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in smtp.messages() {
        *seen.entry(m.header("Message-ID").expect("id")).or_default() += 1;
    }
    assert_eq!(messages.len(), 200);
    assert_eq!(seen.len(), 200, "200 distinct jobs");
    assert!(
        seen.values().all(|&n| n == 1),
        "each delivered once: {seen:?}"
    );
    let max = smtp.max_concurrent_sessions();
    assert!(max <= 16, "at most 16 SMTP sessions at once, saw {max}");
    assert!(max >= 8, "the work was spread over sessions (saw {max})");
    assert_eq!(broker.ready_count(&broker.names.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_451_twice_then_delivered_after_the_configured_delays() {
    let smtp = SmtpServer::start();
    smtp.add_rule(Rule::times(
        2,
        Cmd::DataEnd,
        Action::Reply(451, "4.3.0 try later".into()),
    ));
    let broker = Broker::new("retry451").await;
    let config = test_config(&broker, smtp.port());
    let (first_delay, second_delay) = (Duration::from_millis(300), Duration::from_millis(600));
    assert_eq!(config.retry.initial_delay, first_delay);
    let worker = RunningWorker::start(&broker, config).await;

    broker
        .publish(job("flaky-1", "ann@example.com").as_bytes())
        .await;
    let mut attempts_at = Vec::new();
    for n in 1..=3 {
        smtp.wait_for(WAIT, &format!("attempt {n}"), |s| s.data_commands() >= n)
            .await;
        attempts_at.push(Instant::now());
    }
    let messages = smtp.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1, "delivered once");
    assert_eq!(
        messages[0].header("Message-ID").as_deref(),
        Some("<flaky-1@example.com>")
    );
    let gap1 = attempts_at[1] - attempts_at[0];
    let gap2 = attempts_at[2] - attempts_at[1];
    assert!(
        gap1 >= first_delay,
        "second attempt after {gap1:?}, before the 300 ms delay"
    );
    assert!(
        gap2 >= second_delay,
        "third attempt after {gap2:?}, before the 600 ms delay"
    );

    // Stopping drains: every job is settled before the counters are read.
    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    let metrics = metrics.encode();
    assert!(
        metrics.contains("amqp_mailer_jobs_retried_total{attempt=\"1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("amqp_mailer_jobs_retried_total{attempt=\"2\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("amqp_mailer_jobs_delivered_total 1"),
        "{metrics}"
    );
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_550_goes_straight_to_dead_letters_with_headers_and_the_exact_body() {
    let smtp = SmtpServer::start();
    smtp.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 no such user".into()))
            .matching("nobody@example.com"),
    );
    let broker = Broker::new("reject550").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let mut dead = broker.reader(&broker.names.dead).await;

    // Spacing and key order the worker must not touch.
    let body = br#"{ "id":"gone-1",  "to":"nobody@example.com", "subject":"s", "text":"t" }"#;
    let mut producer_headers = FieldTable::default();
    producer_headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    broker
        .publish_with(
            body,
            BasicProperties::default()
                .with_headers(producer_headers)
                .with_message_id("producer-msg-1".into()),
        )
        .await;

    let letter = dead.next(WAIT).await;
    assert_eq!(letter.data, body, "body kept byte for byte");
    assert_eq!(header(&letter, "error-kind").as_deref(), Some("rejected"));
    assert_eq!(header(&letter, "smtp-code").as_deref(), Some("550"));
    assert_eq!(header(&letter, "attempt").as_deref(), Some("1"));
    let last_error = header(&letter, "last-error").expect("last-error");
    assert!(
        last_error.contains("550")
            && last_error.contains("no such user")
            && last_error.contains("nobody@example.com"),
        "{last_error}"
    );
    assert!(header(&letter, "failed-at").is_some_and(|t| t.ends_with('Z')));
    assert!(header(&letter, "first-failed-at").is_some());
    assert_eq!(
        header(&letter, "tenant").as_deref(),
        Some("acme"),
        "producer headers kept"
    );
    assert_eq!(
        letter.properties.message_id().as_ref().map(|m| m.as_str()),
        Some("producer-msg-1"),
        "producer properties kept"
    );
    assert_eq!(letter.properties.delivery_mode(), &Some(2), "persistent");
    assert!(smtp.messages().is_empty(), "nothing delivered");
    assert_eq!(count_commands(&smtp, "RCPT"), 1, "not retried");
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_exhausted_after_max_attempts_are_dead_lettered() {
    let smtp = SmtpServer::start();
    smtp.add_rule(Rule::always(
        Cmd::Mail,
        Action::Reply(452, "4.3.1 insufficient storage".into()),
    ));
    let broker = Broker::new("exhausted").await;
    let config = test_config(&broker, smtp.port());
    assert_eq!(config.retry.max_attempts, 3);
    let worker = RunningWorker::start(&broker, config).await;
    let mut dead = broker.reader(&broker.names.dead).await;

    let body = job("never-1", "ann@example.com");
    broker.publish(body.as_bytes()).await;
    let letter = dead.next(WAIT).await;
    assert_eq!(letter.data, body.as_bytes());
    assert_eq!(header(&letter, "error-kind").as_deref(), Some("exhausted"));
    assert_eq!(header(&letter, "attempt").as_deref(), Some("3"));
    assert_eq!(header(&letter, "smtp-code").as_deref(), Some("452"));
    assert!(header(&letter, "last-error").is_some_and(|e| e.contains("insufficient storage")));
    let first = header(&letter, "first-failed-at").expect("first-failed-at");
    let last = header(&letter, "failed-at").expect("failed-at");
    assert!(first < last, "first failure {first} before the last {last}");
    assert!(
        header(&letter, "x-death").is_none(),
        "broker history stripped"
    );
    assert_eq!(
        count_commands(&smtp, "MAIL"),
        3,
        "exactly max_attempts attempts"
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_invalid_job_is_dead_lettered_and_the_next_valid_job_still_delivered() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("invalid").await;
    let mut config = test_config(&broker, smtp.port());
    config.worker.max_job_bytes = 2000;
    let worker = RunningWorker::start(&broker, config).await;
    let mut dead = broker.reader(&broker.names.dead).await;

    let oversized = job("big", "a@example.com").replace("Hello", &"x".repeat(3000));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (br#"{"to":"a@example.com","subject":"s","text":"t","tp":1}"#.to_vec(), "unknown field `tp`"),
        (br#"{"subject":"s","text":"t"}"#.to_vec(), "no recipients"),
        (br#"{"to":"not-an-address","subject":"s","text":"t"}"#.to_vec(), "to[0]"),
        (
            br#"{"to":"a@example.com","subject":"s","text":"t","headers":{"X-A":"v\r\nBcc: evil@example.com"}}"#.to_vec(),
            "headers.X-A contains",
        ),
        (b"{\"to\":\"a@example.com\",\"subject\":\"\xff\xfe\",\"text\":\"t\"}".to_vec(), "not UTF-8"),
        (b"this is not json".to_vec(), "not a valid JSON job"),
        (oversized.into_bytes(), "worker.max_job_bytes = 2000"),
    ];
    for (body, _) in &cases {
        broker.publish(body).await;
    }
    broker
        .publish(job("valid-after", "ok@example.com").as_bytes())
        .await;

    let mut letters = Vec::new();
    for _ in 0..cases.len() {
        letters.push(dead.next(WAIT).await);
    }
    for (body, reason) in &cases {
        let letter = letters
            .iter()
            .find(|l| &l.data == body)
            .unwrap_or_else(|| panic!("no dead letter with the body for {reason}"));
        assert_eq!(header(letter, "error-kind").as_deref(), Some("invalid"));
        assert_eq!(header(letter, "attempt").as_deref(), Some("1"));
        let last_error = header(letter, "last-error").expect("reason");
        assert!(
            last_error.contains(reason),
            "{last_error:?} should say {reason:?}"
        );
    }
    let delivered = smtp.wait_for_messages(1, WAIT).await;
    assert_eq!(
        delivered[0].header("Message-ID").as_deref(),
        Some("<valid-after@example.com>")
    );
    assert!(
        !String::from_utf8_lossy(&delivered[0].data).contains("evil"),
        "nothing of the invalid jobs was sent"
    );
    dead.expect_nothing(Duration::from_millis(300)).await;
    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    let metrics = metrics.encode();
    assert!(
        metrics.contains(&format!(
            "amqp_mailer_jobs_dead_lettered_total{{kind=\"invalid\"}} {}",
            cases.len()
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_relay_hits_the_deadline_and_the_job_is_retried() {
    let smtp = SmtpServer::start();
    smtp.add_rule(Rule::times(1, Cmd::DataEnd, Action::Stall));
    let broker = Broker::new("stall").await;
    let mut config = test_config(&broker, smtp.port());
    config.smtp.timeout = Duration::from_secs(1);
    let worker = RunningWorker::start(&broker, config).await;

    let started = Instant::now();
    broker
        .publish(job("slow-1", "ann@example.com").as_bytes())
        .await;
    let messages = smtp.wait_for_messages(1, WAIT).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1300),
        "delivered only after the 1 s deadline and the 300 ms retry delay"
    );
    assert_eq!(
        messages[0].header("Message-ID").as_deref(),
        Some("<slow-1@example.com>")
    );
    assert_eq!(count_commands(&smtp, "DATA"), 2, "two attempts");
    assert!(
        smtp.sessions_total() >= 2,
        "the stalled session was not reused"
    );
    let metrics = worker.handles.metrics.clone();
    worker.stop().await.expect("clean stop");
    let metrics = metrics.encode();
    assert!(
        metrics.contains("amqp_mailer_jobs_retried_total{attempt=\"1\"} 1"),
        "{metrics}"
    );
    smtp.wait_for(WAIT, "the stalled session to be closed", |s| {
        s.open_sessions == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_is_not_acked_when_the_retry_publish_cannot_be_confirmed() {
    let smtp = SmtpServer::start();
    smtp.add_rule(Rule::always(
        Cmd::DataEnd,
        Action::Reply(451, "4.7.1 later".into()),
    ));
    let broker = Broker::new("noconfirm").await;
    let config = test_config(&broker, smtp.port());
    let retry_queues = testkit::worker::retry_queues(&config);
    let worker = RunningWorker::start(&broker, config).await;
    // Take the retry queues away under the running worker: its mandatory retry publish is
    // now returned unroutable, which must not count as stored.
    for queue in &retry_queues {
        broker
            .channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .expect("delete retry queue");
    }

    broker
        .publish(job("keep-1", "ann@example.com").as_bytes())
        .await;
    // Two attempts prove the job came back to the work queue after the failed republish.
    smtp.wait_for(WAIT, "a second attempt of the requeued job", |s| {
        s.data_commands() >= 2
    })
    .await;
    worker.stop().await.expect("clean stop");

    assert_eq!(
        broker.ready_count(&broker.names.queue).await,
        1,
        "the job is back in the work queue, not lost"
    );
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
    let mut reader = broker.reader(&broker.names.queue).await;
    let back = reader.next(WAIT).await;
    assert_eq!(back.data, job("keep-1", "ann@example.com").as_bytes());
    assert!(
        header(&back, "attempt").is_none(),
        "the original, not a republished copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_with_other_arguments_is_a_clear_startup_error() {
    let broker = Broker::new("mismatch").await;
    broker.declare_conflicting_work_queue().await;
    let mut config = test_config(&broker, 2525);
    config.amqp.queue_type = QueueType::Quorum;
    broker.also_delete(testkit::worker::retry_queues(&config));
    let mut worker = RunningWorker::spawn(config);
    let error = worker.join().await.expect_err("must refuse to start");
    assert!(matches!(error, RunError::Topology(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains(&format!("queue '{}'", broker.names.queue)),
        "names the queue: {text}"
    );
    assert!(
        text.contains("x-queue-type")
            || text.contains("x-message-ttl")
            || text.contains("x-dead-letter"),
        "says what differs: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_topology_delivers_and_retries_and_redeclares_idempotently() {
    let smtp = SmtpServer::start();
    smtp.add_rule(Rule::times(
        1,
        Cmd::DataEnd,
        Action::Reply(421, "4.4.2 closing".into()),
    ));
    let broker = Broker::new("quorum").await;
    let mut config = test_config(&broker, smtp.port());
    config.amqp.queue_type = QueueType::Quorum;
    let worker = RunningWorker::start(&broker, config.clone()).await;
    broker
        .publish(job("q-1", "ann@example.com").as_bytes())
        .await;
    let messages = smtp.wait_for_messages(1, WAIT).await;
    assert_eq!(
        messages[0].header("Message-ID").as_deref(),
        Some("<q-1@example.com>")
    );
    worker.stop().await.expect("clean stop");

    // A second start declares the same topology again without complaint.
    let worker = RunningWorker::start(&broker, config).await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_envelope_with_one_refused_recipient_still_delivers_to_the_other() {
    let smtp = SmtpServer::start();
    smtp.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 no such user".into())).matching("gone@"),
    );
    let broker = Broker::new("pipelined").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let mut dead = broker.reader(&broker.names.dead).await;
    let body = serde_json::json!({
        "id": "half-1", "to": ["ok@example.com", "gone@example.com"], "subject": "s", "text": "t"
    })
    .to_string();
    broker.publish(body.as_bytes()).await;
    let letter = dead.next(WAIT).await;
    assert_eq!(header(&letter, "error-kind").as_deref(), Some("rejected"));
    assert_eq!(
        header(&letter, "recipients").as_deref(),
        Some("gone@example.com")
    );
    assert!(header(&letter, "last-error").is_some_and(|e| e.contains("gone@example.com: 550")));
    let messages = smtp.wait_for_messages(1, WAIT).await;
    assert_eq!(
        messages[0].rcpt_to,
        ["ok@example.com"],
        "one group, one message"
    );
    assert_eq!(count_commands(&smtp, "DATA"), 1);
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pipelining_commands_go_one_at_a_time_and_stop_at_a_refusal() {
    let smtp = SmtpServer::start();
    // An EHLO reply without PIPELINING.
    smtp.add_rule(Rule::always(
        Cmd::Ehlo,
        Action::Reply(250, "relay.test\n8BITMIME".into()),
    ));
    smtp.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 no such user".into())).matching("gone@"),
    );
    let broker = Broker::new("nopipelining").await;
    let mut config = test_config(&broker, smtp.port());
    // One job at a time, so that both share one session.
    config.worker.concurrency = 1;
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    broker
        .publish(job("seq-1", "gone@example.com").as_bytes())
        .await;
    broker
        .publish(job("seq-2", "ok@example.com").as_bytes())
        .await;
    for _ in 0..2 {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("settled")
            .expect("event");
    }
    let messages = smtp.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].header("Message-ID").as_deref(),
        Some("<seq-2@example.com>")
    );
    assert_eq!(
        count_commands(&smtp, "DATA"),
        1,
        "no DATA after the refused RCPT"
    );
    assert_eq!(
        count_commands(&smtp, "RSET"),
        1,
        "the session was reset and kept"
    );
    assert_eq!(smtp.sessions_total(), 1);
    worker.stop().await.expect("clean stop");
}
