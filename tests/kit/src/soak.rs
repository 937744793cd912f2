//! The soak's books and its verdict (`examples/soak/`): what was published, delivered and
//! dead-lettered, and a pure function from that (and the memory of the longest-lived worker) to
//! pass or fail with the reasons. Pure so that the rules of the verdict are unit-tested here,
//! without a broker, a relay or a 10-minute run.

use std::collections::HashMap;

/// RSS samples taken this early in a worker's life (seconds) are start-up, not steady state.
pub const WARM_UP: f64 = 10.0;

/// The memory check judges only a worker that lived at least this long (seconds): a shorter life
/// has too few steady samples for a median of its first and last quarter to mean anything.
pub const MIN_JUDGED: f64 = 120.0;

/// The least steady samples for a judged memory check (two per quarter).
const MIN_JUDGED_SAMPLES: usize = 8;

/// The least steady samples for a memory figure at all (one per quarter).
const MIN_SAMPLES: usize = 4;

/// What a published job was made to be, and so where it must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    /// A good job: delivered.
    Normal,
    /// To an address the relay always refuses with 550: dead-lettered as `rejected`.
    Permanent,
    /// Bad JSON, an unknown field or a bad address: dead-lettered as `invalid`.
    Invalid,
}

/// A dead letter as read from the dead-letter queue: its headers `error-kind`, `attempt` and
/// `last-error` (empty when missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// `error-kind`: rejected, invalid, exhausted, ...
    pub kind: String,
    /// `attempt`: attempts made.
    pub attempt: String,
    /// `last-error`.
    pub reason: String,
}

/// What the run saw happen to its jobs, by job id.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every job the broker confirmed, by id.
    pub published: HashMap<String, JobKind>,
    /// Publishes that failed or were not confirmed (not counted as published).
    pub unconfirmed: Vec<String>,
    /// Seconds since the start at which the relay accepted each id.
    pub delivered: HashMap<String, Vec<f64>>,
    /// Relay messages that did not carry a soak id.
    pub foreign: usize,
    /// Every dead letter read, by id (more than one means it was dead-lettered twice).
    pub dead: HashMap<String, Vec<DeadLetter>>,
}

impl Ledger {
    /// Ids published but neither delivered nor dead-lettered (yet), in publishing order.
    pub fn unaccounted(&self) -> Vec<String> {
        let mut missing: Vec<String> = self
            .published
            .keys()
            .filter(|id| !self.delivered.contains_key(*id) && !self.dead.contains_key(*id))
            .cloned()
            .collect();
        missing.sort_by_key(|id| id_number(id));
        missing
    }
}

/// The number at the end of a soak id (`soak-<seed>-<n>`): its place in publishing order.
pub fn id_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The life of the worker process whose memory is judged (the longest-lived one).
#[derive(Debug, Clone, PartialEq)]
pub struct Life {
    /// Its generation number (1 for the first worker).
    pub worker: usize,
    /// Seconds it lived (until the end of the run if it was still running).
    pub lived: f64,
    /// Its RSS samples in KiB, in time order, those of the first [`WARM_UP`] seconds left out.
    pub steady_rss_kb: Vec<u64>,
}

/// The memory check of one worker.
#[derive(Debug, Clone, PartialEq)]
pub enum MemoryCheck {
    /// Fewer steady samples than one per quarter of its life: no figure.
    TooFewSamples {
        /// The generation number.
        worker: usize,
        /// Seconds it lived.
        lived: f64,
    },
    /// The median RSS of the first and of the last quarter of its steady samples.
    Measured {
        /// The generation number.
        worker: usize,
        /// Seconds it lived.
        lived: f64,
        /// Median RSS of the first quarter, KiB.
        first_kb: u64,
        /// Median RSS of the last quarter, KiB.
        last_kb: u64,
        /// `(last - first) / first`, in percent.
        growth_percent: f64,
        /// Whether it lived long enough (and was sampled often enough) to be judged.
        judged: bool,
        /// Judged, and it grew by more than the limit: a failure.
        grew: bool,
    },
}

impl MemoryCheck {
    /// Measures `life` against a limit of `max_growth_percent`.
    pub fn of(life: &Life, max_growth_percent: f64) -> MemoryCheck {
        let steady = &life.steady_rss_kb;
        if steady.len() < MIN_SAMPLES {
            return MemoryCheck::TooFewSamples {
                worker: life.worker,
                lived: life.lived,
            };
        }
        let judged = life.lived >= MIN_JUDGED && steady.len() >= MIN_JUDGED_SAMPLES;
        let q = steady.len() / 4;
        let first_kb = median(&steady[..q]);
        let last_kb = median(&steady[steady.len() - q..]);
        let growth_percent = (last_kb as f64 - first_kb as f64) / first_kb as f64 * 100.0;
        MemoryCheck::Measured {
            worker: life.worker,
            lived: life.lived,
            first_kb,
            last_kb,
            growth_percent,
            judged,
            // Written so that NaN (a first median of 0) counts as grown: a figure that cannot be
            // read is no pass.
            grew: judged && (growth_percent.is_nan() || growth_percent > max_growth_percent),
        }
    }

    /// Whether this check fails the run.
    pub fn failed(&self) -> bool {
        matches!(self, MemoryCheck::Measured { grew: true, .. })
    }
}

/// The upper median (of an even count, the higher of the two middle values); 0 for none.
fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

/// The end of a soak: where every job went, and whether the run passed.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Published, and neither delivered nor dead-lettered: lost. In publishing order.
    pub lost: Vec<String>,
    /// Jobs the relay received more than once, with the number of extra copies, in publishing
    /// order. At-least-once delivery allows them: they never fail a run.
    pub duplicates: Vec<(String, usize)>,
    /// The sum of the extra copies.
    pub extra_copies: usize,
    /// Jobs dead-lettered more than once.
    pub dead_twice: Vec<String>,
    /// Jobs both delivered and dead-lettered.
    pub delivered_and_dead: Vec<String>,
    /// Jobs that ended where their kind says they must not, each described for a person, sorted.
    pub misplaced: Vec<String>,
    /// The memory check, when there was a worker to judge.
    pub memory: Option<MemoryCheck>,
    /// Why the run failed: the run's own problems first, then what the books show. Empty: passed.
    pub failures: Vec<String>,
}

impl Verdict {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Judges a run from its books. `problems` are what went wrong while it ran (a worker that
/// crashed or did not come back, a queue that did not settle); `memory` is the longest-lived
/// worker, judged against `max_rss_growth` percent. A run fails on any problem, a lost job, a
/// job in the wrong place, a worker whose memory grew, or when nothing was published.
pub fn verdict(
    ledger: &Ledger,
    memory: Option<&Life>,
    problems: &[String],
    max_rss_growth: f64,
) -> Verdict {
    let lost = ledger.unaccounted();
    let mut duplicates: Vec<(String, usize)> = ledger
        .delivered
        .iter()
        .filter(|(_, times)| times.len() > 1)
        .map(|(id, times)| (id.clone(), times.len() - 1))
        .collect();
    duplicates.sort_by_key(|(id, _)| id_number(id));
    let extra_copies = duplicates.iter().map(|(_, n)| n).sum();
    let mut dead_twice: Vec<String> = ledger
        .dead
        .iter()
        .filter(|(_, letters)| letters.len() > 1)
        .map(|(id, _)| id.clone())
        .collect();
    dead_twice.sort_by_key(|id| id_number(id));
    let mut delivered_and_dead: Vec<String> = ledger
        .dead
        .keys()
        .filter(|id| ledger.delivered.contains_key(*id))
        .cloned()
        .collect();
    delivered_and_dead.sort_by_key(|id| id_number(id));

    let mut misplaced: Vec<String> = ledger
        .published
        .iter()
        .filter_map(|(id, kind)| misplacement(ledger, id, *kind))
        .collect();
    misplaced.sort();

    let memory = memory.map(|life| MemoryCheck::of(life, max_rss_growth));

    let mut failures = problems.to_vec();
    if !lost.is_empty() {
        failures.push(format!("{} jobs lost", lost.len()));
    }
    if !misplaced.is_empty() {
        failures.push(format!("{} jobs ended in the wrong place", misplaced.len()));
    }
    if memory.as_ref().is_some_and(MemoryCheck::failed) {
        failures.push("the worker's memory grew".into());
    }
    if ledger.published.is_empty() {
        failures.push("nothing was published".into());
    }
    Verdict {
        lost,
        duplicates,
        extra_copies,
        dead_twice,
        delivered_and_dead,
        misplaced,
        memory,
        failures,
    }
}

/// Why job `id` of `kind` ended in the wrong place, if it did. Only its first dead letter counts.
fn misplacement(ledger: &Ledger, id: &str, kind: JobKind) -> Option<String> {
    let delivered = ledger.delivered.contains_key(id);
    let dead = ledger.dead.get(id).and_then(|l| l.first());
    let (what, expected) = match kind {
        JobKind::Normal => {
            return dead.map(|letter| {
                format!(
                    "{id} (a good job) dead-lettered as {} after {} attempts: {}",
                    letter.kind, letter.attempt, letter.reason
                )
            });
        }
        JobKind::Permanent => ("to be rejected", "rejected"),
        JobKind::Invalid => ("invalid", "invalid"),
    };
    if delivered {
        return Some(format!("{id} ({what}) was delivered"));
    }
    dead.filter(|letter| letter.kind != expected).map(|letter| {
        format!(
            "{id} ({what}) dead-lettered as {}: {}",
            letter.kind, letter.reason
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(kind: &str) -> DeadLetter {
        DeadLetter {
            kind: kind.into(),
            attempt: "1".into(),
            reason: format!("the reason for {kind}"),
        }
    }

    /// Three good jobs delivered, one rejected and one invalid dead-lettered as they should be.
    fn clean() -> Ledger {
        let mut ledger = Ledger::default();
        for n in 1..=3 {
            let id = format!("soak-7-{n}");
            ledger.published.insert(id.clone(), JobKind::Normal);
            ledger.delivered.insert(id, vec![n as f64]);
        }
        ledger
            .published
            .insert("soak-7-4".into(), JobKind::Permanent);
        ledger
            .dead
            .insert("soak-7-4".into(), vec![letter("rejected")]);
        ledger.published.insert("soak-7-5".into(), JobKind::Invalid);
        ledger
            .dead
            .insert("soak-7-5".into(), vec![letter("invalid")]);
        ledger
    }

    fn life(lived: f64, rss: &[u64]) -> Life {
        Life {
            worker: 2,
            lived,
            steady_rss_kb: rss.to_vec(),
        }
    }

    #[test]
    fn a_clean_run_passes() {
        let flat = life(300.0, &[100; 40]);
        let v = verdict(&clean(), Some(&flat), &[], 20.0);
        assert!(v.passed(), "{v:?}");
        assert!(v.lost.is_empty() && v.misplaced.is_empty() && v.duplicates.is_empty());
        assert!(matches!(
            v.memory,
            Some(MemoryCheck::Measured {
                judged: true,
                grew: false,
                ..
            })
        ));
    }

    #[test]
    fn a_lost_job_fails_in_publishing_order() {
        let mut ledger = clean();
        ledger.published.insert("soak-7-10".into(), JobKind::Normal);
        ledger.published.insert("soak-7-9".into(), JobKind::Invalid);
        let v = verdict(&ledger, None, &[], 20.0);
        assert_eq!(v.lost, ["soak-7-9", "soak-7-10"]);
        assert_eq!(v.failures, ["2 jobs lost"]);
        assert_eq!(ledger.unaccounted(), v.lost);
    }

    #[test]
    fn duplicates_are_counted_but_do_not_fail() {
        let mut ledger = clean();
        ledger
            .delivered
            .insert("soak-7-2".into(), vec![1.0, 2.0, 3.0]);
        ledger.delivered.insert("soak-7-1".into(), vec![1.0, 5.0]);
        ledger
            .dead
            .get_mut("soak-7-4")
            .expect("rejected job")
            .push(letter("rejected"));
        let v = verdict(&ledger, None, &[], 20.0);
        assert!(v.passed(), "{v:?}");
        assert_eq!(
            v.duplicates,
            [("soak-7-1".to_string(), 1), ("soak-7-2".to_string(), 2)]
        );
        assert_eq!(v.extra_copies, 3);
        assert_eq!(v.dead_twice, ["soak-7-4"]);
    }

    #[test]
    fn a_job_in_the_wrong_place_fails_with_its_story() {
        let mut ledger = clean();
        // A good job dead-lettered, a rejected one delivered, an invalid one exhausted.
        ledger
            .dead
            .insert("soak-7-1".into(), vec![letter("exhausted")]);
        ledger.delivered.insert("soak-7-4".into(), vec![9.0]);
        ledger
            .dead
            .insert("soak-7-5".into(), vec![letter("exhausted")]);
        let v = verdict(&ledger, None, &[], 20.0);
        assert_eq!(
            v.misplaced,
            [
                "soak-7-1 (a good job) dead-lettered as exhausted after 1 attempts: the reason for \
                 exhausted",
                "soak-7-4 (to be rejected) was delivered",
                "soak-7-5 (invalid) dead-lettered as exhausted: the reason for exhausted",
            ]
        );
        assert_eq!(v.delivered_and_dead, ["soak-7-1", "soak-7-4"]);
        assert_eq!(v.failures, ["3 jobs ended in the wrong place"]);
    }

    #[test]
    fn memory_growth_fails_only_a_worker_that_lived_long_enough() {
        // 30 % growth from the first quarter to the last.
        let rss: Vec<u64> = (0..40).map(|i| if i < 20 { 100 } else { 130 }).collect();
        let long = verdict(&clean(), Some(&life(300.0, &rss)), &[], 20.0);
        assert_eq!(long.failures, ["the worker's memory grew"]);
        match long.memory {
            Some(MemoryCheck::Measured {
                first_kb,
                last_kb,
                growth_percent,
                judged,
                grew,
                ..
            }) => {
                assert_eq!((first_kb, last_kb), (100, 130));
                assert!((growth_percent - 30.0).abs() < 1e-9);
                assert!(judged && grew);
            }
            other => panic!("{other:?}"),
        }
        // Under the limit: passes.
        assert!(verdict(&clean(), Some(&life(300.0, &rss)), &[], 40.0).passed());
        // The same growth in a short life is shown but not judged.
        let short = verdict(&clean(), Some(&life(60.0, &rss)), &[], 20.0);
        assert!(short.passed(), "{short:?}");
        assert!(matches!(
            short.memory,
            Some(MemoryCheck::Measured {
                judged: false,
                grew: false,
                ..
            })
        ));
        // A long life with too few samples for a judgement, and one with too few for a figure.
        let sparse = verdict(
            &clean(),
            Some(&life(300.0, &[100, 100, 100, 100, 200])),
            &[],
            20.0,
        );
        assert!(sparse.passed(), "{sparse:?}");
        let none = verdict(&clean(), Some(&life(300.0, &[100, 500])), &[], 20.0);
        assert!(none.passed());
        assert_eq!(
            none.memory,
            Some(MemoryCheck::TooFewSamples {
                worker: 2,
                lived: 300.0
            })
        );
    }

    #[test]
    fn problems_come_first_and_an_empty_run_fails() {
        let problems = vec!["worker #2 (pid 9) exited on its own: signal 9".to_string()];
        let v = verdict(&Ledger::default(), None, &problems, 20.0);
        assert_eq!(
            v.failures,
            [
                "worker #2 (pid 9) exited on its own: signal 9",
                "nothing was published"
            ]
        );
        assert!(!v.passed());
    }

    #[test]
    fn id_numbers_order_ids() {
        assert_eq!(id_number("soak-20261124-1234"), 1234);
        assert_eq!(id_number("no-number"), 0);
    }
}
