#!/usr/bin/env bash
# Builds the payment-channel program (paychan/) for Solana's BPF target from source, installing
# what that needs when it is missing: the nightly toolchain pinned in paychan/rust-toolchain.toml
# (its LLVM must be the one sbpf-linker loads) with rust-src, and sbpf-linker itself. Prints the
# program's path (paychan/target/bpfel-unknown-none/release/libpaychan.so).
set -euo pipefail
cd "$(dirname "$0")/../paychan"

toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1 ||
    ! [ -d "$(rustup run "$toolchain" rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
    echo "installing the $toolchain toolchain (with rust-src) for the on-chain program" >&2
    rustup toolchain install "$toolchain" --profile minimal -c rust-src >/dev/null
fi
if ! cargo +stable install --list 2>/dev/null | grep -q '^sbpf-linker v0\.2\.6:'; then
    echo "installing sbpf-linker 0.2.6 (a few minutes, once)" >&2
    cargo +stable install sbpf-linker --version 0.2.6 --locked >&2
fi
export PATH="$HOME/.cargo/bin:$PATH"
# The program always goes to paychan/target (whatever target dir the rest of the build shares):
# that is where its tests and the chain look for it. It builds in about a minute from nothing.
export CARGO_TARGET_DIR="$PWD/target"
# The linker prints a harmless line for a linker-script file it tries to dlopen; keep the rest.
cargo build -Z build-std=core,alloc --release --target bpfel-unknown-none 2> >(grep -v 'unable to open LLVM shared lib' >&2)
echo "$PWD/target/bpfel-unknown-none/release/libpaychan.so"
