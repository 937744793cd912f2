//! `[http]`: the health and metrics listener.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[http]`: where `/healthz`, `/readyz` and `/metrics` listen.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the health and metrics listener, e.g. `127.0.0.1:9464`. Off when unset (the
    /// default).
    pub listen: Option<SocketAddr>,
}

impl HttpConfig {
    /// Nothing to check beyond its type: the address is parsed while reading, and whether it can
    /// be bound shows only when the worker starts (`app::run` names `http.listen` then).
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load;

    #[test]
    fn a_bad_address_names_http_listen() {
        let env = [("AMQP_MAILER_HTTP__LISTEN".to_string(), "here".to_string())];
        let error = load(None, env).expect_err("not an address");
        assert_eq!(error.key, "http.listen");
    }
}
