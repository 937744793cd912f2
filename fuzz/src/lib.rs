//! The fuzz targets' bodies. The checks and the hostile-job generator live in the test kit
//! (`tests/kit/`, crate `testkit`, built here without its `io` feature), so that the ordinary tests
//! (`tests/fuzz_regressions.rs`, `tests/hardening.rs`) run exactly the same code on the committed
//! inputs.

pub use testkit::{hostile, invariants, targets};
