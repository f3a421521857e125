#!/usr/bin/env bash
# Installs what building and running wasmgrid needs on a Debian machine that has only the Rust
# toolchain: the wasm32-wasip1 target, and a Vulkan driver (Mesa's lavapipe, software) when the
# machine has none. Safe to run again.
set -euo pipefail

rustup target add wasm32-wasip1 >/dev/null

have_vulkan_driver() {
    ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json /usr/local/share/vulkan/icd.d/*.json >/dev/null 2>&1 &&
        ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'
}

if ! have_vulkan_driver; then
    echo "no Vulkan driver found: installing Mesa's (lavapipe runs GPU kernels on the CPU)" >&2
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi

# The payment-channel program's tests run LiteSVM, whose signature precompiles link OpenSSL.
if ! pkg-config --exists openssl 2>/dev/null; then
    echo "installing OpenSSL's headers and pkg-config (for the payment-channel tests)" >&2
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq libssl-dev pkg-config >/dev/null
fi

# The Vulkan loader warns on every start without a runtime directory.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/wasmgrid-runtime-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
