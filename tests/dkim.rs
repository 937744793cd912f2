//! DKIM signing, end to end: jobs through the broker and the worker to a relay, their
//! signatures checked by dkimpy (Python; an implementation this project did not write) against
//! the records `amqp-mailer dkim-record` prints. Keys are made as a user makes them, with
//! `openssl genpkey`. Needs the venv of `bash .ci/install-test-tools`.

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::broker::{Broker, WAIT};
use testkit::pki::TempDir;
use testkit::postfix::{Postfix, PostfixOptions};
use testkit::process::{free_port, run_to_end};
use testkit::smtp::{ReceivedMessage, SmtpServer};
use testkit::worker::{RunningWorker, test_config};

use amqp_mailer::config::{DEFAULT_SIGNED_HEADERS, DkimAlgorithm, DkimEntry};

const INSTALL_HINT: &str = "run `bash .ci/install-test-tools` (it makes target/test-tools/venv \
                            with dkimpy), then run the tests again";

fn venv_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/venv/bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import dkim, nacl"])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        ok,
        "{} cannot import dkimpy and PyNaCl: {INSTALL_HINT}",
        python.display()
    );
    python
}

/// A private key made by `openssl genpkey`, as a user would make one.
fn genpkey(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("openssl genpkey: {e} (install openssl)"));
    assert!(
        out.status.success(),
        "openssl genpkey {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn rsa_key(dir: &Path, name: &str, bits: u32) -> PathBuf {
    let bits = format!("rsa_keygen_bits:{bits}");
    genpkey(dir, name, &["-algorithm", "RSA", "-pkeyopt", &bits])
}

fn ed25519_key(dir: &Path, name: &str) -> PathBuf {
    genpkey(dir, name, &["-algorithm", "ED25519"])
}

fn entry(domain: &str, selector: &str, key_file: &Path, algorithm: DkimAlgorithm) -> DkimEntry {
    DkimEntry {
        domain: domain.into(),
        selector: selector.into(),
        key_file: key_file.to_path_buf(),
        algorithm,
        headers: DEFAULT_SIGNED_HEADERS.map(String::from).to_vec(),
    }
}

/// The `[[dkim]]` entries as TOML, for the binary.
fn dkim_toml(entries: &[DkimEntry]) -> String {
    let mut toml = String::new();
    for e in entries {
        toml.push_str(&format!(
            "[[dkim]]\ndomain = \"{}\"\nselector = \"{}\"\nkey_file = \"{}\"\nalgorithm = \"{}\"\n\n",
            e.domain,
            e.selector,
            e.key_file.display(),
            e.algorithm.name()
        ));
    }
    toml
}

/// The records `amqp-mailer dkim-record` prints, parsed as a zone file line is:
/// `name. IN TXT "part" "part"`, the parts joined. Returns (name without the dot, value).
async fn records(config_file: &Path, domain: Option<&str>) -> Vec<(String, String)> {
    let config = config_file.display().to_string();
    let mut args = vec!["--config", config.as_str(), "dkim-record"];
    if let Some(domain) = domain {
        args.extend(["--domain", domain]);
    }
    let (status, stdout, stderr) = run_to_end(&args, &[]).await;
    assert!(status.success(), "dkim-record: {stderr}");
    stdout
        .lines()
        .map(|line| {
            let (name, rest) = line
                .split_once(". IN TXT ")
                .unwrap_or_else(|| panic!("not a zone file TXT line: {line}"));
            let mut value = String::new();
            for (i, part) in rest.split('"').enumerate() {
                match i % 2 {
                    1 => value.push_str(part),
                    _ => assert!(part.trim().is_empty(), "between the strings: {line}"),
                }
            }
            assert!(
                rest.split('"').skip(1).step_by(2).all(|p| p.len() <= 255),
                "each string of a TXT record is 255 bytes at most: {line}"
            );
            (name.to_string(), value)
        })
        .collect()
}

#[derive(Debug, serde::Deserialize, PartialEq)]
struct Verified {
    d: String,
    s: String,
    a: String,
    ok: bool,
    /// Why it failed.
    #[serde(default)]
    reason: String,
}

/// dkimpy's verdict on each signature of `data`.
fn verify(dir: &Path, data: &[u8], records: &[(String, String)]) -> Vec<Verified> {
    let file = dir.join("message.eml");
    std::fs::write(&file, data).expect("write the message");
    let records: serde_json::Map<String, serde_json::Value> = records
        .iter()
        .map(|(name, value)| (name.clone(), value.clone().into()))
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dkim/verify.py");
    let out = Command::new(venv_python())
        .arg(script)
        .arg(&file)
        .arg(serde_json::Value::Object(records).to_string())
        .output()
        .expect("run the verifier");
    assert!(
        out.status.success(),
        "verify.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the verifier's JSON")
}

fn message_from<'a>(messages: &'a [ReceivedMessage], from: &str) -> &'a ReceivedMessage {
    messages
        .iter()
        .find(|m| m.mail_from == from)
        .unwrap_or_else(|| panic!("no message from {from}"))
}

/// RSA, Ed25519, and a domain with both keys (signed twice, RFC 8463), through the worker: each
/// signature verifies with dkimpy against the record `dkim-record` prints; a message without a
/// key for its domain is not signed; and a message changed after signing fails (so that this
/// test can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_with_an_independent_verifier() {
    let dir = TempDir::new("dkim");
    let rsa = rsa_key(dir.path(), "rsa.pem", 2048);
    let ed = ed25519_key(dir.path(), "ed.pem");
    let both_rsa = rsa_key(dir.path(), "both-rsa.pem", 2048);
    let both_ed = ed25519_key(dir.path(), "both-ed.pem");
    let entries = vec![
        entry("rsa.example", "s2026", &rsa, DkimAlgorithm::RsaSha256),
        entry("ed.example", "ed2026", &ed, DkimAlgorithm::Ed25519Sha256),
        entry("both.example", "rsa1", &both_rsa, DkimAlgorithm::RsaSha256),
        entry(
            "BOTH.example",
            "ed1",
            &both_ed,
            DkimAlgorithm::Ed25519Sha256,
        ),
    ];
    let config_file = dir.path().join("amqp-mailer.toml");
    std::fs::write(&config_file, dkim_toml(&entries)).expect("write the config");
    let records = records(&config_file, None).await;
    assert_eq!(records.len(), 4, "{records:?}");
    assert_eq!(records[0].0, "s2026._domainkey.rsa.example", "{records:?}");
    assert!(
        records[0].1.starts_with("v=DKIM1; k=rsa; p=MII"),
        "{records:?}"
    );
    assert!(
        records[1].1.starts_with("v=DKIM1; k=ed25519; p="),
        "{records:?}"
    );
    let both = self::records(&config_file, Some("Both.Example")).await;
    assert_eq!(
        both,
        records[2..].to_vec(),
        "--domain picks one domain's keys"
    );

    let smtp = SmtpServer::start();
    let broker = Broker::new("dkim").await;
    let mut config = test_config(&broker, smtp.port());
    config.dkim = entries;
    config.validate().expect("valid");
    let worker = RunningWorker::start(&broker, config).await;
    for (id, from) in [
        ("dkim-rsa", "news@rsa.example"),
        ("dkim-ed", "news@ed.example"),
        ("dkim-both", "News@Both.Example"),
        ("dkim-none", "news@unsigned.example"),
    ] {
        let job = serde_json::json!({
            "id": id,
            "from": format!("Newsletter <{from}>"),
            "to": "ann@example.com",
            "cc": ["Bob <bob@example.com>"],
            "subject": "Grüße: the DKIM test, with a subject long enough to be folded by the builder",
            "text": "Hello,\n\nthis line ends with spaces   \nand this one has\ttabs.\n\n\n",
            "html": "<p>Hello</p>",
        });
        broker.publish(job.to_string().as_bytes()).await;
    }
    let messages = smtp.wait_for_messages(4, WAIT).await;
    worker.stop().await.expect("clean stop");

    let check = |from: &str, expected: &[(&str, &str, &str)]| {
        let message = message_from(&messages, from);
        let verdicts = verify(dir.path(), &message.data, &records);
        let expected: Vec<Verified> = expected
            .iter()
            .map(|(d, s, a)| Verified {
                d: d.to_string(),
                s: s.to_string(),
                a: a.to_string(),
                ok: true,
                reason: String::new(),
            })
            .collect();
        assert_eq!(
            verdicts,
            expected,
            "{from}:\n{}",
            String::from_utf8_lossy(&message.data)
        );
        message
    };
    let signed = check(
        "news@rsa.example",
        &[("rsa.example", "s2026", "rsa-sha256")],
    );
    check(
        "news@ed.example",
        &[("ed.example", "ed2026", "ed25519-sha256")],
    );
    check(
        "News@Both.Example",
        &[
            ("both.example", "rsa1", "rsa-sha256"),
            ("both.example", "ed1", "ed25519-sha256"),
        ],
    );
    let unsigned = message_from(&messages, "news@unsigned.example");
    assert!(
        unsigned.headers_named("DKIM-Signature").is_empty(),
        "no key for the domain, no signature"
    );

    // Changed after signing, in the body or in a signed header: the verifier says no.
    let text = String::from_utf8_lossy(&signed.data).into_owned();
    for (what, changed) in [
        ("the body", text.replacen("Hello", "Hullo", 1)),
        (
            "the subject",
            text.replacen("Subject: ", "Subject: Re: ", 1),
        ),
    ] {
        assert_ne!(changed, text, "{what} was changed");
        let verdicts = verify(dir.path(), changed.as_bytes(), &records);
        assert_eq!(verdicts.len(), 1);
        assert!(
            !verdicts[0].ok,
            "a change to {what} fails verification: {verdicts:?}"
        );
    }
}

/// Relayed by a real Postfix (its own instance, `testkit::postfix`), which adds its Received
/// header in front: the RSA and Ed25519 signatures still verify with dkimpy at the relay behind
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_survive_relaying_through_postfix() {
    let dir = TempDir::new("dkim-postfix");
    let rsa = rsa_key(dir.path(), "rsa.pem", 2048);
    let ed = ed25519_key(dir.path(), "ed.pem");
    let entries = vec![
        entry("mx.example", "rsa1", &rsa, DkimAlgorithm::RsaSha256),
        entry("mx.example", "ed1", &ed, DkimAlgorithm::Ed25519Sha256),
    ];
    let config_file = dir.path().join("amqp-mailer.toml");
    std::fs::write(&config_file, dkim_toml(&entries)).expect("write the config");
    let records = records(&config_file, None).await;

    let smtp = SmtpServer::start();
    let postfix = Postfix::start("dkim", smtp.port(), &PostfixOptions::default());
    let broker = Broker::new("dkim-postfix").await;
    let mut config = test_config(&broker, postfix.port());
    config.dkim = entries;
    config.validate().expect("valid");
    let worker = RunningWorker::start(&broker, config).await;
    let job = serde_json::json!({
        "id": "dkim-through-postfix",
        "from": "News <news@mx.example>",
        "to": "ann@example.com",
        "subject": "Signed, then relayed by Postfix",
        "text": "Hello through a real MTA.\n",
        "html": "<p>Hello</p>",
    });
    broker.publish(job.to_string().as_bytes()).await;
    let messages = smtp.wait_for_messages(1, WAIT).await;
    worker.stop().await.expect("clean stop");
    let message = &messages[0];
    assert!(
        message
            .header("Received")
            .is_some_and(|r| r.contains("postfix.test")),
        "relayed by Postfix: {}",
        String::from_utf8_lossy(&message.data)
    );
    let verdicts = verify(dir.path(), &message.data, &records);
    let ok: Vec<(&str, bool)> = verdicts.iter().map(|v| (v.a.as_str(), v.ok)).collect();
    assert_eq!(
        ok,
        [("rsa-sha256", true), ("ed25519-sha256", true)],
        "{verdicts:?}\n{}",
        String::from_utf8_lossy(&message.data)
    );
}

/// A key that cannot sign exits 64 before connecting, naming its entry.
#[tokio::test]
async fn a_key_that_cannot_sign_exits_64_naming_its_entry() {
    let dir = TempDir::new("dkim-bad");
    let weak = rsa_key(dir.path(), "weak.pem", 1024);
    let ed = ed25519_key(dir.path(), "ed.pem");
    let rsa = rsa_key(dir.path(), "rsa.pem", 2048);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key\n").expect("write");
    let missing = dir.path().join("missing.pem");
    let good = entry("ok.example", "s1", &rsa, DkimAlgorithm::RsaSha256);
    let cases = [
        (
            entry("a.example", "s", &missing, DkimAlgorithm::RsaSha256),
            "cannot read",
        ),
        (
            entry("a.example", "s", &garbage, DkimAlgorithm::RsaSha256),
            "no usable private key",
        ),
        (
            entry("a.example", "s", &weak, DkimAlgorithm::RsaSha256),
            "too weak",
        ),
        (
            entry("a.example", "s", &ed, DkimAlgorithm::RsaSha256),
            "it is Ed25519",
        ),
        (
            entry("a.example", "s", &rsa, DkimAlgorithm::Ed25519Sha256),
            "it is RSA",
        ),
    ];
    // Nothing listens there: an error about the key must come before any connection.
    let dead_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    for (bad, says) in cases {
        let file = dir.path().join("amqp-mailer.toml");
        std::fs::write(&file, dkim_toml(&[good.clone(), bad.clone()])).expect("write the config");
        let config = file.display().to_string();
        for args in [
            vec!["--config", config.as_str(), "run"],
            vec!["--config", config.as_str(), "dkim-record"],
        ] {
            let (status, stdout, stderr) =
                run_to_end(&args, &[("AMQP_MAILER_AMQP__URL", dead_url.clone())]).await;
            let output = format!("{stdout}{stderr}");
            assert_eq!(status.code(), Some(64), "{args:?} {bad:?}: {output}");
            assert!(
                output.contains("dkim[1].key_file") && output.contains(says),
                "{args:?}: names the entry's key and says {says:?}: {output}"
            );
            assert!(
                !output.contains("cannot connect") && !output.contains("connecting"),
                "before connecting: {output}"
            );
        }
    }
}
