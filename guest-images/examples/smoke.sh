# Smoke test for the Ferrodisk test guest (sourced by the guest's /init, with
# the helpers step, kv, wait_dev and log). Needs one writable disk /dev/vda of
# at least 64 MiB; it is overwritten.
#
#   guest-images/run-example.sh            # boots the guest with this script

step vda-present wait_dev /dev/vda 10
kv vda.size_bytes "$(blockdev --getsize64 /dev/vda)"
kv vda.serial "$(cat /sys/block/vda/serial 2>/dev/null)"
kv vda.discard_max_bytes "$(cat /sys/block/vda/queue/discard_max_bytes)"
kv vda.write_zeroes_max_bytes "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
kv vda.nr_hw_queues "$(ls /sys/block/vda/mq | wc -l)"

step mkfs mkfs.ext4 -F -q /dev/vda
step mount mount -t ext4 /dev/vda /mnt
step write dd if=/dev/urandom of=/mnt/data bs=1M count=8 conv=fsync
kv data.sha256 "$(sha256sum </mnt/data | cut -d' ' -f1)"
step fstrim fstrim -v /mnt
step umount umount /mnt
step fsck e2fsck -f -n /dev/vda
step remount-verify sh -c 'mount -o ro /dev/vda /mnt && sha256sum /mnt/data && umount /mnt'

# fio straight on the block device, data verified with crc32c.
for engine in libaio psync io_uring; do
    step "fio-$engine" fio --name="verify-$engine" --filename=/dev/vda --direct=1 \
        --ioengine="$engine" --iodepth=8 --rw=randwrite --bs=4k --size=16M \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=terse --terse-version=3
done
kv fio.version "$(fio --version)"

step blkdiscard blkdiscard -f /dev/vda
step zeroout blkdiscard -f -z -o 0 -l 1048576 /dev/vda
step read-zeroes sh -c '[ "$(dd if=/dev/vda bs=1M count=1 2>/dev/null | tr -d "\0" | wc -c)" -eq 0 ]'
step sync sync
