//! A real Postfix (Debian's package, installed by `bash .ci/install-test-tools`) as a relay in
//! front of a test relay: its own configuration and queue directories under
//! `/var/tmp/amqp-mailer-postfix/`, never the system's `/etc/postfix`, on a port of its own on
//! 127.0.0.1, relaying everything it accepts to `[127.0.0.1]:<relay port>`.
//!
//! Not under the checkout's `target/`: Postfix's daemons run as the `postfix` user, which must
//! traverse every parent of the queue directory, and a checkout often sits in a directory only
//! its owner may enter (a CI clone in `mktemp -d`, mode 0700).
//!
//! What it can be asked for: STARTTLS with a certificate of the test's CA (and AUTH only over
//! TLS), AUTH PLAIN and LOGIN through Cyrus SASL with a sasldb of its own, a recipient access
//! map, `message_size_limit`, and anvil's limits (connection count and message rate) with
//! localhost not exempted. Its log is its own file (`maillog_file`), for the tests to read.
//!
//! Starting needs root (Postfix's master runs as root and drops to the `postfix` user). An
//! instance is stopped (`postfix abort`) and its directory removed when dropped; one left by a
//! test process that died is cleaned up by the next start.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::pki::Pki;
use crate::process::free_port;

/// What the instance enforces.
#[derive(Default)]
pub struct PostfixOptions<'a> {
    /// STARTTLS offered and required (`smtpd_tls_security_level = encrypt`), with this
    /// certificate; AUTH only after it.
    pub tls: Option<&'a Pki>,
    /// Users of the sasldb: AUTH is then required to relay (`permit_sasl_authenticated`).
    pub users: Vec<(&'a str, &'a str)>,
    /// The recipient access map, e.g. `("gone@example.com", "550 5.1.1 No such user")`.
    pub recipient_access: Vec<(&'a str, &'a str)>,
    /// `message_size_limit`; Postfix's default (10,240,000) if unset.
    pub message_size_limit: Option<u64>,
    /// `smtpd_client_connection_count_limit`.
    pub connection_count_limit: Option<u32>,
    /// `smtpd_client_message_rate_limit` per `anvil_rate_time_unit`.
    pub message_rate_limit: Option<(u32, Duration)>,
}

/// A running Postfix instance (see the module's documentation).
pub struct Postfix {
    dir: PathBuf,
    port: u16,
}

const REALM: &str = "postfix.test";

impl Postfix {
    /// Writes the configuration, creates the sasldb and starts the instance; returns once it
    /// answers on its port. Panics, saying what to do, when Postfix is missing or not root.
    pub fn start(label: &str, relay_port: u16, options: &PostfixOptions<'_>) -> Postfix {
        for tool in ["/usr/sbin/postfix", "/usr/sbin/saslpasswd2"] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run `bash .ci/install-test-tools` (Debian's postfix and \
                 sasl2-bin)"
            );
        }
        assert!(
            is_root(),
            "the Postfix tests start a Postfix instance, which needs root: run them as root"
        );
        let base = base_dir();
        clean_stale(&base);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = base.join(format!(
            "{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let conf = dir.join("conf");
        let state = dir.join("state");
        for sub in [conf.join("sasl"), state.join("queue"), state.join("data")] {
            std::fs::create_dir_all(&sub)
                .unwrap_or_else(|e| panic!("create {}: {e}", sub.display()));
        }
        // The postfix user must reach its queue, data and sasldb through every parent.
        for path in [&base, &dir, &conf, &state, &conf.join("sasl")] {
            chmod(path, 0o755);
        }
        let port = free_port();
        std::fs::write(
            conf.join("main.cf"),
            main_cf(&conf, &state, relay_port, options),
        )
        .expect("write main.cf");
        std::fs::write(conf.join("master.cf"), master_cf(port)).expect("write master.cf");
        for file in ["postfix-files", "dynamicmaps.cf"] {
            std::fs::copy(Path::new("/etc/postfix").join(file), conf.join(file))
                .unwrap_or_else(|e| panic!("copy /etc/postfix/{file}: {e}"));
        }
        let mut access = String::new();
        for (address, action) in &options.recipient_access {
            let _ = writeln!(access, "{address} {action}");
        }
        std::fs::write(conf.join("recipient_access"), access).expect("write the access map");
        let sasldb = state.join("sasldb2");
        std::fs::write(
            conf.join("sasl/smtpd.conf"),
            format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {}\n\
                 mech_list: PLAIN LOGIN\n",
                sasldb.display()
            ),
        )
        .expect("write smtpd.conf");
        for (user, password) in &options.users {
            let mut child = Command::new("/usr/sbin/saslpasswd2")
                .args(["-p", "-c", "-u", REALM, "-f"])
                .arg(&sasldb)
                .arg(user)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("run saslpasswd2");
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(password.as_bytes())
                .expect("write the password");
            assert!(
                child.wait().expect("saslpasswd2").success(),
                "saslpasswd2 failed"
            );
        }
        if sasldb.exists() {
            chown_postfix(&sasldb);
        }
        chown_postfix(&state.join("data"));

        let postfix = Postfix { dir, port };
        let output = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start")
            .output()
            .expect("run postfix start");
        assert!(
            output.status.success(),
            "postfix start failed: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            postfix.log()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Postfix did not listen on {port} within 30 s:\n{}",
                postfix.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        postfix
    }

    /// The port its smtpd listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log (`maillog_file`) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("state/maillog")).unwrap_or_default()
    }

    /// Waits until its log has a line containing every one of `needles`; that line, or `None` on
    /// timeout.
    pub async fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log()
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
            {
                return Some(line.to_string());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        stop(&self.dir);
    }
}

/// Where instances live: a fixed directory every user can traverse (see the module's
/// documentation), shared by every checkout on the machine; names carry the owning process's
/// pid, so that runs side by side keep apart and a dead run's instances are found.
fn base_dir() -> PathBuf {
    PathBuf::from("/var/tmp/amqp-mailer-postfix")
}

/// Stops the instance in `dir` and removes it.
fn stop(dir: &Path) {
    let _ = Command::new("/usr/sbin/postfix")
        .arg("-c")
        .arg(dir.join("conf"))
        .arg("abort")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(dir);
}

/// Instances whose test process is gone (killed, crashed): stopped and removed.
fn clean_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .rsplit('-')
            .nth(1)
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| {
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        }) {
            stop(&entry.path());
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

fn chown_postfix(path: &Path) {
    let status = Command::new("chown")
        .arg("postfix")
        .arg(path)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown postfix {}", path.display());
}

fn main_cf(conf: &Path, state: &Path, relay_port: u16, options: &PostfixOptions<'_>) -> String {
    let conf = conf.display();
    let state = state.display();
    let mut text = format!(
        "compatibility_level = 3.6
config_directory = {conf}
meta_directory = {conf}
queue_directory = {state}/queue
data_directory = {state}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = {REALM}
mydomain = {REALM}
myorigin = {REALM}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{relay_port}
smtp_tls_security_level = none
maillog_file = {state}/maillog
maillog_file_prefixes = {state}
smtpd_recipient_restrictions = check_recipient_access texthash:{conf}/recipient_access
smtpd_client_event_limit_exceptions =
"
    );
    if options.users.is_empty() {
        text.push_str("smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n");
    } else {
        let _ = write!(
            text,
            "smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {conf}/sasl
smtpd_sasl_local_domain = {REALM}
smtpd_sasl_security_options = noanonymous
"
        );
    }
    if let Some(pki) = options.tls {
        let _ = write!(
            text,
            "smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_cert_file = {}
smtpd_tls_key_file = {}
",
            pki.cert_file.display(),
            pki.key_file.display()
        );
    }
    if let Some(limit) = options.message_size_limit {
        let _ = writeln!(text, "message_size_limit = {limit}");
    }
    if let Some(limit) = options.connection_count_limit {
        let _ = writeln!(text, "smtpd_client_connection_count_limit = {limit}");
    }
    if let Some((limit, unit)) = options.message_rate_limit {
        let _ = writeln!(text, "smtpd_client_message_rate_limit = {limit}");
        let _ = writeln!(text, "anvil_rate_time_unit = {}s", unit.as_secs().max(1));
    }
    text
}

/// The services a relaying Postfix needs, none chrooted (the instance has no chroot of its own).
fn master_cf(port: u16) -> String {
    format!(
        "127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"
    )
}
