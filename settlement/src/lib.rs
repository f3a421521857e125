#![doc = include_str!("../README.md")]

pub mod chain;
pub mod pay;
pub mod policy;
pub mod token;

pub use chain::{Chain, ChainError, LocalChain, Status};
pub use pay::{PayError, Payee, Payer, Terms, address, open_escrow, signer, verify_escrow, wire_key};
pub use policy::Policy;
