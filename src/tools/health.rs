//! `amqp-mailer health`: ask a running worker over HTTP whether it is ready (`/readyz`) or alive
//! (`/healthz`), for container and systemd probes.

use std::net::SocketAddr;
use std::time::Duration;

use super::ToolError;
use crate::config::Config;
use crate::http;

/// A probe must end on its own: a worker that accepts the connection and never answers is not
/// ready, and the orchestrator's own timeout would only report a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The flags of `amqp-mailer health`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HealthArgs {
    /// Address of the worker's HTTP listener; defaults to http.listen.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<SocketAddr>,
    /// Check /healthz (alive) instead of /readyz (ready).
    #[arg(long)]
    pub live: bool,
}

impl HealthArgs {
    /// The endpoint to ask.
    pub fn path(&self) -> &'static str {
        if self.live { "/healthz" } else { "/readyz" }
    }
}

/// Where to ask: `--addr`, else `http.listen`; a usage error when neither is set.
pub fn target(config: &Config, args: &HealthArgs) -> Result<SocketAddr, ToolError> {
    let addr = args.addr.or(config.http.listen).ok_or_else(|| {
        ToolError::Usage(
            "health: no address; set http.listen (AMQP_MAILER_HTTP__LISTEN) or pass --addr".into(),
        )
    })?;
    // A listener on 0.0.0.0 is reached on loopback from inside the container.
    Ok(if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    })
}

/// Asks the worker and prints its answer; not ready (or no answer in 5 s) is
/// [`ToolError::NotReady`].
pub async fn run(config: &Config, args: HealthArgs) -> Result<(), ToolError> {
    let addr = target(config, &args)?;
    let body = probe(addr, args.path())
        .await
        .map_err(ToolError::NotReady)?;
    println!("{body}");
    Ok(())
}

/// GET `path` at `addr` within [`ANSWER_WITHIN`]: the body when 200, else why not.
pub async fn probe(addr: SocketAddr, path: &str) -> Result<String, String> {
    tokio::time::timeout(ANSWER_WITHIN, http::check(addr, path))
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {addr} within 5 s")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_prefers_the_flag_and_reaches_an_unspecified_listener_on_loopback() {
        let mut config = Config::default();
        let none = HealthArgs::default();
        let error = target(&config, &none).expect_err("no address");
        assert!(matches!(error, ToolError::Usage(_)), "{error:?}");
        assert_eq!(error.exit_code(), 64);
        assert!(error.to_string().contains("http.listen"), "{error}");

        config.http.listen = Some("0.0.0.0:9100".parse().expect("addr"));
        assert_eq!(
            target(&config, &none).expect("listen"),
            "127.0.0.1:9100".parse::<SocketAddr>().expect("addr")
        );
        let flag = HealthArgs {
            addr: Some("192.0.2.7:8080".parse().expect("addr")),
            live: true,
        };
        assert_eq!(
            target(&config, &flag).expect("flag"),
            flag.addr.expect("addr")
        );
        assert_eq!(flag.path(), "/healthz");
        assert_eq!(none.path(), "/readyz");
    }

    #[tokio::test]
    async fn nothing_listening_is_not_ready() {
        // Bound then dropped: a port on which nothing listens.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let reason = probe(addr, "/readyz").await.expect_err("refused");
        assert!(reason.contains("cannot connect"), "{reason}");
        assert_eq!(ToolError::NotReady(reason).exit_code(), 1);
    }
}
