#!/usr/bin/env bash
# The demo: builds wasmgrid and the sample kernels, then runs them in the sandbox on this
# machine's GPU (or lavapipe, on the CPU, where there is none) and prints results and usage.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

cargo build --release --locked -p cli
cargo build --release --locked --target wasm32-wasip1 -p matmul -p mlp -p train
bin=target/release/wasmgrid
wasm=target/wasm32-wasip1/release

echo "== GPUs"
$bin gpus
echo
echo "== batch job: tiled matmul, checked against a CPU reference inside the kernel"
$bin run $wasm/matmul.wasm
echo
echo "== batch job: logistic regression trained on the GPU (the loss falls)"
$bin run $wasm/train.wasm
echo
echo "== inference service: MLP, weights uploaded once in init, one request per line"
printf '%s\n' \
    "1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0" \
    "0.5 -0.5 0.25 1 0 0 0 0 0 0 0 0 0 0 0 2" \
    "$(seq -s, 1 16)" |
    $bin infer $wasm/mlp.wasm
