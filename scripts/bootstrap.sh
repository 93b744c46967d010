#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine, idempotently:
# the Debian Rust toolchain that ships a prebuilt `core` for bpfel-unknown-none (rustup
# cannot provide rust-src here), LLVM 22 for bpf-linker, and the tools the tests and demo use.
set -euo pipefail

need_pkgs=(
  rustc-web cargo-web libstd-rust-web-dev-bpf
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  bpftool bpftrace wrk prometheus prometheus-node-exporter
  iproute2 procps curl util-linux
)

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "bootstrap: Debian packages present"
fi

# bpf-linker 0.13.0 is the last release that builds against LLVM 22 with rustc 1.95/1.96.
want_linker="bpf-linker 0.13.0"
if command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version 2>/dev/null | grep -q "0.13.0"; then
  echo "bootstrap: $want_linker present"
else
  echo "bootstrap: installing $want_linker (takes a few minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 \
    --no-default-features --features llvm-22
fi

# cargo-fuzz runs the fuzz targets (fuzz/) in `cargo xtask test`.
if command -v cargo-fuzz >/dev/null 2>&1 && cargo fuzz --version 2>/dev/null | grep -q "0.13.2"; then
  echo "bootstrap: cargo-fuzz 0.13.2 present"
else
  echo "bootstrap: installing cargo-fuzz 0.13.2"
  cargo install --locked cargo-fuzz --version 0.13.2
fi

test -x /usr/bin/rustc || { echo "bootstrap: /usr/bin/rustc missing after install" >&2; exit 1; }
echo "bootstrap: done ($(/usr/bin/rustc --version))"
