#!/usr/bin/env bash
# Boot the Ferrodisk test guest under TCG and run a test script in it (default:
# examples/smoke.sh). Builds the guest first if needed.
#
#   guest-images/run-example.sh [--vhost-user] [SCRIPT [DISK_IMAGE]]
#
# Without --vhost-user the disk is QEMU's own virtio-blk; with it, the disk is
# a vhost-user-blk-pci device served by qemu-storage-daemon, the way the VM
# tests attach Ferrodisk. DISK_IMAGE defaults to a fresh 256 MiB temporary file.
# Prints the serial console and the boot-to-poweroff time; exits 0 when the
# guest printed FERRODISK-END with failed=0.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
vhost=0
if [[ ${1:-} == --vhost-user ]]; then vhost=1; shift; fi
script=${1:-$here/examples/smoke.sh}
guest=${FERRODISK_GUEST_DIR:-${HOME:-/root}/.cache/ferrodisk/guest}
"$here/build.sh" "$guest"

tmp=$(mktemp -d)
qsd_pid=""
cleanup() {
    [[ -n $qsd_pid ]] && kill "$qsd_pid" 2>/dev/null && wait "$qsd_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
disk=${2:-$tmp/disk.img}
[[ -e $disk ]] || truncate -s 256M "$disk"

qemu=(qemu-system-x86_64 -cpu max -m 512 -smp 1
      -nographic -no-reboot -nodefaults -serial stdio
      -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img"
      -append "console=ttyS0 quiet loglevel=1 panic=-1"
      -fw_cfg name=opt/ferrodisk/script,file="$script")
if ((vhost)); then
    sock=$tmp/vhost.sock
    qemu-storage-daemon \
        --blockdev driver=file,node-name=n0,filename="$disk",cache.direct=on,aio=io_uring \
        --export type=vhost-user-blk,id=e0,addr.type=unix,addr.path="$sock",node-name=n0,writable=on,num-queues=1 &
    qsd_pid=$!
    for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
    [[ -S $sock ]] || { echo "qemu-storage-daemon did not create $sock" >&2; exit 1; }
    qemu+=(-machine q35,accel=tcg,memory-backend=mem0
           -object memory-backend-memfd,id=mem0,size=512M,share=on
           -chardev socket,id=c0,path="$sock"
           -device vhost-user-blk-pci,chardev=c0,num-queues=1)
else
    qemu+=(-machine q35,accel=tcg
           -drive file="$disk",if=virtio,format=raw,cache=unsafe,discard=unmap)
fi

start=$(date +%s.%N)
timeout 600 "${qemu[@]}" | tee "$tmp/console.log"
end=$(date +%s.%N)
awk -v a="$start" -v b="$end" 'BEGIN {printf "boot-to-poweroff: %.1f s\n", b - a}' >&2

end_line=$(tr -d '\r' <"$tmp/console.log" | grep '^FERRODISK-END ' || true)
[[ -n $end_line ]] || { echo "no FERRODISK-END line: the guest did not finish" >&2; exit 1; }
[[ $end_line == *" failed=0" ]]
