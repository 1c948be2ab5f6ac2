#!/usr/bin/env bash
# The Ferrodisk demo: build, create a disk image, serve it with Ferrodisk, boot a QEMU
# guest on it, run a short fio job inside (4k randread and randwrite), print the results.
# Everything it starts is stopped and removed on exit.
#
#   scripts/demo.sh [SECONDS_PER_JOB]     (default 10)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runtime=${1:-10}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Installing QEMU, fio and the guest image's inputs (if missing)"
scripts/install-deps.sh

step "Building ferrodisk (release)"
cargo build --release --quiet
bin=$PWD/target/release/ferrodisk

step "Building the test guest (cached after the first run)"
guest_dir=${FERRODISK_GUEST_DIR:-$HOME/.cache/ferrodisk/guest}
guest-images/build.sh "$guest_dir" >/dev/null

work=$(mktemp -d /tmp/ferrodisk-demo.XXXXXX)
daemon=""
cleanup() {
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

step "Creating a 1 GiB disk image and serving it on $work/disk.sock"
truncate -s 1G "$work/disk.img"
"$bin" serve --disk "path=$work/disk.img,socket=$work/disk.sock,queues=2,direct=on,serial=ferrodisk-demo" \
    >"$work/stats.json" 2>"$work/ferrodisk.log" &
daemon=$!
for _ in $(seq 100); do [[ -S $work/disk.sock ]] && break; sleep 0.05; done
[[ -S $work/disk.sock ]] || { cat "$work/ferrodisk.log"; echo "ferrodisk did not start" >&2; exit 1; }
echo "ferrodisk pid $daemon: $(head -n 1 "$work/ferrodisk.log" | sed 's/\x1b\[[0-9;]*m//g')"

cat >"$work/guest.sh" <<GUEST
kv size "\$(cat /sys/block/vda/size)"
kv serial "\$(cat /sys/block/vda/serial)"
kv queues "\$(ls /sys/block/vda/mq | wc -l)"
for rw in randread randwrite; do
    kv fio.\$rw "\$(fio --name=\$rw --filename=/dev/vda --rw=\$rw --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --size=512M --runtime=$runtime --time_based=1 --output-format=terse)"
done
GUEST

step "Booting a QEMU guest (TCG) with the disk as vhost-user-blk-pci, running fio for 2 x ${runtime}s"
qemu-system-x86_64 -machine q35,accel=tcg,memory-backend=mem0 -cpu max -smp 2 -m 512 \
    -object memory-backend-memfd,id=mem0,size=512M,share=on \
    -nographic -no-reboot -nodefaults -serial "file:$work/console.log" \
    -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.img" \
    -append "console=ttyS0 quiet loglevel=1 panic=-1" \
    -fw_cfg "name=opt/ferrodisk/script,file=$work/guest.sh" \
    -chardev "socket,id=c0,path=$work/disk.sock" \
    -device vhost-user-blk-pci,chardev=c0,num-queues=2 >"$work/qemu.log" 2>&1 &
qemu=$!
timeout=$((120 + 2 * runtime))
for _ in $(seq $((timeout * 10))); do kill -0 "$qemu" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$qemu" 2>/dev/null; then kill "$qemu"; echo "the guest did not finish in ${timeout}s" >&2; exit 1; fi

console=$(tr -d '\r' <"$work/console.log")
kv() { sed -n "s/^FERRODISK-KV key=$1 value=//p" <<<"$console"; }
grep -q '^FERRODISK-END steps=.* failed=0' <<<"$console" || { echo "$console"; echo "the guest reported a failure" >&2; exit 1; }

kill -TERM "$daemon"; wait "$daemon" || true; daemon=""

step "Results"
printf 'guest: /dev/vda %s sectors (%s GiB), serial %s, %s hardware queues\n' \
    "$(kv size)" "$(( $(kv size) * 512 >> 30 ))" "$(kv serial)" "$(kv queues)"
printf '\n%-22s %10s %10s %12s %12s\n' workload IOPS MiB/s "p50 lat us" "p99 lat us"
for rw in randread randwrite; do
    # fio terse v3: read iops 8, read bw KiB/s 7, read clat p50 24, p99 30;
    # write: iops 49, bw 48, clat p50 65, p99 71. Percentiles are "N%=usec".
    kv "fio.$rw" | awk -F';' -v rw="$rw" '{
        if (rw == "randread") { iops=$8; bw=$7; p50=$24; p99=$30 } else { iops=$49; bw=$48; p50=$65; p99=$71 }
        sub(/.*=/, "", p50); sub(/.*=/, "", p99)
        printf "%-22s %10d %10.1f %12s %12s\n", "4k " rw " QD16", iops, bw / 1024, p50, p99 }'
done
echo
sed -n 's/.*"totals":{\([^}]*\)}.*/\1/p' "$work/stats.json" | tr ',' '\n' | tr -d '"' |
    awk -F: '$1 ~ /^(requests|reads|writes|flushes|batches|notifications|errors_ioerr)$/ { printf "ferrodisk %-14s %s\n", $1, $2 }'
sed -n 's/.*"queues":\[\(.*\)\]}}/\1/p' "$work/stats.json" | tr '}' '\n' |
    sed -n 's/.*"requests":\([0-9]*\).*/\1/p' | awk '{ printf "ferrodisk queue %d       %s requests\n", NR - 1, $1 }'
cat <<'NOTE'

The guest runs under TCG (software emulation), so these figures measure the emulator more
than Ferrodisk. For backend numbers see docs/benchmarks.md (benches/, libblkio client).
NOTE
