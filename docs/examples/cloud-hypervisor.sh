#!/bin/sh
# A cloud-hypervisor guest whose disk is served by Ferrodisk (docs/integration.md).
#
# NOT RUN: cloud-hypervisor is not packaged for Debian 12, so this was never started on the
# machines Ferrodisk is developed and tested on. Its options follow cloud-hypervisor's own
# documentation (`--disk vhost_user=on|off,socket=...,num_queues=...,queue_size=...`,
# `--memory ...,shared=on|off`). tests/integration_examples.rs checks that the options below
# say vhost_user=true, socket= and shared=on, and that every ferrodisk flag used here exists.
#
# Needs: the ferrodisk daemon running (docs/examples/ferrodisk.service), /dev/kvm, a guest
# kernel that cloud-hypervisor can boot directly (an uncompressed vmlinux with a PVH entry
# point) with virtio_blk built in, and a root file system on the volume.
set -eu

VOLUME=vol1
INSTANCE=vm1
SOCKET=/run/ferrodisk/$VOLUME.sock
KERNEL=/var/lib/vm/vmlinux

# 1. Create the volume (once) and serve it on a vhost-user socket with 2 queues. Queue size
#    256 is also Ferrodisk's default; it must match queue_size below. cloud-hypervisor runs
#    as root here; for another user add --socket-mode 0660 --socket-gid <its group>.
ferrodisk volume create "$VOLUME" --size 10G
ferrodisk attach --volume "$VOLUME" --instance "$INSTANCE" --context os=linux \
    --socket "$SOCKET" --queues 2 --queue-size 256

# 2. Boot. vhost-user requires shared guest memory: shared=on (cloud-hypervisor refuses a
#    vhost_user disk without it). num_queues must not exceed the attachment's --queues.
#    cloud-hypervisor connects to the socket as a client and, if Ferrodisk goes away,
#    reconnects by itself (it retries the socket for a minute); no option is needed.
cloud-hypervisor \
    --cpus boot=2 \
    --memory size=1G,shared=on \
    --kernel "$KERNEL" \
    --cmdline "console=hvc0 root=/dev/vda rw" \
    --disk vhost_user=true,socket="$SOCKET",num_queues=2,queue_size=256 \
    --console tty \
    --serial off

# 3. After the guest has shut down, release the socket (the volume stays).
ferrodisk detach "$VOLUME@$INSTANCE"
