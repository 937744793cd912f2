//! The report: what happened to the jobs, the worker's counters beside its log lines, the faults,
//! the worker generations and their memory, and the verdict (`testkit::soak::verdict`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use testkit::soak::{JobKind, Ledger, Life, MIN_JUDGED, MemoryCheck, Verdict, WARM_UP, verdict};

use crate::faults::FaultRecord;
use crate::worker::{Generation, Sample};
use crate::{Args, GRACE_SECS, HEARTBEAT_SECS, SMTP_TIMEOUT, Soak, clock, lock, mib};

/// Writes the report (stdout and `report.txt`), the fault timeline (`faults.txt`) and the
/// duplicates' log lines (`duplicates.txt`); the exit code is the verdict's.
pub(crate) fn report(
    soak: &Soak,
    publish_ended: Option<f64>,
    settle_secs: Option<f64>,
) -> ExitCode {
    let now = soak.now();
    let ledger = lock(&soak.ledger);
    let generations = lock(&soak.generations);
    let faults = lock(&soak.faults);
    let args = &soak.args;

    // The verdict, on the books and on the longest-lived worker's memory (warm-up excluded).
    let longest = generations
        .iter()
        .max_by(|a, b| a.lived(now).total_cmp(&b.lived(now)));
    let life = longest.map(|g| Life {
        worker: g.n,
        lived: g.lived(now),
        steady_rss_kb: g
            .samples
            .iter()
            .filter(|s| s.t - g.started >= WARM_UP)
            .map(|s| s.rss_kb)
            .collect(),
    });
    let problems = lock(&soak.problems).clone();
    let verdict = verdict(&ledger, life.as_ref(), &problems, args.max_rss_growth);
    let Verdict {
        memory, failures, ..
    } = &verdict;
    let logs: Vec<(usize, PathBuf)> = generations.iter().map(|g| (g.n, g.log.clone())).collect();

    let mut r = String::new();
    header(&mut r, soak, publish_ended, settle_secs);
    jobs(&mut r, &ledger, &verdict);
    counters(&mut r, &generations, &logs);
    faults_and_restarts(&mut r, soak, &faults, &generations);
    generations_table(&mut r, &generations, now);
    rss_over_time(&mut r, soak, &generations, now);
    memory_check(&mut r, memory, args);
    let appendix = duplicates_lost_misplaced(&mut r, &ledger, &verdict, &logs);
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
    if failures.is_empty() {
        let _ = writeln!(r, "result              PASS");
    } else {
        let _ = writeln!(r, "result              FAIL");
        for failure in failures {
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

/// The run's seed, duration, set-up and output.
fn header(r: &mut String, soak: &Soak, publish_ended: Option<f64>, settle_secs: Option<f64>) {
    let now = soak.now();
    let args = &soak.args;
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
}

/// Where the published jobs went.
fn jobs(r: &mut String, ledger: &Ledger, verdict: &Verdict) {
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
    let Verdict {
        lost,
        duplicates,
        extra_copies,
        dead_twice,
        delivered_and_dead: both,
        misplaced,
        ..
    } = verdict;
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
}

/// The counters as /metrics last showed them, and the same events counted in the logs: a
/// worker's last scrape misses what it did in the final moments of its drain.
fn counters(r: &mut String, generations: &[Generation], logs: &[(usize, PathBuf)]) {
    // The counters summed over every worker's last scrape.
    let counter = |name: &str| {
        generations
            .iter()
            .filter_map(|g| g.metrics.as_ref())
            .map(|m| m.sum(name, &[]))
            .sum::<f64>() as u64
    };
    let from_logs = log_counts(logs);
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
}

/// The faults injected, how the worker noticed and recovered, and its restarts.
fn faults_and_restarts(
    r: &mut String,
    soak: &Soak,
    faults: &[FaultRecord],
    generations: &[Generation],
) {
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
}

/// One row per worker process: its life, how it stopped, its memory, threads and fds.
fn generations_table(r: &mut String, generations: &[Generation], now: f64) {
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
}

/// RSS every minute (or every tenth of the run if shorter), with the books' progress.
fn rss_over_time(r: &mut String, soak: &Soak, generations: &[Generation], now: f64) {
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
}

/// The memory check of the longest-lived worker, as the verdict judged it.
fn memory_check(r: &mut String, memory: &Option<MemoryCheck>, args: &Args) {
    match memory {
        Some(MemoryCheck::Measured {
            worker,
            lived,
            first_kb,
            last_kb,
            growth_percent,
            judged,
            grew,
        }) => {
            let judgement = if !judged {
                format!(
                    "not judged: it takes a worker that lived {} (run at least 5 minutes)",
                    clock(MIN_JUDGED)
                )
            } else if *grew {
                "GREW".to_string()
            } else {
                "ok".to_string()
            };
            let _ = writeln!(
                r,
                "memory check        worker #{worker} lived {}: median RSS {} in its first quarter, \
                 {} in its last ({growth_percent:+.1}%, limit +{}%): {judgement}",
                clock(*lived),
                mib(*first_kb),
                mib(*last_kb),
                args.max_rss_growth,
            );
        }
        Some(MemoryCheck::TooFewSamples { worker, lived }) => {
            let _ = writeln!(
                r,
                "memory check        not enough samples (worker #{worker} lived {})",
                clock(*lived)
            );
        }
        None => {}
    }
    let _ = writeln!(r);
}

/// Where the duplicates came from (from the worker's own logs), the lost jobs and the jobs in
/// the wrong place; returns the duplicates' log lines, for `duplicates.txt`.
fn duplicates_lost_misplaced(
    r: &mut String,
    ledger: &Ledger,
    verdict: &Verdict,
    logs: &[(usize, PathBuf)],
) -> String {
    let Verdict {
        lost,
        duplicates,
        misplaced,
        ..
    } = verdict;
    let mut appendix = String::new();
    if !duplicates.is_empty() {
        let mut causes: BTreeMap<&str, usize> = BTreeMap::new();
        for (id, _) in duplicates {
            let lines = log_lines_for(logs, id);
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
                ledger.delivered[id]
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
            let _ = writeln!(r, "  {id} ({:?})", ledger.published[id]);
            let lines = log_lines_for(logs, id);
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
    appendix
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
