//! `amqp-mailer status`, the real binary against the real broker and a real worker process: the
//! figures of each kind of queue, in the table and the JSON, the worker's readiness, the exit
//! status that says whether anything consumes, and `--watch` refreshing on a pseudo-terminal.

use lapin::BasicProperties;
use testkit::broker::{Broker, WAIT};
use testkit::process::{WorkerProcess, free_port, run_to_end, worker_env};
use testkit::smtp::SmtpServer;
use testkit::worker::job;

/// The worker's and the tool's environment: one retry tier of 1 h (two attempts), so that what
/// the test puts there stays; health on `port`.
fn env(broker: &Broker, smtp_port: u16, port: u16) -> Vec<(&'static str, String)> {
    let mut env = worker_env(&broker.names, smtp_port);
    env.extend([
        ("AMQP_MAILER_RETRY__INITIAL_DELAY", "1h".into()),
        ("AMQP_MAILER_HTTP__LISTEN", format!("127.0.0.1:{port}")),
        ("AMQP_MAILER_SMTP__FROM", "sender@example.com".into()),
    ]);
    env
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("JSON ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_queue_the_worker_and_whether_anything_consumes() {
    let smtp = SmtpServer::start();
    let broker = Broker::new("status").await;
    let retry = format!("{}1h", broker.names.retry_prefix);
    broker.also_delete([retry.clone()]);
    let port = free_port();
    let env = env(&broker, smtp.port(), port);

    // Before any worker ran: nothing is declared, nothing consumes.
    let (status, stdout, stderr) = run_to_end(&["status"], &env).await;
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("(not declared)"), "{stdout}");
    assert!(stderr.contains("nothing consumes"), "{stderr}");

    let mut worker = WorkerProcess::start(&["run"], &env);
    worker.wait_for_log("consuming", WAIT).await;
    for i in 0..3 {
        broker
            .publish_to_queue(
                &retry,
                job(&format!("r-{i}"), "a@example.com").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    for i in 0..2 {
        broker
            .publish_to_queue(
                &broker.names.dead,
                job(&format!("d-{i}"), "a@example.com").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    let (status, stdout, stderr) = run_to_end(&["status"], &env).await;
    assert!(status.success(), "consuming: {stdout}{stderr}");
    let row = |stdout: &str, what: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("a {what} row: {stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row(&stdout, "work"),
        ["work", &broker.names.queue, "0", "1"],
        "{stdout}"
    );
    assert_eq!(
        row(&stdout, "retry 1h"),
        ["retry", "1h", &retry, "3", "0"],
        "{stdout}"
    );
    assert_eq!(
        row(&stdout, "dead letters")[2..],
        [broker.names.dead.as_str(), "2", "0"],
        "{stdout}"
    );
    assert!(stdout.contains("waiting to be retried: 3"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "worker at 127.0.0.1:{port}: ready; in flight: 0\n"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("consuming: yes"), "{stdout}");

    let (status, stdout, _) = run_to_end(&["status", "--json"], &env).await;
    assert!(status.success());
    let doc = json(&stdout);
    assert_eq!(doc["work_queue"]["ready"], 0);
    assert_eq!(doc["work_queue"]["consumers"], 1);
    assert_eq!(doc["retry"][0]["delay"], "1h");
    assert_eq!(doc["retry"][0]["name"], retry);
    assert_eq!(doc["retry"][0]["ready"], 3);
    assert_eq!(doc["dead_letters"]["ready"], 2);
    assert_eq!(doc["worker"]["ready"], true);
    assert_eq!(doc["worker"]["in_flight"], 0);
    assert_eq!(doc["consuming"], true);

    // The worker gone, jobs wait in the work queue and nothing consumes them.
    worker.signal("TERM");
    assert!(worker.wait_exit(WAIT).await.success());
    for i in 0..4 {
        broker
            .publish(job(&format!("w-{i}"), "a@example.com").as_bytes())
            .await;
    }
    let (status, stdout, _) = run_to_end(&["status", "--json"], &env).await;
    assert_eq!(status.code(), Some(1), "not consuming: {stdout}");
    let doc = json(&stdout);
    assert_eq!(doc["work_queue"]["ready"], 4);
    assert_eq!(doc["work_queue"]["consumers"], 0);
    assert_eq!(doc["worker"]["ready"], false);
    assert_eq!(doc["consuming"], false);
    let (_, stdout, _) = run_to_end(&["status"], &env).await;
    assert!(
        stdout.contains("NOT READY") && stdout.contains("consuming: NO"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_refreshes_in_place_on_a_terminal() {
    let broker = Broker::new("statuswatch").await;
    let env = env(&broker, 1, free_port());
    // Under script(1): a pseudo-terminal, as an operator's shell would give it.
    let mut command = tokio::process::Command::new("script");
    command
        .args(["-qec"])
        .arg(format!(
            "{} status --watch",
            testkit::process::binary().display()
        ))
        .arg("/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    testkit::process::without_worker_env(&mut command);
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = command.spawn().expect("script(1) from util-linux");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let refreshes = |seen: &[u8]| {
        String::from_utf8_lossy(seen)
            .matches("\x1b[H\x1b[2J")
            .count()
    };
    let read = async {
        use tokio::io::AsyncReadExt as _;
        let mut buffer = [0u8; 4096];
        while refreshes(&seen) < 3 {
            let n = stdout.read(&mut buffer).await.expect("read");
            assert!(n > 0, "script ended: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("three screens within the wait");
    let text = String::from_utf8_lossy(&seen);
    for screen in text.split("\x1b[H\x1b[2J").skip(1).take(2) {
        assert!(
            screen.contains("QUEUE") && screen.contains("every 1 s"),
            "{screen:?}"
        );
    }
    let _ = child.kill().await;
}
