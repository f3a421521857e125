//! Payment on the session wire: the escrow a renter opened, its vouchers, and the provider's
//! settlements and refunds. Each carries an ed25519 signature over a Solana transaction message
//! that both sides build the same way from these fields (the `settlement` crate builds it), so
//! nothing here needs a Solana type and a signature checks only against the exact transfer it
//! was made for.

use serde::{Deserialize, Serialize};

use crate::identity::{PublicKey, Signature};

/// The escrow a renter opened for one session: a token account of `mint` owned by a 2-of-2
/// SPL multisig of renter and provider, and a durable nonce account whose authority is the
/// provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowTerms {
    pub mint: PublicKey,
    pub decimals: u8,
    pub multisig: PublicKey,
    pub account: PublicKey,
    pub nonce_account: PublicKey,
    /// Tokens deposited: the most the session can pay.
    pub budget: u64,
}

/// The renter's signature on a transfer, out of escrow to the provider, of the cumulative
/// amount of receipt `sequence` less what was already paid, on durable nonce `nonce`, with the
/// receipt's digest in a Memo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    /// The receipt it pays for.
    pub sequence: u64,
    /// That receipt's cumulative amount due.
    pub cumulative: u64,
    /// The nonce value the transaction uses.
    pub nonce: [u8; 32],
    pub signature: Signature,
}

/// The provider's signature on a refund of everything left in escrow to the renter, on durable
/// nonce `nonce`. The renter submits it when the session ends or the provider vanishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub nonce: [u8; 32],
    pub amount: u64,
    pub signature: Signature,
}

/// A voucher the provider co-signed and the chain confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// The confirmed transaction's signature (its id on the chain).
    pub transaction: Signature,
    /// The receipt it paid up to.
    pub sequence: u64,
    /// Paid out of escrow so far, this settlement included.
    pub paid: u64,
    /// A refund of the rest on the advanced nonce.
    pub refund: Refund,
}
