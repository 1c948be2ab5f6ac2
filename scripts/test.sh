#!/usr/bin/env bash
# Runs every test: unit and property tests, libblkio frontend tests against the daemon,
# and the VM tests with real QEMU guests. Installs what it needs first.
#
#   scripts/test.sh            everything
#   scripts/test.sh --no-vm    everything but the QEMU guests
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
guest-images/build.sh

echo "test: lint"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace -q

echo "test: build"
cargo build --workspace --all-targets
export FERRODISK_BIN="$PWD/target/debug/ferrodisk"

if [[ ${1:-} == --no-vm ]]; then
    cargo test -p ferrodisk
else
    cargo test --workspace
fi
