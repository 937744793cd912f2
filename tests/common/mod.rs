#![allow(dead_code)]

pub mod broker;
pub mod process;
pub mod proxy;
pub mod smtp;
pub mod worker;
