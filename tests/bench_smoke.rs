//! The benchmark's smoke mode (500 jobs, both cases, with the ceilings; then the scale-out path
//! with 1 and 2 worker processes on one queue, 400 jobs), so that it cannot rot. It runs the
//! debug builds: the figures mean nothing here, the checks do (every job received and settled,
//! none twice, by whichever instance). The real benchmark is `bench/run`, see the README.

use std::path::{Path, PathBuf};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchmark_smoke_mode_runs_and_verifies_every_job() {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_amqp-mailer"));
    // `cargo test` builds the examples beside the binaries' directory; `cargo test --test
    // bench_smoke` builds only this test and the binary.
    let bench = worker.parent().expect("target dir").join("examples/bench");
    assert!(
        bench.is_file(),
        "{} missing: `cargo test` builds it (with `--test bench_smoke`, run `cargo build --example bench` first)",
        bench.display()
    );
    for tool in ["smtp-sink", "smtp-source"] {
        assert!(
            Path::new("/usr/sbin").join(tool).is_file(),
            "{tool} is missing: run `bash .ci/install-test-tools` first"
        );
    }
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(&bench)
            .arg("--smoke")
            .env("AMQP_MAILER_BIN", &worker)
            .env(
                "PATH",
                format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()),
            )
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the smoke run finished in time")
    .expect("run the benchmark");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    for row in [
        "| fast (postfix sink) | 500 | 50 |",
        "| slow (own sink) | 500 | 200 |",
    ] {
        assert!(stdout.contains(row), "table row {row:?} in:\n{stdout}");
    }
    assert_eq!(stdout.matches("worker      case=").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("smtp-source case=").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("ack-only    case=").count(), 2, "{stdout}");
    // The scale-out table: one row per instance count, each run checked like the rows above.
    for row in [
        "| slow (own sink) | 1 | 400 | 200 | 50 ms |",
        "| slow (own sink) | 2 | 400 | 200 | 50 ms |",
    ] {
        assert!(stdout.contains(row), "table row {row:?} in:\n{stdout}");
    }
    for line in [
        "scale-out   case=slow instances=1 ",
        "scale-out   case=slow instances=2 ",
        "  smtp-source sessions=400:",
        "  ack-only    consumers=2:",
    ] {
        assert_eq!(stdout.matches(line).count(), 1, "{line:?} in:\n{stdout}");
    }
    // Said, so that nobody quotes a smoke figure as a measure.
    assert!(stdout.contains("a check, not a measure"), "{stdout}");
}
