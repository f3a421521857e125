//! Payment on the session wire: the channel a renter pays through and its vouchers. A voucher is
//! the renter's ed25519 signature over the message the payment-channel program checks before it
//! pays (`paychan-state`'s `voucher_message`: program, channel, generation, mint, cumulative
//! amount, receipt digest), so a voucher that verifies here is one the chain will pay, and no
//! other.

use serde::{Deserialize, Serialize};

use crate::identity::{Address, PublicKey, Signature};

/// The channel a renter names when it opens a paid session. Its address is derived from the
/// program, the two parties, the mint and the id; the provider reads the channel itself from
/// the chain and trusts nothing here but the address's inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelTerms {
    /// The payment-channel program (the provider refuses any but the one it knows).
    pub program: Address,
    pub mint: PublicKey,
    pub id: u64,
    /// The newest voucher the renter signed on this channel, so that a provider that lost it
    /// (a crash before it saved) counts from the same amount as the renter.
    pub newest: Option<Voucher>,
}

/// The renter's promise to pay `cumulative` in all on the channel (every session and job on it
/// together), answering the provider's receipt whose digest it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    pub cumulative: u64,
    pub receipt_digest: [u8; 32],
    pub signature: Signature,
}

/// A claim the provider made on the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claimed {
    /// The claim transaction's signature (its id on the chain).
    pub transaction: Signature,
    /// What the channel has paid the provider in all, this claim included.
    pub cumulative: u64,
}
