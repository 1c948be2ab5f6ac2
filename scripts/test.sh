#!/usr/bin/env bash
# Runs every test: unit and property tests, libblkio frontend tests against the daemon,
# the VM tests with real QEMU guests, and a short run of each fuzz target (docs/fuzzing.md).
# Installs what it needs first.
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

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if [[ ${1:-} == --no-vm ]]; then
    scope=(-p ferrodisk)
else
    scope=(--workspace)
fi
# No doc-tests: there are none, and their empty summary would close the run.
set +e
cargo test "${scope[@]}" --no-fail-fast --lib --bins --tests 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "\nall test binaries: %d passed, %d failed\n", p, f }' "$log"

# Replays every committed fuzz input, then fuzzes each target briefly; a crash fails the run.
echo "test: fuzz (${FUZZ_SECS:-20} s per target)"
scripts/fuzz.sh --time "${FUZZ_SECS:-20}" || rc=1
exit "$rc"
