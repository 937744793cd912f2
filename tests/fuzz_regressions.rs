//! Every committed fuzz input, run as an ordinary test through the very code of the fuzz targets
//! (`testkit::targets`, in `tests/kit/`, which `fuzz/` runs too):
//!
//! - `fuzz/regressions/<target>/*`: inputs that once found a bug; each must now pass.
//! - `fuzz/seeds/<target>/*`: the corpus CI's fuzzing starts from; each must pass as well.
//!
//! A missing directory is fine (no input of that kind yet), but the test insists on at least one
//! input per target overall, so that it can never pass by finding nothing.

use std::path::{Path, PathBuf};

use testkit::invariants::Verdict;
use testkit::targets;

const TARGETS: &[&str] = &["decode_job", "build_message"];

/// The files of `fuzz/<kind>/<target>/`, sorted; none if the directory does not exist.
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs one input through its target; the panic (if any) names the file.
fn run(target: &str, path: &Path) -> Vec<Verdict> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let result = std::panic::catch_unwind(|| match target {
        "decode_job" => targets::decode_job(&data).into_iter().collect(),
        "build_message" => targets::build_message(&data).into_iter().collect(),
        other => panic!("unknown fuzz target {other}"),
    });
    result.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!(
            "{target}: {} broke an invariant:\n{message}",
            path.display()
        )
    })
}

#[test]
fn every_regression_input_and_seed_passes_its_target() {
    for target in TARGETS {
        let files: Vec<PathBuf> = ["regressions", "seeds"]
            .iter()
            .flat_map(|kind| inputs(kind, target))
            .collect();
        assert!(
            !inputs("regressions", target).is_empty() || !inputs("seeds", target).is_empty(),
            "no committed input for the fuzz target {target} under fuzz/regressions or fuzz/seeds"
        );
        for path in &files {
            run(target, path);
        }
    }
}

#[test]
fn there_is_a_regression_input_per_target() {
    for target in TARGETS {
        assert!(
            !inputs("regressions", target).is_empty(),
            "fuzz/regressions/{target}/ is empty: commit the inputs that found bugs (or a seed \
             worth keeping) so that this test is not vacuous"
        );
    }
}

/// A few inputs whose outcome is known, so that a change in what they mean shows up here.
#[test]
fn known_inputs_end_as_expected() {
    let decode = |kind: &str, name: &str| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind)
            .join("decode_job")
            .join(name);
        run("decode_job", &path).swap_remove(0)
    };
    let reason = |verdict: Verdict| match verdict {
        Verdict::Invalid(reason) => reason,
        Verdict::Built(_) => panic!("built, expected invalid"),
    };
    assert!(reason(decode("seeds", "deep-json.json")).contains("recursion limit"));
    assert!(reason(decode("seeds", "nul-in-subject.json")).contains("subject contains"));
    assert!(
        reason(decode("seeds", "ten-thousand-recipients.json"))
            .contains("limits.max_recipients = 100")
    );
    assert!(reason(decode("seeds", "crlf-header-name.json")).contains("is not a header name"));
    assert!(
        reason(decode("regressions", "multipart-attachment.json")).contains("cannot be multipart")
    );
    for built in [
        "readme-example.json",
        "encoded-word-subject.json",
        "unicode-everywhere.json",
    ] {
        let kind = if built == "encoded-word-subject.json" {
            "regressions"
        } else {
            "seeds"
        };
        assert!(!decode(kind, built).is_invalid(), "{built} is built");
    }
    let ten_thousand = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds/build_message/ten-thousand-recipients");
    match run("build_message", &ten_thousand).swap_remove(0) {
        Verdict::Built(out) => assert_eq!(out.envelope.to().len(), 10_000),
        Verdict::Invalid(reason) => panic!("ten-thousand-recipients: {reason}"),
    }
}
