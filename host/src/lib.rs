#![doc = include_str!("../README.md")]

#[doc(hidden)]
pub mod bench;
pub mod checkpoint;
pub mod collective;
mod error;
mod files;
mod gpu;
mod limits;
mod meter;
mod sandbox;
pub mod worker;

pub use files::bundle_dir;
pub use gpu::{AdapterChoice, AdapterSummary, default_adapters, list_adapters, pick_default_adapters, select_adapters};
pub use limits::{LimitKind, Limits};
pub use meter::{GpuTimeSource, Usage};
pub use sandbox::{
    Failure, Host, HostConfig, HostError, Inference, JobContext, JobKind, JobModule, JobReport, LoadError, LogWatch,
    Service, StartError, StartFailed,
};
