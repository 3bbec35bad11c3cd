#!/usr/bin/env bash
# Build (or reuse from the cache) the nested normal-KVM lane's L1: Debian's
# stock amd64 kernel and a busybox initramfs that loads kvm-amd, mounts the
# host's root filesystem read-only over virtio-9p and runs a job in it.
#
#   tests/nested/build-l1.sh   -> last stdout line: the L1 directory, holding
#                                 vmlinuz and l1.cpio
#
# QEMU in TCG mode emulates AMD SVM, so kvm-amd in that L1 gives a normal,
# hardware-style /dev/kvm (nested paging, real CPUID, kvmclock, PV features):
# the KVM our users have, unlike the interpreting kvm_pvm of our own hosts.
#
# Cache: ${MICROVM_CACHE:-/var/cache/microvm}/nested/l1-<key>/, key = hash of
# this script, l1-init, the kernel package's name and version and busybox.
# Needs root (apt-get download, mknod) on a Debian 12 host.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MICROVM_CACHE:-/var/cache/microvm}
OUT=$CACHE/nested
# Modules the L1 init loads, with their dependencies resolved here by modprobe:
# KVM for AMD SVM, TAP for the net tests, virtio-pci + 9p for the host's root.
MODULES=(kvm_amd tun virtio_pci 9pnet_virtio 9p)

log() { printf '[nested-l1] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$OUT"
TMPS=()
cleanup() { local d; for d in "${TMPS[@]}"; do rm -rf --one-file-system "$d"; done; }
trap cleanup EXIT

# The kernel package linux-image-amd64 points at today (e.g. linux-image-6.1.0-57-amd64).
pkg_of_meta() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
PKG=$(pkg_of_meta)
if [[ -z $PKG ]]; then
    log "apt-get update (linux-image-amd64 unknown to apt)"
    apt-get update -qq >&2
    PKG=$(pkg_of_meta)
fi
[[ -n $PKG ]] || die "apt knows no linux-image-amd64 package"
VER=$(apt-cache policy "$PKG" | awk '/Candidate:/ {print $2}')
[[ -n $VER && $VER != "(none)" ]] || die "no candidate version for $PKG"
KREL=${PKG#linux-image-}

BUSYBOX=$(dpkg-query -L busybox-static 2>/dev/null | grep -m1 -E '/s?bin/busybox$' || true)
[[ -n $BUSYBOX && -x $BUSYBOX ]] || die "busybox-static is not installed (scripts/deps.sh installs it)"
command -v cpio >/dev/null || die "cpio is not installed (scripts/deps.sh installs it)"
command -v modprobe >/dev/null || die "kmod (modprobe) is not installed (scripts/deps.sh installs it)"

KEY=$({
    for f in build-l1.sh l1-init; do
        printf '%s\n' "$f"
        sha256sum <"$HERE/$f"
    done
    printf '%s=%s\n' "$PKG" "$VER"
    sha256sum <"$BUSYBOX"
} | sha256sum | cut -c1-16)
DIR=$OUT/l1-$KEY
if [[ -f $DIR/vmlinuz && -f $DIR/l1.cpio ]]; then
    log "cache hit: $DIR ($PKG $VER)"
    echo "$DIR"
    exit 0
fi

# ---- kernel package -----------------------------------------------------------
deb_dir=$OUT/debs
mkdir -p "$deb_dir"
chmod 0755 "$OUT" "$deb_dir" # lets apt download as _apt (sandboxed)
deb=$(ls "$deb_dir/${PKG}_${VER//:/%3a}_amd64.deb" 2>/dev/null || true)
if [[ -z $deb ]]; then
    log "downloading $PKG $VER"
    (cd "$deb_dir" && apt-get download -q "$PKG=$VER" >&2)
    deb=$(ls "$deb_dir/${PKG}_${VER//:/%3a}_amd64.deb")
fi
x=$(mktemp -d "$OUT/.x.XXXXXX")
TMPS+=("$x")
dpkg-deb -x "$deb" "$x"
[[ -f $x/boot/vmlinuz-$KREL ]] || die "$deb has no boot/vmlinuz-$KREL"
depmod -b "$x" "$KREL"

# ---- initramfs ------------------------------------------------------------------
stage=$(mktemp -d "$OUT/.stage.XXXXXX")
TMPS+=("$stage")
chmod 0755 "$stage"
mkdir -p "$stage"/{bin,sbin,proc,sys,dev,tmp,host,modules}
install -m 0755 "$BUSYBOX" "$stage/bin/busybox"
for a in sh mount umount insmod mkdir cat echo sleep poweroff chroot ls sync dmesg tee mknod; do
    ln -s busybox "$stage/bin/$a"
done
install -m 0755 "$HERE/l1-init" "$stage/init"
: >"$stage/modules/order"
for m in "${MODULES[@]}"; do
    modprobe -d "$x" -S "$KREL" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    name=$(basename "$ko")
    install -m 0644 "$ko" "$stage/modules/$name"
    echo "$name" >>"$stage/modules/order"
done
mknod -m 600 "$stage/dev/console" c 5 1
mknod -m 666 "$stage/dev/null" c 1 3

tmp=$(mktemp -d "$OUT/.l1.XXXXXX")
TMPS+=("$tmp")
(cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) >"$tmp/l1.cpio"
install -m 0644 "$x/boot/vmlinuz-$KREL" "$tmp/vmlinuz"
printf '%s %s\n' "$PKG" "$VER" >"$tmp/kernel-package"
rm -rf "$DIR"
chmod 0755 "$tmp"
mv -T "$tmp" "$DIR"
log "built $DIR ($PKG $VER, $(wc -l <"$stage/modules/order") modules)"
echo "$DIR"
