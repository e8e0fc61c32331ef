#!/usr/bin/env bash
# Runs meterd's whole test suite: formatting, lints, the build and every test.
# Meant for a fresh Debian machine with a Rust toolchain, run as root (CI) or as a developer.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n==> %s\n' "$*"
}

# System packages the tests need, beyond Rust. Empty today: the embedded store needs nothing.
# Later stores add theirs here (e.g. postgresql, clickhouse-server).
APT_PACKAGES=()

install_packages() {
    if [ "${#APT_PACKAGES[@]}" -eq 0 ]; then
        step "system packages: none needed"
        return
    fi
    local missing=()
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        step "system packages: already installed (${APT_PACKAGES[*]})"
        return
    fi
    step "installing system packages: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_packages

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build --locked"
cargo build --locked

step "cargo test --workspace --locked"
cargo test --workspace --locked

step "all checks passed"
