//! The command-line tools, run as the real binary against the real broker: publish, dead-letters
//! list and replay (including a replay killed half-way), health, and --help everywhere.

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
        &env,
    )
    .await;
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
    let (status, _, stderr) = run_to_end(
        &[
            "publish",
            "--to",
            "not an address",
            "--subject",
            "s",
            "--text",
            "t",
        ],
        &env,
    )
    .await;
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
    for command in ["list", "replay"] {
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
    let (status, stdout, stderr) = run_to_end(
        &[
            "publish",
            "--to",
            "ann@example.com",
            "--subject",
            "s",
            "--text",
            "t",
        ],
        &env,
    )
    .await;
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
