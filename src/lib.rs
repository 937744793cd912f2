//! amqp-mailer: consume email jobs from RabbitMQ and deliver them over SMTP, losing none.
//!
//! The binary is thin; everything lives here so that tests can run the worker in-process with
//! their own configuration and shutdown token (see [`app::run`]).

pub mod amqp;
pub mod app;
pub mod config;
pub mod dkim;
pub mod http;
pub mod job;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod shutdown;
pub mod smtp;
pub mod status;
pub mod systemd;
pub mod telemetry;
pub mod tools;
