#![doc = include_str!("../README.md")]

pub mod api;
pub mod cluster;
pub mod frame;
pub mod httpsig;
pub mod identity;
pub mod msg;
pub mod receipt;
pub mod ticket;
pub mod voucher;
pub mod worker;

pub use frame::{FrameDecoder, FrameError, PROTOCOL_VERSION};
pub use identity::{Address, KeyError, Keypair, PublicKey, Signature};
