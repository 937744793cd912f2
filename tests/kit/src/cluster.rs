//! The three-node RabbitMQ cluster of `.ci/rabbitmq-cluster`, as a fixture for tests that stop,
//! kill and restart nodes: started once per test binary, never skipped (a cluster that cannot
//! start fails the test, naming the script), and nodes driven through the same script.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::pki::Ca;

/// The cluster script, `.ci/rabbitmq-cluster` of this repository.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/rabbitmq-cluster")
}

/// Runs the script with `args`; panics with its output if it fails. Blocking.
fn run_script(args: &[&str]) -> String {
    run_script_with(&[], args)
}

/// [`run_script`] with `env` set for the script.
fn run_script_with(env: &[(&str, String)], args: &[&str]) -> String {
    let script = script();
    let output = Command::new("bash")
        .arg(&script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `bash {} {}`: {e}",
                script.display(),
                args.join(" ")
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "`bash {} {}` failed ({}): the cluster and TLS tests need the RabbitMQ nodes of that \
         script.\nstdout:\n{stdout}\nstderr:\n{}",
        script.display(),
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The AMQP URLs of nodes 1, 2 and 3, after `bash .ci/rabbitmq-cluster start` (once per test
/// binary; the script is idempotent, quick when the cluster is up, and locks against other
/// runs). Panics, naming the script, if the cluster cannot be started. Blocking: call it from
/// `spawn_blocking` (or [`urls`]) inside a runtime.
pub fn urls_blocking() -> &'static [String; 3] {
    static URLS: OnceLock<[String; 3]> = OnceLock::new();
    URLS.get_or_init(|| {
        run_script(&["start"]);
        let listed = run_script(&["urls"]);
        let urls: Vec<String> = listed.lines().map(str::to_owned).collect();
        urls.try_into().unwrap_or_else(|urls: Vec<String>| {
            panic!(
                "`bash {} urls` printed {} URLs, not 3: {urls:?}",
                script().display(),
                urls.len()
            )
        })
    })
}

/// [`urls_blocking`] without blocking the runtime.
pub async fn urls() -> &'static [String; 3] {
    tokio::task::spawn_blocking(urls_blocking)
        .await
        .expect("starting the cluster")
}

/// [`urls`], after making sure again that every node is up and in the cluster (`start`: quick
/// when it is). For each test that takes nodes down: a test that failed before it could start
/// its node again leaves that to its guard's `Drop`, which may still be running when the next
/// test begins.
pub async fn all_up() -> &'static [String; 3] {
    let urls = urls().await;
    tokio::task::spawn_blocking(|| run_script(&["start"]))
        .await
        .expect("starting the cluster");
    urls
}

/// The AMQP port of node `n` (1..=3) as the URLs name it.
pub fn port_of(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in the URL {url}"))
}

/// Runs `bash .ci/rabbitmq-cluster <command> <nodes…>` (`stop-node`, `kill-node`, `start-node`,
/// `restart-node`, `partition`, `heal`) without blocking the runtime; returns how long it took.
/// Panics with the script's output if it fails.
pub async fn nodes(command: &'static str, nodes: &[u8]) -> Duration {
    let started = Instant::now();
    let mut args = vec![command.to_owned()];
    args.extend(nodes.iter().map(u8::to_string));
    tokio::task::spawn_blocking(move || {
        run_script(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .expect("the cluster script");
    started.elapsed()
}

/// [`nodes`] for one node.
pub async fn node(command: &'static str, n: u8) -> Duration {
    nodes(command, &[n]).await
}

/// What undoes `command`: `heal` after `partition`, `start-node` after the rest.
fn undo_of(command: &str) -> &'static str {
    if command == "partition" {
        "heal"
    } else {
        "start-node"
    }
}

/// Nodes that a test stopped, killed or cut off: started again (or healed) when this is dropped
/// (the test ended, or failed), so that the next test finds the cluster whole.
pub struct DownNode {
    nodes: Vec<u8>,
    undo: &'static str,
    restored: bool,
}

impl DownNode {
    /// Stops (`stop-node`), kills (`kill-node`) or cuts off (`partition`) node `n`; returns
    /// the guard and how long the script took.
    pub async fn take_down(command: &'static str, n: u8) -> (Self, Duration) {
        Self::take_down_all(command, &[n]).await
    }

    /// [`take_down`](Self::take_down) for several nodes at once (`stop-node 1 2 3`: the whole
    /// cluster).
    pub async fn take_down_all(command: &'static str, down: &[u8]) -> (Self, Duration) {
        // Made first: if the script fails half-way, the nodes are restored all the same.
        let guard = Self {
            nodes: down.to_vec(),
            undo: undo_of(command),
            restored: false,
        };
        let took = nodes(command, down).await;
        (guard, took)
    }

    /// Starts the nodes again (together, so that a whole cluster comes back from the node that
    /// stopped last) or heals the partition, and waits until they are back in the cluster.
    pub async fn start_again(mut self) -> Duration {
        let took = nodes(self.undo, &self.nodes).await;
        self.restored = true;
        took
    }
}

impl Drop for DownNode {
    fn drop(&mut self) {
        if !self.restored {
            let mut args = vec![self.undo.to_owned()];
            args.extend(self.nodes.iter().map(u8::to_string));
            // From a thread of its own: this may run inside a runtime, during a panic.
            let _ = std::thread::spawn(move || {
                run_script(&args.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .join();
        }
    }
}

/// A RabbitMQ node of its own that also listens with TLS: `bash .ci/rabbitmq-cluster` with node
/// name `tlshare1@localhost`, plain AMQP on 5691 and TLS on 6691, `verify_peer` and EXTERNAL,
/// its server certificate signed by [`TlsNode::ca`], a throwaway CA made with rcgen and kept in
/// `target/tls-broker/` (so that a node still running from an earlier run is not restarted).
pub struct TlsNode {
    /// `amqp://guest:guest@127.0.0.1:5691/%2f`: for the test's own publishing and reading.
    pub plain_url: String,
    /// `amqps://localhost:6691/%2f`.
    pub tls_url: String,
    /// The CA the node trusts, and that signed its certificate.
    pub ca: Ca,
    /// Where the CA and the server's files are.
    pub dir: PathBuf,
}

/// The common name (and so the broker user) of the client certificates the TLS node accepts.
pub const TLS_USER: &str = "amqp-mailer-tls";

/// The TLS node, started once per test binary. Panics, naming the script, if it cannot start.
/// Blocking: call it from `spawn_blocking` (or [`tls_node`]) inside a runtime.
pub fn tls_node_blocking() -> &'static TlsNode {
    static NODE: OnceLock<TlsNode> = OnceLock::new();
    NODE.get_or_init(|| {
        let dir = crate::process::profile_dir()
            .parent()
            .map(|target| target.join("tls-broker"))
            .expect("the target directory");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let ca = Ca::kept(&dir, "broker");
        let (server, server_key) = (dir.join("server.pem"), dir.join("server-key.pem"));
        // A new CA (none was kept) needs a new server certificate.
        let same_ca = std::fs::read(&ca.ca_file).ok() == std::fs::read(dir.join("ca.pem")).ok();
        if !server.is_file() || !server_key.is_file() || !same_ca {
            ca.server(&dir, "server");
            std::fs::copy(&ca.ca_file, dir.join("ca.pem")).expect("copy the CA");
        }
        let env = [
            ("AMQP_MAILER_CLUSTER_NODE_PREFIX", "tlshare".to_string()),
            ("AMQP_MAILER_CLUSTER_BASE_PORT", "5691".into()),
            ("AMQP_MAILER_CLUSTER_SIZE", "1".into()),
            ("AMQP_MAILER_CLUSTER_TLS_DIR", dir.display().to_string()),
            ("AMQP_MAILER_CLUSTER_TLS_USER", TLS_USER.into()),
        ];
        run_script_with(&env, &["start"]);
        let listed = run_script_with(&env, &["urls"]);
        let mut lines = listed.lines().map(str::to_owned);
        let (Some(plain_url), Some(tls_url)) = (lines.next(), lines.next()) else {
            panic!(
                "`bash {} urls` printed no TLS URL: {listed}",
                script().display()
            )
        };
        TlsNode {
            plain_url,
            tls_url,
            ca,
            dir,
        }
    })
}

/// [`tls_node_blocking`] without blocking the runtime.
pub async fn tls_node() -> &'static TlsNode {
    tokio::task::spawn_blocking(tls_node_blocking)
        .await
        .expect("starting the TLS node")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_read_from_the_urls() {
        assert_eq!(port_of("amqp://guest:guest@127.0.0.1:5681/%2f"), 5681);
        assert_eq!(port_of("amqp://127.0.0.1:5683"), 5683);
        assert!(script().ends_with(".ci/rabbitmq-cluster"));
    }
}
