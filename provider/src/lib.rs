#![doc = include_str!("../README.md")]

pub mod blobs;
pub mod daemon;
mod flow;
pub mod memory;
mod mesh;
pub mod payment;
pub mod pool;
mod session;

pub use daemon::{DaemonConfig, DaemonError, run_forever};
pub use pool::{Pool, WorkerCommand};
