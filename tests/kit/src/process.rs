//! The real `amqp-mailer` binary as a child process, with its log lines readable as events.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::broker::{Broker, Names, amqp_url};

/// The `amqp-mailer` binary that cargo built beside the running test (or example).
///
/// `env!("CARGO_BIN_EXE_amqp-mailer")` exists only while cargo compiles the root package's own
/// tests, not this crate, so the kit finds the binary where cargo puts it: in the profile
/// directory (`target/debug/`) above the test's `deps/` (or the example's `examples/`). Cargo
/// builds a package's binaries before its integration tests. Panics, naming the path, if the
/// binary is not there.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        // Set by cargo at run time too, where it does (and by hand, to test another build).
        if let Some(path) = std::env::var_os("CARGO_BIN_EXE_amqp-mailer") {
            return PathBuf::from(path);
        }
        let binary = profile_dir().join(format!("amqp-mailer{}", std::env::consts::EXE_SUFFIX));
        assert!(
            binary.is_file(),
            "{} is missing: run the tests with `cargo test`, which builds it",
            binary.display()
        );
        binary
    })
}

/// The directory of cargo's build profile that holds the running executable (`target/debug`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let dir = exe.parent().expect("the test executable is in a directory");
    // Tests and benches live in `deps/`, examples in `examples/`; the binaries one level up.
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// The environment that points the binary at a test's queues on the test broker (classic
/// queues, quick to create and delete).
pub fn broker_env(names: &Names) -> Vec<(&'static str, String)> {
    vec![
        ("AMQP_MAILER_AMQP__URL", amqp_url()),
        ("AMQP_MAILER_AMQP__EXCHANGE", names.exchange.clone()),
        ("AMQP_MAILER_AMQP__EVENTS_EXCHANGE", names.events.clone()),
        ("AMQP_MAILER_AMQP__QUEUE", names.queue.clone()),
        ("AMQP_MAILER_AMQP__ROUTING_KEY", names.routing_key.clone()),
        (
            "AMQP_MAILER_AMQP__RETRY_QUEUE_PREFIX",
            names.retry_prefix.clone(),
        ),
        ("AMQP_MAILER_AMQP__DEAD_LETTER_QUEUE", names.dead.clone()),
        ("AMQP_MAILER_AMQP__QUEUE_TYPE", "classic".into()),
    ]
}

/// [`broker_env`] plus the relay on 127.0.0.1:`smtp_port` without TLS and two attempts per job:
/// what `run` needs against a test relay. With the default retry delay the one retry queue is
/// `<retry_prefix>10s`, for the test to delete. A test appends what else it sets.
pub fn worker_env(names: &Names, smtp_port: u16) -> Vec<(&'static str, String)> {
    let mut env = broker_env(names);
    env.extend([
        ("AMQP_MAILER_RETRY__MAX_ATTEMPTS", "2".into()),
        ("AMQP_MAILER_SMTP__HOST", "127.0.0.1".into()),
        ("AMQP_MAILER_SMTP__PORT", smtp_port.to_string()),
        ("AMQP_MAILER_SMTP__TLS", "none".into()),
        // No connection but the jobs' own: tests count sessions and script the first ones.
        ("AMQP_MAILER_SMTP__CHECK_AT_START", "false".into()),
    ]);
    env
}

/// Removes from a worker's environment what this process has of the worker's own settings
/// (`AMQP_MAILER_*`) and of systemd's (`NOTIFY_SOCKET`, `WATCHDOG_*`), so that only what the
/// caller sets reaches it.
pub fn without_worker_env(command: &mut Command) {
    for (key, _) in std::env::vars() {
        if key.starts_with("AMQP_MAILER") || key == "NOTIFY_SOCKET" || key.starts_with("WATCHDOG_")
        {
            command.env_remove(key);
        }
    }
}

/// The binary running as a child process (killed when dropped), its stderr collected.
pub struct WorkerProcess {
    child: Child,
    /// Every stderr line so far.
    log: watch::Receiver<Vec<String>>,
    /// Every stdout line so far.
    out: watch::Receiver<Vec<String>>,
}

impl WorkerProcess {
    /// Starts `amqp-mailer` with `args`, the environment cleared of AMQP_MAILER_* and set to
    /// `envs`, and JSON-free text logs on stderr.
    pub fn start(args: &[&str], envs: &[(&str, String)]) -> Self {
        let mut command = Command::new(binary());
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        without_worker_env(&mut command);
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start the amqp-mailer binary");
        let log = lines_of(child.stderr.take().expect("stderr piped"));
        let out = lines_of(child.stdout.take().expect("stdout piped"));
        Self { child, log, out }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Starts `amqp-mailer run` on `broker`'s queues and the relay on 127.0.0.1:`smtp_port`
    /// ([`worker_env`], then `extra`), without waiting. Its one retry queue (`<retry_prefix>10s`,
    /// see [`worker_env`]) is deleted with the broker's queues.
    pub fn run(
        broker: &Broker,
        smtp_port: u16,
        extra: impl IntoIterator<Item = (&'static str, String)>,
    ) -> Self {
        broker.also_delete([format!("{}10s", broker.names.retry_prefix)]);
        let mut env = worker_env(&broker.names, smtp_port);
        env.extend(extra);
        Self::start(&["run"], &env)
    }

    /// Waits for a log line containing `needle`; panics with the log so far on timeout.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let found = tokio::time::timeout(
            timeout,
            self.log
                .wait_for(|lines| lines.iter().any(|l| l.contains(needle))),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|lines| lines.iter().find(|l| l.contains(needle)).cloned());
        match found {
            Some(line) => line,
            None => panic!(
                "no log line with {needle:?} within {timeout:?}; log so far:\n{}",
                self.log().join("\n")
            ),
        }
    }

    /// Waits until `count` stdout lines start with `prefix`; returns every stdout line so far.
    /// Panics with the output so far on timeout.
    pub async fn wait_for_output(
        &mut self,
        prefix: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<String> {
        let enough =
            |lines: &Vec<String>| lines.iter().filter(|l| l.starts_with(prefix)).count() >= count;
        let found = tokio::time::timeout(timeout, self.out.wait_for(enough))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|lines| lines.clone());
        match found {
            Some(lines) => lines,
            None => panic!(
                "not {count} stdout lines starting {prefix:?} within {timeout:?}; so far:\n{}\nlog:\n{}",
                self.output().join("\n"),
                self.log().join("\n")
            ),
        }
    }

    /// Every stdout line so far.
    pub fn output(&self) -> Vec<String> {
        self.out.borrow().clone()
    }

    /// Every stderr line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    /// Sends `signal` (e.g. `TERM`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit; panics with its log on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "amqp-mailer did not exit within {timeout:?}; log:\n{}",
                self.log().join("\n")
            ),
        }
    }
}

/// The lines `stream` gives, gathered as they come.
fn lines_of(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> watch::Receiver<Vec<String>> {
    let (tx, lines) = watch::channel(Vec::new());
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            tx.send_modify(|lines| lines.push(line));
        }
    });
    lines
}

/// Runs the binary to completion (for subcommands like `config`); returns status, stdout, stderr.
pub async fn run_to_end(args: &[&str], envs: &[(&str, String)]) -> (ExitStatus, String, String) {
    let mut command = Command::new(binary());
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    without_worker_env(&mut command);
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("finished in time")
        .expect("run binary");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
