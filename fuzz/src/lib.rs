//! The fuzz targets' bodies. The checks and the hostile-job generator live under `tests/common/`
//! and are included here by path, so that the ordinary tests (`tests/fuzz_regressions.rs`,
//! `tests/hardening.rs`) run exactly the same code on the committed inputs.

#[path = "../../tests/common/invariants.rs"]
pub mod invariants;

#[path = "../../tests/common/hostile.rs"]
pub mod hostile;

#[path = "../../tests/common/targets.rs"]
pub mod targets;
