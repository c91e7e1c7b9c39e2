#!/usr/bin/env bash
# Installs what a fresh machine needs to build and test segmentd, skipping what is present.
# Safe to run repeatedly. Needs root (or sudo) only when something is missing.
set -euo pipefail

# Debian packages: a C/C++ toolchain for the -sys crates (RocksDB and librdkafka are built
# from source), libclang-dev for RocksDB's bindgen, cmake, ccache so rebuilds of the C/C++
# dependencies come from cache, GNU time and bc for the benchmark script.
packages=(build-essential pkg-config libclang-dev cmake ccache time bc)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
