#!/usr/bin/env bash
# Installs what building and running wasmgrid needs on a Debian machine that has only the Rust
# toolchain: the wasm32-wasip1 target, a Vulkan driver (Mesa's lavapipe, software) when the
# machine has none, OpenSSL's headers, and the payment-channel program (built from source with
# the toolchain it pins). Safe to run again.
set -euo pipefail

rustup target add wasm32-wasip1 >/dev/null

# A driver manifest in any of the loader's folders (one empty folder is not a missing driver),
# and the loader itself. grep reads all of ldconfig's output: with pipefail, `grep -q` quitting
# early could fail the pipe.
have_vulkan_driver() {
    local d found=""
    for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
        if compgen -G "$d/*.json" >/dev/null; then found=1; fi
    done
    [ -n "$found" ] && ldconfig -p 2>/dev/null | grep 'libvulkan\.so\.1' >/dev/null
}

if ! have_vulkan_driver; then
    echo "no Vulkan driver found: installing Mesa's (lavapipe runs GPU kernels on the CPU)" >&2
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi

# The in-process chain (LiteSVM) checks signatures with its precompiles, which link OpenSSL.
if ! pkg-config --exists openssl 2>/dev/null; then
    echo "installing OpenSSL's headers and pkg-config (for the payment-channel tests)" >&2
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq libssl-dev pkg-config >/dev/null
fi

# The payment-channel program, built from source for Solana's BPF target (installing its pinned
# nightly and sbpf-linker when missing): the settlement crate embeds it for the in-process chain.
"$(dirname "${BASH_SOURCE[0]}")/build-paychan.sh" >/dev/null

# The Vulkan loader warns on every start without a runtime directory.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/wasmgrid-runtime-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
