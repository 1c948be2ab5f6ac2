#!/usr/bin/env bash
# Build the Ferrodisk test guest: OUTDIR/vmlinuz and OUTDIR/initrd.img (gzip
# newc cpio) from the Debian packages pinned in guest-images/packages.lock.
#
#   guest-images/build.sh [OUTDIR]
#
# OUTDIR defaults to ${FERRODISK_GUEST_DIR:-$HOME/.cache/ferrodisk/guest}.
# Downloaded .debs are cached in ${FERRODISK_DEB_CACHE:-OUTDIR/../debs}.
# OUTDIR/STAMP holds the sha256 of the recipe files; when it matches and the
# outputs exist, the script exits at once. Concurrent runs on one OUTDIR wait
# for each other (flock). Needs: apt-get (only for .debs not yet cached),
# dpkg-deb, readelf, cc (for fio's stub libraries), cpio, gzip, flock.
# See guest-images/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUTDIR=${1:-${FERRODISK_GUEST_DIR:-${HOME:-/root}/.cache/ferrodisk/guest}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
DEBDIR=${FERRODISK_DEB_CACHE:-$(dirname "$OUTDIR")/debs}
LOCK=$here/packages.lock

# Files whose content defines the guest. Their hash is the cache key.
RECIPE_FILES=(build.sh init helpers.sh packages.lock)

# Modules, in load order (ext4 and NVMe are built into the cloud kernel).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk qemu_fw_cfg)

# Programs copied from the unpacked packages (path relative to the package root).
# /bin/sh is dash, not busybox: Debian's busybox-static runs its own applet
# (e.g. its blkdiscard, fstrim, mke2fs, blockdev) in preference to a program of
# the same name in PATH, both in its shell and in applets that run commands
# (timeout, env, xargs, setsid, taskset, ionice); so those come from Debian too.
PROGRAMS=(
    bin/dash
    usr/bin/timeout usr/bin/env usr/bin/xargs
    usr/bin/setsid usr/bin/taskset usr/bin/ionice
    usr/bin/fio
    sbin/mke2fs sbin/e2fsck sbin/tune2fs sbin/dumpe2fs sbin/resize2fs
    sbin/blkdiscard sbin/fstrim sbin/blockdev sbin/wipefs
)
# Symlinks NAME=TARGET, as the packages ship them.
LINKS=(
    bin/sh=dash
    sbin/mkfs.ext2=mke2fs sbin/mkfs.ext3=mke2fs sbin/mkfs.ext4=mke2fs
    sbin/fsck.ext2=e2fsck sbin/fsck.ext3=e2fsck sbin/fsck.ext4=e2fsck
    sbin/e2label=tune2fs
)
# Libraries loaded with dlopen rather than DT_NEEDED (glibc needs libgcc_s for
# pthread_cancel and pthread_exit).
EXTRA_LIBS=(libgcc_s.so.1)

# fio links directly against the libraries of its optional engines (rbd, rados,
# glusterfs, rdma, nbd, pmem); with them it pulls in ~64 libraries (~80 MB).
# The guest gets stub libraries instead: same soname and symbol versions, and
# each function prints a message and exits 127. The engines the tests use
# (psync, sync, libaio, io_uring, ...) are untouched.
STUB_LIBS=(libgfapi.so.0 libnbd.so.0 libibverbs.so.1 librdmacm.so.1
           librados.so.2 librbd.so.1 libpmemblk.so.1 libpmem.so.1)
# For unversioned symbols: which stub provides a prefix.
STUB_PREFIXES=(glfs_=libgfapi.so.0 nbd_=libnbd.so.0 ibv_=libibverbs.so.1
               rdma_=librdmacm.so.1 rados_=librados.so.2 rbd_=librbd.so.1
               pmemblk_=libpmemblk.so.1 pmem_=libpmem.so.1)

LIBDIRS=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu)

log() { echo "build.sh: $*" >&2; }
die() {
    echo >&2
    echo "build.sh: ERROR: $*" >&2
    exit 1
}

recipe_hash=$(cd "$here" && sha256sum "${RECIPE_FILES[@]}" | sha256sum | cut -d' ' -f1)

is_fresh() {
    [[ -s $OUTDIR/vmlinuz && -s $OUTDIR/initrd.img && -f $OUTDIR/STAMP ]] &&
        [[ $(<"$OUTDIR/STAMP") == "$recipe_hash" ]]
}

if is_fresh; then
    log "up to date: $OUTDIR (recipe $recipe_hash)"
    exit 0
fi

exec 9>"$OUTDIR/.lock"
flock 9
if is_fresh; then # built by a concurrent run while we waited
    log "up to date: $OUTDIR (recipe $recipe_hash)"
    exit 0
fi

[[ $(dpkg --print-architecture) == amd64 ]] || die "only amd64 hosts are supported"
for tool in dpkg-deb readelf cc cpio gzip tar sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' is needed (apt-get install -y dpkg binutils gcc cpio gzip tar coreutils)"
done

log "building guest in $OUTDIR (recipe $recipe_hash)"
rm -f "$OUTDIR/STAMP"
mkdir -p "$DEBDIR"
work=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------- download --
apt_updated=0
# fetch NAME VERSION SHA256: sets $deb to a verified .deb in $DEBDIR.
fetch() {
    local name=$1 ver=$2 sha=$3 got dl
    deb="$DEBDIR/${name}_${ver//:/%3a}_amd64.deb"
    if [[ -f $deb ]]; then
        got=$(sha256sum <"$deb" | cut -d' ' -f1)
        [[ $got == "$sha" ]] && return 0
        log "cached $deb has sha256 $got, not the pinned $sha: downloading it again"
        rm -f "$deb"
    fi
    command -v apt-get >/dev/null || die "$name $ver is not cached in $DEBDIR and apt-get is missing"
    dl=$(mktemp -d "$DEBDIR/.dl.XXXXXX")
    chmod 755 "$dl"
    chown _apt "$dl" 2>/dev/null || true # lets apt download sandboxed
    log "apt-get download $name=$ver"
    if ! (cd "$dl" && apt-get download -q=2 "$name=$ver") >&2; then
        if ((!apt_updated)) && [[ $(id -u) == 0 ]]; then
            log "download failed; running apt-get update once and retrying"
            apt_updated=1
            apt-get update -q=2 >&2 || true
        fi
        if ! (cd "$dl" && apt-get download -q=2 "$name=$ver") >&2; then
            rm -rf "$dl"
            die "cannot download $name=$ver with apt-get.
  The pinned version may have left the Debian archive (bookworm-security replaces
  kernel packages). Either put the .deb (sha256 $sha) at
    $deb
  or re-pin with guest-images/update-lock.sh and rebuild."
        fi
    fi
    local files=("$dl"/*.deb)
    [[ ${#files[@]} -eq 1 && -f ${files[0]} ]] || die "apt-get download $name=$ver produced no single .deb in $dl"
    got=$(sha256sum <"${files[0]}" | cut -d' ' -f1)
    if [[ $got != "$sha" ]]; then
        mv "${files[0]}" "$DEBDIR/REJECTED-${name}_${ver//:/%3a}_amd64.deb"
        rm -rf "$dl"
        die "SHA256 MISMATCH for $name $ver
  pinned in packages.lock: $sha
  downloaded:              $got
  The archive now serves a different file under this version. Kept it as
    $DEBDIR/REJECTED-${name}_${ver//:/%3a}_amd64.deb
  Do not edit the lock by hand; investigate, then re-pin with guest-images/update-lock.sh."
    fi
    mv "${files[0]}" "$deb"
    rm -rf "$dl"
}

[[ -f $LOCK ]] || die "missing $LOCK (create it with guest-images/update-lock.sh)"
kernel_deb=""
pkg_debs=()
while read -r name ver sha extra; do
    [[ -z $name || $name == \#* ]] && continue
    [[ -n $ver && $sha =~ ^[0-9a-f]{64}$ && -z ${extra:-} ]] || die "bad line in packages.lock: $name $ver $sha ${extra:-}"
    fetch "$name" "$ver" "$sha"
    if [[ $name == linux-image-* ]]; then
        [[ -z $kernel_deb ]] || die "packages.lock pins more than one kernel"
        kernel_deb=$deb
    else
        pkg_debs+=("$deb")
    fi
done <"$LOCK"
[[ -n $kernel_deb ]] || die "packages.lock pins no linux-image-* package"
log "all .debs verified against packages.lock"

# ------------------------------------------------------------------ unpack --
stage=$work/stage   # every non-kernel package, unpacked
kstage=$work/kernel # the kernel image and the needed modules
root=$work/root     # becomes the initramfs
mkdir -p "$stage" "$kstage" "$root"
for d in "${pkg_debs[@]}"; do
    dpkg-deb -x "$d" "$stage"
done
mod_patterns=()
for m in "${MODULES[@]}"; do
    mod_patterns+=("./lib/modules/*/$m.ko" "./lib/modules/*/$m.ko.xz" "./lib/modules/*/$m.ko.zst")
done
dpkg-deb --fsys-tarfile "$kernel_deb" |
    tar -x -C "$kstage" --wildcards --no-anchored './boot/vmlinuz-*' "${mod_patterns[@]}" 2>/dev/null || true
vmlinuz=$(ls "$kstage"/boot/vmlinuz-* 2>/dev/null | head -n1)
[[ -n $vmlinuz ]] || die "no /boot/vmlinuz-* in $kernel_deb"
kver=${vmlinuz##*/vmlinuz-}
log "kernel $kver"

# ------------------------------------------------------------- initramfs tree --
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/x86_64-linux-gnu,lib64,etc,proc,sys,dev,tmp,run,mnt,root,var/tmp} \
         "$root/lib/ferrodisk" "$root/lib/modules/$kver"
chmod 1777 "$root/tmp" "$root/var/tmp"
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true # the kernel has one too
mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true

# Modules, decompressed (busybox insmod reads plain .ko), flat in lib/modules/KVER.
: >"$root/lib/ferrodisk/modules"
for m in "${MODULES[@]}"; do
    f=$(find "$kstage/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
    [[ -n $f ]] || die "module $m not found in $kernel_deb (built in? check /boot/config-$kver)"
    case $f in
        *.xz) xz -dc "$f" >"$root/lib/modules/$kver/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"$root/lib/modules/$kver/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$kver/$m.ko" ;;
    esac
    echo "$m" >>"$root/lib/ferrodisk/modules"
done

cp "$stage/bin/busybox" "$root/bin/busybox"
for p in "${PROGRAMS[@]}"; do
    [[ -f $stage/$p ]] || die "$p is not in the pinned packages"
    cp "$stage/$p" "$root/$p"
done
for l in "${LINKS[@]}"; do
    ln -sf "${l#*=}" "$root/${l%%=*}"
done
cp "$stage/etc/mke2fs.conf" "$root/etc/mke2fs.conf"
ln -s /proc/mounts "$root/etc/mtab"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
install -m 755 "$here/init" "$root/init"
install -m 644 "$here/helpers.sh" "$root/lib/ferrodisk/helpers.sh"

# -------------------------------------------------------- shared libraries --
is_stub() {
    local s
    for s in "${STUB_LIBS[@]}"; do [[ $1 == "$s" ]] && return 0; done
    return 1
}
find_lib() { # SONAME -> path in $stage, or nothing
    local d
    for d in "${LIBDIRS[@]}"; do
        [[ -e $stage/$d/$1 ]] && { echo "$stage/$d/$1"; return 0; }
    done
    return 1
}
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }

declare -A have_lib=()
queue=()
for p in "${PROGRAMS[@]}"; do queue+=("$root/$p"); done
for l in "${EXTRA_LIBS[@]}"; do
    f=$(find_lib "$l") || die "$l is in no pinned package"
    cp -L "$f" "$root/lib/x86_64-linux-gnu/$l"
    have_lib[$l]=1
    queue+=("$root/lib/x86_64-linux-gnu/$l")
done
missing=()
while ((${#queue[@]})); do
    obj=${queue[0]}
    queue=("${queue[@]:1}")
    for so in $(needed "$obj"); do
        [[ -n ${have_lib[$so]:-} ]] && continue
        have_lib[$so]=1
        is_stub "$so" && continue
        if f=$(find_lib "$so"); then
            cp -L "$f" "$root/lib/x86_64-linux-gnu/$so"
            queue+=("$root/lib/x86_64-linux-gnu/$so")
        else
            missing+=("$so (needed by ${obj#"$root"/})")
        fi
    done
done
((${#missing[@]} == 0)) || die "shared libraries in no pinned package:
$(printf '    %s\n' "${missing[@]}")
  add their packages to LIB_PACKAGES in guest-images/update-lock.sh and run it"
ld_so=$(find_lib ld-linux-x86-64.so.2) || die "ld-linux-x86-64.so.2 not found (libc6 pinned?)"
cp -L "$ld_so" "$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"

# ------------------------------------------------------------ stub libraries --
# Symbols each stub must define: every undefined, non-weak dynamic symbol of a
# program that either carries a version needed from that stub's soname, or is
# unversioned and defined by none of the real libraries in the guest.
defined=$work/defined-syms
for f in "$root"/lib/x86_64-linux-gnu/*.so*; do
    readelf -W --dyn-syms "$f" | awk '$7 != "UND" && $8 != "" {sub(/@.*/, "", $8); print $8}'
done | sort -u >"$defined"
stubsyms=$work/stub-syms # lines: SONAME SYMBOL VERSION|- TYPE
: >"$stubsyms"
for p in "${PROGRAMS[@]}"; do
    bin=$root/$p
    needs_stub=0
    for so in $(needed "$bin"); do is_stub "$so" && needs_stub=1; done
    ((needs_stub)) || continue
    # version name -> soname, from .gnu.version_r
    readelf -W -V "$bin" | awk '
        /Version needs section/ {inr = 1; next}
        /section/ {inr = 0}
        inr && $2 == "Version:" && $4 == "File:" {file = $5}
        inr && $2 == "Name:" {print $3, file}' >"$work/verneed"
    readelf -W --dyn-syms "$bin" |
        awk -v prefixes="${STUB_PREFIXES[*]}" -v stubs="${STUB_LIBS[*]}" \
            -v verneed="$work/verneed" -v defined="$defined" -v prog="$p" '
        BEGIN {
            while ((getline l < verneed) > 0) { split(l, a, " "); vfile[a[1]] = a[2] }
            while ((getline l < defined) > 0) def[l] = 1
            n = split(stubs, s, " "); for (i = 1; i <= n; i++) isstub[s[i]] = 1
            np = split(prefixes, pp, " ")
        }
        $7 == "UND" && $5 != "WEAK" && $8 != "" {
            name = $8; ver = "-"
            if (index(name, "@")) { ver = substr(name, index(name, "@") + 1); name = substr(name, 1, index(name, "@") - 1); sub(/^@/, "", ver) }
            if (ver != "-") {
                lib = vfile[ver]
                if (!(lib in isstub)) next
            } else {
                if (name in def) next
                lib = ""
                for (i = 1; i <= np; i++) {
                    split(pp[i], kv, "=")
                    if (index(name, kv[1]) == 1 && length(kv[1]) > length(best)) { lib = kv[2]; best = kv[1] }
                }
                best = ""
                if (lib == "") { print "UNRESOLVED " name " " prog > "/dev/stderr"; bad = 1; next }
            }
            print lib, name, ver, $4
        }
        END { exit bad }' >>"$stubsyms" ||
        die "$p needs symbols that no pinned library or stub provides (listed above)"
done
if [[ -s $stubsyms ]] && awk '$4 != "FUNC" {print; bad = 1} END {exit !bad}' "$stubsyms" >&2; then
    die "only functions can be stubbed; the symbols above are not functions"
fi
for so in "${STUB_LIBS[@]}"; do
    [[ -n ${have_lib[$so]:-} ]] || continue
    src=$work/stub-$so.c
    vs=$work/stub-$so.map
    cat >"$src" <<'EOF'
/* Generated by guest-images/build.sh: a stub for a library of an fio ioengine
 * that the Ferrodisk test guest does not carry. */
#include <unistd.h>
static void ferrodisk_stub(const char *name, unsigned long len)
{
    static const char a[] = "ferrodisk test guest: ";
    static const char b[] = "() is a stub: this fio ioengine is not in the guest\n";
    (void)!write(2, a, sizeof a - 1);
    (void)!write(2, name, len);
    (void)!write(2, b, sizeof b - 1);
    _exit(127);
}
#define STUB(f) void f(void); void f(void) { ferrodisk_stub(#f, sizeof #f - 1); }
EOF
    awk -v so="$so" '$1 == so {print "STUB(" $2 ")"}' "$stubsyms" | sort -u >>"$src"
    # Version nodes: every version fio needs from this soname; unversioned
    # symbols go into the first node (or no version script at all).
    awk -v so="$so" '$1 == so && $3 != "-" {print $3}' "$stubsyms" | sort -u >"$work/vers"
    verflags=()
    if [[ -s $work/vers ]]; then
        first=$(head -n1 "$work/vers")
        {
            while read -r v; do
                echo "$v {"
                echo "  global:"
                awk -v so="$so" -v v="$v" -v first="$first" \
                    '$1 == so && ($3 == v || ($3 == "-" && v == first)) {print "    " $2 ";"}' "$stubsyms" | sort -u
                [[ $v == "$first" ]] && echo "  local: *;"
                echo "};"
            done <"$work/vers"
        } >"$vs"
        verflags=(-Wl,--version-script="$vs")
    fi
    cc -shared -fPIC -O2 -o "$root/lib/x86_64-linux-gnu/$so" -Wl,-soname,"$so" "${verflags[@]}" "$src" ||
        die "cannot compile the stub $so"
    log "stub $so: $(awk -v so="$so" '$1 == so' "$stubsyms" | wc -l) functions"
done

# Every program must load with the guest's own loader and libraries: all
# symbols bound (as the guest's ld.so does for BIND_NOW programs like fio), and
# fio must run.
gld=$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
for p in "${PROGRAMS[@]}"; do
    if ! out=$(LD_TRACE_LOADED_OBJECTS=1 LD_WARN=yes LD_BIND_NOW=yes "$gld" --inhibit-cache \
                   --library-path "$root/lib/x86_64-linux-gnu" "$root/$p" 2>&1) || grep -Eq 'not found|undefined symbol|no version information|error' <<<"$out"; then
        die "$p does not load with the guest's libraries:
$out"
    fi
done
"$gld" --inhibit-cache --library-path "$root/lib/x86_64-linux-gnu" "$root/usr/bin/fio" --version >/dev/null ||
    die "fio does not run with the guest's libraries"

# busybox applets, where no real program of that name is present.
while read -r a; do
    [[ $a == */* ]] || continue # e.g. linuxrc
    n=${a##*/}
    [[ -e $root/bin/$n || -e $root/sbin/$n || -e $root/usr/bin/$n || -e $root/usr/sbin/$n ]] && continue
    ln -s /bin/busybox "$root/$a"
done < <("$root/bin/busybox" --list-full)
[[ -e $root/bin/sh ]] || die "busybox has no sh applet"

# ------------------------------------------------------------------- pack --
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$work/initrd.img"
cp "$vmlinuz" "$work/vmlinuz"
{
    echo "recipe $recipe_hash"
    echo "kernel $kver"
    echo "initrd.img $(sha256sum <"$work/initrd.img" | cut -d' ' -f1) $(stat -c %s "$work/initrd.img") bytes"
    echo "vmlinuz $(sha256sum <"$work/vmlinuz" | cut -d' ' -f1)"
    grep -v '^#' "$LOCK"
} >"$work/BUILDINFO"
mv "$work/vmlinuz" "$OUTDIR/vmlinuz"
mv "$work/initrd.img" "$OUTDIR/initrd.img"
mv "$work/BUILDINFO" "$OUTDIR/BUILDINFO"
echo "$recipe_hash" >"$OUTDIR/STAMP"
log "done: $OUTDIR/vmlinuz, $OUTDIR/initrd.img ($(du -h "$OUTDIR/initrd.img" | cut -f1)), kernel $kver"
