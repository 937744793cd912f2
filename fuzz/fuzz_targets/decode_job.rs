//! Arbitrary bytes as a job body: decoded with the default limits and with small ones; a valid
//! job is built and the message checked. See tests/kit/src/targets.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    amqp_mailer_fuzz::targets::decode_job(data);
});
