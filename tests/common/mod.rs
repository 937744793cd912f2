#![allow(dead_code)]

pub mod broker;
pub mod metrics;
pub mod process;
pub mod proxy;
pub mod smtp;
pub mod worker;
