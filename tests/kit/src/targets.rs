//! The bodies of the two fuzz targets, shared by `fuzz/` and `tests/fuzz_regressions.rs`, which
//! replays the committed inputs through them. Each panics with the broken invariant and the job
//! that broke it.

use crate::hostile::HostileJob;
use crate::invariants::{self, Verdict};

/// `decode_job`: the bytes are a job body, checked with the default limits and with small ones.
pub fn decode_job(data: &[u8]) -> [Verdict; 2] {
    let defaults = invariants::defaults();
    [
        amqp_mailer::job::Limits::default(),
        invariants::small_limits(),
    ]
    .map(|limits| {
        invariants::check_body(data, &limits, &defaults)
            .unwrap_or_else(|broken| panic!("{broken}\nlimits: {limits:?}\njob: {}", preview(data)))
    })
}

/// `build_message`: the bytes choose a hostile job, rendered as JSON and checked with the limits
/// it chose. `None` when the bytes are too few to choose a job.
pub fn build_message(data: &[u8]) -> Option<Verdict> {
    let job = HostileJob::from_bytes(data)?;
    let body = job.render();
    let limits = job.limits.limits();
    Some(
        invariants::check_body(&body, &limits, &invariants::defaults()).unwrap_or_else(|broken| {
            panic!("{broken}\nlimits: {limits:?}\njob: {}", preview(&body))
        }),
    )
}

/// The job for a panic message: the first 2000 bytes, escaped.
pub fn preview(data: &[u8]) -> String {
    let shown = &data[..data.len().min(2000)];
    let text = String::from_utf8_lossy(shown).escape_debug().to_string();
    if shown.len() < data.len() {
        format!("{text}… ({} bytes)", data.len())
    } else {
        text
    }
}
