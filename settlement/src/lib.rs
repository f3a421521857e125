#![doc = include_str!("../README.md")]

pub mod chain;
pub mod channel;
pub mod ledger;
pub mod party;
pub mod pay;
pub mod policy;
pub mod rpc;
pub mod token;

/// The Solana types callers need alongside this crate's.
pub mod solana {
    pub use solana_sdk::pubkey::Pubkey;
    pub use solana_sdk::signature::{Keypair, Signature, Signer};
}

pub use chain::{Chain, ChainError, LocalChain, Status};
pub use party::{Ids, PayError, Payee, Payer};
pub use pay::{address, address_of, signer, wire_address, wire_key};
pub use policy::Policy;

/// A transaction signature as Solana prints it (base58): its id on explorers and in RPC.
pub fn signature_text(s: &proto::Signature) -> String {
    solana_sdk::signature::Signature::from(s.0).to_string()
}
