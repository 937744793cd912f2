//! `[retry]`: the delay ladder of transient failures, and when to give up.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::duration::{self, positive};

/// `[retry]`: exponential delays between attempts, and the give-up points.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Delay before the second attempt. Default `10s`.
    #[serde(with = "duration")]
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this. Default 2.
    pub multiplier: f64,
    /// Longest delay. Default `1h`.
    #[serde(with = "duration")]
    pub max_delay: Duration,
    /// Attempts in all, the first included; after the last one the job is dead-lettered
    /// as `exhausted`. Default 10.
    pub max_attempts: u32,
    /// A job still unsent this long after its first failed attempt is dead-lettered as
    /// `expired` instead of being sent late. Unset (the default): no limit. A job can also carry
    /// its own `not_after` time.
    #[serde(with = "duration::optional")]
    pub max_age: Option<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_secs(10),
            multiplier: 2.0,
            max_delay: Duration::from_secs(3600),
            max_attempts: 10,
            max_age: None,
        }
    }
}

impl RetryConfig {
    /// Checks that the ladder climbs, fits a queue TTL, and ends.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("retry.initial_delay", self.initial_delay)?;
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0 && self.multiplier <= 100.0) {
            return Err(ConfigError::new(
                "retry.multiplier",
                "must be a number between 1 and 100",
            ));
        }
        if self.max_delay < self.initial_delay {
            return Err(ConfigError::new(
                "retry.max_delay",
                "must not be shorter than retry.initial_delay",
            ));
        }
        // A TTL is a 32-bit number of milliseconds.
        if self.max_delay > Duration::from_millis(u64::from(u32::MAX)) {
            return Err(ConfigError::new("retry.max_delay", "must be under 49 days"));
        }
        if self.max_attempts == 0 || self.max_attempts > 1000 {
            return Err(ConfigError::new(
                "retry.max_attempts",
                "must be between 1 and 1000",
            ));
        }
        if let Some(age) = self.max_age {
            positive("retry.max_age", age)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_failure_names_its_key() {
        assert!(RetryConfig::default().validate().is_ok());
        type Break = fn(&mut RetryConfig);
        let cases: [(Break, &str); 6] = [
            (|c| c.initial_delay = Duration::ZERO, "retry.initial_delay"),
            (|c| c.multiplier = 0.5, "retry.multiplier"),
            (|c| c.max_delay = Duration::from_secs(1), "retry.max_delay"),
            (
                |c| c.max_delay = Duration::from_secs(50 * 86_400),
                "retry.max_delay",
            ),
            (|c| c.max_attempts = 0, "retry.max_attempts"),
            (|c| c.max_age = Some(Duration::ZERO), "retry.max_age"),
        ];
        for (break_it, key) in cases {
            let mut config = RetryConfig::default();
            break_it(&mut config);
            assert_eq!(config.validate().expect_err(key).key, key);
        }
    }
}
