#!/usr/bin/env bash
# Installs what Ferrodisk's build, tests, demo and benches need on a fresh Debian 12
# machine: QEMU 7.2 (with qemu-storage-daemon), the guest image's inputs, and e2fsprogs.
# Rust (cargo) must already be there. Safe to run again: it installs only what is missing,
# but always refreshes the package lists, which guest-images/build.sh downloads from.
set -euo pipefail

# etcd-server: the cluster authority in the replication tests; protobuf-compiler: the etcd
# client crate compiles etcd's protobufs; iproute2: network namespaces for the partition test;
# libvirt-clients + libxml2-utils: virt-xml-validate for the libvirt example; systemd:
# systemd-analyze for the unit files.
pkgs=(qemu-system-x86 busybox-static fio cpio e2fsprogs util-linux gcc libc6-dev xz-utils
      etcd-server protobuf-compiler iproute2 libvirt-clients libxml2-utils systemd)

sudo=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install-deps: run as root (or install sudo)" >&2; exit 1; }
    sudo=sudo
fi

command -v cargo >/dev/null || { echo "install-deps: cargo is missing: install Rust first" >&2; exit 1; }

echo "install-deps: refreshing package lists"
$sudo apt-get update -q >/dev/null
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
qemu-system-x86_64 --version | head -n 1
