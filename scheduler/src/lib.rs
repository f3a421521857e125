#![doc = include_str!("../README.md")]

pub mod matching;
pub mod server;
pub mod state;
pub mod store;

pub use server::{Listening, SchedulerConfig, start};
pub use state::{Config, JobPricing, State};
pub use store::{MemoryStore, RedbStore, Store, StoreError};
