//! aiosmtpd (Python) as a child process: the relay of the interop tests. The server is
//! `tests/interop/aiosmtpd_relay.py`, run with the venv that `bash .ci/install-test-tools` makes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, Command};

use testkit::pki::Pki;

const INSTALL_HINT: &str = "run `bash .ci/install-test-tools` (it makes target/test-tools/venv \
                            with aiosmtpd), then run the tests again";

/// How long the relay may take to say READY (a cold Python start is well under a second).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The venv's python, checked once to import aiosmtpd. Fails the test, never skips it.
pub fn venv_python() -> PathBuf {
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        let python =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/venv/bin/python");
        if !python.exists() {
            return Err(format!(
                "the interop tests need aiosmtpd, and {} does not exist: {INSTALL_HINT}",
                python.display()
            ));
        }
        let output = std::process::Command::new(&python)
            .args(["-c", "import aiosmtpd.smtp"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}; {INSTALL_HINT}", python.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} cannot import aiosmtpd ({}): {INSTALL_HINT}",
                python.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(python)
    });
    match checked {
        Ok(python) => python.clone(),
        Err(message) => panic!("{message}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayTls {
    /// Plain SMTP; STARTTLS is not offered.
    None,
    /// STARTTLS offered, and required before MAIL FROM.
    Starttls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

impl RelayTls {
    fn arg(self) -> &'static str {
        match self {
            RelayTls::None => "none",
            RelayTls::Starttls => "starttls",
            RelayTls::Implicit => "implicit",
        }
    }
}

/// A message aiosmtpd accepted, as the relay recorded it.
#[derive(Debug, Clone, Deserialize)]
pub struct Recorded {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub data: String,
    /// The name the client gave in EHLO.
    pub ehlo: Option<String>,
    /// How many EHLOs the session sent (STARTTLS: one before it and one after).
    pub ehlo_count: u32,
    /// The parameters of MAIL FROM, e.g. `SIZE=1234`.
    pub mail_options: Vec<String>,
    pub tls: bool,
    /// E.g. `TLSv1.3`.
    pub tls_version: Option<String>,
    pub authenticated: bool,
    pub auth_user: Option<String>,
    /// `PLAIN` or `LOGIN`.
    pub auth_mechanism: Option<String>,
}

impl Recorded {
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(self.data.as_bytes())
            .expect("the recorded data parses as a message")
    }

    /// The first header of that name (case-insensitive), raw: unfolded, not decoded.
    pub fn header(&self, name: &str) -> Option<String> {
        testkit::smtp::unfolded_headers(self.data.as_bytes())
            .into_iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }
}

/// An AUTH attempt the relay saw (the password is not recorded).
#[derive(Debug, Clone, Deserialize)]
pub struct AuthAttempt {
    pub mechanism: String,
    pub user: Option<String>,
    pub success: bool,
    pub tls: bool,
}

#[derive(Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event {
    Message(Recorded),
    Auth(AuthAttempt),
}

/// A running aiosmtpd relay. Killed when dropped; `stop` ends it with SIGTERM.
pub struct Aiosmtpd {
    child: Child,
    port: u16,
    jsonl: PathBuf,
    stderr: Arc<Mutex<String>>,
}

pub struct RelayOptions<'a> {
    pub tls: RelayTls,
    /// The certificate and key to serve; needed unless `tls` is `None`.
    pub pki: Option<&'a Pki>,
    /// AUTH required, with this user and password.
    pub auth: Option<(&'a str, &'a str)>,
    /// The SIZE it advertises and enforces; aiosmtpd's default (32 MiB) if unset.
    pub size_limit: Option<u64>,
}

impl Aiosmtpd {
    /// Starts the relay on a port of its choosing and waits for its READY line.
    pub async fn start(dir: &Path, options: RelayOptions<'_>) -> Self {
        let python = venv_python();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/aiosmtpd_relay.py");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let jsonl = dir.join(format!(
            "relay-{}-{}.jsonl",
            options.tls.arg(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut command = Command::new(python);
        command
            .arg(script)
            .args(["--port", "0", "--tls", options.tls.arg()])
            .arg("--jsonl")
            .arg(&jsonl)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(pki) = options.pki {
            command
                .arg("--cert")
                .arg(&pki.cert_file)
                .arg("--key")
                .arg(&pki.key_file);
        }
        if let Some((user, password)) = options.auth {
            command.args(["--user", user, "--password", password]);
        }
        if let Some(limit) = options.size_limit {
            command.args(["--size-limit", &limit.to_string()]);
        }
        let mut child = command.spawn().expect("start the aiosmtpd relay");

        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });

        let stdout = child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(port) = line.strip_prefix("READY ") {
                    return port.trim().parse::<u16>().ok();
                }
            }
            None
        })
        .await;
        let port = match ready {
            Ok(Some(port)) => port,
            outcome => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                // Let the stderr reader catch up with what the process said before it ended.
                tokio::task::yield_now().await;
                panic!(
                    "the aiosmtpd relay did not say READY ({}); stderr:\n{}\nIf aiosmtpd is \
                     missing: {INSTALL_HINT}",
                    if outcome.is_err() {
                        format!("not within {START_TIMEOUT:?}")
                    } else {
                        "it exited or printed garbage".to_string()
                    },
                    stderr.lock().expect("lock")
                );
            }
        };
        // Keep reading stdout so the relay never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            port,
            jsonl,
            stderr,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the relay printed on stderr so far (its log), for failure messages.
    pub fn log(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    fn events(&self) -> Vec<Event> {
        let text = match std::fs::read_to_string(&self.jsonl) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("cannot read {}: {e}", self.jsonl.display()),
        };
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("bad line from the relay ({e}): {line}"))
            })
            .collect()
    }

    /// The messages accepted so far. Each is written before the relay answers 250, so after the
    /// worker reported a delivery its message is here.
    pub fn messages(&self) -> Vec<Recorded> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m),
                Event::Auth(_) => None,
            })
            .collect()
    }

    /// The AUTH attempts so far, each written before the relay answered it.
    pub fn auth_attempts(&self) -> Vec<AuthAttempt> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Auth(a) => Some(a),
                Event::Message(_) => None,
            })
            .collect()
    }

    /// Ends the relay with SIGTERM and checks that it exits cleanly (status 0).
    pub async fn stop(mut self) {
        let pid = self.child.id().expect("relay still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let exit = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("aiosmtpd ignored SIGTERM; log:\n{}", self.log()))
            .expect("wait for aiosmtpd");
        assert!(
            exit.success(),
            "aiosmtpd exited with {exit} on SIGTERM; log:\n{}",
            self.log()
        );
    }
}
