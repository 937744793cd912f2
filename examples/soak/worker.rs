//! The worker process: starting a generation, waiting for it to consume, scraping its metrics,
//! sampling its memory, signalling and restarting it, and noticing a crash.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::metrics::Metrics;
use testkit::process::free_port;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::ledger::Progress;
use crate::{GRACE_SECS, Soak, clock, hold, lock};

/// One reading of the worker's /proc/<pid>/status and fd count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Seconds since the start of the run.
    pub(crate) t: f64,
    /// VmRSS, KiB.
    pub(crate) rss_kb: u64,
    /// VmHWM (peak RSS), KiB.
    pub(crate) hwm_kb: u64,
    pub(crate) threads: u64,
    /// Open file descriptors.
    pub(crate) fds: u64,
}

/// One worker process, from its start to its exit.
pub(crate) struct Generation {
    /// 1 for the first worker.
    pub(crate) n: usize,
    pub(crate) pid: u32,
    pub(crate) log: PathBuf,
    /// Seconds since the start of the run.
    pub(crate) started: f64,
    /// Seconds from its start until /readyz said consuming.
    pub(crate) ready_after: Option<f64>,
    pub(crate) ended: Option<f64>,
    pub(crate) exit: Option<String>,
    /// How it ended: "SIGTERM", "SIGTERM x2", "final SIGTERM", "crashed", "killed".
    pub(crate) stop: &'static str,
    pub(crate) samples: Vec<Sample>,
    /// The last /metrics scrape.
    pub(crate) metrics: Option<Metrics>,
}

impl Generation {
    /// Seconds it lived, until `now` if it still runs.
    pub(crate) fn lived(&self, now: f64) -> f64 {
        self.ended.unwrap_or(now) - self.started
    }
}

impl Soak {
    /// Starts a new generation of the worker and waits (bounded) until it consumes.
    pub(crate) async fn start_worker(&self, slot: &mut Option<Child>) -> Result<(), String> {
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
        testkit::process::without_worker_env(&mut command);
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
    pub(crate) async fn wait_ready(&self, http: SocketAddr, bound: Duration) -> Option<f64> {
        let since = Instant::now();
        while since.elapsed() < bound {
            if amqp_mailer::http::check(http, "/readyz").await.is_ok() {
                return Some(since.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    pub(crate) async fn scrape(&self, index: usize, http: SocketAddr) {
        let Ok(Ok(text)) = tokio::time::timeout(
            Duration::from_secs(2),
            amqp_mailer::http::check(http, "/metrics"),
        )
        .await
        else {
            return;
        };
        // A page that does not parse counts as a failed scrape: the last good one stays.
        let Ok(metrics) = Metrics::parse(&text) else {
            return;
        };
        if let Some(generation) = lock(&self.generations).get_mut(index) {
            generation.metrics = Some(metrics);
        }
    }

    /// SIGTERM (twice if `double`, the second during the drain), then waits for the exit.
    pub(crate) async fn stop_worker(
        &self,
        slot: &mut Option<Child>,
        double: bool,
        why: &'static str,
    ) {
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
    pub(crate) async fn restart(&self, double: bool, pause: Duration) {
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
    pub(crate) async fn check_crashed(&self) {
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

    /// Samples RSS, scrapes metrics, takes in the relay's messages, notices crashes; until `stop`.
    pub(crate) async fn monitor(&self, stop: CancellationToken) {
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
}

fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// VmRSS and VmHWM in KiB, threads and open file descriptors (`t` is left at 0).
pub(crate) fn memory(pid: u32) -> Option<Sample> {
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
