//! Soak test: runs the real release binary for a set time against the local RabbitMQ and a
//! scripted test relay, injects faults at random, and checks at the end that every published job
//! was delivered or dead-lettered, how many were sent twice, and that the worker's memory did not
//! grow.
//!
//! ```sh
//! cargo run --release --example soak -- --minutes 10        # or: bash .ci/soak --minutes 10
//! cargo run --release --example soak -- --help
//! ```
//!
//! Not part of `cargo test`. It needs the broker at 127.0.0.1:5672 (guest/guest, or `AMQP_URL`)
//! and builds `target/release/amqp-mailer` first (`--no-build` to skip, `--binary` to choose).
//!
//! The layout:
//!
//! ```text
//!  publisher ──(direct)──▶ RabbitMQ ◀──(broker proxy: cut, black-hole, refuse)── amqp-mailer
//!  dead-letter reader ◀─(direct)─┘                                                  │
//!                      test relay (tests/kit/src/smtp.rs) ◀──(relay proxy)───────────┘
//! ```
//!
//! Everything the run needs is unique to it (queue names carry the seed and pid) and deleted at
//! the end, also on Ctrl-C. The worker's logs, the fault timeline and the report are written under
//! `target/soak/<run>/`.
//!
//! The parts: this file (flags, set-up, the run from start to settle), `worker.rs` (the worker
//! process: start, signal, restart, sample), `faults.rs` (the fault injector), `ledger.rs`
//! (publishing, dead letters, the relay's messages, settling), `report.rs` (the report), and
//! the verdict on the books, a pure function in the test kit (`testkit::soak`, unit-tested there).

mod faults;
mod ledger;
mod report;
mod rng;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
// The test relay and the TCP fault proxy of the integration tests, used as they are.
use testkit::proxy::Proxy;
use testkit::smtp::SmtpServer;
use testkit::soak::Ledger;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::faults::FaultRecord;
use crate::ledger::Progress;
use crate::report::report;
use crate::rng::Rng;
use crate::worker::{Generation, memory};

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Soak amqp-mailer: publish jobs for a while, inject faults at random, account for every job"
)]
struct Args {
    /// How long to publish and inject faults (then it settles, bounded by --settle-timeout).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Jobs published per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Seed of the fault schedule and of the job mix (printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// worker.concurrency.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Percent of jobs sent to an address the relay always rejects with 550 (dead letter
    /// `rejected`).
    #[arg(long, default_value_t = 2.0)]
    permanent_percent: f64,
    /// Percent of jobs that are invalid (bad JSON, an unknown field, a bad address: dead letter
    /// `invalid`).
    #[arg(long, default_value_t = 1.0)]
    invalid_percent: f64,
    /// Mean pause in seconds between two faults, per injector (relay side and broker side run
    /// independently, so their faults overlap now and then).
    #[arg(long, default_value_t = 8.0)]
    fault_gap: f64,
    /// How many times to SIGTERM and restart the worker (default: one per 2.5 minutes, at least
    /// 2). Half of them fall in the first quarter of the run and half in the last, so that one
    /// worker lives through the middle half and its memory can be judged.
    #[arg(long)]
    restarts: Option<usize>,
    /// Inject only these kinds of fault (comma-separated, e.g. `broker_cut,relay_4xx`; `none`
    /// for none). Kinds: relay_4xx, relay_stall, relay_drop, relay_cut, relay_refuse,
    /// relay_blackhole, relay_slow, broker_cut, broker_blackhole, broker_down. Restarts are set
    /// with --restarts.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Probability that a restart sends a second SIGTERM during the drain (stop at once).
    #[arg(long, default_value_t = 0.35)]
    double_sigterm: f64,
    /// Seconds between two RSS samples.
    #[arg(long, default_value_t = 2.0)]
    sample_every: f64,
    /// The bound on the wait for everything to settle after publishing stopped, in seconds.
    #[arg(long, default_value_t = 240.0)]
    settle_timeout: f64,
    /// Fail if the longest-lived worker's RSS grew by more than this percent between the first
    /// and the last quarter of its life.
    #[arg(long, default_value_t = 20.0)]
    max_rss_growth: f64,
    /// The worker binary (default: target/release/amqp-mailer, built first unless --no-build).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Do not run `cargo build --release --bin amqp-mailer` first.
    #[arg(long)]
    no_build: bool,
    /// Broker URL (direct, without the fault proxy); default $AMQP_URL or the local guest broker.
    #[arg(long)]
    amqp_url: Option<String>,
    /// Where logs and the report go (default target/soak/<time>-<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
}

const SMTP_TIMEOUT: &str = "3s";
const HEARTBEAT_SECS: u64 = 2;
const GRACE_SECS: u64 = 10;
const REJECT_DOMAIN: &str = "reject.example";
const MESSAGE_ID_DOMAIN: &str = "soak.example";

struct Names {
    prefix: String,
    exchange: String,
    /// Receipts go here: on, as by default, with nothing bound (the broker drops them).
    events: String,
    queue: String,
    retry_prefix: String,
    dead: String,
}

impl Names {
    fn new(seed: u64) -> Self {
        let prefix = format!("soak.{seed}.{}", std::process::id());
        Self {
            exchange: format!("{prefix}.email"),
            events: format!("{prefix}.events"),
            queue: format!("{prefix}.send"),
            retry_prefix: format!("{prefix}.retry."),
            dead: format!("{prefix}.dead"),
            prefix,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything one run shares between its tasks (publisher, dead-letter reader, monitor, and the
/// two fault injectors).
struct Soak {
    args: Args,
    seed: u64,
    start: Instant,
    amqp_url: String,
    binary: PathBuf,
    /// What was built: the commit, and whether the tree had changes.
    build: String,
    out: PathBuf,
    names: Names,
    retry_queues: Vec<String>,
    /// The worker's configuration, without http.listen (chosen per generation).
    env: Vec<(String, String)>,
    smtp: SmtpServer,
    relay_proxy: Proxy,
    broker_proxy: Proxy,
    ledger: Mutex<Ledger>,
    /// When the last dead letter was read: the end waits until the dead-letter queue is quiet.
    last_dead_at: Mutex<Option<Instant>>,
    generations: Mutex<Vec<Generation>>,
    /// (generation index, pid, http address) of the running worker.
    current: Mutex<Option<(usize, u32, SocketAddr)>>,
    child: tokio::sync::Mutex<Option<Child>>,
    faults: Mutex<Vec<FaultRecord>>,
    /// Things that make the run fail.
    problems: Mutex<Vec<String>>,
    /// Things worth a look that do not fail the run.
    notes: Mutex<Vec<String>>,
    progress: Mutex<Vec<Progress>>,
    /// Broker black-holes: (held seconds, seconds until /readyz said "reconnecting").
    blackholes: Mutex<Vec<(f64, Option<f64>)>>,
    /// Seconds from lifting a broker fault to consuming again.
    recoveries: Mutex<Vec<f64>>,
    /// Seconds from a restart to consuming.
    restart_ready: Mutex<Vec<f64>>,
    relay_seen: Mutex<usize>,
}

impl Soak {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn problem(&self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("[{}] PROBLEM: {text}", clock(self.now()));
        lock(&self.problems).push(text);
    }

    fn note(&self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("[{}] note: {text}", clock(self.now()));
        lock(&self.notes).push(text);
    }

    fn fault(&self, kind: &'static str, detail: impl Into<String>) {
        let detail = detail.into();
        let at = self.now();
        eprintln!("[{}] fault {kind}: {detail}", clock(at));
        lock(&self.faults).push(FaultRecord { at, kind, detail });
    }

    /// Whether --only allows this kind of fault.
    fn allowed(&self, kind: &str) -> bool {
        self.args
            .only
            .as_ref()
            .is_none_or(|only| only.iter().any(|k| k == kind))
    }

    fn current(&self) -> Option<(usize, u32, SocketAddr)> {
        *lock(&self.current)
    }
}

/// Sleeps `d`; false if `stop` came first.
async fn hold(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

fn clock(secs: f64) -> String {
    let secs = secs.max(0.0).round() as u64;
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(1)
    });
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => {
            if !args.no_build {
                eprintln!("building the worker: cargo build --release --bin amqp-mailer");
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let built = std::process::Command::new(cargo)
                    .args(["build", "--release", "--bin", "amqp-mailer"])
                    .current_dir(manifest)
                    .status();
                if !built.is_ok_and(|s| s.success()) {
                    eprintln!("soak: cargo build --release failed");
                    return ExitCode::from(2);
                }
            }
            manifest.join("target/release/amqp-mailer")
        }
    };
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| manifest.join(format!("target/soak/{stamp}-{seed}")));
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("soak: cannot create {}: {e}", out.display());
        return ExitCode::from(2);
    }
    let build = describe_build(manifest, &binary);
    // A private copy: other builds may replace target/release/amqp-mailer during the run.
    let copy = out.join("amqp-mailer");
    if let Err(e) = std::fs::copy(&binary, &copy) {
        eprintln!("soak: cannot copy {}: {e}", binary.display());
        return ExitCode::from(2);
    }
    let amqp_url = args.amqp_url.clone().unwrap_or_else(|| {
        std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    });
    let Some(broker_addr) = broker_address(&amqp_url) else {
        eprintln!("soak: cannot find host:port in {amqp_url}");
        return ExitCode::from(2);
    };
    if let Err(e) = Connection::connect(&amqp_url, ConnectionProperties::default()).await {
        eprintln!(
            "soak: RabbitMQ is not reachable at {amqp_url}: {e}. Start it (bash .ci/ensure-rabbitmq)."
        );
        return ExitCode::from(2);
    }

    let names = Names::new(seed);
    let smtp = SmtpServer::start();
    let relay_proxy = Proxy::start(smtp.addr());
    let broker_proxy = Proxy::start(broker_addr);
    let url_via_proxy = amqp_url.replacen(
        &format!(":{}", broker_addr.port()),
        &format!(":{}", broker_proxy.port()),
        1,
    );
    let env: Vec<(String, String)> = [
        ("AMQP__URL", url_via_proxy),
        ("AMQP__EXCHANGE", names.exchange.clone()),
        ("AMQP__EVENTS_EXCHANGE", names.events.clone()),
        ("AMQP__QUEUE", names.queue.clone()),
        ("AMQP__ROUTING_KEY", names.queue.clone()),
        ("AMQP__RETRY_QUEUE_PREFIX", names.retry_prefix.clone()),
        ("AMQP__DEAD_LETTER_QUEUE", names.dead.clone()),
        ("AMQP__QUEUE_TYPE", "quorum".into()),
        ("AMQP__CONNECTION_NAME", names.prefix.clone()),
        ("AMQP__HEARTBEAT", format!("{HEARTBEAT_SECS}s")),
        ("AMQP__CONNECT_TIMEOUT", "3s".into()),
        ("AMQP__RECONNECT_MAX_DELAY", "5s".into()),
        ("AMQP__PUBLISH_TIMEOUT", "5s".into()),
        ("WORKER__CONCURRENCY", args.concurrency.to_string()),
        ("SMTP__HOST", "127.0.0.1".into()),
        ("SMTP__PORT", relay_proxy.port().to_string()),
        ("SMTP__TLS", "none".into()),
        ("SMTP__FROM", "Soak <soak@example.com>".into()),
        ("SMTP__HELLO_NAME", "soak.test".into()),
        ("SMTP__MESSAGE_ID_DOMAIN", MESSAGE_ID_DOMAIN.into()),
        ("SMTP__TIMEOUT", SMTP_TIMEOUT.into()),
        ("SMTP__CONNECT_TIMEOUT", "2s".into()),
        ("RETRY__INITIAL_DELAY", "1s".into()),
        ("RETRY__MULTIPLIER", "2".into()),
        ("RETRY__MAX_DELAY", "8s".into()),
        ("RETRY__MAX_ATTEMPTS", "20".into()),
        ("SHUTDOWN__GRACE", format!("{GRACE_SECS}s")),
        ("LOG__LEVEL", "info".into()),
        ("LOG__FORMAT", "text".into()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("AMQP_MAILER_{k}"), v))
    .collect();
    // The worker's own reading of this configuration names the retry queues (for cleanup).
    let config = match amqp_mailer::config::load(None, env.clone()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("soak: the worker configuration is invalid: {e}");
            return ExitCode::from(2);
        }
    };
    let retry_queues = testkit::worker::retry_queues(&config);

    let soak = Arc::new(Soak {
        args: args.clone(),
        seed,
        start: Instant::now(),
        amqp_url,
        binary: copy,
        build,
        out: out.clone(),
        names,
        retry_queues,
        env,
        smtp,
        relay_proxy,
        broker_proxy,
        ledger: Mutex::default(),
        last_dead_at: Mutex::default(),
        generations: Mutex::default(),
        current: Mutex::default(),
        child: tokio::sync::Mutex::default(),
        faults: Mutex::default(),
        problems: Mutex::default(),
        notes: Mutex::default(),
        progress: Mutex::default(),
        blackholes: Mutex::default(),
        recoveries: Mutex::default(),
        restart_ready: Mutex::default(),
        relay_seen: Mutex::default(),
    });
    soak.reset_relay_rules();
    eprintln!(
        "soak: seed {seed} (repeat with --seed {seed}), {} min at {} jobs/s, queues {}.*, output {}",
        args.minutes,
        args.rate,
        soak.names.prefix,
        out.display()
    );

    let stop_all = CancellationToken::new();
    let outcome = tokio::select! {
        code = soak_run(soak.clone(), stop_all.clone()) => Some(code),
        _ = tokio::signal::ctrl_c() => None,
    };
    let code = match outcome {
        Some(code) => code,
        None => {
            eprintln!("\nsoak: interrupted; stopping the worker and deleting the queues");
            stop_all.cancel();
            if let Ok(mut slot) =
                tokio::time::timeout(Duration::from_secs(20), soak.child.lock()).await
            {
                soak.stop_worker(&mut slot, true, "SIGTERM").await;
            }
            ExitCode::from(130)
        }
    };
    soak.delete_queues().await;
    code
}

/// The commit the binary was built from (and "+changes" for a dirty tree), its size and time.
fn describe_build(manifest: &Path, binary: &Path) -> String {
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty=+changes"])
        .current_dir(manifest)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown commit".into(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        });
    let meta = std::fs::metadata(binary).ok();
    let size = meta.as_ref().map_or(0, |m| m.len());
    let age = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.elapsed().ok())
        .map_or("?".into(), |d| clock(d.as_secs_f64()));
    format!(
        "{} ({commit}, {:.1} MiB, built {age} ago)",
        binary.display(),
        size as f64 / 1048576.0
    )
}

fn broker_address(url: &str) -> Option<SocketAddr> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (host_port, 5672),
    };
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{port}").parse().ok()
}

async fn soak_run(soak: Arc<Soak>, stop_all: CancellationToken) -> ExitCode {
    // The first worker declares the topology; publishing can start once it consumes.
    {
        let mut slot = soak.child.lock().await;
        if let Err(e) = soak.start_worker(&mut slot).await {
            soak.problem(e);
            soak.stop_worker(&mut slot, false, "SIGTERM").await;
            return report(&soak, None, None);
        }
    }
    let dead_stop = stop_all.child_token();
    let dead_reader = tokio::spawn({
        let soak = soak.clone();
        let stop = dead_stop.clone();
        async move { soak.read_dead_letters(stop).await }
    });
    let monitor_stop = stop_all.child_token();
    let monitor = tokio::spawn({
        let soak = soak.clone();
        let stop = monitor_stop.clone();
        async move { soak.monitor(stop).await }
    });
    let publish_stop = stop_all.child_token();
    let publisher = tokio::spawn({
        let soak = soak.clone();
        let stop = publish_stop.clone();
        let rng = Rng::new(soak.seed, 1);
        async move { soak.publish(rng, stop).await }
    });
    let faults_stop = stop_all.child_token();
    let relay_faults = tokio::spawn({
        let soak = soak.clone();
        let stop = faults_stop.clone();
        let rng = Rng::new(soak.seed, 2);
        async move { soak.relay_faults(rng, stop).await }
    });
    let broker_faults = tokio::spawn({
        let soak = soak.clone();
        let stop = faults_stop.clone();
        let rng = Rng::new(soak.seed, 3);
        async move { soak.broker_faults(rng, stop).await }
    });

    let run_for = Duration::from_secs_f64(soak.args.minutes * 60.0);
    let mut last = Instant::now();
    while soak.start.elapsed() < run_for {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if last.elapsed() >= Duration::from_secs(30) {
            last = Instant::now();
            let (published, delivered, dead) = {
                let ledger = lock(&soak.ledger);
                (
                    ledger.published.len(),
                    ledger.delivered.len(),
                    ledger.dead.len(),
                )
            };
            let rss = soak
                .current()
                .and_then(|(_, pid, _)| memory(pid))
                .map_or("-".into(), |s| mib(s.rss_kb));
            eprintln!(
                "[{}] published {published}, delivered {delivered}, dead-lettered {dead}, \
                 faults {}, worker RSS {rss}",
                clock(soak.now()),
                lock(&soak.faults).len()
            );
        }
    }
    let publish_ended = soak.now();
    eprintln!(
        "[{}] time is up: no more faults or jobs; settling",
        clock(publish_ended)
    );
    faults_stop.cancel();
    publish_stop.cancel();
    let _ = relay_faults.await;
    let _ = broker_faults.await;
    let _ = publisher.await;
    soak.clear_all_faults().await;
    {
        let mut slot = soak.child.lock().await;
        if slot.is_none()
            && let Err(e) = soak.start_worker(&mut slot).await
        {
            soak.problem(e);
        }
    }
    let bound = Duration::from_secs_f64(soak.args.settle_timeout);
    let settled = soak.settle(bound).await;
    if let Err(e) = &settled {
        soak.problem(e.clone());
    }
    {
        let mut slot = soak.child.lock().await;
        soak.stop_worker(&mut slot, false, "final SIGTERM").await;
    }
    monitor_stop.cancel();
    let _ = monitor.await;
    // Read the last dead letters: until the queue is empty and quiet for 2 s (bounded).
    let since = Instant::now();
    if let Ok(conn) = Connection::connect(&soak.amqp_url, ConnectionProperties::default()).await {
        while since.elapsed() < Duration::from_secs(30) {
            let quiet =
                lock(&soak.last_dead_at).is_none_or(|at| at.elapsed() > Duration::from_secs(2));
            let empty = match conn.create_channel().await {
                Ok(channel) => channel
                    .queue_declare(
                        soak.names.dead.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .is_ok_and(|q| q.message_count() == 0),
                Err(_) => false,
            };
            if quiet && empty {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
    dead_stop.cancel();
    let _ = dead_reader.await;
    soak.absorb_relay().await;
    report(&soak, Some(publish_ended), settled.ok())
}
