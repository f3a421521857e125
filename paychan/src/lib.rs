//! wasmgrid's payment channel on Solana. A renter opens one channel per provider, mint and id,
//! and deposits into a vault the channel's address owns; as it is served it signs vouchers
//! (off chain) for the cumulative amount it owes; the provider claims the newest voucher
//! whenever its policy says, paying a transaction fee per claim rather than per inference. The
//! renter can close at any time: the provider then has the dispute window to claim, and the
//! rest goes back to the renter with the accounts' rent. See `state` for the exact layouts.
//!
//! On the BPF target this crate is the program (`processor`); on the host it is the layouts and
//! encodings the callers share (and an ordinary std library, so that it links as a cdylib).
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod state;

#[cfg(target_arch = "bpf")]
mod processor;
