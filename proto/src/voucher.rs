//! Payment on the session wire: the channel a renter pays through and its vouchers. A voucher is
//! the renter's ed25519 signature over the message the payment-channel program checks before it
//! pays (`paychan-state`'s `voucher_message`: program, channel, generation, mint, cumulative
//! amount, receipt digest), so a voucher that verifies here is one the chain will pay, and no
//! other.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

/// One channel named in full, for a third party (the scheduler) to check a voucher on it
/// without the chain: the channel's address is derived here from the program, the two
/// parties, the mint and the id exactly as the program derives it, and the voucher's
/// signature is checked over the message the program checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRef {
    pub program: Address,
    pub mint: PublicKey,
    pub id: u64,
    /// The channel's generation the voucher was signed for.
    pub generation: u64,
}

impl ChannelRef {
    /// The channel account's address between `renter` and `provider` (the program's PDA).
    pub fn address(&self, renter: &PublicKey, provider: &PublicKey) -> Address {
        let id = self.id.to_le_bytes();
        let seeds: [&[u8]; 5] = [paychan_state::CHANNEL_SEED, &renter.0, &provider.0, &self.mint.0, &id];
        program_address(&seeds, &self.program)
    }

    /// The bytes a voucher for `cumulative`, answering the receipt with `receipt_digest`, signs
    /// on this channel between `renter` and `provider` (what the program checks).
    pub fn message(
        &self,
        renter: &PublicKey,
        provider: &PublicKey,
        cumulative: u64,
        receipt_digest: &[u8; 32],
    ) -> [u8; paychan_state::VOUCHER_LEN] {
        self.message_at(&self.address(renter, provider), cumulative, receipt_digest)
    }

    /// [`ChannelRef::message`] for a channel whose address is already derived.
    fn message_at(
        &self,
        address: &Address,
        cumulative: u64,
        receipt_digest: &[u8; 32],
    ) -> [u8; paychan_state::VOUCHER_LEN] {
        paychan_state::Channel::voucher_message(
            &self.program.0,
            &address.0,
            self.generation,
            &self.mint.0,
            cumulative,
            receipt_digest,
        )
    }

    /// Whether `renter` signed `v` for this channel between it and `provider`; the channel's
    /// address when it did.
    pub fn verify(&self, renter: &PublicKey, provider: &PublicKey, v: &Voucher) -> Option<Address> {
        let address = self.address(renter, provider);
        let message = self.message_at(&address, v.cumulative, &v.receipt_digest);
        renter.verify(&message, &v.signature).then_some(address)
    }
}

/// Solana's program-derived address: the first bump seed, from 255 down, whose hash is off the
/// ed25519 curve (so that no private key exists for it).
fn program_address(seeds: &[&[u8]], program: &Address) -> Address {
    for bump in (0..=u8::MAX).rev() {
        let mut h = Sha256::new();
        for s in seeds {
            h.update(s);
        }
        h.update([bump]);
        h.update(program.0);
        h.update(b"ProgramDerivedAddress");
        let hash: [u8; 32] = h.finalize().into();
        if ed25519_dalek::VerifyingKey::from_bytes(&hash).is_err() {
            return Address(hash);
        }
    }
    // Each bump is off the curve with odds of one half: 256 misses do not happen.
    unreachable!("no bump seed gives an address off the curve")
}
