//! A real MTA in front of the test relay: Debian's Postfix, in its own directories
//! (`testkit::postfix`), relaying to the scripted relay, where the mail is checked. End to end
//! through the broker: STARTTLS with a throwaway CA and AUTH PLAIN and LOGIN through Cyrus SASL,
//! an access map refusing one recipient for good and one for now, `message_size_limit`, and
//! anvil's connection-count and message-rate limits with localhost not exempted.
//!
//! Needs root and `bash .ci/install-test-tools` (Postfix, sasl2-bin); without them the tests fail
//! saying so, they never skip.

use std::time::Duration;

use amqp_mailer::config::{AuthMechanism, Config, Secret, TlsMode};
use amqp_mailer::pipeline::JobOutcome;
use testkit::broker::{Broker, WAIT, header};
use testkit::metrics::metric_sum;
use testkit::pki::{Pki, TempDir};
use testkit::postfix::{Postfix, PostfixOptions};
use testkit::smtp::SmtpServer;
use testkit::worker::{
    RunningWorker, assert_each_delivered_once_first_try, job, publish_jobs, retry_queues,
    test_config, wait_events,
};

const USER: &str = "mailer";
const PASSWORD: &str = "s3cret pass:word";

/// The worker's configuration for Postfix on `localhost` (the name in the test certificate):
/// STARTTLS required, trusting the test CA, AUTH as USER with `mechanism`.
fn through_postfix(
    broker: &Broker,
    postfix: &Postfix,
    pki: &Pki,
    mechanism: AuthMechanism,
) -> Config {
    let mut config = test_config(broker, postfix.port());
    config.smtp.host = "localhost".into();
    config.smtp.tls = TlsMode::Starttls;
    config.smtp.ca_file = Some(pki.ca_file.clone());
    config.smtp.username = Some(USER.into());
    config.smtp.password = Some(Secret::new(PASSWORD));
    config.smtp.auth_mechanisms = vec![mechanism];
    config
}

fn with_tls_and_auth<'a>(pki: &'a Pki) -> PostfixOptions<'a> {
    PostfixOptions {
        tls: Some(pki),
        users: vec![(USER, PASSWORD)],
        ..PostfixOptions::default()
    }
}

/// STARTTLS (a certificate of the test CA, verified) and AUTH PLAIN, then LOGIN, through
/// Postfix's Cyrus SASL: each job reaches the relay behind Postfix, Postfix logs the mechanism,
/// and each session says EHLO twice (before and after STARTTLS), not three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_auth_plain_and_login_through_postfix() {
    let dir = TempDir::new("postfix-auth");
    let pki = Pki::generate(dir.path(), "postfix");
    let relay = SmtpServer::start();
    let postfix = Postfix::start("auth", relay.port(), &with_tls_and_auth(&pki));
    for (i, mechanism) in [AuthMechanism::Plain, AuthMechanism::Login]
        .into_iter()
        .enumerate()
    {
        let broker = Broker::new(&format!("postfix-auth-{i}")).await;
        let worker =
            RunningWorker::start(&broker, through_postfix(&broker, &postfix, &pki, mechanism))
                .await;
        let mut events = worker.handles.events.subscribe();
        let id = format!("postfix-{mechanism:?}");
        broker.publish(job(&id, "ann@example.com").as_bytes()).await;
        let settled = wait_events(&mut events, 1, WAIT, |_| true).await;
        assert_eq!(
            settled[0].outcome,
            JobOutcome::Delivered,
            "{}",
            postfix.log()
        );
        let messages = relay.wait_for_messages(i + 1, WAIT).await;
        let message = messages
            .iter()
            .find(|m| m.header("Message-ID") == Some(format!("<{id}@example.com>")))
            .unwrap_or_else(|| panic!("{id} relayed by Postfix"));
        assert_eq!(message.rcpt_to, ["ann@example.com"]);
        assert!(
            message
                .header("Received")
                .is_some_and(|r| r.contains("postfix.test") && r.contains("ESMTPSA")),
            "received by Postfix over TLS with AUTH: {:?}",
            message.header("Received")
        );
        let name = format!("{mechanism:?}").to_uppercase();
        let auth_line = postfix
            .wait_for_log(
                &[&format!("sasl_method={name}"), "sasl_username=mailer"],
                WAIT,
            )
            .await;
        assert!(auth_line.is_some(), "{}", postfix.log());
        worker.stop().await.expect("clean stop");
    }
    // Each session's command counts, logged by Postfix when it ends (the worker's QUIT).
    let log = postfix.log();
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disconnect from") && l.contains("auth=1"))
        .collect();
    assert!(!sessions.is_empty(), "{log}");
    for line in &sessions {
        assert!(line.contains("ehlo=2 starttls=1 auth=1"), "{line}");
    }
}

/// An access map refusing one recipient for good (550) and deferring one (450), in one job:
/// the third recipient gets the mail, the refused one is dead-lettered alone as rejected, the
/// deferred one retried alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_refused_by_postfixs_access_map_are_handled_each_alone() {
    let dir = TempDir::new("postfix-access");
    let pki = Pki::generate(dir.path(), "postfix");
    let relay = SmtpServer::start();
    let postfix = Postfix::start(
        "access",
        relay.port(),
        &PostfixOptions {
            recipient_access: vec![
                ("gone@example.com", "550 5.1.1 No such user here"),
                ("later@example.com", "450 4.2.1 Mailbox busy, try later"),
            ],
            ..with_tls_and_auth(&pki)
        },
    );
    let broker = Broker::new("postfix-access").await;
    let mut config = through_postfix(&broker, &postfix, &pki, AuthMechanism::Plain);
    // Long enough that the deferred recipient's copy is still waiting when the test looks.
    config.retry.initial_delay = Duration::from_secs(60);
    config.retry.max_delay = Duration::from_secs(60);
    let retry_queue = retry_queues(&config).remove(0);
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    let mut dead = broker.reader(&broker.names.dead).await;
    let body = serde_json::json!({
        "id": "postfix-access-1",
        "to": ["first@example.com", "gone@example.com", "later@example.com"],
        "subject": "Three recipients, one refused, one deferred",
        "text": "hello",
    })
    .to_string();
    broker.publish(body.as_bytes()).await;

    let settled = wait_events(&mut events, 1, WAIT, |_| true).await;
    assert_eq!(settled[0].outcome, JobOutcome::PartlyDelivered);
    let letter = dead.next(WAIT).await;
    assert_eq!(letter.data, body.as_bytes(), "the job as published");
    assert_eq!(header(&letter, "error-kind").as_deref(), Some("rejected"));
    assert_eq!(
        header(&letter, "recipients").as_deref(),
        Some("gone@example.com")
    );
    assert_eq!(header(&letter, "smtp-code").as_deref(), Some("550"));
    let retried = broker.reader(&retry_queue).await.next(WAIT).await;
    assert_eq!(
        header(&retried, "recipients").as_deref(),
        Some("later@example.com")
    );
    assert_eq!(header(&retried, "smtp-code").as_deref(), Some("450"));
    let messages = relay.wait_for_messages(1, WAIT).await;
    assert_eq!(
        messages[0].rcpt_to,
        ["first@example.com"],
        "only the accepted one"
    );
    worker.stop().await.expect("clean stop");
}

/// `message_size_limit = 200000`: Postfix advertises SIZE 200000, and a job of 300 KB is
/// dead-lettered as rejected without being sent (nor retried); a small one goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_size_job_is_dead_lettered_as_rejected_not_sent_or_retried() {
    let dir = TempDir::new("postfix-size");
    let pki = Pki::generate(dir.path(), "postfix");
    let relay = SmtpServer::start();
    let postfix = Postfix::start(
        "size",
        relay.port(),
        &PostfixOptions {
            message_size_limit: Some(200_000),
            ..with_tls_and_auth(&pki)
        },
    );
    let broker = Broker::new("postfix-size").await;
    let config = through_postfix(&broker, &postfix, &pki, AuthMechanism::Plain);
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    let mut dead = broker.reader(&broker.names.dead).await;
    let big = serde_json::json!({
        "id": "postfix-big",
        "to": "ann@example.com",
        "subject": "300 KB",
        "text": "0123456789 abcdefghij\n".repeat(14_000),
    })
    .to_string();
    broker.publish(big.as_bytes()).await;
    broker
        .publish(job("postfix-small", "ann@example.com").as_bytes())
        .await;
    let settled = wait_events(&mut events, 2, WAIT, |_| true).await;
    let outcome = |id: &str| {
        settled
            .iter()
            .find(|e| e.job_id.as_deref() == Some(id))
            .map(|e| (e.outcome, e.attempt))
    };
    assert_eq!(
        outcome("postfix-big"),
        Some((
            JobOutcome::DeadLettered(amqp_mailer::policy::ErrorKind::Rejected),
            1
        ))
    );
    assert_eq!(outcome("postfix-small"), Some((JobOutcome::Delivered, 1)));
    let letter = dead.next(WAIT).await;
    assert_eq!(letter.data, big.as_bytes());
    let error = header(&letter, "last-error").unwrap_or_default();
    assert!(error.contains("takes at most 200000"), "{error}");
    let messages = relay.wait_for_messages(1, WAIT).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].header("Message-ID").as_deref(),
        Some("<postfix-small@example.com>")
    );
    worker.stop().await.expect("clean stop");
}

/// anvil's limits with localhost not exempted (3 connections per client, 30 messages per
/// 10 s), at concurrency 16, default flow control: every job is delivered exactly once, none
/// dead-lettered, none retried (overload waits are not attempts), although 30 of the 60 must
/// wait for the next 10 s. The worker settles at the 3 connections Postfix accepts; refused
/// connections stay a small fraction of the sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfixs_rate_and_connection_limits_slow_the_worker_without_spending_attempts() {
    const JOBS: usize = 60;
    let dir = TempDir::new("postfix-anvil");
    let pki = Pki::generate(dir.path(), "postfix");
    let relay = SmtpServer::start();
    let postfix = Postfix::start(
        "anvil",
        relay.port(),
        &PostfixOptions {
            connection_count_limit: Some(3),
            message_rate_limit: Some((30, Duration::from_secs(10))),
            ..with_tls_and_auth(&pki)
        },
    );
    let broker = Broker::new("postfix-anvil").await;
    let mut config = through_postfix(&broker, &postfix, &pki, AuthMechanism::Plain);
    config.worker.concurrency = 16;
    let worker = RunningWorker::start(&broker, config).await;
    let mut events = worker.handles.events.subscribe();
    publish_jobs(&broker, "anvil", JOBS).await;
    let settled = wait_events(&mut events, JOBS, Duration::from_secs(120), |_| true).await;
    let metrics = worker.handles.metrics.encode();
    worker.stop().await.expect("clean stop");
    relay.wait_for_messages(JOBS, WAIT).await;
    let log = postfix.log();
    assert_each_delivered_once_first_try(&settled, &relay, JOBS, &log);
    assert_eq!(broker.ready_count(&broker.names.dead).await, 0);
    assert_eq!(
        metric_sum(&metrics, "amqp_mailer_jobs_retried_total", &[]),
        0.0
    );

    // Postfix logs each refusal as a warning (its reply says "too much mail from" and "too
    // many connections from").
    let too_much = log
        .matches("Message delivery request rate limit exceeded")
        .count();
    let too_many = log.matches("Connection concurrency limit exceeded").count();
    for line in log.lines().filter(|l| {
        l.contains("concurrency limit")
            || l.contains("connect from")
            || l.contains("rate limit exceeded")
    }) {
        eprintln!("PF {line}");
    }
    eprintln!(
        "Postfix anvil: {too_many} connections refused, {too_much} MAIL FROMs refused for the \
         rate, for {JOBS} jobs"
    );
    assert!(too_much > 0, "the message rate limit was met:\n{log}");
    // New connections come in doubling waves (four at first): the limit is met by a refused
    // connection or a few, not by the thirteen of a first burst of sixteen.
    assert!(
        too_many <= JOBS / 10,
        "{too_many} connections refused for {JOBS} sends"
    );
}
