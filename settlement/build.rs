//! Finds the payment-channel program that `scripts/build-paychan.sh` builds, for `channel.rs`
//! to embed (the in-process chain loads it, `wasmgrid chain deploy` deploys it).
//! `PAYCHAN_SO=/path/to/libpaychan.so` embeds another build instead.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=PAYCHAN_SO");
    let so = match std::env::var_os("PAYCHAN_SO") {
        Some(p) => PathBuf::from(p),
        None => {
            let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            dir.join("../paychan/target/bpfel-unknown-none/release/libpaychan.so")
        }
    };
    println!("cargo::rerun-if-changed={}", so.display());
    match std::fs::canonicalize(&so) {
        Ok(path) if path.is_file() => println!("cargo::rustc-env=WASMGRID_PAYCHAN_SO={}", path.display()),
        _ => {
            println!(
                "cargo::error=the payment-channel program is not built ({} is missing): run scripts/build-paychan.sh (the README's commands do)",
                so.display()
            );
        }
    }
}
