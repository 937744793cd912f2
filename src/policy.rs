//! What to do with a job after an attempt: pure arithmetic and a table, no I/O.

use std::time::Duration;

use crate::config::RetryConfig;

/// Why a job was dead-lettered or retried; written as the `error-kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A failure that may pass: 4xx, network, timeout, TLS or authentication trouble.
    Transient,
    /// The relay refused this message or a recipient for good (5xx).
    Rejected,
    /// The job itself cannot be sent: bad JSON, bad address, over a limit.
    Invalid,
    /// Transient failures until no attempt was left.
    Exhausted,
    /// The message was sent and the relay's verdict never came: it may have been delivered.
    Ambiguous,
    /// Past its `not_after` time or `retry.max_age`: not sent late.
    Expired,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Exhausted => "exhausted",
            ErrorKind::Ambiguous => "ambiguous",
            ErrorKind::Expired => "expired",
        }
    }

    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Transient,
        ErrorKind::Rejected,
        ErrorKind::Invalid,
        ErrorKind::Exhausted,
        ErrorKind::Ambiguous,
        ErrorKind::Expired,
    ];
}

/// How an attempt failed, as far as the decision is concerned. A delivered job needs no
/// decision: it is acked, so there is no variant for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Transient,
    Rejected,
    Invalid,
    /// Sent, verdict unknown; retried or dead-lettered as `smtp.ambiguous` says.
    Ambiguous,
    Expired,
}

/// Where a failed job goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Publish to the retry queue of `delay` with `attempt` attempts made, then ack.
    Retry {
        attempt: u32,
        delay: Duration,
        kind: ErrorKind,
    },
    /// Publish to the dead-letter queue, then ack.
    DeadLetter { attempt: u32, kind: ErrorKind },
}

/// The retry ladder: attempt n (n ≥ 1) that failed transiently waits
/// `initial_delay × multiplier^(n-1)`, capped at `max_delay`, before attempt n + 1; after
/// `max_attempts` attempts the job is exhausted.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    initial: Duration,
    multiplier: f64,
    max: Duration,
    max_attempts: u32,
    /// Dead-letter an ambiguous send instead of retrying it.
    ambiguous_dead_letter: bool,
}

impl Schedule {
    pub fn new(config: &RetryConfig) -> Self {
        Self {
            initial: config.initial_delay,
            multiplier: config.multiplier,
            max: config.max_delay,
            max_attempts: config.max_attempts,
            ambiguous_dead_letter: false,
        }
    }

    /// With `smtp.ambiguous = "dead-letter"`: an ambiguous send goes to a person, not a retry.
    pub fn dead_letter_ambiguous(mut self, yes: bool) -> Self {
        self.ambiguous_dead_letter = yes;
        self
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay after failed attempt `attempt` (1-based), in whole milliseconds (a TTL's unit).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1);
        // Work in f64 milliseconds and cap before converting: 2^1000 must not overflow.
        let millis = self.initial.as_millis() as f64 * self.multiplier.powi(exponent as i32);
        let capped = millis.min(self.max.as_millis() as f64);
        Duration::from_millis(capped.round() as u64)
    }

    /// Every distinct delay a job can wait, in order: one retry queue each.
    pub fn delays(&self) -> Vec<Duration> {
        let mut delays: Vec<Duration> = Vec::new();
        for attempt in 1..self.max_attempts {
            let delay = self.delay_after(attempt);
            if delays.last() != Some(&delay) {
                delays.push(delay);
            }
        }
        delays
    }

    /// The decision after a failed attempt, given how many attempts were made before it.
    pub fn decide(&self, failure: Failure, attempts_before: u32) -> Decision {
        let attempt = attempts_before.saturating_add(1);
        let dead = |kind| Decision::DeadLetter { attempt, kind };
        let retry = |kind| {
            if attempt >= self.max_attempts {
                dead(ErrorKind::Exhausted)
            } else {
                Decision::Retry {
                    attempt,
                    delay: self.delay_after(attempt),
                    kind,
                }
            }
        };
        match failure {
            Failure::Rejected => dead(ErrorKind::Rejected),
            Failure::Invalid => dead(ErrorKind::Invalid),
            Failure::Expired => dead(ErrorKind::Expired),
            Failure::Ambiguous if self.ambiguous_dead_letter => dead(ErrorKind::Ambiguous),
            Failure::Ambiguous => retry(ErrorKind::Ambiguous),
            Failure::Transient => retry(ErrorKind::Transient),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(initial_ms: u64, multiplier: f64, max_ms: u64, max_attempts: u32) -> Schedule {
        Schedule::new(&RetryConfig {
            initial_delay: Duration::from_millis(initial_ms),
            multiplier,
            max_delay: Duration::from_millis(max_ms),
            max_attempts,
            max_age: None,
        })
    }

    #[test]
    fn default_ladder_and_give_up_point() {
        let s = Schedule::new(&RetryConfig::default());
        let secs = |n| Decision::Retry {
            attempt: n,
            delay: Duration::from_secs(10 * 2u64.pow(n - 1)),
            kind: ErrorKind::Transient,
        };
        // attempts made before → decision after a transient failure
        let table = [
            (0, secs(1)), // 10 s
            (1, secs(2)), // 20 s
            (2, secs(3)), // 40 s
            (3, secs(4)), // 80 s
            (4, secs(5)), // 160 s
            (5, secs(6)), // 320 s
            (6, secs(7)), // 640 s
            (7, secs(8)), // 1280 s
            (8, secs(9)), // 2560 s
            (
                9,
                Decision::DeadLetter {
                    attempt: 10,
                    kind: ErrorKind::Exhausted,
                },
            ),
            (
                25,
                Decision::DeadLetter {
                    attempt: 26,
                    kind: ErrorKind::Exhausted,
                },
            ),
        ];
        for (before, expected) in table {
            assert_eq!(
                s.decide(Failure::Transient, before),
                expected,
                "after {before}"
            );
        }
    }

    #[test]
    fn delay_is_capped() {
        let s = schedule(10_000, 2.0, 3_600_000, 20);
        assert_eq!(s.delay_after(9), Duration::from_secs(2560));
        assert_eq!(s.delay_after(10), Duration::from_secs(3600));
        assert_eq!(s.delay_after(19), Duration::from_secs(3600));
        assert_eq!(s.delay_after(1000), Duration::from_secs(3600));
    }

    #[test]
    fn distinct_delays_are_one_queue_each() {
        let s = schedule(10_000, 2.0, 3_600_000, 20);
        let delays: Vec<u64> = s.delays().iter().map(Duration::as_secs).collect();
        assert_eq!(
            delays,
            [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600],
            "the capped delay appears once"
        );
        assert_eq!(schedule(100, 1.0, 100, 5).delays().len(), 1);
        assert!(
            schedule(100, 2.0, 1000, 1).delays().is_empty(),
            "one attempt: never retried"
        );
    }

    #[test]
    fn fractional_multiplier_rounds_to_milliseconds() {
        let s = schedule(1000, 1.5, 60_000, 5);
        let ms: Vec<u128> = (1..5).map(|n| s.delay_after(n).as_millis()).collect();
        assert_eq!(ms, [1000, 1500, 2250, 3375]);
    }

    #[test]
    fn non_transient_outcomes_ignore_attempts_left() {
        let s = schedule(100, 2.0, 1000, 3);
        assert_eq!(
            s.decide(Failure::Rejected, 0),
            Decision::DeadLetter {
                attempt: 1,
                kind: ErrorKind::Rejected
            }
        );
        assert_eq!(
            s.decide(Failure::Invalid, 1),
            Decision::DeadLetter {
                attempt: 2,
                kind: ErrorKind::Invalid
            }
        );
        assert_eq!(
            s.decide(Failure::Transient, 1),
            Decision::Retry {
                attempt: 2,
                delay: Duration::from_millis(200),
                kind: ErrorKind::Transient,
            }
        );
        assert_eq!(
            s.decide(Failure::Transient, 2),
            Decision::DeadLetter {
                attempt: 3,
                kind: ErrorKind::Exhausted
            }
        );
    }

    #[test]
    fn ambiguous_follows_the_policy() {
        let retry = schedule(100, 2.0, 1000, 3);
        assert_eq!(
            retry.decide(Failure::Ambiguous, 0),
            Decision::Retry {
                attempt: 1,
                delay: Duration::from_millis(100),
                kind: ErrorKind::Ambiguous
            }
        );
        assert_eq!(
            retry.decide(Failure::Ambiguous, 2),
            Decision::DeadLetter {
                attempt: 3,
                kind: ErrorKind::Exhausted
            }
        );
        let dead = schedule(100, 2.0, 1000, 3).dead_letter_ambiguous(true);
        assert_eq!(
            dead.decide(Failure::Ambiguous, 0),
            Decision::DeadLetter {
                attempt: 1,
                kind: ErrorKind::Ambiguous
            }
        );
        assert_eq!(
            dead.decide(Failure::Expired, 4),
            Decision::DeadLetter {
                attempt: 5,
                kind: ErrorKind::Expired
            }
        );
    }

    #[test]
    fn single_attempt_never_retries() {
        let s = schedule(100, 2.0, 1000, 1);
        assert_eq!(
            s.decide(Failure::Transient, 0),
            Decision::DeadLetter {
                attempt: 1,
                kind: ErrorKind::Exhausted
            }
        );
    }
}
