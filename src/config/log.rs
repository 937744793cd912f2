//! `[log]`: what the worker logs, and how.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::enums::by_name;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", remote = "Self")]
pub enum LogFormat {
    /// For a person at a terminal or in the journal.
    Text,
    /// One JSON object a line, for a log collector.
    Json,
}
by_name!(LogFormat);

/// `[log]`: format and filter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter: `info` (default), `debug`, or per target like `amqp_mailer=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl LogConfig {
    /// Checks that the level is a filter `tracing` understands.
    pub fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level).map_err(|e| {
            ConfigError::new(
                "log.level",
                format!("`{}` is not a filter: {e}", self.level),
            )
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_names_log_level() {
        assert!(LogConfig::default().validate().is_ok());
        let config = LogConfig {
            level: "info,[[[".into(),
            ..LogConfig::default()
        };
        assert_eq!(config.validate().expect_err("bad filter").key, "log.level");
    }
}
