//! The test kit of amqp-mailer: what the integration tests (`tests/*.rs`), the examples (the soak
//! and the benchmark) and the fuzz targets (`fuzz/`) share, as one crate that they depend on.
//!
//! The pure parts build everywhere, the fuzz crate's sanitizer build included:
//! [`hostile`] (the hostile-job generator), [`invariants`] (what must hold for every job),
//! [`targets`] (the fuzz targets' bodies), [`metrics`] (the Prometheus text format) and [`soak`]
//! (the soak's verdict). The parts that open sockets, talk to the broker or start processes are
//! behind the default feature `io`: the scripted SMTP relay ([`smtp`]), the fault proxy
//! ([`proxy`]), the broker ([`broker`]), the three-node cluster of `.ci/rabbitmq-cluster` ([`cluster`]), the binary as a child process ([`process`]), the worker
//! in-process ([`worker`]), a throwaway certificate authority ([`pki`]) and an OAuth2 token
//! endpoint ([`oauth`]) and a real Postfix in its own directories ([`postfix`]).

pub mod hostile;
pub mod invariants;
pub mod metrics;
pub mod soak;
pub mod targets;

#[cfg(feature = "io")]
pub mod broker;
#[cfg(feature = "io")]
pub mod cluster;
#[cfg(feature = "io")]
pub mod oauth;
#[cfg(feature = "io")]
pub mod pki;
#[cfg(feature = "io")]
pub mod postfix;
#[cfg(feature = "io")]
pub mod process;
#[cfg(feature = "io")]
pub mod proxy;
#[cfg(feature = "io")]
pub mod smtp;
#[cfg(feature = "io")]
pub mod worker;
