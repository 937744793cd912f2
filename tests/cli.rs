//! The command-line tools, run as the real binary against the real broker: publish, dead-letters
//! list, show, replay and purge (each killed half-way), health, and --help everywhere.

use std::collections::HashMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use mail_parser::MimeHeaders as _;
use testkit::broker::{Broker, WAIT, header};
use testkit::process::{WorkerProcess, broker_env, free_port, run_to_end};
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};
use testkit::worker::{RunningWorker, job, test_config};

/// Declares the test's topology by starting and stopping a worker.
async fn declare(broker: &Broker) {
    let worker = RunningWorker::start(broker, test_config(broker, 1)).await;
    worker.stop().await.expect("clean stop");
}

/// The tools' environment: the test's queues, and the sender the in-process worker has
/// (`test_config`), as a producer shares the worker's configuration.
fn tool_env(broker: &Broker) -> Vec<(&'static str, String)> {
    let mut env = broker_env(&broker.names);
    env.push((
        "AMQP_MAILER_SMTP__FROM",
        "Test Sender <sender@example.com>".into(),
    ));
    env
}

/// A dead letter as the worker would write it.
async fn put_dead_letter(broker: &Broker, id: &str, kind: &str, failed_at: &str) {
    let mut headers = FieldTable::default();
    for (key, value) in [
        ("error-kind", kind),
        ("last-error", "550 5.1.1 no such user (after RCPT TO)"),
        ("failed-at", failed_at),
        ("first-failed-at", failed_at),
        ("tenant", "acme"),
    ] {
        headers.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    headers.insert("attempt".into(), AMQPValue::LongInt(3));
    broker
        .publish_to_queue(
            &broker.names.dead,
            job(id, "ann@example.com").as_bytes(),
            BasicProperties::default()
                .with_headers(headers)
                .with_content_type("application/json".into()),
        )
        .await;
}

/// `publish --to TO` with a subject and a text: a job valid but for what the test is about.
async fn publish_to(
    to: &str,
    env: &[(&'static str, String)],
) -> (std::process::ExitStatus, String, String) {
    run_to_end(
        &["publish", "--to", to, "--subject", "s", "--text", "t"],
        env,
    )
    .await
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_from_flags_file_and_stdin_is_delivered() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("clipublish").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let env = tool_env(&broker);
    let dir = std::env::temp_dir().join(format!("amqp-mailer-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let attachment = dir.join("report.csv");
    std::fs::write(&attachment, "a,b\n1,2\n").expect("write");

    let (status, stdout, stderr) = run_to_end(
        &[
            "publish",
            "--to",
            "ann@example.com",
            "--cc",
            "carl@example.com",
            "--subject",
            "Flags ✓",
            "--text",
            "plain",
            "--html",
            "<p>html</p>",
            "--attach",
            attachment.to_str().expect("utf-8"),
            "--header",
            "X-Source: cli",
        ],
        &env,
    )
    .await;
    assert!(status.success(), "{stderr}");
    let flag_id = stdout.trim().to_string();
    assert!(!flag_id.is_empty());

    let file = dir.join("job.json");
    std::fs::write(
        &file,
        r#"{"id":"from-file-1","to":"bob@example.com","subject":"File","text":"from a file"}"#,
    )
    .expect("write");
    let (status, stdout, stderr) =
        run_to_end(&["publish", "--file", file.to_str().expect("utf-8")], &env).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "from-file-1");

    let stdin_job = r#"{"to":"dora@example.com","subject":"Stdin","text":"from stdin"}"#;
    let mut child = tokio::process::Command::new(testkit::process::binary())
        .args(["publish", "--file", "-"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(stdin_job.as_bytes())
            .await
            .expect("write stdin");
    }
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("in time")
        .expect("output");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdin_id = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        stdin_id.starts_with("cli-"),
        "an id was given to the job: {stdin_id}"
    );

    let messages = smtp.wait_for_messages(3, WAIT).await;
    let by_id: HashMap<String, _> = messages
        .iter()
        .map(|m| (m.header("Message-ID").expect("id"), m))
        .collect();
    let flagged = by_id[&format!("<{flag_id}@example.com>")];
    assert_eq!(flagged.rcpt_to, ["ann@example.com", "carl@example.com"]);
    let parsed = flagged.parsed();
    assert_eq!(parsed.subject(), Some("Flags ✓"));
    assert_eq!(flagged.header("X-Source").as_deref(), Some("cli"));
    let csv = parsed.attachment(0).expect("attachment");
    assert_eq!(csv.attachment_name(), Some("report.csv"));
    assert_eq!(csv.contents(), b"a,b\n1,2\n");
    assert!(by_id.contains_key("<from-file-1@example.com>"));
    assert!(by_id.contains_key(&format!("<{stdin_id}@example.com>")));
    let _ = std::fs::remove_dir_all(&dir);
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_an_invalid_job_and_says_when_nothing_is_bound() {
    let broker = Broker::new("clirefuse").await;
    let env = tool_env(&broker);
    // Nothing declared yet: the exchange does not exist or routes nowhere.
    let (status, _, stderr) = publish_to("a@example.com", &env).await;
    assert_eq!(status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("NOT_FOUND - no exchange"), "{stderr}");
    assert!(
        stderr.contains("The worker declares the exchange")
            && stderr.contains("start `amqp-mailer run` once"),
        "the hint: {stderr}"
    );

    declare(&broker).await;
    let (status, _, stderr) = run_to_end(&["publish", "--subject", "s", "--text", "t"], &env).await;
    assert_eq!(status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("no recipients"), "{stderr}");
    let (status, _, stderr) = publish_to("not an address", &env).await;
    assert_eq!(status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("to[0]"), "{stderr}");
    // Without smtp.from, a job without `from` is one the worker would dead-letter.
    let (status, _, stderr) = run_to_end(
        &[
            "publish",
            "--to",
            "a@example.com",
            "--subject",
            "s",
            "--text",
            "t",
        ],
        &broker_env(&broker.names),
    )
    .await;
    assert_eq!(status.code(), Some(65), "{stderr}");
    assert!(
        stderr.contains("from") && stderr.contains("give --from, or set smtp.from"),
        "{stderr}"
    );
    assert_eq!(
        broker.ready_count(&broker.names.queue).await,
        0,
        "nothing published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_shows_them_filters_them_and_removes_nothing() {
    let smtp = SmtpServer::start();
    smtp.add_rule(
        Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 no such user".into())).matching("gone@"),
    );
    let broker = Broker::new("clilist").await;
    let worker = RunningWorker::start(&broker, test_config(&broker, smtp.port())).await;
    let mut events = worker.handles.events.subscribe();
    broker
        .publish(job("gone-1", "gone@example.com").as_bytes())
        .await;
    broker.publish(b"{ broken json").await;
    for _ in 0..2 {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("settled")
            .expect("event");
    }
    worker.stop().await.expect("clean stop");
    put_dead_letter(&broker, "old-1", "exhausted", "2020-01-01T00:00:00.000Z").await;
    let env = tool_env(&broker);

    let (status, stdout, stderr) = run_to_end(&["dead-letters", "list"], &env).await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.starts_with("ID"), "a table: {stdout}");
    assert!(stderr.contains("3 dead letters in"), "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "header and three rows: {stdout}");
    assert!(
        stdout.contains("gone-1") && stdout.contains("rejected") && stdout.contains("550"),
        "{stdout}"
    );
    assert!(
        stdout.contains("invalid") && stdout.contains("not a valid JSON job"),
        "{stdout}"
    );
    assert!(
        stdout.contains("old-1") && stdout.contains("exhausted"),
        "{stdout}"
    );

    let rows = |stdout: &str| stdout.lines().skip(1).count();
    let (_, stdout, _) = run_to_end(&["dead-letters", "list", "--kind", "rejected"], &env).await;
    assert_eq!(rows(&stdout), 1, "{stdout}");
    let (_, stdout, _) = run_to_end(&["dead-letters", "list", "--older-than", "1h"], &env).await;
    assert_eq!(rows(&stdout), 1, "{stdout}");
    assert!(stdout.contains("old-1"), "{stdout}");
    let (_, stdout, _) = run_to_end(&["dead-letters", "list", "--newer-than", "1h"], &env).await;
    assert_eq!(rows(&stdout), 2, "{stdout}");

    let (status, stdout, stderr) = run_to_end(&["dead-letters", "list", "--json"], &env).await;
    assert!(status.success(), "{stderr}");
    let letters: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(letters.len(), 3);
    let gone = letters
        .iter()
        .find(|l| l["id"] == "gone-1")
        .expect("gone-1");
    assert_eq!(gone["kind"], "rejected");
    assert_eq!(gone["attempts"], 1, "a number: {gone}");
    assert_eq!(gone["smtp_code"], 550, "a number: {gone}");
    assert_eq!(
        gone["recipients"], "gone@example.com",
        "the refused recipient"
    );
    let invalid = letters
        .iter()
        .find(|l| l["kind"] == "invalid")
        .expect("the invalid job");
    assert_eq!(
        invalid["recipients"],
        serde_json::Value::Null,
        "dead-lettered whole"
    );
    assert_eq!(invalid["smtp_code"], serde_json::Value::Null);

    // A part is never counted as the whole, and a kind that does not exist is refused.
    let (status, stdout, stderr) =
        run_to_end(&["dead-letters", "list", "--limit", "2"], &env).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(rows(&stdout), 2, "{stdout}");
    assert!(
        stderr.contains("2 shown of 3 dead letters") && stderr.contains("--limit 2 reached"),
        "{stderr}"
    );
    let (status, _, stderr) = run_to_end(&["dead-letters", "list", "--kind", "bogus"], &env).await;
    assert_eq!(status.code(), Some(64), "a usage error: {stderr}");
    assert!(stderr.contains("`bogus` is not an error kind"), "{stderr}");

    // Listing five times removed nothing and kept the order.
    let listed_kinds: Vec<String> = letters
        .iter()
        .map(|l| l["kind"].as_str().expect("kind").to_string())
        .collect();
    let mut reader = broker.reader(&broker.names.dead).await;
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.push(header(&reader.next(WAIT).await, "error-kind").expect("kind"));
    }
    reader.expect_nothing(Duration::from_millis(300)).await;
    assert_eq!(kinds, listed_kinds);
    kinds.sort();
    assert_eq!(kinds, ["exhausted", "invalid", "rejected"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_moves_matching_dead_letters_back_with_a_fresh_attempt_count() {
    let broker = Broker::new("clireplay").await;
    declare(&broker).await;
    let now = now_rfc3339();
    put_dead_letter(&broker, "r-1", "exhausted", &now).await;
    put_dead_letter(&broker, "r-2", "rejected", &now).await;
    put_dead_letter(&broker, "r-3", "exhausted", &now).await;
    let env = tool_env(&broker);

    let (status, stdout, stderr) = run_to_end(
        &["dead-letters", "replay", "--kind", "exhausted", "--dry-run"],
        &env,
    )
    .await;
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("2 would be replayed"), "{stderr}");
    assert_eq!(
        broker.ready_count(&broker.names.dead).await,
        3,
        "a dry run moves nothing: {stdout}"
    );

    let (status, stdout, stderr) =
        run_to_end(&["dead-letters", "replay", "--kind", "exhausted"], &env).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["replayed r-1", "replayed r-3"]
    );

    let mut work = broker.reader(&broker.names.queue).await;
    for id in ["r-1", "r-3"] {
        let replayed = work.next(WAIT).await;
        assert_eq!(
            replayed.data,
            job(id, "ann@example.com").as_bytes(),
            "body byte for byte"
        );
        assert!(
            header(&replayed, "attempt").is_none(),
            "fresh attempt count"
        );
        assert!(header(&replayed, "error-kind").is_none());
        assert!(header(&replayed, "replayed-at").is_some());
        assert_eq!(
            header(&replayed, "tenant").as_deref(),
            Some("acme"),
            "producer headers kept"
        );
        assert_eq!(replayed.properties.delivery_mode(), &Some(2));
    }
    work.expect_nothing(Duration::from_millis(300)).await;
    let mut dead = broker.reader(&broker.names.dead).await;
    let left = dead.next(WAIT).await;
    assert_eq!(
        header(&left, "error-kind").as_deref(),
        Some("rejected"),
        "the other stays"
    );
    dead.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_killed_half_way_loses_nothing_and_duplicates_nothing() {
    let broker = Broker::new("clikill").await;
    declare(&broker).await;
    let now = now_rfc3339();
    for i in 0..100 {
        put_dead_letter(&broker, &format!("k-{i}"), "exhausted", &now).await;
    }
    let mut replay = WorkerProcess::start(
        &["dead-letters", "replay", "--rate", "40"],
        &tool_env(&broker),
    );
    // stdout carries one "replayed <id>" line per job; the log helper reads stderr, so wait on
    // the broker instead: the work queue fills as jobs are moved.
    let mut work = broker.reader(&broker.names.queue).await;
    let mut in_work = Vec::new();
    for _ in 0..30 {
        in_work.push(work.next(WAIT).await.data);
    }
    replay.signal("KILL");
    replay.wait_exit(WAIT).await;
    // Whatever else made it to the work queue before the kill, and what is left dead.
    in_work.extend(
        work.drain(Duration::from_millis(500))
            .await
            .into_iter()
            .map(|d| d.data),
    );
    let mut dead = broker.reader(&broker.names.dead).await;
    let in_dead: Vec<_> = dead
        .drain(Duration::from_millis(500))
        .await
        .into_iter()
        .map(|d| d.data)
        .collect();
    let mut work_sorted = in_work.clone();
    work_sorted.sort();
    work_sorted.dedup();
    assert_eq!(
        work_sorted.len(),
        in_work.len(),
        "no job twice in the work queue"
    );
    let mut all: Vec<_> = in_work.iter().chain(&in_dead).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        100,
        "every dead letter is somewhere: {} in work, {} dead",
        in_work.len(),
        in_dead.len()
    );
    assert!(
        in_work.len() + in_dead.len() <= 101,
        "at most the one job in flight at the kill is in both queues ({} + {})",
        in_work.len(),
        in_dead.len()
    );
    assert!(
        in_work.len() >= 30 && !in_dead.is_empty(),
        "the kill came half-way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_ready_not_ready_and_missing_address() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("clihealth").await;
    let port = free_port();
    let mut config = test_config(&broker, smtp.port());
    config.http.listen = Some(format!("127.0.0.1:{port}").parse().expect("addr"));
    let worker = RunningWorker::start(&broker, config).await;
    let addr = format!("127.0.0.1:{port}");
    let (status, stdout, stderr) = run_to_end(&["health", "--addr", &addr], &[]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "ready");
    let (status, stdout, _) = run_to_end(
        &["health"],
        &[("AMQP_MAILER_HTTP__LISTEN", format!("0.0.0.0:{port}"))],
    )
    .await;
    assert!(
        status.success(),
        "http.listen on 0.0.0.0 is reached on loopback"
    );
    assert_eq!(stdout.trim(), "ready");
    worker.stop().await.expect("clean stop");

    let (status, _, stderr) = run_to_end(&["health", "--addr", &addr], &[]).await;
    assert_eq!(status.code(), Some(1), "nothing listens any more: {stderr}");
    assert!(stderr.contains("not ready"), "{stderr}");
    let (status, _, stderr) = run_to_end(&["health"], &[]).await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("http.listen"), "{stderr}");
}

#[tokio::test]
async fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["publish", "--help"],
        vec!["dead-letters", "--help"],
        vec!["dead-letters", "list", "--help"],
        vec!["dead-letters", "replay", "--help"],
        vec!["dead-letters", "show", "--help"],
        vec!["dead-letters", "purge", "--help"],
        vec!["status", "--help"],
        vec!["config", "--help"],
        vec!["health", "--help"],
    ] {
        let (status, stdout, stderr) = run_to_end(&args, &[]).await;
        assert!(status.success(), "{args:?}: {stderr}");
        assert!(stdout.contains("Usage: amqp-mailer"), "{args:?}: {stdout}");
    }
    let (status, stdout, _) = run_to_end(&["publish", "--help"], &[]).await;
    assert!(status.success());
    for flag in [
        "--to",
        "--subject",
        "--text",
        "--html",
        "--attach",
        "--file",
    ] {
        assert!(stdout.contains(flag), "publish --help mentions {flag}");
    }
}

#[tokio::test]
async fn dead_letters_kind_help_names_every_kind() {
    for command in ["list", "replay", "purge"] {
        let (status, stdout, stderr) = run_to_end(&["dead-letters", command, "--help"], &[]).await;
        assert!(status.success(), "{command}: {stderr}");
        let kind = stdout
            .lines()
            .find(|line| line.trim_start().starts_with("--kind"))
            .expect("a --kind line");
        for error_kind in amqp_mailer::policy::ErrorKind::ALL {
            assert!(kind.contains(error_kind.as_str()), "{command}: {kind}");
        }
        assert!(kind.contains("broker:"), "{command}: {kind}");
    }
}

/// The tools take the worker's broker list: `publish` reaches the first broker that answers, and
/// `config` prints every URL of the list with its password redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_use_the_broker_list_and_never_print_its_passwords() {
    let broker = Broker::new("cli-list").await;
    declare(&broker).await;
    let nowhere = format!("amqp://guest:nopass1@127.0.0.1:{}/%2f", free_port());
    let list = format!("{nowhere},{}", testkit::broker::amqp_url());
    let mut env = tool_env(&broker);
    env.retain(|(k, _)| *k != "AMQP_MAILER_AMQP__URL");
    env.push(("AMQP_MAILER_AMQP__URL", list));
    let (status, stdout, stderr) = publish_to("ann@example.com", &env).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(broker.ready_count(&broker.names.queue).await, 1, "{stdout}");

    let (status, printed, _) = run_to_end(&["config"], &env).await;
    assert!(status.success());
    assert!(!printed.contains("nopass1"), "{printed}");
    assert!(
        printed.contains("amqp://guest:***@127.0.0.1:5672/%2f"),
        "both URLs, redacted: {printed}"
    );
    assert_eq!(printed.matches(":***@").count(), 2, "{printed}");
}

/// The job ids in `broker`'s dead-letter queue, read and removed (at the end of a test).
async fn take_dead_ids(broker: &Broker) -> Vec<String> {
    let mut dead = broker.reader(&broker.names.dead).await;
    dead.drain(Duration::from_millis(500))
        .await
        .iter()
        .map(|d| {
            let body: serde_json::Value = serde_json::from_slice(&d.data).expect("a job");
            body["id"].as_str().expect("an id").to_string()
        })
        .collect()
}

/// `show` gives one dead letter whole: the failure history and the relay's reply from the
/// headers, what the worker would make of the job today, and the job with its long strings
/// elided; a body that is not JSON shown as text; an unknown id exits 1. Nothing is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_show_prints_one_dead_letter_whole_with_long_bodies_elided() {
    let broker = Broker::new("clishow").await;
    declare(&broker).await;
    let now = now_rfc3339();
    put_dead_letter(&broker, "other", "exhausted", &now).await;
    let long = serde_json::json!({
        "id": "show-1",
        "to": ["ann@example.com"],
        "subject": "A long one",
        "text": "x".repeat(5000),
    });
    let mut headers = FieldTable::default();
    for (key, value) in [
        ("error-kind", "rejected"),
        (
            "last-error",
            "552 5.3.4 message size exceeds limit (after DATA)",
        ),
        ("failed-at", now.as_str()),
        ("first-failed-at", "2026-12-01T10:00:00.000Z"),
        ("recipients", "ann@example.com"),
    ] {
        headers.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    headers.insert("attempt".into(), AMQPValue::LongInt(2));
    headers.insert("smtp-code".into(), AMQPValue::LongInt(552));
    broker
        .publish_to_queue(
            &broker.names.dead,
            long.to_string().as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await;
    let mut invalid = FieldTable::default();
    invalid.insert("error-kind".into(), AMQPValue::LongString("invalid".into()));
    broker
        .publish_to_queue(
            &broker.names.dead,
            b"{not json",
            BasicProperties::default()
                .with_message_id("raw-1".into())
                .with_headers(invalid),
        )
        .await;
    let env = tool_env(&broker);

    let (status, stdout, stderr) = run_to_end(&["dead-letters", "show", "show-1"], &env).await;
    assert!(status.success(), "{stderr}");
    for line in [
        "id               show-1",
        "kind             rejected",
        "attempts         2",
        "first failed at  2026-12-01T10:00:00.000Z",
        "relay reply      552",
        "recipients       ann@example.com",
        "reason           552 5.3.4 message size exceeds limit (after DATA)",
        "today            the worker would take this job",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in:\n{stdout}");
    }
    assert!(stdout.contains("  last-error: 552 5.3.4"), "{stdout}");
    assert!(
        stdout.contains(&format!("\"{}… (3000 more characters)\"", "x".repeat(2000))),
        "the body elided past 2000 characters: {stdout}"
    );
    assert!(!stdout.contains(&"x".repeat(2001)), "{stdout}");
    assert!(stdout.contains("\"subject\": \"A long one\""), "{stdout}");

    let (status, stdout, stderr) = run_to_end(
        &[
            "dead-letters",
            "show",
            "show-1",
            "--json",
            "--body-limit",
            "10",
        ],
        &env,
    )
    .await;
    assert!(status.success(), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(doc["letter"]["attempts"], 2);
    assert_eq!(doc["letter"]["smtp_code"], 552);
    assert_eq!(
        doc["headers"]["first-failed-at"],
        "2026-12-01T10:00:00.000Z"
    );
    assert_eq!(
        doc["job"]["text"],
        format!("{}… (4990 more characters)", "x".repeat(10))
    );
    assert!(doc["invalid"].is_null(), "{stdout}");

    let (status, stdout, stderr) = run_to_end(&["dead-letters", "show", "raw-1"], &env).await;
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("(not JSON) {not json"), "{stdout}");
    assert!(
        stdout.contains("today            the worker would refuse it: "),
        "{stdout}"
    );

    let (status, _, stderr) = run_to_end(&["dead-letters", "show", "nobody"], &env).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no dead letter with id 'nobody' among the 3 looked at"),
        "{stderr}"
    );
    assert_eq!(
        broker.ready_count(&broker.names.dead).await,
        3,
        "show removes nothing"
    );
}

/// Under script(1), on a pseudo-terminal as an operator's shell gives it, with `answer` typed.
async fn on_a_terminal(
    args: &str,
    env: &[(&'static str, String)],
    answer: &str,
) -> (std::process::ExitStatus, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut command = tokio::process::Command::new("script");
    command
        .args(["-qec"])
        .arg(format!("{} {args}", testkit::process::binary().display()))
        .arg("/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    testkit::process::without_worker_env(&mut command);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("script(1) from util-linux");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(answer.as_bytes()).await.expect("type");
    // Kept open until the end: an early end of input would end the session before the prompt.
    let output = tokio::time::timeout(WAIT, child.wait_with_output());
    let output = output.await.expect("finished in time").expect("script");
    drop(stdin);
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// `purge` removes what matches and only that: without a terminal it wants `--yes`, on a
/// terminal it asks and takes no for an answer, `--dry-run` removes nothing, and a terminal
/// shows the progress bar with the count done and left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_purge_asks_first_and_removes_only_what_matches() {
    let broker = Broker::new("clipurge").await;
    declare(&broker).await;
    let now = now_rfc3339();
    for i in 0..3 {
        put_dead_letter(&broker, &format!("rej-{i}"), "rejected", &now).await;
        put_dead_letter(&broker, &format!("exh-{i}"), "exhausted", &now).await;
    }
    let env = tool_env(&broker);
    let dead = || broker.ready_count(&broker.names.dead);

    let (status, _, stderr) =
        run_to_end(&["dead-letters", "purge", "--kind", "rejected"], &env).await;
    assert_eq!(status.code(), Some(64), "no terminal, no --yes: {stderr}");
    assert!(
        stderr.contains("purge would remove 3 dead letters") && stderr.contains("--yes"),
        "{stderr}"
    );
    assert_eq!(dead().await, 6, "nothing removed without --yes");

    let (status, stdout, stderr) = run_to_end(
        &["dead-letters", "purge", "--kind", "rejected", "--dry-run"],
        &env,
    )
    .await;
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("dry run: 3 would be purged"), "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "a header and 3 rows: {stdout}");
    assert_eq!(dead().await, 6, "a dry run removes nothing");

    let (status, output) = on_a_terminal("dead-letters purge --kind rejected", &env, "no\n").await;
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("Remove 3 dead letters from")
            && output.contains("not confirmed; nothing purged"),
        "{output}"
    );
    assert_eq!(dead().await, 6, "no is no");

    let (status, output) = on_a_terminal(
        "dead-letters purge --kind rejected --rate 10",
        &env,
        "yes\n",
    )
    .await;
    assert!(status.success(), "{output}");
    for i in 0..3 {
        assert!(output.contains(&format!("purged rej-{i}")), "{output}");
    }
    assert!(
        output.contains("purged, 2 left, 3 in all"),
        "the progress bar: {output}"
    );
    assert_eq!(dead().await, 3);

    let (status, stdout, stderr) =
        run_to_end(&["dead-letters", "purge", "--id", "exh-1", "--yes"], &env).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "purged exh-1\n");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "purged 1 of 3 dead letters looked at, from '{}'",
            broker.names.dead
        ),
        "no progress bar when piped"
    );
    let mut left = take_dead_ids(&broker).await;
    left.sort();
    assert_eq!(left, ["exh-0", "exh-2"]);
}

/// A purge killed half-way has removed only dead letters it was asked to: every other one is
/// still there, and each matching one is either purged (and said so) or still there, but for
/// the one in hand at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_killed_half_way_removes_only_what_matches() {
    let broker = Broker::new("clipurgekill").await;
    declare(&broker).await;
    let now = now_rfc3339();
    for i in 0..50 {
        put_dead_letter(&broker, &format!("rej-{i}"), "rejected", &now).await;
        put_dead_letter(&broker, &format!("exh-{i}"), "exhausted", &now).await;
    }
    let mut purge = WorkerProcess::start(
        &[
            "dead-letters",
            "purge",
            "--kind",
            "rejected",
            "--yes",
            "--rate",
            "40",
        ],
        &tool_env(&broker),
    );
    purge.wait_for_output("purged ", 15, WAIT).await;
    purge.signal("KILL");
    purge.wait_exit(WAIT).await;
    let said: Vec<String> = purge
        .output()
        .iter()
        .filter_map(|l| l.strip_prefix("purged ").map(str::to_string))
        .collect();
    let left = take_dead_ids(&broker).await;
    for i in 0..50 {
        let id = format!("exh-{i}");
        assert!(left.contains(&id), "{id} was not to be purged: {left:?}");
    }
    let mut deduped = left.clone();
    deduped.sort();
    deduped.dedup();
    assert_eq!(deduped.len(), left.len(), "nothing twice: {left:?}");
    let rejected_left = left.iter().filter(|id| id.starts_with("rej-")).count();
    assert!(
        said.len() >= 15 && rejected_left > 0,
        "the kill came half-way: {} said, {rejected_left} left",
        said.len()
    );
    assert!(
        said.iter().all(|id| !left.contains(id)),
        "what it said it purged is gone: {said:?}"
    );
    assert!(
        (49..=50).contains(&(said.len() + rejected_left)),
        "every rejected one is purged and said so, or still there, but for the one in hand at \
         the kill: {} said, {rejected_left} left",
        said.len()
    );
}
