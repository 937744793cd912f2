//! `[shutdown]`: how a stop requested by the service manager is carried out.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::duration::{self, positive};

/// `[shutdown]`: the drain's grace period.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM, how long jobs in flight may take to finish before they are handed back to the
    /// broker. Default `25s`.
    #[serde(with = "duration")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(25),
        }
    }
}

impl ShutdownConfig {
    /// Checks that there is a grace period at all.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("shutdown.grace", self.grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_grace_names_shutdown_grace() {
        assert!(ShutdownConfig::default().validate().is_ok());
        let config = ShutdownConfig {
            grace: Duration::ZERO,
        };
        assert_eq!(config.validate().expect_err("zero").key, "shutdown.grace");
    }
}
