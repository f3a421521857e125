//! Keys shared by wasmgrid and Solana. (Sessions and batch jobs pay through the payment
//! channel: [`crate::party`].)

use solana_sdk::pubkey::Pubkey;
use solana_sdk::signature::Keypair;

/// A wire key as a Solana address (the same 32 bytes).
pub fn address(key: &proto::PublicKey) -> Pubkey {
    Pubkey::new_from_array(key.0)
}

/// An address (any 32 bytes: a program's, a derived one) as a Solana address.
pub fn address_of(a: &proto::Address) -> Pubkey {
    Pubkey::new_from_array(a.0)
}

/// A Solana address as a wire address.
pub fn wire_address(key: &Pubkey) -> proto::Address {
    proto::Address(key.to_bytes())
}

/// A Solana address as a wire key.
pub fn wire_key(key: &Pubkey) -> proto::PublicKey {
    proto::PublicKey(key.to_bytes())
}

/// A party's Solana signer: the same ed25519 key as its wasmgrid identity.
pub fn signer(key: &proto::Keypair) -> Keypair {
    Keypair::new_from_array(key.seed())
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelId;

    /// The wire's own derivation (what the scheduler checks vouchers with, without Solana's
    /// crates) gives the address the program and Solana's `find_program_address` give.
    #[test]
    fn the_wire_derives_a_channels_address_as_solana_does() {
        for id in [0, 1, 7, u64::MAX] {
            let keys: Vec<proto::Keypair> = (0..4).map(|_| proto::Keypair::generate()).collect();
            let (program, renter, provider, mint) =
                (keys[0].public(), keys[1].public(), keys[2].public(), keys[3].public());
            let c = ChannelId {
                program: address(&program),
                renter: address(&renter),
                provider: address(&provider),
                mint: address(&mint),
                id,
            };
            let wire = proto::voucher::ChannelRef { program: proto::Address(program.0), mint, id, generation: 1 };
            assert_eq!(wire.address(&renter, &provider), wire_address(&c.address()), "id {id}");
            assert_ne!(wire.address(&provider, &renter), wire_address(&c.address()), "the parties' order counts");
        }
    }
}
