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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

// The test relay and the TCP fault proxy of the integration tests, used as they are.
use testkit::proxy::Proxy;
use testkit::smtp::{Action, Cmd, Rule, SmtpServer};

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
/// RSS samples taken this early in a worker's life are start-up, not steady state.
const WARM_UP: f64 = 10.0;
/// The memory check judges only a worker that lived at least this long (seconds).
const MIN_JUDGED: f64 = 120.0;

// ---------------------------------------------------------------------------------------------
// A small seeded random number generator (xorshift64*), one stream per task so that the fault
// schedule of a seed does not depend on how the tasks interleave.

struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        // splitmix64 of the seed and stream, never zero.
        let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64(self.range(lo, hi))
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn pick<T: Copy>(&mut self, weighted: &[(T, u32)]) -> T {
        let total: u32 = weighted.iter().map(|(_, w)| w).sum();
        let mut roll = (self.next() % u64::from(total)) as u32;
        for (item, weight) in weighted {
            if roll < *weight {
                return *item;
            }
            roll -= weight;
        }
        weighted[0].0
    }
}

// ---------------------------------------------------------------------------------------------
// What the run records.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum JobKind {
    Normal,
    Permanent,
    Invalid,
}

#[derive(Debug, Clone)]
struct DeadLetter {
    kind: String,
    attempt: String,
    reason: String,
}

#[derive(Default)]
struct Ledger {
    /// Every job the broker confirmed, by id.
    published: HashMap<String, JobKind>,
    /// Publishes that failed or were not confirmed (not counted as published).
    unconfirmed: Vec<String>,
    /// Seconds since the start at which the relay accepted each id.
    delivered: HashMap<String, Vec<f64>>,
    /// Relay messages that did not carry a soak id.
    foreign: usize,
    /// Every dead letter read, by id (more than one means it was dead-lettered twice).
    dead: HashMap<String, Vec<DeadLetter>>,
    last_dead_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Seconds since the start of the run.
    t: f64,
    rss_kb: u64,
    hwm_kb: u64,
    threads: u64,
    fds: u64,
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    t: f64,
    published: usize,
    delivered: usize,
    dead: usize,
}

type Metrics = BTreeMap<String, f64>;

struct Generation {
    n: usize,
    pid: u32,
    log: PathBuf,
    started: f64,
    ready_after: Option<f64>,
    ended: Option<f64>,
    exit: Option<String>,
    /// How it ended: "SIGTERM", "SIGTERM x2", "final SIGTERM", "crashed", "killed".
    stop: &'static str,
    samples: Vec<Sample>,
    /// The last /metrics scrape.
    metrics: Option<Metrics>,
}

impl Generation {
    fn lived(&self, now: f64) -> f64 {
        self.ended.unwrap_or(now) - self.started
    }
}

struct FaultRecord {
    at: f64,
    kind: &'static str,
    detail: String,
}

struct Names {
    prefix: String,
    exchange: String,
    queue: String,
    retry_prefix: String,
    dead: String,
}

impl Names {
    fn new(seed: u64) -> Self {
        let prefix = format!("soak.{seed}.{}", std::process::id());
        Self {
            exchange: format!("{prefix}.email"),
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

    // -- the worker process ----------------------------------------------------------------

    /// Starts a new generation of the worker and waits (bounded) until it consumes.
    async fn start_worker(&self, slot: &mut Option<Child>) -> Result<(), String> {
        let n = lock(&self.generations).len() + 1;
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = self.out.join(format!("worker-{n}.log"));
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let stdout = file.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new(&self.binary);
        command
            .arg("run")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            // Its own process group: a Ctrl-C on the terminal reaches only the soak, which
            // then stops the worker itself.
            .process_group(0)
            .kill_on_drop(true);
        for (key, _) in std::env::vars() {
            if key.starts_with("AMQP_MAILER")
                || key == "NOTIFY_SOCKET"
                || key.starts_with("WATCHDOG_")
            {
                command.env_remove(key);
            }
        }
        command
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("AMQP_MAILER_HTTP__LISTEN", http.to_string())
            .env("NO_COLOR", "1");
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        let pid = child.id().unwrap_or(0);
        let started = self.now();
        let index = {
            let mut generations = lock(&self.generations);
            generations.push(Generation {
                n,
                pid,
                log,
                started,
                ready_after: None,
                ended: None,
                exit: None,
                stop: "",
                samples: Vec::new(),
                metrics: None,
            });
            generations.len() - 1
        };
        *slot = Some(child);
        *lock(&self.current) = Some((index, pid, http));
        eprintln!(
            "[{}] worker #{n} started (pid {pid}, http {http})",
            clock(started)
        );
        match self.wait_ready(http, Duration::from_secs(30)).await {
            Some(after) => {
                lock(&self.generations)[index].ready_after = Some(after);
                Ok(())
            }
            None => Err(format!(
                "worker #{n} (pid {pid}) was not consuming within 30 s of its start"
            )),
        }
    }

    /// Polls /readyz until it answers 200; the seconds it took, or None after `bound`.
    async fn wait_ready(&self, http: SocketAddr, bound: Duration) -> Option<f64> {
        let since = Instant::now();
        while since.elapsed() < bound {
            if amqp_mailer::http::check(http, "/readyz").await.is_ok() {
                return Some(since.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    async fn scrape(&self, index: usize, http: SocketAddr) {
        let Ok(Ok(text)) = tokio::time::timeout(
            Duration::from_secs(2),
            amqp_mailer::http::check(http, "/metrics"),
        )
        .await
        else {
            return;
        };
        let metrics = parse_metrics(&text);
        if let Some(generation) = lock(&self.generations).get_mut(index) {
            generation.metrics = Some(metrics);
        }
    }

    /// SIGTERM (twice if `double`, the second during the drain), then waits for the exit.
    async fn stop_worker(&self, slot: &mut Option<Child>, double: bool, why: &'static str) {
        let Some(mut child) = slot.take() else {
            return;
        };
        let Some((index, pid, http)) = lock(&self.current).take() else {
            return;
        };
        let n = index + 1;
        self.scrape(index, http).await;
        signal(pid, "TERM");
        let mut stop = why;
        if double {
            // Wait until it says it is draining, then the second signal: stop at once.
            let since = Instant::now();
            let mut draining = false;
            while since.elapsed() < Duration::from_secs(5) {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                if let Err(e) = amqp_mailer::http::check(http, "/readyz").await
                    && e.contains("draining")
                {
                    draining = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if draining && matches!(child.try_wait(), Ok(None)) {
                self.scrape(index, http).await;
                signal(pid, "TERM");
                stop = "SIGTERM x2";
            } else {
                self.note(format!(
                    "worker #{n}: no second SIGTERM, it had {} before it was seen draining",
                    if draining {
                        "exited"
                    } else {
                        "not drained or exited"
                    }
                ));
            }
        }
        // Scrape while it drains: the HTTP server runs until the drain is over.
        let deadline = Instant::now() + Duration::from_secs(GRACE_SECS + 20);
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.ok(),
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    if Instant::now() > deadline {
                        self.problem(format!(
                            "worker #{n} (pid {pid}) did not exit within {} s of SIGTERM; killed",
                            GRACE_SECS + 20
                        ));
                        let _ = child.kill().await;
                        stop = "killed";
                        break child.wait().await.ok();
                    }
                    self.scrape(index, http).await;
                }
            }
        };
        let exit = status.map_or("unknown".to_string(), |s| s.to_string());
        let clean = status.is_some_and(|s| s.success());
        if !clean && stop != "killed" {
            self.problem(format!(
                "worker #{n} (pid {pid}) ended with {exit} after {stop}"
            ));
        }
        let mut generations = lock(&self.generations);
        let generation = &mut generations[index];
        generation.ended = Some(self.now());
        generation.exit = Some(exit.clone());
        generation.stop = stop;
        eprintln!(
            "[{}] worker #{n} stopped ({stop}): {exit}",
            clock(self.now())
        );
    }

    /// A restart: SIGTERM (maybe twice), a short pause, start, wait until consuming.
    async fn restart(&self, double: bool, pause: Duration) {
        let mut slot = self.child.lock().await;
        let n = lock(&self.generations).len();
        self.fault(
            if double {
                "restart_sigterm_x2"
            } else {
                "restart_sigterm"
            },
            format!(
                "worker #{n}: SIGTERM{}, restart after {:.1} s",
                if double {
                    " twice (second during the drain)"
                } else {
                    ""
                },
                pause.as_secs_f64()
            ),
        );
        self.stop_worker(&mut slot, double, "SIGTERM").await;
        tokio::time::sleep(pause).await;
        let since = Instant::now();
        match self.start_worker(&mut slot).await {
            Ok(()) => lock(&self.restart_ready).push(since.elapsed().as_secs_f64()),
            Err(e) => self.problem(format!("after a restart: {e}")),
        }
    }

    /// Notices a worker that exited on its own (a crash), records it, and starts a new one.
    async fn check_crashed(&self) {
        let Ok(mut slot) = self.child.try_lock() else {
            return; // a restart is in progress
        };
        let exited = match slot.as_mut() {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status),
                _ => None,
            },
            None => None,
        };
        let Some(status) = exited else {
            return;
        };
        *slot = None;
        if let Some((index, pid, _)) = lock(&self.current).take() {
            let mut generations = lock(&self.generations);
            let generation = &mut generations[index];
            generation.ended = Some(self.now());
            generation.exit = Some(status.to_string());
            generation.stop = "crashed";
            drop(generations);
            self.problem(format!(
                "worker #{} (pid {pid}) exited on its own: {status} (log: {})",
                index + 1,
                self.out.join(format!("worker-{}.log", index + 1)).display()
            ));
        }
        if let Err(e) = self.start_worker(&mut slot).await {
            self.problem(format!("after a crash: {e}"));
        }
    }

    // -- faults ---------------------------------------------------------------------------

    /// The relay's standing rules: the permanent jobs are refused with 550, at RCPT and (should
    /// one slip through while the rules are being swapped) again after the message.
    fn reset_relay_rules(&self) {
        self.smtp.clear_rules();
        self.smtp.add_rule(
            Rule::always(Cmd::Rcpt, Action::Reply(550, "5.1.1 no such user".into()))
                .matching(format!("@{REJECT_DOMAIN}")),
        );
        self.smtp.add_rule(
            Rule::always(
                Cmd::DataEnd,
                Action::Reply(554, "5.7.1 recipient refused".into()),
            )
            .matching(format!("@{REJECT_DOMAIN}")),
        );
    }

    async fn clear_all_faults(&self) {
        self.reset_relay_rules();
        self.smtp.set_data_delay(Duration::ZERO);
        self.smtp.set_refusing(false).await;
        self.relay_proxy.set_blackhole(false);
        self.relay_proxy.set_refusing(false).await;
        self.broker_proxy.set_blackhole(false);
        self.broker_proxy.set_refusing(false).await;
    }

    /// Relay-side faults, one after the other, until `stop`.
    async fn relay_faults(&self, mut rng: Rng, stop: CancellationToken) {
        let gap = self.args.fault_gap;
        #[derive(Clone, Copy)]
        enum F {
            Reply4xx,
            Stall,
            Drop,
            Cut,
            Refuse,
            Blackhole,
            Slow,
        }
        let weights: Vec<(F, u32)> = [
            (F::Reply4xx, 3, "relay_4xx"),
            (F::Stall, 2, "relay_stall"),
            (F::Drop, 2, "relay_drop"),
            (F::Cut, 3, "relay_cut"),
            (F::Refuse, 2, "relay_refuse"),
            (F::Blackhole, 1, "relay_blackhole"),
            (F::Slow, 1, "relay_slow"),
        ]
        .into_iter()
        .filter(|(_, _, kind)| self.allowed(kind))
        .map(|(f, w, _)| (f, w))
        .collect();
        if weights.is_empty() {
            return;
        }
        while hold(rng.secs(gap * 0.5, gap * 1.5), &stop).await {
            match rng.pick(&weights) {
                F::Reply4xx => {
                    let (cmd, code, text) = [
                        (Cmd::Mail, 451, "4.3.0 try again later"),
                        (Cmd::Rcpt, 450, "4.2.1 mailbox busy"),
                        (Cmd::DataEnd, 451, "4.3.0 queue full"),
                        (Cmd::Connect, 421, "4.3.2 service not available"),
                    ][rng.below(4)];
                    let d = rng.secs(3.0, 15.0);
                    self.fault(
                        "relay_4xx",
                        format!("{code} at {cmd:?} for {:.1} s", d.as_secs_f64()),
                    );
                    self.smtp
                        .add_rule(Rule::always(cmd, Action::Reply(code, text.into())));
                    hold(d, &stop).await;
                    self.reset_relay_rules();
                }
                F::Stall => {
                    let cmd = if rng.chance(0.7) {
                        Cmd::DataEnd
                    } else {
                        Cmd::Connect
                    };
                    let d = rng.secs(3.0, 12.0);
                    let at = if cmd == Cmd::DataEnd {
                        "after DATA"
                    } else {
                        "before the greeting"
                    };
                    self.fault(
                        "relay_stall",
                        format!("no answer {at} for {:.1} s", d.as_secs_f64()),
                    );
                    self.smtp.add_rule(Rule::always(cmd, Action::Stall));
                    hold(d, &stop).await;
                    self.reset_relay_rules();
                }
                F::Drop => {
                    let cmd =
                        [Cmd::Connect, Cmd::Mail, Cmd::Rcpt, Cmd::Data, Cmd::DataEnd][rng.below(5)];
                    let d = rng.secs(2.0, 10.0);
                    self.fault(
                        "relay_drop",
                        format!("connection closed at {cmd:?} for {:.1} s", d.as_secs_f64()),
                    );
                    self.smtp.add_rule(Rule::always(cmd, Action::Drop));
                    hold(d, &stop).await;
                    self.reset_relay_rules();
                }
                F::Cut => {
                    let times = 1 + rng.below(3);
                    self.fault("relay_cut", format!("every relay connection cut, {times}x"));
                    for _ in 0..times {
                        self.relay_proxy.cut_all();
                        tokio::time::sleep(rng.secs(0.1, 1.0)).await;
                    }
                }
                F::Refuse => {
                    let d = rng.secs(2.0, 15.0);
                    if rng.chance(0.5) {
                        self.fault(
                            "relay_refuse",
                            format!("connections refused for {:.1} s", d.as_secs_f64()),
                        );
                        self.relay_proxy.set_refusing(true).await;
                        self.relay_proxy.cut_all();
                        hold(d, &stop).await;
                        self.relay_proxy.set_refusing(false).await;
                    } else {
                        self.fault(
                            "relay_refuse",
                            format!(
                                "relay down behind its proxy (accepted, then closed) for {:.1} s",
                                d.as_secs_f64()
                            ),
                        );
                        self.smtp.set_refusing(true).await;
                        self.smtp.kill_sessions();
                        hold(d, &stop).await;
                        self.smtp.set_refusing(false).await;
                    }
                }
                F::Blackhole => {
                    let d = rng.secs(2.0, 8.0);
                    self.fault(
                        "relay_blackhole",
                        format!("relay traffic black-holed for {:.1} s", d.as_secs_f64()),
                    );
                    self.relay_proxy.set_blackhole(true);
                    hold(d, &stop).await;
                    self.relay_proxy.set_blackhole(false);
                    self.relay_proxy.cut_all();
                }
                F::Slow => {
                    let delay = rng.secs(0.3, 1.5);
                    let d = rng.secs(5.0, 20.0);
                    self.fault(
                        "relay_slow",
                        format!(
                            "{:.0} ms before each 250 after DATA, for {:.1} s",
                            delay.as_secs_f64() * 1000.0,
                            d.as_secs_f64()
                        ),
                    );
                    self.smtp.set_data_delay(delay);
                    hold(d, &stop).await;
                    self.smtp.set_data_delay(Duration::ZERO);
                }
            }
        }
    }

    /// Broker-side faults and restarts, one after the other, until `stop`.
    async fn broker_faults(&self, mut rng: Rng, stop: CancellationToken) {
        let gap = self.args.fault_gap;
        let run = self.args.minutes * 60.0;
        let count = self
            .args
            .restarts
            .unwrap_or_else(|| ((self.args.minutes / 2.5).round() as usize).max(2));
        let mut restarts: Vec<f64> = (0..count)
            .map(|i| {
                if i % 2 == 0 {
                    rng.range(0.05, 0.25) * run
                } else {
                    rng.range(0.75, 0.95) * run
                }
            })
            .collect();
        restarts.sort_by(|a, b| b.total_cmp(a)); // the next one last
        #[derive(Clone, Copy)]
        enum F {
            Cut,
            Blackhole,
            Down,
        }
        loop {
            let mut pause = rng.secs(gap * 0.5, gap * 1.5);
            if let Some(next) = restarts.last() {
                pause = pause.min(Duration::from_secs_f64((next - self.now()).max(0.0)));
            }
            if !hold(pause, &stop).await {
                break;
            }
            if restarts.last().is_some_and(|next| self.now() >= *next) {
                restarts.pop();
                let double = rng.chance(self.args.double_sigterm);
                let pause = rng.secs(0.0, 3.0);
                self.restart(double, pause).await;
                continue;
            }
            let Some((_, _, http)) = self.current() else {
                continue;
            };
            let weights: Vec<(F, u32)> = [
                (F::Cut, 3, "broker_cut"),
                (F::Blackhole, 2, "broker_blackhole"),
                (F::Down, 2, "broker_down"),
            ]
            .into_iter()
            .filter(|(_, _, kind)| self.allowed(kind))
            .map(|(f, w, _)| (f, w))
            .collect();
            if weights.is_empty() {
                continue;
            }
            let what = match rng.pick(&weights) {
                F::Cut => {
                    self.fault("broker_cut", "every broker connection cut");
                    self.broker_proxy.cut_all();
                    "broker_cut"
                }
                F::Blackhole => {
                    let d = rng.secs(5.0, 12.0);
                    self.fault(
                        "broker_blackhole",
                        format!("broker traffic black-holed for {:.1} s", d.as_secs_f64()),
                    );
                    self.broker_proxy.set_blackhole(true);
                    let since = Instant::now();
                    let mut noticed = None;
                    while since.elapsed() < d && !stop.is_cancelled() {
                        if noticed.is_none()
                            && let Err(e) = amqp_mailer::http::check(http, "/readyz").await
                            && e.contains("reconnecting")
                        {
                            noticed = Some(since.elapsed().as_secs_f64());
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let held = since.elapsed().as_secs_f64();
                    self.broker_proxy.set_blackhole(false);
                    self.broker_proxy.cut_all();
                    lock(&self.blackholes).push((held, noticed));
                    if noticed.is_none() && held > (2 * HEARTBEAT_SECS + 3) as f64 {
                        self.note(format!(
                            "the worker did not report the broker black-hole within {held:.1} s \
                             (heartbeat {HEARTBEAT_SECS} s)"
                        ));
                    }
                    "broker_blackhole"
                }
                F::Down => {
                    let d = rng.secs(2.0, 10.0);
                    self.fault(
                        "broker_down",
                        format!("broker unreachable (refused) for {:.1} s", d.as_secs_f64()),
                    );
                    self.broker_proxy.set_refusing(true).await;
                    self.broker_proxy.cut_all();
                    hold(d, &stop).await;
                    self.broker_proxy.set_refusing(false).await;
                    "broker_down"
                }
            };
            // It must come back to consuming on its own.
            match self.wait_ready(http, Duration::from_secs(60)).await {
                Some(after) => lock(&self.recoveries).push(after),
                None => {
                    if self.current().is_some_and(|(_, _, h)| h == http) {
                        self.problem(format!(
                            "the worker was not consuming again within 60 s after {what}"
                        ));
                    }
                }
            }
        }
    }

    // -- the broker side of the soak ------------------------------------------------------

    /// Publishes `rate` jobs per second, each confirmed, until `stop`.
    async fn publish(&self, mut rng: Rng, stop: CancellationToken) {
        let rate = f64::from(self.args.rate);
        let permanent = self.args.permanent_percent / 100.0;
        let invalid = self.args.invalid_percent / 100.0;
        let started = Instant::now();
        let mut sent: u64 = 0;
        let mut channel = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            if channel.is_none() {
                match open_publisher(&self.amqp_url).await {
                    Ok(c) => channel = Some(c),
                    Err(e) => {
                        self.note(format!("publisher: cannot connect: {e}"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let Some((_, ch)) = channel.as_ref() else {
                continue;
            };
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            let mut pending = Vec::new();
            while sent < due {
                sent += 1;
                let id = format!("soak-{}-{sent}", self.seed);
                let roll = rng.unit();
                let kind = if roll < permanent {
                    JobKind::Permanent
                } else if roll < permanent + invalid {
                    JobKind::Invalid
                } else {
                    JobKind::Normal
                };
                let body = job_body(&id, kind, sent, &mut rng);
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(id.as_str().into());
                let publish = ch.basic_publish(
                    self.names.exchange.as_str().into(),
                    self.names.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body.as_bytes(),
                    properties,
                );
                pending.push((id, kind, publish.await));
            }
            let mut broken = false;
            let confirms = pending.into_iter().map(|(id, kind, publish)| async move {
                let confirmed = match publish {
                    Ok(confirm) => {
                        match tokio::time::timeout(Duration::from_secs(30), confirm).await {
                            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                            Ok(Ok(other)) => Err(format!("{other:?}")),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("no confirm within 30 s".into()),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                (id, kind, confirmed)
            });
            let results = futures_util::future::join_all(confirms).await;
            let mut ledger = lock(&self.ledger);
            for (id, kind, confirmed) in results {
                match confirmed {
                    Ok(()) => {
                        ledger.published.insert(id, kind);
                    }
                    Err(e) => {
                        if ledger.unconfirmed.len() < 5 {
                            eprintln!("publisher: {id} not confirmed: {e}");
                        }
                        ledger.unconfirmed.push(id);
                        broken = true;
                    }
                }
            }
            drop(ledger);
            if broken {
                channel = None; // reconnect
            }
        }
    }

    /// Reads the dead-letter queue for the whole run (acking what it read).
    async fn read_dead_letters(&self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let consumer = async {
                let conn = Connection::connect(&self.amqp_url, ConnectionProperties::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
                channel
                    .basic_qos(500, BasicQosOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let consumer = channel
                    .basic_consume(
                        self.names.dead.as_str().into(),
                        "soak-dead-letters".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, consumer))
            };
            let (conn, mut consumer) = match consumer.await {
                Ok(ok) => ok,
                Err(e) => {
                    self.note(format!("dead-letter reader: {e}; retrying"));
                    hold(Duration::from_secs(1), &stop).await;
                    continue;
                }
            };
            loop {
                let delivery = tokio::select! {
                    next = consumer.next() => next,
                    _ = stop.cancelled() => break,
                };
                let delivery = match delivery {
                    Some(Ok(delivery)) => delivery,
                    other => {
                        self.note(format!("dead-letter reader: consumer ended ({other:?})"));
                        break;
                    }
                };
                let properties = &delivery.properties;
                let id = properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_string())
                    .or_else(|| {
                        serde_json::from_slice::<serde_json::Value>(&delivery.data)
                            .ok()
                            .and_then(|v| v["id"].as_str().map(str::to_string))
                    })
                    .unwrap_or_else(|| "<no id>".into());
                let header = |name: &str| {
                    amqp_mailer::amqp::header_text(properties, name).unwrap_or_default()
                };
                let letter = DeadLetter {
                    kind: header("error-kind"),
                    attempt: header("attempt"),
                    reason: header("last-error"),
                };
                {
                    let mut ledger = lock(&self.ledger);
                    ledger.dead.entry(id).or_default().push(letter);
                    ledger.last_dead_at = Some(Instant::now());
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            let _ = conn.close(200, "bye".into()).await;
        }
    }

    /// Takes in what the relay accepted since the last call.
    async fn absorb_relay(&self) {
        let start = self.start;
        let mut seen = *lock(&self.relay_seen);
        let mut new: Vec<(Option<String>, f64)> = Vec::new();
        self.smtp
            .wait_until(Duration::from_secs(1), |state| {
                for message in state.messages.iter().skip(seen) {
                    let id = message
                        .header("Message-ID")
                        .and_then(|mid| {
                            mid.trim_matches(['<', '>'])
                                .rsplit_once('@')
                                .map(|(id, _)| id.to_string())
                        })
                        .filter(|id| id.starts_with("soak-"));
                    let at = message.received_at.saturating_duration_since(start);
                    new.push((id, at.as_secs_f64()));
                }
                seen = state.messages.len();
                true
            })
            .await;
        *lock(&self.relay_seen) = seen;
        let mut ledger = lock(&self.ledger);
        for (id, at) in new {
            match id {
                Some(id) => ledger.delivered.entry(id).or_default().push(at),
                None => ledger.foreign += 1,
            }
        }
    }

    /// Samples RSS, scrapes metrics, takes in the relay's messages, notices crashes; until `stop`.
    async fn monitor(&self, stop: CancellationToken) {
        let every = Duration::from_secs_f64(self.args.sample_every.max(0.2));
        let mut next_progress = 0.0;
        loop {
            self.absorb_relay().await;
            if let Some((index, pid, http)) = self.current() {
                if let Some(stats) = memory(pid) {
                    let t = self.now();
                    if let Some(generation) = lock(&self.generations).get_mut(index)
                        && generation.ended.is_none()
                    {
                        generation.samples.push(Sample { t, ..stats });
                    }
                }
                self.scrape(index, http).await;
            }
            self.check_crashed().await;
            let t = self.now();
            if t >= next_progress {
                let ledger = lock(&self.ledger);
                let progress = Progress {
                    t,
                    published: ledger.published.len(),
                    delivered: ledger.delivered.len(),
                    dead: ledger.dead.len(),
                };
                drop(ledger);
                lock(&self.progress).push(progress);
                next_progress = t + 10.0;
            }
            if !hold(every, &stop).await {
                return;
            }
        }
    }

    // -- accounting -----------------------------------------------------------------------

    async fn queue_counts(&self, conn: &Connection) -> Result<Vec<(String, u32)>, String> {
        let mut out = Vec::new();
        let mut queues = vec![self.names.queue.clone()];
        queues.extend(self.retry_queues.iter().cloned());
        for queue in queues {
            let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("{queue}: {e}"))?;
            out.push((queue, declared.message_count()));
            let _ = channel.close(200, "ok".into()).await;
        }
        Ok(out)
    }

    /// Ids published but neither delivered nor dead-lettered.
    fn unaccounted(&self) -> Vec<String> {
        let ledger = lock(&self.ledger);
        let mut missing: Vec<String> = ledger
            .published
            .keys()
            .filter(|id| !ledger.delivered.contains_key(*id) && !ledger.dead.contains_key(*id))
            .cloned()
            .collect();
        missing.sort_by_key(|id| id_number(id));
        missing
    }

    /// Waits until every job is accounted for, the queues are empty and nothing is in flight.
    async fn settle(&self, bound: Duration) -> Result<f64, String> {
        let since = Instant::now();
        let conn = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("cannot connect to the broker: {e}"))?;
        let mut quiet_checks = 0;
        let mut last_state = String::new();
        let mut last_print = Instant::now();
        while since.elapsed() < bound {
            self.absorb_relay().await;
            let missing = self.unaccounted();
            let counts = self.queue_counts(&conn).await.unwrap_or_default();
            let queued: u32 = counts.iter().map(|(_, n)| n).sum();
            let in_flight = match self.current() {
                Some((index, _, http)) => {
                    self.scrape(index, http).await;
                    lock(&self.generations)[index]
                        .metrics
                        .as_ref()
                        .map_or(-1.0, |m| sum(m, "amqp_mailer_jobs_in_flight"))
                }
                None => -1.0,
            };
            last_state = format!(
                "{} jobs unaccounted for, {queued} queued ({}), {in_flight} in flight",
                missing.len(),
                counts
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(q, n)| format!(
                        "{}: {n}",
                        q.strip_prefix(&self.names.prefix).unwrap_or(q)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if missing.is_empty() && queued == 0 && in_flight == 0.0 && !counts.is_empty() {
                quiet_checks += 1;
                if quiet_checks >= 3 {
                    let _ = conn.close(200, "bye".into()).await;
                    return Ok(since.elapsed().as_secs_f64());
                }
            } else {
                quiet_checks = 0;
            }
            if last_print.elapsed() > Duration::from_secs(10) {
                eprintln!("[{}] settling: {last_state}", clock(self.now()));
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let _ = conn.close(200, "bye".into()).await;
        Err(format!(
            "not settled within {} s: {last_state}",
            bound.as_secs()
        ))
    }

    async fn delete_queues(&self) {
        let Ok(conn) = Connection::connect(&self.amqp_url, ConnectionProperties::default()).await
        else {
            eprintln!(
                "cleanup: cannot connect to the broker; queues {}* remain",
                self.names.prefix
            );
            return;
        };
        let mut queues = vec![self.names.queue.clone(), self.names.dead.clone()];
        queues.extend(self.retry_queues.iter().cloned());
        let mut deleted = 0;
        for queue in &queues {
            if let Ok(channel) = conn.create_channel().await
                && channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .is_ok()
            {
                deleted += 1;
            }
        }
        if let Ok(channel) = conn.create_channel().await {
            let _ = channel
                .exchange_delete(self.names.exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
        eprintln!(
            "cleanup: deleted {deleted} of {} queues and the exchange {}",
            queues.len(),
            self.names.exchange
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn job_body(id: &str, kind: JobKind, n: u64, rng: &mut Rng) -> String {
    // Bodies of varied size, so that the allocator sees some churn.
    let words = 5 + rng.below(300);
    let text: String = (0..words)
        .map(|i| format!("word{} ", (i * 7 + n as usize) % 1000))
        .collect();
    match kind {
        JobKind::Normal => serde_json::json!({
            "id": id,
            "to": format!("user{}@example.com", n % 1000),
            "subject": format!("Soak job {id}"),
            "text": text,
            "headers": {"X-Soak": "1"},
        })
        .to_string(),
        JobKind::Permanent => serde_json::json!({
            "id": id,
            "to": format!("nobody{}@{REJECT_DOMAIN}", n % 100),
            "subject": format!("Soak job {id} (rejected)"),
            "text": text,
        })
        .to_string(),
        JobKind::Invalid => match rng.below(3) {
            0 => format!("{{\"id\": \"{id}\", \"to\": \"ann@example.com\", \"subject\": "),
            1 => serde_json::json!({
                "id": id, "to": "ann@example.com", "subject": "typo", "text": "x", "colour": "red",
            })
            .to_string(),
            _ => serde_json::json!({
                "id": id, "to": "bob@", "subject": "bad address", "text": "x",
            })
            .to_string(),
        },
    }
}

async fn open_publisher(url: &str) -> Result<(Connection, lapin::Channel), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, channel))
}

/// Sleeps `d`; false if `stop` came first.
async fn hold(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// VmRSS and VmHWM in KiB, threads and open file descriptors (`t` is left at 0).
fn memory(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|line| {
            line.strip_prefix(name)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    Some(Sample {
        t: 0.0,
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
        threads: field("Threads:")?,
        fds,
    })
}

fn parse_metrics(text: &str) -> Metrics {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of a metric (all label values).
fn sum(metrics: &Metrics, name: &str) -> f64 {
    metrics
        .iter()
        .filter(|(series, _)| {
            series.as_str() == name
                || series
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{'))
        })
        .map(|(_, v)| v)
        .sum()
}

fn id_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    if values.is_empty() {
        0
    } else {
        values[values.len() / 2]
    }
}

/// The log lines of the worker that mention `id` (ANSI colours stripped).
fn log_lines_for(logs: &[(usize, PathBuf)], id: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (n, path) in logs {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            let line = strip_ansi(line);
            if let Some(pos) = line.find(id) {
                let after = line[pos + id.len()..].chars().next();
                if !after.is_some_and(|c| c.is_ascii_digit()) {
                    out.push(format!("#{n}: {line}"));
                }
            }
        }
    }
    out
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Job outcomes and connection events counted in the worker logs, by the name of the counter
/// that counts them too.
fn log_counts(logs: &[(usize, PathBuf)]) -> BTreeMap<&'static str, u64> {
    let patterns = [
        ("delivered", "}: delivered "),
        ("retried", "attempt failed; retrying later"),
        ("dead_lettered", "job dead-lettered"),
        ("requeued", "handing it back"),
        ("abandoned", "stopped before sending"),
        ("possible_duplicates", "could not ack"),
        // Both "redelivered by the broker" and "redelivered after a lost ack".
        ("jobs_redelivered", "redelivered"),
        ("duplicates_avoided", "already handled"),
        ("broker_reconnects", "broker connection lost; reconnecting"),
    ];
    let mut out: BTreeMap<&'static str, u64> = patterns.iter().map(|(k, _)| (*k, 0)).collect();
    for (_, path) in logs {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            for (name, pattern) in patterns {
                if line.contains(pattern) {
                    *out.entry(name).or_default() += 1;
                }
            }
        }
    }
    out
}

/// WARN and ERROR lines of the worker logs, grouped by their message.
fn log_summary(logs: &[(usize, PathBuf)]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (_, path) in logs {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            let line = strip_ansi(line);
            let level = if line.contains(" WARN ") {
                "WARN"
            } else if line.contains(" ERROR ") {
                "ERROR"
            } else if line.contains("panicked") {
                "PANIC"
            } else {
                continue;
            };
            // The message: after the span list ("}: "), up to the first field ("name=").
            let message = line
                .rsplit_once("}: ")
                .map(|(_, m)| m)
                .or_else(|| line.split_once(&format!(" {level} ")).map(|(_, m)| m))
                .unwrap_or(&line);
            let message: Vec<&str> = message
                .split(' ')
                .take_while(|word| !word.contains('='))
                .collect();
            let key = format!("{level} {}", message.join(" "));
            *out.entry(key).or_default() += 1;
        }
    }
    out
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
    let retry_queues = amqp_mailer::policy::Schedule::new(&config.retry)
        .delays()
        .into_iter()
        .map(|d| {
            format!(
                "{}{}",
                names.retry_prefix,
                amqp_mailer::config::duration::format(d)
            )
        })
        .collect();

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
            let quiet = lock(&soak.ledger)
                .last_dead_at
                .is_none_or(|at| at.elapsed() > Duration::from_secs(2));
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

// ---------------------------------------------------------------------------------------------
// The report.

fn report(soak: &Soak, publish_ended: Option<f64>, settle_secs: Option<f64>) -> ExitCode {
    let now = soak.now();
    let ledger = lock(&soak.ledger);
    let generations = lock(&soak.generations);
    let faults = lock(&soak.faults);
    let mut r = String::new();
    let args = &soak.args;

    let by_kind = |kind: JobKind| ledger.published.values().filter(|k| **k == kind).count();
    let published = ledger.published.len();
    let delivered_unique = ledger
        .published
        .keys()
        .filter(|id| ledger.delivered.contains_key(*id))
        .count();
    let relay_messages: usize =
        ledger.delivered.values().map(Vec::len).sum::<usize>() + ledger.foreign;
    let dead_unique = ledger
        .published
        .keys()
        .filter(|id| ledger.dead.contains_key(*id))
        .count();
    let mut dead_by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for letters in ledger.dead.values() {
        for letter in letters {
            *dead_by_kind.entry(letter.kind.clone()).or_default() += 1;
        }
    }
    let lost: Vec<&String> = {
        let mut lost: Vec<&String> = ledger
            .published
            .keys()
            .filter(|id| !ledger.delivered.contains_key(*id) && !ledger.dead.contains_key(*id))
            .collect();
        lost.sort_by_key(|id| id_number(id));
        lost
    };
    let mut duplicates: Vec<(&String, usize)> = ledger
        .delivered
        .iter()
        .filter(|(_, times)| times.len() > 1)
        .map(|(id, times)| (id, times.len() - 1))
        .collect();
    duplicates.sort_by_key(|(id, _)| id_number(id));
    let extra_copies: usize = duplicates.iter().map(|(_, n)| n).sum();
    let dead_twice: Vec<&String> = ledger
        .dead
        .iter()
        .filter(|(_, letters)| letters.len() > 1)
        .map(|(id, _)| id)
        .collect();
    let both: Vec<&String> = ledger
        .dead
        .keys()
        .filter(|id| ledger.delivered.contains_key(*id))
        .collect();

    // Jobs that ended where they should not have.
    let mut misplaced: Vec<String> = Vec::new();
    for (id, kind) in &ledger.published {
        let delivered = ledger.delivered.contains_key(id);
        let dead = ledger.dead.get(id).and_then(|l| l.first());
        match kind {
            JobKind::Normal => {
                if let Some(letter) = dead {
                    misplaced.push(format!(
                        "{id} (a good job) dead-lettered as {} after {} attempts: {}",
                        letter.kind, letter.attempt, letter.reason
                    ));
                }
            }
            JobKind::Permanent => {
                if delivered {
                    misplaced.push(format!("{id} (to be rejected) was delivered"));
                } else if let Some(letter) = dead
                    && letter.kind != "rejected"
                {
                    misplaced.push(format!(
                        "{id} (to be rejected) dead-lettered as {}: {}",
                        letter.kind, letter.reason
                    ));
                }
            }
            JobKind::Invalid => {
                if delivered {
                    misplaced.push(format!("{id} (invalid) was delivered"));
                } else if let Some(letter) = dead
                    && letter.kind != "invalid"
                {
                    misplaced.push(format!(
                        "{id} (invalid) dead-lettered as {}: {}",
                        letter.kind, letter.reason
                    ));
                }
            }
        }
    }
    misplaced.sort();

    let mut total = Metrics::new();
    for generation in generations.iter() {
        if let Some(metrics) = &generation.metrics {
            for (series, value) in metrics {
                if series.ends_with("_total") || series.contains("_total{") {
                    *total.entry(series.clone()).or_default() += value;
                }
            }
        }
    }
    let counter = |name: &str| sum(&total, name) as u64;

    let _ = writeln!(r, "amqp-mailer soak report");
    let _ = writeln!(r, "=======================");
    let _ = writeln!(
        r,
        "seed                {} (repeat: cargo run --release --example soak -- --seed {} --minutes {})",
        soak.seed, soak.seed, args.minutes
    );
    let _ = writeln!(
        r,
        "duration            {} of jobs and faults, {} to settle, {} in all",
        clock(publish_ended.unwrap_or(now)),
        settle_secs.map_or("did not settle".into(), clock),
        clock(now)
    );
    let _ = writeln!(
        r,
        "setup               {} jobs/s, concurrency {}, quorum queues, retry 1s x2 up to 8s, 20 attempts, \
         smtp.timeout {SMTP_TIMEOUT}, heartbeat {HEARTBEAT_SECS}s, grace {GRACE_SECS}s",
        args.rate, args.concurrency
    );
    let _ = writeln!(
        r,
        "faults              {}, about one every {} s on each side (relay, broker)",
        args.only
            .as_ref()
            .map_or("all kinds".to_string(), |only| format!(
                "only {}",
                only.join(",")
            )),
        args.fault_gap
    );
    let _ = writeln!(r, "worker binary       {}", soak.build);
    let _ = writeln!(r, "output              {}", soak.out.display());
    let _ = writeln!(r);
    let _ = writeln!(r, "jobs");
    let _ = writeln!(
        r,
        "  published         {published} (good {}, to be rejected {}, invalid {}){}",
        by_kind(JobKind::Normal),
        by_kind(JobKind::Permanent),
        by_kind(JobKind::Invalid),
        if ledger.unconfirmed.is_empty() {
            String::new()
        } else {
            format!(
                "; {} publishes not confirmed, not counted",
                ledger.unconfirmed.len()
            )
        }
    );
    let _ = writeln!(
        r,
        "  delivered         {delivered_unique} unique ({relay_messages} messages at the relay{})",
        if ledger.foreign > 0 {
            format!(", {} without a soak id", ledger.foreign)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        r,
        "  dead-lettered     {dead_unique} ({})",
        dead_by_kind
            .iter()
            .map(|(k, n)| format!("{} {n}", if k.is_empty() { "<no kind>" } else { k }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(r, "  lost              {}", lost.len());
    let _ = writeln!(
        r,
        "  duplicates        {} jobs delivered more than once ({extra_copies} extra copies)",
        duplicates.len()
    );
    if !dead_twice.is_empty() {
        let _ = writeln!(r, "  dead-lettered 2x  {}", dead_twice.len());
    }
    if !both.is_empty() {
        let _ = writeln!(r, "  delivered + dead  {}", both.len());
    }
    if !misplaced.is_empty() {
        let _ = writeln!(r, "  misplaced         {}", misplaced.len());
    }
    let _ = writeln!(r);
    // The counters as /metrics last showed them, and the same events counted in the logs: a
    // worker's last scrape misses what it did in the final moments of its drain.
    let logs: Vec<(usize, PathBuf)> = generations.iter().map(|g| (g.n, g.log.clone())).collect();
    let from_logs = log_counts(&logs);
    let _ = writeln!(
        r,
        "worker counters, summed over {} workers   /metrics   log lines",
        generations.len()
    );
    for (label, name) in [
        ("received", "amqp_mailer_jobs_received_total"),
        ("delivered", "amqp_mailer_jobs_delivered_total"),
        ("retried", "amqp_mailer_jobs_retried_total"),
        ("dead_lettered", "amqp_mailer_jobs_dead_lettered_total"),
        ("requeued", "amqp_mailer_jobs_requeued_total"),
        ("abandoned", "amqp_mailer_jobs_abandoned_total"),
        (
            "possible_duplicates",
            "amqp_mailer_possible_duplicates_total",
        ),
        ("jobs_redelivered", "amqp_mailer_jobs_redelivered_total"),
        ("duplicates_avoided", "amqp_mailer_duplicates_avoided_total"),
        ("broker_reconnects", "amqp_mailer_broker_reconnects_total"),
        (
            "smtp_stale_connections",
            "amqp_mailer_smtp_stale_connections_total",
        ),
    ] {
        let logged = from_logs
            .get(label)
            .map_or("-".to_string(), |n| n.to_string());
        let _ = writeln!(r, "  {label:<36}{:>10}  {logged:>10}", counter(name));
    }
    let _ = writeln!(r);

    let mut fault_counts: BTreeMap<&str, usize> = BTreeMap::new();
    for fault in faults.iter() {
        *fault_counts.entry(fault.kind).or_default() += 1;
    }
    let _ = writeln!(r, "faults injected     {}", faults.len());
    for (kind, n) in &fault_counts {
        let _ = writeln!(r, "  {kind:<24}{n}");
    }
    let blackholes = lock(&soak.blackholes);
    if !blackholes.is_empty() {
        let noticed: Vec<f64> = blackholes.iter().filter_map(|(_, n)| *n).collect();
        let unnoticed: Vec<String> = blackholes
            .iter()
            .filter(|(_, n)| n.is_none())
            .map(|(held, _)| format!("{held:.1} s"))
            .collect();
        let _ = writeln!(
            r,
            "  broker black-holes noticed by the heartbeat (/readyz said reconnecting): {} of {}{}{}",
            noticed.len(),
            blackholes.len(),
            if noticed.is_empty() {
                String::new()
            } else {
                format!(
                    ", after {:.1}-{:.1} s",
                    noticed.iter().cloned().fold(f64::MAX, f64::min),
                    noticed.iter().cloned().fold(0.0, f64::max)
                )
            },
            if unnoticed.is_empty() {
                String::new()
            } else {
                format!("; the others lasted only {}", unnoticed.join(", "))
            }
        );
    }
    let recoveries = lock(&soak.recoveries);
    if !recoveries.is_empty() {
        let _ = writeln!(
            r,
            "  consuming again after a broker fault: {} of {}, at most {:.1} s after it was lifted",
            recoveries.len(),
            fault_counts
                .iter()
                .filter(|(k, _)| k.starts_with("broker_"))
                .map(|(_, n)| n)
                .sum::<usize>(),
            recoveries.iter().cloned().fold(0.0, f64::max)
        );
    }
    let restart_ready = lock(&soak.restart_ready);
    let restarts = generations.len().saturating_sub(1);
    let doubles = generations
        .iter()
        .filter(|g| g.stop == "SIGTERM x2")
        .count();
    let crashes = generations.iter().filter(|g| g.stop == "crashed").count();
    let _ = writeln!(
        r,
        "worker restarts     {restarts} ({doubles} with a second SIGTERM during the drain; \
         {crashes} crashes); consuming again {} of {} times, at most {:.1} s after the start",
        restart_ready.len(),
        generations.iter().filter(|g| g.n > 1).count(),
        restart_ready.iter().cloned().fold(0.0, f64::max)
    );
    let _ = writeln!(r);

    let _ = writeln!(r, "worker generations (RSS from /proc/<pid>/status)");
    let _ = writeln!(
        r,
        "  {:>3} {:>8} {:>8} {:>8} {:>14} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9}",
        "#",
        "pid",
        "from",
        "lived",
        "stop",
        "RSS start",
        "RSS end",
        "RSS peak",
        "VmHWM",
        "threads",
        "fds"
    );
    for g in generations.iter() {
        let first = g
            .samples
            .iter()
            .find(|s| s.t - g.started >= WARM_UP)
            .or(g.samples.first());
        let last = g.samples.last();
        let peak = g.samples.iter().map(|s| s.rss_kb).max();
        let hwm = g.samples.iter().map(|s| s.hwm_kb).max();
        let span = |f: fn(&Sample) -> u64| match (first, last) {
            (Some(a), Some(b)) => format!("{}->{}", f(a), f(b)),
            _ => "-".into(),
        };
        let _ = writeln!(
            r,
            "  {:>3} {:>8} {:>8} {:>8} {:>14} {:>11} {:>11} {:>11} {:>11} {:>9} {:>9}",
            g.n,
            g.pid,
            clock(g.started),
            clock(g.lived(now)),
            if g.stop.is_empty() { "-" } else { g.stop },
            first.map_or("-".into(), |s| mib(s.rss_kb)),
            last.map_or("-".into(), |s| mib(s.rss_kb)),
            peak.map_or("-".into(), mib),
            hwm.map_or("-".into(), mib),
            span(|s| s.threads),
            span(|s| s.fds),
        );
        if let Some(exit) = &g.exit
            && !exit.contains("exit status: 0")
        {
            let _ = writeln!(r, "      exit: {exit}");
        }
    }
    let _ = writeln!(r);

    // RSS every minute (or every tenth of the run if shorter), with progress.
    let all: Vec<(usize, Sample)> = generations
        .iter()
        .flat_map(|g| g.samples.iter().map(move |s| (g.n, *s)))
        .collect();
    let progress = lock(&soak.progress);
    let step = if now > 180.0 {
        60.0
    } else {
        (now / 6.0).max(5.0)
    };
    let _ = writeln!(
        r,
        "RSS over time (the worker's VmRSS, VmHWM, threads and open fds)"
    );
    let _ = writeln!(
        r,
        "  {:>7} {:>4} {:>10} {:>10} {:>7} {:>4} {:>10} {:>10} {:>8}",
        "t", "gen", "RSS", "VmHWM", "threads", "fds", "published", "delivered", "dead"
    );
    // The first steady sample, then the latest sample at each mark, then the last one.
    let mut rows: Vec<(usize, Sample)> = Vec::new();
    if let Some(first) = all.iter().find(|(_, s)| s.t >= WARM_UP).or(all.first()) {
        rows.push(*first);
    }
    let end = all.last().map_or(0.0, |(_, s)| s.t);
    let mut mark = step;
    while mark < end {
        if let Some(row) = all.iter().rfind(|(_, s)| s.t <= mark) {
            rows.push(*row);
        }
        mark += step;
    }
    if let Some(last) = all.last() {
        rows.push(*last);
    }
    rows.dedup_by(|a, b| a.1.t == b.1.t);
    for (n, s) in rows {
        let p = progress.iter().rfind(|p| p.t <= s.t + 0.5);
        let _ = writeln!(
            r,
            "  {:>7} {:>4} {:>10} {:>10} {:>7} {:>4} {:>10} {:>10} {:>8}",
            clock(s.t),
            n,
            mib(s.rss_kb),
            mib(s.hwm_kb),
            s.threads,
            s.fds,
            p.map_or(0, |p| p.published),
            p.map_or(0, |p| p.delivered),
            p.map_or(0, |p| p.dead),
        );
    }

    // The memory check on the longest-lived generation, warm-up excluded.
    let mut memory_ok = true;
    let longest = generations
        .iter()
        .max_by(|a, b| a.lived(now).total_cmp(&b.lived(now)));
    if let Some(g) = longest {
        let steady: Vec<u64> = g
            .samples
            .iter()
            .filter(|s| s.t - g.started >= WARM_UP)
            .map(|s| s.rss_kb)
            .collect();
        let judged = g.lived(now) >= MIN_JUDGED && steady.len() >= 8;
        if steady.len() >= 4 {
            let q = steady.len() / 4;
            let first = median(&mut steady[..q].to_vec());
            let last = median(&mut steady[steady.len() - q..].to_vec());
            let growth = (last as f64 - first as f64) / first as f64 * 100.0;
            memory_ok = !judged || growth <= args.max_rss_growth;
            let verdict = if !judged {
                format!(
                    "not judged: it takes a worker that lived {} (run at least 5 minutes)",
                    clock(MIN_JUDGED)
                )
            } else if memory_ok {
                "ok".to_string()
            } else {
                "GREW".to_string()
            };
            let _ = writeln!(
                r,
                "memory check        worker #{} lived {}: median RSS {} in its first quarter, {} in \
                 its last ({growth:+.1}%, limit +{}%): {verdict}",
                g.n,
                clock(g.lived(now)),
                mib(first),
                mib(last),
                args.max_rss_growth,
            );
        } else {
            let _ = writeln!(
                r,
                "memory check        not enough samples (worker #{} lived {})",
                g.n,
                clock(g.lived(now))
            );
        }
    }
    let _ = writeln!(r);

    // Where the duplicates came from, from the worker's own logs.
    let mut appendix = String::new();
    if !duplicates.is_empty() {
        let mut causes: BTreeMap<&str, usize> = BTreeMap::new();
        for (id, _) in &duplicates {
            let lines = log_lines_for(&logs, id);
            let cause = if lines
                .iter()
                .any(|l| l.contains("could not publish the job"))
            {
                "a retry or dead letter whose confirm was lost was handed back, but the broker \
                 had stored it: both copies were sent"
            } else if lines
                .iter()
                .any(|l| l.contains("redelivered by the broker"))
            {
                "redelivered by the broker (connection lost or stop) while or after the first \
                 copy was sent"
            } else if lines.iter().any(|l| l.contains("retrying later")) {
                "retried after a failure that came once the relay had the message"
            } else {
                "no explanation in the logs"
            };
            *causes.entry(cause).or_default() += 1;
            let _ = writeln!(
                appendix,
                "duplicate {id}: relay received it at {}",
                ledger.delivered[*id]
                    .iter()
                    .map(|t| clock(*t))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for line in lines.iter().take(12) {
                let _ = writeln!(appendix, "    {line}");
            }
        }
        let _ = writeln!(r, "duplicates by cause (from the worker logs)");
        for (cause, n) in causes {
            let _ = writeln!(r, "  {n:>5}  {cause}");
        }
        let _ = writeln!(r);
    }
    if !lost.is_empty() {
        let _ = writeln!(r, "LOST jobs (first 20 of {})", lost.len());
        for id in lost.iter().take(20) {
            let _ = writeln!(r, "  {id} ({:?})", ledger.published[*id]);
            let lines = log_lines_for(&logs, id);
            for line in lines.iter().take(10) {
                let _ = writeln!(r, "      {line}");
            }
        }
        let _ = writeln!(r);
    }
    if !misplaced.is_empty() {
        let _ = writeln!(r, "misplaced jobs (first 20 of {})", misplaced.len());
        for line in misplaced.iter().take(20) {
            let _ = writeln!(r, "  {line}");
        }
        let _ = writeln!(r);
    }
    let summary = log_summary(&logs);
    if !summary.is_empty() {
        let _ = writeln!(r, "worker WARN/ERROR log lines by message");
        for (message, n) in &summary {
            let _ = writeln!(r, "  {n:>6}  {message}");
        }
        let _ = writeln!(r);
    }
    let notes = lock(&soak.notes);
    if !notes.is_empty() {
        let _ = writeln!(r, "notes");
        for note in notes.iter() {
            let _ = writeln!(r, "  - {note}");
        }
        let _ = writeln!(r);
    }
    let problems = lock(&soak.problems).clone();
    let mut failures = problems.clone();
    if !lost.is_empty() {
        failures.push(format!("{} jobs lost", lost.len()));
    }
    if !misplaced.is_empty() {
        failures.push(format!("{} jobs ended in the wrong place", misplaced.len()));
    }
    if !memory_ok {
        failures.push("the worker's memory grew".into());
    }
    if published == 0 {
        failures.push("nothing was published".into());
    }
    if failures.is_empty() {
        let _ = writeln!(r, "result              PASS");
    } else {
        let _ = writeln!(r, "result              FAIL");
        for failure in &failures {
            let _ = writeln!(r, "  - {failure}");
        }
    }

    let mut timeline = String::new();
    for fault in faults.iter() {
        let _ = writeln!(
            timeline,
            "{:>8}  {:<20} {}",
            clock(fault.at),
            fault.kind,
            fault.detail
        );
    }
    let _ = std::fs::write(soak.out.join("faults.txt"), timeline);
    let _ = std::fs::write(soak.out.join("duplicates.txt"), appendix);
    let _ = std::fs::write(soak.out.join("report.txt"), &r);
    println!("{r}");
    println!(
        "(report, fault timeline, duplicates and worker logs in {})",
        soak.out.display()
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
