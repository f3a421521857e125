#!/usr/bin/env bash
# Fuzzes the host ABI, the wire decoders, the worker loop and the payment-channel program's
# decoders for a bounded time (default 60 s for the ABI, a quarter of it for each of the others)
# with cargo-fuzz on the nightly toolchain.
# A crash fails the run and leaves its input under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cd fuzz
# No sanitizer: wasmtime handles guest faults with signal handlers that AddressSanitizer would
# take for crashes. Debug build: the point is the host's checks, not speed, and it builds faster.
mkdir -p corpus/abi corpus/frames corpus/worker corpus/paychan
cargo +nightly fuzz run abi --dev --sanitizer none corpus/abi seeds -- \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -max_len=4096
# The wire decoders are fast: a quarter of the time finds a lot there.
cargo +nightly fuzz run frames --dev --sanitizer none corpus/frames -- \
    -max_total_time="$(( (seconds + 3) / 4 ))" -timeout=10 -rss_limit_mb=2048 -max_len=65536
# A worker's reader and loop, fed what a daemon would write.
cargo +nightly fuzz run worker --dev --sanitizer none corpus/worker -- \
    -max_total_time="$(( (seconds + 3) / 4 ))" -timeout=20 -rss_limit_mb=4096 -max_len=65536
# The payment-channel program's decoders, natively (its own source).
cargo +nightly fuzz run paychan --dev --sanitizer none corpus/paychan -- \
    -max_total_time="$(( (seconds + 3) / 4 ))" -timeout=10 -rss_limit_mb=2048 -max_len=512
