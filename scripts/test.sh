#!/usr/bin/env bash
# Every check CI runs: formatting, lints, all tests (GPU tests on lavapipe where there is no
# GPU), and a short fuzzing run of the host ABI. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"

echo "== fmt" >&2
cargo fmt --all --check
echo "== clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests" >&2
cargo test --workspace --locked
echo "== fuzz (${FUZZ_SECONDS}s)" >&2
scripts/fuzz.sh "$FUZZ_SECONDS"
echo "all checks passed" >&2
