#!/usr/bin/env bash
# Cost of replication: unreplicated (write-back and write-through) vs 2 replicas on loopback.
# See benches/README.md ("Replication overhead").
#   benches/replication.sh            3 rounds x 5 s over a 256 MiB span; rewrites the replication
#                                     section of docs/benchmarks.md and benches/results/replication.jsonl
#   benches/replication.sh --quick    smoke run (1 round x 1 s, 64 MiB span); prints the section,
#                                     writes nothing in the repository
#   benches/replication.sh --help
set -euo pipefail

usage() {
    cat <<'EOF'
usage: benches/replication.sh [--quick] [--rounds N] [--duration SECS] [--ramp SECS]
                              [--settle SECS] [--span SIZE] [--out FILE|-] [--results FILE|-]

Measures 4k randwrite at QD32 and QD1 (1 queue) against three backends, alternately,
for each round:
  A  ferrodisk serve, unreplicated, write-back cache (default)
  B  ferrodisk serve, unreplicated, writeback=off,direct=on (write-through, O_DIRECT + RWF_DSYNC)
  C  ferrodisk serve with 2 replicas (ferrodisk replica) on 127.0.0.1
  D  as C, with adaptive polling off (poll-us=0)
  T  as C, with the links over TLS 1.3 (certificates made with openssl) instead of a
     pre-shared key
Defaults: 3 rounds, 5 s measured after 1 s of warm-up, 1 s idle before each run
(--settle), span 256M of a 1G image.
--quick: 1 round, 1 s, 0.5 s warm-up, no settle, span 64M; --out and --results default to '-' (stdout
only / not kept), so a smoke run never replaces the real report.
--out FILE     markdown file whose replication section (between <!-- replication:begin -->
               and <!-- replication:end -->) is replaced [docs/benchmarks.md]; '-' = stdout only
--results FILE raw JSON lines [benches/results/replication.jsonl]; '-' = not kept
EOF
}

die() {
    echo "replication.sh: error: $*" >&2
    exit 1
}
note() { echo "replication.sh: $*" >&2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

quick=0 rounds="" duration="" ramp="" settle="" span="" out="" results=""
while (($#)); do
    case "$1" in
    --quick) quick=1 ;;
    --rounds) rounds="${2:?--rounds needs a value}"; shift ;;
    --duration) duration="${2:?--duration needs a value}"; shift ;;
    --ramp) ramp="${2:?--ramp needs a value}"; shift ;;
    --settle) settle="${2:?--settle needs a value}"; shift ;;
    --span) span="${2:?--span needs a value}"; shift ;;
    --out) out="${2:?--out needs a value}"; shift ;;
    --results) results="${2:?--results needs a value}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
if ((quick)); then
    : "${rounds:=1}" "${duration:=1}" "${ramp:=0.5}" "${settle:=0}" "${span:=64M}" "${out:=-}" "${results:=-}"
else
    : "${rounds:=3}" "${duration:=5}" "${ramp:=1}" "${settle:=1}" "${span:=256M}"
    : "${out:=docs/benchmarks.md}" "${results:=benches/results/replication.jsonl}"
fi
size=1G
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, not '$rounds'"
[[ $duration =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--duration must be a number of seconds"
[[ $ramp =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--ramp must be a number of seconds"
[[ $settle =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--settle must be a number of seconds"
to_bytes() {
    local n=${1%[KkMmGg]} u=${1: -1}
    [[ $n =~ ^[0-9]+$ ]] || return 1
    case $u in
    [Kk]) echo $((n << 10)) ;; [Mm]) echo $((n << 20)) ;; [Gg]) echo $((n << 30)) ;;
    *) echo "$1" ;;
    esac
}
span_bytes=$(to_bytes "$span") || die "--span must be a size like 256M, not '$span'"
size_bytes=$(to_bytes "$size")
((span_bytes >= 1 << 20 && span_bytes <= size_bytes)) || die "--span must be between 1M and $size"

# ---- prerequisites --------------------------------------------------------------------------
for c in cargo git jq curl dd awk sort openssl; do
    command -v "$c" >/dev/null || die "'$c' is not in PATH (needed by this script)"
done
if [[ $out != - ]]; then
    [[ -f $out ]] || die "$out does not exist (the replication section is added to an existing file)"
    begins=$(grep -c '^<!-- replication:begin -->$' "$out" || true)
    ends=$(grep -c '^<!-- replication:end -->$' "$out" || true)
    if ! { ((begins == 0 && ends == 0)) || ((begins == 1 && ends == 1)); }; then
        die "$out has $begins begin and $ends end replication marker(s); expected one of each or none"
    fi
fi
if [[ $results != - ]]; then
    mkdir -p "$(dirname "$results")" || die "cannot create the directory of $results"
fi

# ---- process bookkeeping and cleanup --------------------------------------------------------
# Children die with this script even if it is SIGKILLed (where setpriv can arrange it).
launch=()
if command -v setpriv >/dev/null && setpriv --pdeathsig KILL -- true 2>/dev/null; then
    launch=(setpriv --pdeathsig KILL --)
fi

pids=()
# alive PID: the process exists and is not a zombie.
alive() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [[ ${s:0:1} != Z ]]
}

base=/var/tmp
if [[ $(findmnt -no FSTYPE -T "$base" 2>/dev/null || true) == tmpfs || ! -w $base ]]; then
    base="$root/target"
fi
work=$(mktemp -d "$base/ferrodisk-repl-bench.XXXXXX") || die "cannot create a temp dir in $base"
failed_logs=1
cleanup() {
    local rc=$? p i
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for ((i = 0; i < 100; i++)); do alive "$p" || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if ((rc != 0 && failed_logs)); then
        for f in "$work"/*.log; do
            [[ -s $f ]] || continue
            echo "---- last lines of $(basename "$f") ----" >&2
            tail -n 15 "$f" >&2
        done
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'note "interrupted"; exit 130' INT
trap 'note "terminated"; exit 143' TERM

note "building (cargo build --release -p ferrodisk -p ferrodisk-loadgen)"
# In the background, so that a signal is handled at once (and cargo stopped by cleanup).
cargo build --release -p ferrodisk -p ferrodisk-loadgen &
pids+=("$!")
brc=0
wait "${pids[-1]}" || brc=$?
unset 'pids[-1]'
((brc == 0)) || die "cargo build failed (exit $brc)"
BIN="$root/target/release/ferrodisk"
LG="$root/target/release/ferrodisk-loadgen"
[[ -x $BIN ]] || die "$BIN was not built"
[[ -x $LG ]] || die "$LG was not built"

avail_kib=$(df -Pk "$work" | awk 'NR==2 {print $4}')
((avail_kib > 5 * 1024 * 1024)) || die "need 5 GiB free in $work (4 GiB of images), have $((avail_kib / 1024)) MiB"

# ---- process helpers ------------------------------------------------------------------------
# cpu_ticks PID: utime + stime (all threads) in clock ticks.
cpu_ticks() {
    local s
    s=$(cat "/proc/$1/stat") || die "cannot read /proc/$1/stat (process gone?)"
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $((${12} + ${13}))
}
hz=$(getconf CLK_TCK)
# busy_pct SECS: sleeps SECS and prints how busy all CPUs were meanwhile, in % (idle and
# iowait count as idle).
busy_pct() {
    local a b
    read -r -a a </proc/stat
    sleep "$1"
    read -r -a b </proc/stat
    awk -v u="$((b[1] + b[2] + b[3] + b[6] + b[7] + b[8] - a[1] - a[2] - a[3] - a[6] - a[7] - a[8]))" \
        -v i="$((b[4] + b[5] - a[4] - a[5]))" 'BEGIN { if (u + i > 0) printf "%.1f", u * 100 / (u + i); else print "null" }'
}

# start LOG CMD...: starts CMD in the background, logging to LOG; sets $started.
start() {
    local log=$1
    shift
    "${launch[@]}" "$@" >"$log" 2>&1 &
    started=$!
    pids+=("$started")
}
stop() {
    local p=$1 i keep=()
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 600; i++)); do alive "$p" || break; sleep 0.1; done
    if alive "$p"; then
        kill -KILL "$p" 2>/dev/null || true
        note "pid $p did not stop within 60 s of SIGTERM; killed"
    fi
    wait "$p" 2>/dev/null || true
    for i in "${pids[@]}"; do [[ $i == "$p" ]] || keep+=("$i"); done
    pids=("${keep[@]}")
}
wait_socket() { # SOCK PID LOG
    local i
    for ((i = 0; i < 600; i++)); do
        [[ -S $1 ]] && return 0
        alive "$2" || die "backend exited before creating $1 (log: $3)"
        sleep 0.05
    done
    die "no socket $1 after 30 s (log: $3)"
}
wait_port() { # PORT PID LOG
    local i
    for ((i = 0; i < 600; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        alive "$2" || die "replica exited before listening on port $1 (log: $3)"
        sleep 0.05
    done
    die "nothing listening on 127.0.0.1:$1 after 30 s (log: $3)"
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 30000))
        if port_free "$p" && [[ " ${used_ports[*]} " != *" $p "* ]]; then
            used_ports+=("$p")
            echo "$p"
            return 0
        fi
    done
    die "cannot find a free TCP port"
}
used_ports=()
P1=$(pick_port); used_ports+=("$P1")
P2=$(pick_port); used_ports+=("$P2")
PH=$(pick_port)

health() { curl -s --max-time 3 "http://127.0.0.1:$PH/health" || true; }
# health_doc: the health document, or die.
health_doc() {
    local h
    h=$(health)
    jq -e .volumes >/dev/null 2>&1 <<<"$h" || die "no health document from 127.0.0.1:$PH: ${h:-unreachable}"
    printf '%s' "$h"
}

# ---- setup ----------------------------------------------------------------------------------
head -c 32 /dev/urandom >"$work/key"
PLAIN="$work/plain.img" # A and B
PRIM="$work/primary.img" # C
note "writing two ${size} images in $work (fully allocated, no unwritten extents)"
for img in "$PLAIN" "$PRIM"; do
    dd if=/dev/zero of="$img" bs=4M count=$((size_bytes >> 22)) oflag=direct status=none ||
        die "cannot write $img"
done
mkdir -p "$work/r1" "$work/r2"
# T: one CA and one certificate (for 127.0.0.1, server and client) shared by the three daemons.
note "making a CA and a certificate for T with openssl"
{
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=ferrodisk bench CA" -keyout "$work/ca.key" -out "$work/ca.crt" &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -subj "/CN=127.0.0.1" -keyout "$work/host.key" -out "$work/host.csr" &&
        printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$work/host.ext" &&
        openssl x509 -req -in "$work/host.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
            -CAcreateserial -days 2 -extfile "$work/host.ext" -out "$work/host.crt"
} >"$work/openssl.log" 2>&1 || die "openssl could not make the test certificates (see $work/openssl.log)"
PSK=(--replication-key "$work/key")
TLS=(--tls-cert "$work/host.crt" --tls-key "$work/host.key" --tls-ca "$work/ca.crt")

SPEC_A="path=$PLAIN,socket=$work/a.sock"
SPEC_B="path=$PLAIN,socket=$work/b.sock,writeback=off,direct=on"
SPEC_C="path=$PRIM,socket=$work/c.sock,volume=vol1,replicas=127.0.0.1:$P1+127.0.0.1:$P2"
SPEC_D="path=$PRIM,socket=$work/d.sock,volume=vol1,replicas=127.0.0.1:$P1+127.0.0.1:$P2,poll-us=0"
SPEC_T="path=$PRIM,socket=$work/t.sock,volume=vol1,replicas=127.0.0.1:$P1+127.0.0.1:$P2"
declare -A NAME=([A]="unreplicated, write-back" [B]="unreplicated, write-through (O_DIRECT)"
    [C]="replicated, 2 replicas on loopback (pre-shared key)" [D]="replicated as C, poll-us=0"
    [T]="replicated as C, over TLS 1.3")
# replicated CONFIG: whether the configuration has replicas.
replicated() { [[ $1 == C || $1 == D || $1 == T ]]; }

backend_pid="" rpid1="" rpid2=""
# up CONFIG: starts the backend(s) of a configuration and waits until it can be measured.
up() {
    case $1 in
    A | B)
        local spec
        [[ $1 == A ]] && spec=$SPEC_A || spec=$SPEC_B
        start "$work/serve-$1.log" "$BIN" serve --disk "$spec"
        backend_pid=$started
        sock="$work/${1,,}.sock"
        wait_socket "$sock" "$backend_pid" "serve-$1.log"
        ;;
    C | D | T)
        local spec link=("${PSK[@]}")
        case $1 in C) spec=$SPEC_C ;; D) spec=$SPEC_D ;; T) spec=$SPEC_T link=("${TLS[@]}") ;; esac
        start "$work/replica1.log" "$BIN" replica --listen "127.0.0.1:$P1" --data "$work/r1" \
            "${link[@]}"
        rpid1=$started
        start "$work/replica2.log" "$BIN" replica --listen "127.0.0.1:$P2" --data "$work/r2" \
            "${link[@]}"
        rpid2=$started
        wait_port "$P1" "$rpid1" replica1.log
        wait_port "$P2" "$rpid2" replica2.log
        start "$work/serve-$1.log" "$BIN" serve --authority "file:$work/authority" --node a \
            "${link[@]}" --health "127.0.0.1:$PH" --disk "$spec"
        backend_pid=$started
        sock="$work/${1,,}.sock"
        wait_socket "$sock" "$backend_pid" "serve-$1.log"
        local t0=$SECONDS h=""
        while :; do
            alive "$backend_pid" || die "the replicated primary exited (log: serve-$1.log)"
            h=$(health)
            if [[ -n $h ]] && jq -e '.volumes[0].replicas | length == 2 and all(.state == "in-sync")' \
                >/dev/null 2>&1 <<<"$h"; then
                break
            fi
            ((SECONDS - t0 < 300)) || die "replicas not in-sync after 300 s; health: ${h:-unreachable}"
            sleep 0.2
        done
        note "  replicas in-sync after $((SECONDS - t0)) s"
        ;;
    esac
}
down() {
    stop "$backend_pid"
    if replicated "$1"; then
        stop "$rpid1"
        stop "$rpid2"
    fi
    # The daemon flushes on SIGTERM; make sure nothing of this run is written back in the next,
    # and drop the images' pages from the page cache (posix_fadvise DONTNEED), so that every
    # run starts from the same state: B's O_DIRECT writes invalidate the cached pages of
    # plain.img, and nothing would invalidate those of primary.img.
    sync "$PLAIN" "$PRIM" 2>/dev/null || sync
    local img
    for img in "$PLAIN" "$PRIM"; do
        dd of="$img" oflag=nocache conv=notrunc,fdatasync count=0 status=none ||
            die "cannot drop the page cache of $img"
    done
}

# loadgen OUTVAR ARGS...: one ferrodisk-loadgen run; dies unless it succeeded.
loadgen() {
    local var=$1 rc=0 o
    shift
    # In the background, so that a signal to this script is handled at once (wait returns).
    "$LG" run --socket "$sock" --pid "$backend_pid" "$@" >"$work/loadgen.out" 2>"$work/loadgen.err" &
    local lpid=$!
    pids+=("$lpid")
    wait "$lpid" || rc=$?
    unset 'pids[-1]'
    o=$(cat "$work/loadgen.out")
    if ((rc != 0)) || ! jq -e . >/dev/null 2>&1 <<<"$o"; then
        cat "$work/loadgen.err" >&2
        [[ -z $o ]] || echo "$o" >&2
        die "ferrodisk-loadgen run $* failed (exit $rc) against config $cfg"
    fi
    printf -v "$var" '%s' "$o"
}
records="$work/records.jsonl"
: >"$records"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=""
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then dirty=" (uncommitted changes in the working tree)"; fi
date_utc=$(date -u '+%Y-%m-%d %H:%M UTC')
add_record() { # JSON KIND WORKLOAD ROUND [EXTRA-JSON]
    local extra='{}'
    [[ -z ${5:-} ]] || extra=$5
    jq -c --arg kind "$2" --arg cfg "$cfg" --arg name "${NAME[$cfg]}" --arg w "$3" \
        --argjson round "$4" --arg commit "$commit" --arg date "$date_utc" \
        --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
        --argjson extra "$extra" \
        '{bench: "replication", kind: $kind, config: $cfg, config_name: $name, workload: $w,
          round: $round, commit: $commit, date: $date, loadavg: $load} + . + $extra' <<<"$1" >>"$records"
}

# fill CONFIG: one sequential pass of 1M writes over the span, so every measured block is
# written (on the primary and, for C, on both replicas: the replicas' files are fallocated,
# and the first write to an unwritten extent costs an extent conversion, a journal commit).
fill() {
    local d=3 r need=$((span_bytes >> 20)) written
    while :; do
        loadgen r --rw write --bs 1M --qd 4 --ramp 0 --duration "$d" --span "$span" --label "fill-$cfg"
        written=$(jq -r '.ios' <<<"$r")
        add_record "$r" fill "1M-write-qd4" 0
        if ((written >= need)); then
            note "  filled $span with $written MiB of sequential writes in $d s"
            break
        fi
        ((d < 200)) || die "filling $span through config $cfg did not finish in $d s ($written MiB)"
        d=$((d * 2))
    done
}

t_start=$SECONDS
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
note "temp dir $work; replicas on 127.0.0.1:$P1 and :$P2, health on :$PH"

note "preparing: fill pass through A (image shared with B) and through C"
for cfg in A C; do
    up "$cfg"
    fill
    down "$cfg"
done

workloads=("4k-randwrite-qd32:32" "4k-randwrite-qd1:1")
rec=""
for ((r = 1; r <= rounds; r++)); do
    for cfg in A B C D T; do
        note "round $r/$rounds: $cfg (${NAME[$cfg]})"
        up "$cfg"
        for w in "${workloads[@]}"; do
            wname=${w%%:*} qd=${w##*:}
            # Let the device finish what the previous run left behind; how busy the CPUs are
            # meanwhile (nothing of this benchmark runs) shows other work on the machine.
            bg=null
            if [[ $settle != 0 ]]; then bg=$(busy_pct "$settle"); fi
            extra=$(jq -nc --argjson bg "$bg" '{background_cpu_pct: $bg}')
            if replicated "$cfg"; then
                h0=$(health_doc)
                w0=$(jq '[.volumes[0].replicas[].writes] | min' <<<"$h0")
                c0=$(($(cpu_ticks "$rpid1") + $(cpu_ticks "$rpid2")))
            fi
            loadgen rec --rw randwrite --bs 4k --qd "$qd" --queues 1 --duration "$duration" \
                --ramp "$ramp" --span "$span" --label "$cfg-$wname-r$r"
            if replicated "$cfg"; then
                c1=$(($(cpu_ticks "$rpid1") + $(cpu_ticks "$rpid2")))
                h1=$(health_doc)
                w1=$(jq '[.volumes[0].replicas[].writes] | min' <<<"$h1")
                jq -e '.volumes[0].replicas | length == 2 and all(.state == "in-sync")' >/dev/null <<<"$h1" ||
                    die "a replica left in-sync during $wname round $r: $h1"
                f0=$(jq '[.volumes[0].replicas[].failures] | add' <<<"$h0")
                f1=$(jq '[.volumes[0].replicas[].failures] | add' <<<"$h1")
                ((f1 == f0)) || die "replica write failures during $wname round $r: $h1"
                ((w1 > w0)) || die "the replicas received no writes during $wname round $r: $h1"
                extra=$(jq -c --argjson ticks $((c1 - c0)) --argjson hz "$hz" --argjson writes $((w1 - w0)) \
                    '{replica_cpu_us_per_io: ($ticks / $hz * 1e6 / $writes), replica_cpu_ticks: $ticks,
                      replica_writes_per_link: $writes} + .' <<<"$extra")
            fi
            add_record "$rec" measure "$wname" "$r" "$extra"
            note "  $wname: $(jq -r '"\(.iops | floor) IOPS, p50 \(.lat_us.p50) µs, p99 \(.lat_us.p99) µs, backend \(.backend_cpu_us_per_io) µs/IO"' <<<"$rec")$(
                ! replicated "$cfg" || jq -r '", replicas \(.replica_cpu_us_per_io * 100 | round / 100) µs/IO"' <<<"$extra")"
        done
        down "$cfg"
    done
done
runtime=$((SECONDS - t_start))
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
bg_stats=$(jq -sr '[.[] | select(.kind == "measure") | .background_cpu_pct | select(. != null)] | sort
    | if length == 0 then "" else "\(.[length / 2 | floor]) \(.[-1])" end' "$records")

# ---- report ---------------------------------------------------------------------------------
summary=$(jq -s '
  def median: sort | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  map(select(.kind == "measure")) | group_by(.config + "/" + .workload)
  | map({key: (.[0].config + "/" + .[0].workload), value: {
      n: length,
      iops: (map(.iops) | median), iops_min: (map(.iops) | min), iops_max: (map(.iops) | max),
      p50: (map(.lat_us.p50) | median), p99: (map(.lat_us.p99) | median),
      p99_9: (map(.lat_us.p99_9) | median),
      cpu: (map(.backend_cpu_us_per_io | select(. != null)) | median),
      rcpu: (map(.replica_cpu_us_per_io | select(. != null)) | median)}})
  | from_entries' "$records")
v() { jq -r "$1 // \"null\"" <<<"$summary"; }
# fmt KIND VALUE
fmt() {
    awk -v k="$1" -v x="$2" 'BEGIN {
      if (x == "null" || x == "") { printf "–"; exit }
      if (k == "iops") { if (x >= 1e6) printf "%.2fM", x / 1e6; else if (x >= 1e4) printf "%.1fk", x / 1e3; else if (x >= 1e3) printf "%.2fk", x / 1e3; else printf "%.0f", x }
      else if (k == "lat") { if (x >= 1000) printf "%.0f", x; else if (x >= 100) printf "%.0f", x; else printf "%.1f", x }
      else if (k == "cpu") printf "%.2f", x
      else if (k == "ratio") printf "%.2f", x
      else if (k == "pct") printf "%.0f %%", x * 100
      else if (k == "dlat") printf "%+.1f", x
      else printf "%s", x }'
}
calc() { awk "BEGIN { a = \"$2\"; b = \"$3\"; if (a == \"null\" || b == \"null\" || b + 0 == 0) print \"null\"; else print $1 }"; }

table() {
    local c w
    echo "| config | workload | IOPS (median; min–max) | p50 µs | p99 µs | p99.9 µs | primary CPU µs/IO | replicas CPU µs/IO (both) |"
    echo "|---|---|--:|--:|--:|--:|--:|--:|"
    for w in 4k-randwrite-qd32 4k-randwrite-qd1; do
        for c in A B C D T; do
            local k=".\"$c/$w\""
            printf '| %s %s | %s | %s (%s–%s) | %s | %s | %s | %s | %s |\n' "$c" "${NAME[$c]}" "$w" \
                "$(fmt iops "$(v "$k.iops")")" "$(fmt iops "$(v "$k.iops_min")")" "$(fmt iops "$(v "$k.iops_max")")" \
                "$(fmt lat "$(v "$k.p50")")" "$(fmt lat "$(v "$k.p99")")" "$(fmt lat "$(v "$k.p99_9")")" \
                "$(fmt cpu "$(v "$k.cpu")")" "$(if replicated "$c"; then fmt cpu "$(v "$k.rcpu")"; else printf '–'; fi)"
        done
    done
}

q32='4k-randwrite-qd32' q1='4k-randwrite-qd1'
iA32=$(v ".\"A/$q32\".iops") iB32=$(v ".\"B/$q32\".iops") iC32=$(v ".\"C/$q32\".iops")
iA1=$(v ".\"A/$q1\".iops") iB1=$(v ".\"B/$q1\".iops") iC1=$(v ".\"C/$q1\".iops")
rCA32=$(calc 'a / b' "$iC32" "$iA32") rCB32=$(calc 'a / b' "$iC32" "$iB32")
rCA1=$(calc 'a / b' "$iC1" "$iA1") rCB1=$(calc 'a / b' "$iC1" "$iB1")
dA50=$(calc 'a - b' "$(v ".\"C/$q1\".p50")" "$(v ".\"A/$q1\".p50")")
dA99=$(calc 'a - b' "$(v ".\"C/$q1\".p99")" "$(v ".\"A/$q1\".p99")")
dB50=$(calc 'a - b' "$(v ".\"C/$q1\".p50")" "$(v ".\"B/$q1\".p50")")
dB99=$(calc 'a - b' "$(v ".\"C/$q1\".p99")" "$(v ".\"B/$q1\".p99")")
durable=$(calc 'a * 2 / b' "$iC32" "$iB32")
cpuC=$(v ".\"C/$q32\".cpu") cpuA=$(v ".\"A/$q32\".cpu") rcpuC=$(v ".\"C/$q32\".rcpu")
iD32=$(v ".\"D/$q32\".iops") iD1=$(v ".\"D/$q1\".iops") cpuD=$(v ".\"D/$q32\".cpu") rcpuD=$(v ".\"D/$q32\".rcpu")
rDC32=$(calc 'a / b' "$iD32" "$iC32") rDA32=$(calc 'a / b' "$iD32" "$iA32")
dDC50=$(calc 'a - b' "$(v ".\"D/$q1\".p50")" "$(v ".\"C/$q1\".p50")")
cpuD1=$(v ".\"D/$q1\".cpu") cpuC1=$(v ".\"C/$q1\".cpu")
iT32=$(v ".\"T/$q32\".iops") iT1=$(v ".\"T/$q1\".iops") cpuT=$(v ".\"T/$q32\".cpu") rcpuT=$(v ".\"T/$q32\".rcpu")
rTC32=$(calc 'a / b' "$iT32" "$iC32") rTC1=$(calc 'a / b' "$iT1" "$iC1") rTA32=$(calc 'a / b' "$iT32" "$iA32")
dTC50=$(calc 'a - b' "$(v ".\"T/$q1\".p50")" "$(v ".\"C/$q1\".p50")")
dTC99=$(calc 'a - b' "$(v ".\"T/$q1\".p99")" "$(v ".\"C/$q1\".p99")")
target=$(awk -v r="$rCA32" 'BEGIN { if (r == "null") print "not measured"; else if (r >= 0.70) print "**MET**"; else print "**NOT MET**" }')
cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
fs=$(findmnt -no FSTYPE,SOURCE -T "$work" 2>/dev/null | awk '{print $1 " on " $2}')
qs=""
((quick)) && qs=" --quick"

section="$work/section.md"
{
    echo "<!-- replication:begin -->"
    echo "## Replication overhead"
    echo
    echo "Generated $date_utc by \`benches/replication.sh$qs\` in ${runtime} s; this section is rewritten by that script (\`benches/compare.sh\` rewrites the whole file, so run \`replication.sh\` after it)."
    echo
    echo "- Machine: $(nproc) × ${cpu_model:-unknown CPU}, kernel $(uname -r); load average $load_start after the build, $load_end at the end (1, 5, 15 min; the benchmark's own processes and I/O count in it)"
    if [[ -n $bg_stats ]]; then
        read -r bg_med bg_max <<<"$bg_stats"
        echo "- Other work on the machine: the CPUs were $bg_med % busy (median; max $bg_max %) during the ${settle} s idle pause before each run, when no benchmark process was working"
        if awk -v m="$bg_med" 'BEGIN { exit !(m > 10) }'; then
            echo "- **Warning**: other work competed for the CPUs (and probably the disk) during this run; treat these numbers as rough."
        fi
    fi
    echo "- Ferrodisk: commit $commit$dirty"
    echo "- Images, replica files and sockets in \`$base\` (${fs:-unknown filesystem}): the primary image and both replica files share one virtual disk"
    echo "- $rounds round(s); each run ${duration} s measured after ${ramp} s of warm-up (and ${settle} s idle before it); 4k random writes over the first $span of a $size image, 1 queue; configurations alternate A, B, C, D, T within each round and every run gets freshly started daemons; numbers are medians over the rounds.$(
        [[ $results == - ]] || echo " Raw records: \`$results\` (\`kind\`: \`fill\` or \`measure\`; each with the load average when it was written).")"
    echo
    echo "Backends as started (\`\$DIR\` is the temp dir, \`\$P1\`, \`\$P2\`, \`\$PH\` free local ports; \`key\` is 32 random bytes):"
    echo
    echo "- A: \`ferrodisk serve --disk path=\$DIR/plain.img,socket=\$DIR/a.sock\` (write-back cache, page cache: the default)"
    echo "- B: \`ferrodisk serve --disk path=\$DIR/plain.img,socket=\$DIR/b.sock,writeback=off,direct=on\` (write-through: every write durable, O_DIRECT + RWF_DSYNC)"
    echo "- C: \`ferrodisk replica --listen 127.0.0.1:\$P1 --data \$DIR/r1 --replication-key \$DIR/key\`, the same on \`\$P2\` with \`\$DIR/r2\`, and"
    echo "  \`ferrodisk serve --authority file:\$DIR/authority --node a --replication-key \$DIR/key --health 127.0.0.1:\$PH --disk path=\$DIR/primary.img,socket=\$DIR/c.sock,volume=vol1,replicas=127.0.0.1:\$P1+127.0.0.1:\$P2\`"
    echo "  (primary: write-back, page cache, as A; each replica writes with O_DIRECT + RWF_DSYNC). Measured only once \`GET /health\` reports both replicas \`in-sync\`; the script checks that they are still in-sync, with no failed replica write, after each run."
    echo "- D: as C (same volume, image and replica servers), with \`,poll-us=0\` added to the disk spec: the queue worker sleeps in epoll after every event instead of spinning for up to 50 µs."
    echo "- T: as C, with \`--tls-cert \$DIR/host.crt --tls-key \$DIR/host.key --tls-ca \$DIR/ca.crt\` instead of \`--replication-key \$DIR/key\` on all three daemons (one P-256 certificate for 127.0.0.1, signed by a CA made with \`openssl\` for the run): the links run TLS 1.3 (AES-256-GCM or ChaCha20-Poly1305 as rustls negotiates) and their frames carry no HMAC tag."
    echo "- Client: \`ferrodisk-loadgen run --socket SOCK --pid PRIMARY_PID --rw randwrite --bs 4k --qd 32|1 --queues 1 --duration $duration --ramp $ramp --span $span\`"
    echo
    echo "Preparation: \`plain.img\` and \`primary.img\` are written in full with zeros (\`dd oflag=direct\`), then the measured span is written once more by a sequential pass (\`ferrodisk-loadgen run --rw write --bs 1M --qd 4 --ramp 0\`, repeated with a longer duration until it covers the span) through A and through C before the first round. The replicas create their files with \`fallocate\` (unwritten extents), and the first write to an unwritten extent converts it (a journal commit), about 5× slower than a later write to it; without this pass the replicated numbers would measure extent conversion. The pass goes through the replicated primary, so both replicas' files are written over the span too. After every run the daemons are stopped (the primary flushes), both images are \`fdatasync\`ed and their pages dropped from the page cache (\`dd oflag=nocache count=0\`, i.e. \`posix_fadvise(DONTNEED)\`), so every run starts with nothing of the span cached or dirty (otherwise B's O_DIRECT writes would leave A's image uncached and C's primary image cached)."
    echo
    echo "Primary CPU µs/IO is utime + stime of the \`ferrodisk serve\` process over the measured window, per I/O. The replica servers are separate processes: their CPU is the sum of both replicas' utime + stime (\`/proc/PID/stat\`) over the whole loadgen run (warm-up included), divided by the writes the primary sent to one replica in that time (the health endpoint's \`writes\` counter), so it is per guest write. Clock ticks are 10 ms, so the 1-s runs of \`--quick\` are coarse."
    echo
    table
    echo
    echo "Ratios (of the medians):"
    echo
    echo "- QD32 IOPS, replicated / unreplicated write-back: $(fmt ratio "$rCA32") (target ≥ 0.70: $target)"
    echo "- QD32 IOPS, replicated / unreplicated write-through: $(fmt ratio "$rCB32")"
    echo "- QD1 IOPS, replicated / write-back: $(fmt ratio "$rCA1"); replicated / write-through: $(fmt ratio "$rCB1")"
    echo "- Added QD1 write latency, replicated minus write-back: p50 $(fmt dlat "$dA50") µs, p99 $(fmt dlat "$dA99") µs"
    echo "- Added QD1 write latency, replicated minus write-through: p50 $(fmt dlat "$dB50") µs, p99 $(fmt dlat "$dB99") µs"
    echo "- CPU at QD32: primary $(fmt cpu "$cpuC") µs/IO replicated vs $(fmt cpu "$cpuA") unreplicated write-back, plus $(fmt cpu "$rcpuC") µs/IO in the two replica processes"
    echo "- TLS against the pre-shared key (T against C): QD32 IOPS $(fmt ratio "$rTC32")× (T / write-back: $(fmt ratio "$rTA32")), QD1 IOPS $(fmt ratio "$rTC1")×; QD1 latency p50 $(fmt dlat "$dTC50") µs, p99 $(fmt dlat "$dTC99") µs; CPU at QD32: primary $(fmt cpu "$cpuT") vs $(fmt cpu "$cpuC") µs/IO, replicas $(fmt cpu "$rcpuT") vs $(fmt cpu "$rcpuC") µs/IO"
    echo "- Polling off (D against C): QD32 IOPS $(fmt ratio "$rDC32")× (D / write-back: $(fmt ratio "$rDA32")), primary CPU at QD32 $(fmt cpu "$cpuD") vs $(fmt cpu "$cpuC") µs/IO (replicas $(fmt cpu "$rcpuD")), at QD1 $(fmt cpu "$cpuD1") vs $(fmt cpu "$cpuC1") µs/IO; QD1 p50 $(fmt dlat "$dDC50") µs"
    echo
    echo "Reading: on this VM the primary image and both replica files are on the same virtual disk, so each replicated guest write costs two durable device writes (one per replica, O_DIRECT + RWF_DSYNC) plus one write into the primary's page cache, and the two replica servers, the primary and the load generator share $(nproc) CPUs. At QD32 the replicated disk makes $(fmt iops "$iC32") guest writes/s, i.e. $(fmt iops "$(calc 'a * 2' "$iC32" 1)") durable 4k writes/s on the device, $(fmt pct "$durable") of the $(fmt iops "$iB32") durable writes/s that the write-through disk (B) gets from the same device, while the write-back disk (A) only copies into the page cache. The ratio to write-back therefore compares three copies (two of them durable) with one cached copy, and is bounded by the device here, not by the replication path alone; the write-through ratio is the fairer one for what a guest gets (a write acknowledged only when durable, in B on one disk, in C on two replicas). At QD1 a replicated write is acknowledged after a loopback round trip to both replicas and a durable write on each (in parallel, on the same device), and four processes (client, primary, two replicas) must be woken on 2 CPUs: its p50 of $(fmt lat "$(v ".\"C/$q1\".p50")") µs is $(fmt dlat "$dB50") µs from write-through's single durable write ($(fmt lat "$(v ".\"B/$q1\".p50")") µs) and $(fmt dlat "$dA50") µs from write-back's page-cache copy ($(fmt lat "$(v ".\"A/$q1\".p50")") µs). The write-back numbers (A, and the primary's share of C) are the least stable ones on these VMs: they are CPU-bound page-cache copies whose speed depends on how fast an idle CPU wakes up (see the caveats in \`benches/README.md\`) and on the state of the page cache (hence the cache drop between runs), so check the min–max column. On machines where the replicas have their own disks (and network), the device part of this cost is not shared; these numbers do not say how a real network would add to it."
    echo
    echo "Polling (D): by default a queue worker keeps spinning for up to 50 µs (\`poll-us\`) after each event. A replicated write waits about a millisecond at QD32 for the replicas, and the acknowledgements come back in batches, so the worker spins between batches on a CPU that the replica servers (and the client) need here. D shows what turning it off changes, in the same run."
    echo "<!-- replication:end -->"
} >"$section"

echo
cat "$section"
echo

if [[ $results != - ]]; then
    if ! { cp "$records" "$results.tmp" && mv "$results.tmp" "$results"; }; then die "cannot write $results"; fi
    note "raw records: $results"
fi
if [[ $out != - ]]; then
    new="$work/out.md"
    if grep -q '^<!-- replication:begin -->$' "$out"; then
        awk -v sec="$section" '
          /^<!-- replication:begin -->$/ { while ((getline l < sec) > 0) print l; skip = 1; next }
          /^<!-- replication:end -->$/ { skip = 0; next }
          !skip { print }' "$out" >"$new"
    else
        { cat "$out"; echo; cat "$section"; } >"$new"
    fi
    cat "$new" >"$out" || die "cannot write $out"
    note "replication section written to $out"
fi
failed_logs=0
note "done in $((SECONDS - t_start)) s (plus the build)"
