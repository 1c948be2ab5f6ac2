# Ferrodisk test guest: helpers for test scripts (POSIX sh; /bin/sh is dash).
# Installed as /lib/ferrodisk/helpers.sh and sourced by /init before the test
# script runs. The line format is documented in guest-images/README.md:
#
#   FERRODISK-BEGIN
#   FERRODISK-STEP name=<NAME> rc=<exit code>
#   FERRODISK-KV key=<KEY> value=<VALUE>
#   FERRODISK-END steps=<n> failed=<m>

FERRODISK_STEPS=0
FERRODISK_FAILED=0

# Names and keys are single words: anything outside [A-Za-z0-9._:/+-] becomes _.
_ferrodisk_word() {
    # busybox tr: -c complements the set; the trailing newline of printf is
    # not there, so nothing is appended.
    printf '%s' "$1" | tr -c 'A-Za-z0-9._:/+-' '_'
}

# step NAME CMD [ARG...]
# Runs CMD (a program or a shell function; stdin is /dev/null), lets its output
# go to the console, then prints one marker line with CMD's exit code. Returns
# that exit code. For pipelines or redirections use: step NAME sh -c '...'
step() {
    local name rc
    name=$(_ferrodisk_word "${1:-unnamed}")
    [ $# -gt 0 ] && shift
    if [ $# -eq 0 ]; then
        echo "step $name: no command given" >&2
        rc=127
    else
        # Inside an if so that a script running with set -e still gets
        # its marker line before it stops.
        if "$@" </dev/null; then rc=0; else rc=$?; fi
    fi
    FERRODISK_STEPS=$((FERRODISK_STEPS + 1))
    [ "$rc" -eq 0 ] || FERRODISK_FAILED=$((FERRODISK_FAILED + 1))
    # The leading newline ends a last output line that lacked one, so the
    # marker always starts a line (an empty line may precede it).
    printf '\nFERRODISK-STEP name=%s rc=%d\n' "$name" "$rc"
    return "$rc"
}

# kv KEY VALUE...
# Prints one line for the host to parse. VALUE is the rest of the arguments
# joined by spaces; newlines and carriage returns in it become spaces.
kv() {
    local key value
    key=$(_ferrodisk_word "${1:-unnamed}")
    [ $# -gt 0 ] && shift
    value=$(printf '%s' "$*" | tr '\r\n' '  ')
    printf 'FERRODISK-KV key=%s value=%s\n' "$key" "$value"
}

# wait_dev PATH [SECONDS=10]: wait until PATH is a block device.
wait_dev() {
    local i=0 max=$(( ${2:-10} * 10 ))
    while [ ! -b "$1" ]; do
        if [ "$i" -ge "$max" ]; then
            echo "wait_dev: $1 did not appear within ${2:-10}s" >&2
            return 1
        fi
        sleep 0.1
        i=$((i + 1))
    done
}

# log MESSAGE...: a plain line on the console (not parsed by the host).
log() {
    printf '# %s\n' "$*"
}

# The leading newline ends whatever the firmware left on the line (SeaBIOS
# prints escape sequences without one).
ferrodisk_begin() {
    printf '\nFERRODISK-BEGIN\n'
}

# ferrodisk_end [SCRIPT_EXIT_STATUS]
# A script that exits with a non-zero status (explicit exit, set -e, syntax
# error) is recorded as one more failed step named script-exit.
ferrodisk_end() {
    local st=${1:-0}
    if [ "$st" -ne 0 ]; then
        FERRODISK_STEPS=$((FERRODISK_STEPS + 1))
        FERRODISK_FAILED=$((FERRODISK_FAILED + 1))
        printf '\nFERRODISK-STEP name=script-exit rc=%d\n' "$st"
    fi
    printf 'FERRODISK-END steps=%d failed=%d\n' "$FERRODISK_STEPS" "$FERRODISK_FAILED"
}
