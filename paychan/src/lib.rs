//! wasmgrid's payment channel on Solana. A renter opens one channel per provider, mint and id,
//! and deposits into a vault the channel's address owns; as it is served it signs vouchers
//! (off chain) for the cumulative amount it owes; the provider claims the newest voucher
//! whenever its policy says, paying a transaction fee per claim rather than per inference. The
//! renter can close at any time: the provider then has the dispute window to claim, and the
//! rest goes back to the renter with the accounts' rent. See `state` for the exact layouts.
//!
//! On the BPF target this crate is the program (`processor`); on the host it is the layouts and
//! encodings the callers share, re-exported from `paychan-state` (and an ordinary std library,
//! so that it links as a cdylib).
#![cfg_attr(target_arch = "bpf", no_std)]

// The program compiles paychan-state's very source as its own module, so that the error codes
// convert into pinocchio's ProgramError (a foreign type, which the orphan rule keeps the other
// crate from naming); the host uses the crate.
#[cfg(target_arch = "bpf")]
#[path = "../../paychan-state/src/lib.rs"]
#[allow(unused_attributes, dead_code)]
mod state;
#[cfg(not(target_arch = "bpf"))]
pub use paychan_state as state;

#[cfg(target_arch = "bpf")]
mod processor;
