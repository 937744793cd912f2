//! Structure-aware: the bytes choose a hostile but well-formed job (tests/kit/src/hostile.rs),
//! which is decoded, built and checked. See tests/kit/src/targets.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    amqp_mailer_fuzz::targets::build_message(data);
});
