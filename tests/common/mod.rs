#![allow(dead_code)]

pub mod broker;
pub mod proxy;
pub mod smtp;
pub mod worker;
