//! `[worker]`: how much the worker does at once.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[worker]`: concurrency, threads, and the largest job accepted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs processed at once; also the prefetch and the most SMTP sessions open. Default 32.
    pub concurrency: u16,
    /// Largest job accepted, in bytes; a larger one is dead-lettered as invalid. Default 5 MiB.
    /// It bounds a delivery before it is decoded, next to the broker's own message size limit,
    /// which is why it stays a worker key; decoding reads it through `Config::job_limits`.
    pub max_job_bytes: usize,
    /// Threads running the worker. Default 1: one thread moves thousands of jobs a second, and
    /// saves the cross-thread wake-ups of a larger pool on a machine shared with the broker.
    pub threads: u16,
}

/// RabbitMQ refuses messages over 128 MiB by default (`max_message_size`): a larger job could
/// never arrive.
const BROKER_MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 32,
            max_job_bytes: super::Limits::default().max_job_bytes,
            threads: 1,
        }
    }
}

impl WorkerConfig {
    /// Checks threads, concurrency and the job size limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.threads == 0 || self.threads > 256 {
            return Err(ConfigError::new(
                "worker.threads",
                "must be between 1 and 256",
            ));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::new("worker.concurrency", "must be at least 1"));
        }
        if self.max_job_bytes == 0 || self.max_job_bytes > BROKER_MAX_MESSAGE_BYTES {
            return Err(ConfigError::new(
                "worker.max_job_bytes",
                "must be between 1 and 134217728 (128 MiB, the broker's limit)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_failure_names_its_key() {
        assert!(WorkerConfig::default().validate().is_ok());
        type Break = fn(&mut WorkerConfig);
        let cases: [(Break, &str); 4] = [
            (|c| c.threads = 0, "worker.threads"),
            (|c| c.concurrency = 0, "worker.concurrency"),
            (|c| c.max_job_bytes = 0, "worker.max_job_bytes"),
            (
                |c| c.max_job_bytes = BROKER_MAX_MESSAGE_BYTES + 1,
                "worker.max_job_bytes",
            ),
        ];
        for (break_it, key) in cases {
            let mut config = WorkerConfig::default();
            break_it(&mut config);
            assert_eq!(config.validate().expect_err(key).key, key);
        }
    }
}
