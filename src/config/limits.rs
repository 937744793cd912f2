//! `[limits]`: what one job may ask for. The same type checks jobs while decoding
//! (`job::Limits` is this type), so a limit is declared, defaulted and validated once.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Limits checked while decoding a job; a job over a limit is dead-lettered as invalid, naming it.
/// Read from `[limits]`, except `max_job_bytes` (see its field).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest job accepted, in bytes. Default 5 MiB. Configured as `worker.max_job_bytes`, not
    /// in `[limits]`: `Config::job_limits` fills it in, so its value here is not read from the
    /// configuration.
    #[serde(skip)]
    pub max_job_bytes: usize,
    /// Recipients (to + cc + bcc) in one job. Default 100.
    pub max_recipients: usize,
    /// Attachments in one job. Default 20.
    pub max_attachments: usize,
    /// Decoded size of all attachments together, in bytes. Default 4 MiB.
    pub max_attachment_bytes: usize,
    /// Entries in the job's `headers`. Default 50.
    pub max_headers: usize,
    /// Length of one custom header (name + value), in bytes. Default 998 (RFC 5322's line limit).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_job_bytes: 5 * 1024 * 1024,
            max_recipients: 100,
            max_attachments: 20,
            max_attachment_bytes: 4 * 1024 * 1024,
            max_headers: 50,
            max_header_bytes: 998,
        }
    }
}

impl Limits {
    /// These limits with `max_job_bytes` (the `worker.max_job_bytes` key) in place.
    pub fn new(max_job_bytes: usize, limits: &Limits) -> Self {
        Self {
            max_job_bytes,
            ..limits.clone()
        }
    }

    /// Checks the `[limits]` keys. `max_job_bytes` is the worker's to check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("limits.max_recipients", self.max_recipients),
            ("limits.max_attachments", self.max_attachments),
            ("limits.max_headers", self.max_headers),
            ("limits.max_header_bytes", self.max_header_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_failure_names_its_key() {
        assert!(Limits::default().validate().is_ok());
        type Break = fn(&mut Limits);
        let cases: [(Break, &str); 4] = [
            (|l| l.max_recipients = 0, "limits.max_recipients"),
            (|l| l.max_attachments = 0, "limits.max_attachments"),
            (|l| l.max_headers = 0, "limits.max_headers"),
            (|l| l.max_header_bytes = 0, "limits.max_header_bytes"),
        ];
        for (break_it, key) in cases {
            let mut limits = Limits::default();
            break_it(&mut limits);
            assert_eq!(limits.validate().expect_err(key).key, key);
        }
    }

    #[test]
    fn max_job_bytes_is_not_a_limits_key() {
        let error = toml::from_str::<Limits>("max_job_bytes = 10").expect_err("worker's key");
        assert!(error.to_string().contains("max_job_bytes"), "{error}");
        let printed = toml::to_string(&Limits::default()).expect("serializes");
        assert!(!printed.contains("max_job_bytes"), "{printed}");
    }
}
