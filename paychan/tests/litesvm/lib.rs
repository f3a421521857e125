//! Empty: this package exists for its test, `../litesvm.rs` (see Cargo.toml).
