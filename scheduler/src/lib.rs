#![doc = include_str!("../README.md")]

mod auth;
pub mod gang;
pub mod matching;
pub mod ratelimit;
pub mod server;
pub mod state;
pub mod store;

pub use ratelimit::RenterLimits;
pub use server::{Listening, SchedulerConfig, StartError, start};
pub use state::{Config, State};
pub use store::{KeptCheckpoint, MemoryStore, RedbStore, Store, StoreError};
