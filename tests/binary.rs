//! The compiled binary, end to end: a config file plus environment overrides, jobs published by
//! a plain AMQP client, mail checked at the SMTP server; bad configuration refused before any
//! connection.

use testkit::broker::{Broker, WAIT, amqp_url};
use testkit::process::{WorkerProcess, free_port, run_to_end};
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use testkit::worker::job;

fn config_file(broker: &Broker, smtp_port: u16) -> (tempfile::TempDir, String) {
    let names = &broker.names;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    let text = format!(
        r#"[amqp]
url = "{url}"
exchange = "{exchange}"
events_exchange = "{events}"
queue = "{queue}"
routing_key = "{routing_key}"
retry_queue_prefix = "{retry}"
dead_letter_queue = "{dead}"
queue_type = "classic"
connection_name = "{prefix}"

[worker]
concurrency = 4

[smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
from = "Binary Test <binary@example.com>"

[retry]
initial_delay = "200ms"
max_attempts = 2
"#,
        url = amqp_url(),
        exchange = names.exchange,
        events = names.events,
        queue = names.queue,
        routing_key = names.routing_key,
        retry = names.retry_prefix,
        dead = names.dead,
        prefix = names.prefix,
    );
    std::fs::write(&path, text).expect("write config");
    let path = path.to_string_lossy().into_owned();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_with_config_file_and_env_overrides_delivers_and_stops_cleanly() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("binary").await;
    broker.also_delete([format!("{}200ms", broker.names.retry_prefix)]);
    // The file names a port where nothing listens; the environment overrides it.
    let (_dir, path) = config_file(&broker, 1);
    smtp.require_auth("mailer", "s3cret-in-env");
    // One job is deferred once at RCPT: its retry line carries the enhanced code.
    smtp.add_rule(
        Rule::times(
            1,
            Cmd::Rcpt,
            Action::Reply(450, "4.2.1 mailbox busy".into()),
        )
        .matching("user4@"),
    );
    let mut worker = WorkerProcess::start(
        &["--config", &path, "run"],
        &[
            ("AMQP_MAILER_SMTP__PORT", smtp.port().to_string()),
            ("AMQP_MAILER_SMTP__PASSWORD", "s3cret-in-env".into()),
            ("AMQP_MAILER_SMTP__USERNAME", "mailer".into()),
            ("AMQP_MAILER_LOG__FORMAT", "json".into()),
        ],
    );
    worker.wait_for_log("consuming", WAIT).await;

    for i in 0..5 {
        broker
            .publish(job(&format!("bin-{i}"), &format!("user{i}@example.com")).as_bytes())
            .await;
    }
    let messages = smtp.wait_for_messages(5, WAIT).await;
    for m in &messages {
        assert_eq!(m.mail_from, "binary@example.com");
        assert_eq!(
            m.auth_user.as_deref(),
            Some("mailer"),
            "authenticated with the env password"
        );
    }
    let mut ids: Vec<String> = messages
        .iter()
        .map(|m| m.header("Message-ID").expect("id"))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        (0..5)
            .map(|i| format!("<bin-{i}@example.com>"))
            .collect::<Vec<_>>()
    );

    worker.signal("TERM");
    let status = worker.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", worker.log().join("\n"));
    let log = worker.log().join("\n");
    assert!(
        !log.contains("s3cret-in-env"),
        "the password never appears in logs"
    );
    assert!(
        log.contains("\"job_id\":\"bin-0\""),
        "JSON logs carry the job id: {log}"
    );
    // The relay's queue id and the enhanced code of its reply, for each delivered job; the
    // enhanced code of the deferral too.
    for m in &messages {
        let line = worker
            .log()
            .into_iter()
            .find(|l| l.contains(&format!("\"queue_id\":\"{}\"", m.queue_id)))
            .unwrap_or_else(|| panic!("no log line with queue id {}: {log}", m.queue_id));
        assert!(line.contains("\"enhanced_code\":\"2.0.0\""), "{line}");
        assert!(line.contains("\"outcome\":\"delivered\""), "{line}");
    }
    let retry = worker
        .log()
        .into_iter()
        .find(|l| l.contains("\"outcome\":\"retry\""))
        .unwrap_or_else(|| panic!("no retry line: {log}"));
    assert!(
        retry.contains("\"enhanced_code\":\"4.2.1\"") && retry.contains("\"smtp_code\":450"),
        "{retry}"
    );
    assert_eq!(broker.ready_count(&broker.names.queue).await, 0);
}

#[tokio::test]
async fn bad_configuration_exits_64_naming_the_key_before_connecting() {
    // The broker URL points where nothing listens: a config error must come first.
    let dead_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let cases = [
        ("AMQP_MAILER_SMTP__PORT", "not-a-port", "smtp.port"),
        ("AMQP_MAILER_SMTP__TIMEOUT", "30", "smtp.timeout"),
        ("AMQP_MAILER_WORKER__CONCURRENCY", "0", "worker.concurrency"),
        ("AMQP_MAILER_RETRY__MULTIPLIER", "0.5", "retry.multiplier"),
        ("AMQP_MAILER_SMTP__TLS", "sometimes", "smtp.tls"),
        ("AMQP_MAILER_SMTP__HOTS", "x", "smtp.hots"),
    ];
    for (key, value, named) in cases {
        let (status, _, stderr) = run_to_end(
            &["run"],
            &[
                (key, value.to_string()),
                ("AMQP_MAILER_AMQP__URL", dead_url.clone()),
            ],
        )
        .await;
        assert_eq!(status.code(), Some(64), "{key}={value}: {stderr}");
        assert!(
            stderr.contains(named),
            "{key}={value}: stderr should name {named}: {stderr}"
        );
        assert!(
            !stderr.contains("cannot connect"),
            "failed before connecting: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
        assert_eq!(stderr.matches(named).count(), 1, "named once: {stderr}");
    }
    let (status, _, stderr) =
        run_to_end(&["--config", "/nonexistent/amqp-mailer.toml", "run"], &[]).await;
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("/nonexistent/amqp-mailer.toml"), "{stderr}");
}

#[tokio::test]
async fn config_subcommand_prints_effective_configuration_without_secrets() {
    let (status, stdout, stderr) = run_to_end(
        &["config"],
        &[
            (
                "AMQP_MAILER_AMQP__URL",
                "amqp://app:brokerpw@rabbit:5672/%2f".into(),
            ),
            ("AMQP_MAILER_SMTP__USERNAME", "mailer".into()),
            ("AMQP_MAILER_SMTP__PASSWORD", "smtppw".into()),
            ("AMQP_MAILER_WORKER__CONCURRENCY", "7".into()),
        ],
    )
    .await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("concurrency = 7"), "{stdout}");
    assert!(
        stdout.contains("amqp://app:***@rabbit:5672/%2f"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("brokerpw") && !stdout.contains("smtppw"),
        "{stdout}"
    );
    let _: toml::Value = toml::from_str(&stdout).expect("the output is TOML");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_start_an_unreachable_relay_and_an_unset_sender_are_each_said_once() {
    let broker = Broker::new("startwarn").await;
    let closed = free_port();
    let mut env = testkit::process::broker_env(&broker.names);
    env.extend([
        ("AMQP_MAILER_SMTP__HOST", "127.0.0.1".to_string()),
        ("AMQP_MAILER_SMTP__PORT", closed.to_string()),
        ("AMQP_MAILER_SMTP__TLS", "none".to_string()),
        ("AMQP_MAILER_SMTP__CONNECT_TIMEOUT", "2s".to_string()),
    ]);
    let mut worker = WorkerProcess::start(&["run"], &env);
    let unreachable = worker
        .wait_for_log("the SMTP relay cannot be reached", WAIT)
        .await;
    assert!(unreachable.contains("WARN"), "{unreachable}");
    assert!(
        unreachable.contains(&format!("127.0.0.1:{closed}")),
        "{unreachable}"
    );
    assert!(
        unreachable.contains("--outbox"),
        "a way to try without a relay: {unreachable}"
    );
    let sender = worker.wait_for_log("smtp.from is not set", WAIT).await;
    assert!(sender.contains("WARN"), "{sender}");
    worker.wait_for_log("consuming", WAIT).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
    let log = worker.log();
    for needle in ["the SMTP relay cannot be reached", "smtp.from is not set"] {
        assert_eq!(
            log.iter().filter(|l| l.contains(needle)).count(),
            1,
            "said once: {needle}\n{}",
            log.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_start_a_reachable_relay_and_a_set_sender_give_no_warning() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("startquiet").await;
    let mut env = testkit::process::broker_env(&broker.names);
    env.extend([
        ("AMQP_MAILER_SMTP__HOST", "127.0.0.1".to_string()),
        ("AMQP_MAILER_SMTP__PORT", smtp.port().to_string()),
        ("AMQP_MAILER_SMTP__TLS", "none".to_string()),
        ("AMQP_MAILER_SMTP__FROM", "sender@example.com".to_string()),
    ]);
    let mut worker = WorkerProcess::start(&["run"], &env);
    worker.wait_for_log("consuming", WAIT).await;
    // The start-up check is the relay's first connection; once it has come, nothing is left
    // to warn about.
    smtp.wait_for(WAIT, "the start-up check's connection", |s| {
        s.sessions_total >= 1
    })
    .await;
    broker
        .publish(job("quiet-1", "ann@example.com").as_bytes())
        .await;
    smtp.wait_for_messages(1, WAIT).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
    let log = worker.log();
    assert!(
        !log.iter().any(|l| l.contains("WARN")),
        "no warning:\n{}",
        log.join("\n")
    );
}

/// The text log an operator reads: the job's span names its id once, and a retry or dead-letter
/// line that is not about some recipients carries no empty `recipients` or reply fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_log_lines_name_the_job_once_and_carry_no_empty_fields() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("textlog").await;
    broker.also_delete([format!("{}10s", broker.names.retry_prefix)]);
    smtp.add_rule(Rule::times(
        1,
        Cmd::DataEnd,
        Action::Reply(451, "4.4.1 no answer from host".into()),
    ));
    let mut env = testkit::process::worker_env(&broker.names, smtp.port());
    env.push(("AMQP_MAILER_SMTP__FROM", "sender@example.com".into()));
    let mut worker = WorkerProcess::start(&["run"], &env);
    worker.wait_for_log("consuming", WAIT).await;
    broker
        .publish(job("txt-1", "ann@example.com").as_bytes())
        .await;
    let retry = worker.wait_for_log("retrying later", WAIT).await;
    broker.publish(b"{not a job").await;
    let dead = worker.wait_for_log("job dead-lettered", WAIT).await;
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
    assert!(
        retry.contains("job{attempt=1 job_id=\"txt-1\"}"),
        "the span: {retry}"
    );
    assert_eq!(retry.matches("job_id").count(), 1, "once: {retry}");
    assert!(
        retry.contains("451 4.4.1 no answer from host"),
        "the relay's reply: {retry}"
    );
    for line in [&retry, &dead] {
        assert!(
            !line.contains("=\"\"") && !line.contains("recipients"),
            "no empty fields: {line}"
        );
    }
}
