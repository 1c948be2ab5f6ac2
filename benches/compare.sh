#!/usr/bin/env bash
# Reproduces the Ferrodisk vs qemu-storage-daemon comparison (see benches/README.md).
#   benches/compare.sh            full matrix, writes docs/benchmarks.md (about half an hour)
#   benches/compare.sh --quick    smoke run (null backing, 2 workloads, 1 s each)
#   benches/compare.sh --help     all options
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release -p ferrodisk -p ferrodisk-loadgen
exec "$root/target/release/ferrodisk-loadgen" compare "$@"
