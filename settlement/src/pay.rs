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
