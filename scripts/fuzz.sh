#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ on the stable toolchain (see docs/fuzzing.md).
#
#   scripts/fuzz.sh [--time SECS] [TARGET...]   replay, then fuzz each target SECS seconds (60)
#   scripts/fuzz.sh --replay [TARGET...]        replay the corpus and regressions only
#   scripts/fuzz.sh --cmin TARGET DIR...        merge DIRs into fuzz/corpus/TARGET, minimized
#
# Targets run one at a time, in one process each. New inputs go to a scratch directory, not into
# the committed corpus. A crash, a hang (10 s per input) or an OOM (2 GiB) fails the run and
# leaves the input in fuzz/artifacts/TARGET/ (add it to fuzz/regressions/TARGET/ once fixed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_FUZZ_VERSION=0.13.2
ALL=(desc_chain repl_wire api_bodies)
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}

mode=fuzz
secs=60
case ${1:-} in
--time) secs=$2; shift 2 ;;
--replay) mode=replay; shift ;;
--cmin) mode=cmin; shift ;;
esac

# libfuzzer-sys compiles libFuzzer (C++).
if ! command -v c++ >/dev/null; then
    echo "fuzz: installing g++"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends g++ >/dev/null
fi
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

# libFuzzer's coverage instrumentation without a sanitizer needs no nightly flag.
build=(cargo fuzz build --sanitizer none -O)
bin=fuzz/target/x86_64-unknown-linux-gnu/release
opts=(-max_len=4096 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048)

if [[ $mode == cmin ]]; then
    t=$1; shift
    "${build[@]}" "$t"
    merged=$(mktemp -d)
    "$bin/$t" -merge=1 "${opts[@]}" "$merged" "fuzz/corpus/$t" "$@"
    rm -rf "fuzz/corpus/$t"
    mv "$merged" "fuzz/corpus/$t"
    chmod 755 "fuzz/corpus/$t"
    echo "fuzz: fuzz/corpus/$t has $(ls "fuzz/corpus/$t" | wc -l) inputs"
    exit 0
fi

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${ALL[@]}")
"${build[@]}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    inputs=("fuzz/corpus/$t")
    [[ -d fuzz/regressions/$t ]] && inputs+=("fuzz/regressions/$t")
    echo "fuzz: $t: replaying ${inputs[*]}"
    # A directory argument without -runs fuzzes; list the files to run each once.
    find "${inputs[@]}" -type f -print0 | xargs -0 -r "$bin/$t" "${opts[@]}" 2>"$scratch/$t.replay" ||
        { tail -40 "$scratch/$t.replay"; echo "fuzz: $t: a corpus or regression input fails"; exit 1; }
    [[ $mode == replay ]] && continue
    echo "fuzz: $t: fuzzing for ${secs}s"
    mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
    "$bin/$t" "${opts[@]}" -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "$scratch/$t" "fuzz/corpus/$t" 2>"$scratch/$t.log" ||
        { tail -60 "$scratch/$t.log"; echo "fuzz: $t: FAILED (input in fuzz/artifacts/$t/)"; exit 1; }
    grep -E 'DONE|^Done|stat::(number_of_executed_units|peak_rss)' "$scratch/$t.log" || true
done
echo "fuzz: ${targets[*]}: no crash"
