#!/usr/bin/env bash
# Build the tiny test initramfs for microvm end-to-end tests: Debian's static
# busybox + tests/initramfs/init + microvm-init (its agent) and microvm-vsock
# (from init/build.sh), as a newc cpio archive. No root file system.
#
#   tests/initramfs/build.sh   -> last stdout line: path of the archive
#
# Output, cached under ${MICROVM_CACHE:-/var/cache/microvm}/initramfs/:
#   test-<key>.cpio.gz   gzip'd archive (default; printed)
#   test-<key>.cpio      the same, uncompressed: printed instead when
#                        MICROVM_INITRAMFS_FORMAT=cpio. Unpacking needs no
#                        inflate in the guest kernel, which matters where
#                        guest kernel code is interpreted (~1 us/instruction).
#   test.cpio.gz, test.cpio   symlinks to the latest build
# key = hash of this script, init, the busybox binary, microvm-init and
# microvm-vsock.
#
# busybox comes from the host's busybox-static package if installed, else
# from `apt-get download busybox-static` (extracted into the cache; nothing is
# installed on the host, so a host `busybox` package is left alone).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MICROVM_CACHE:-/var/cache/microvm}
OUT=$CACHE/initramfs
FORMAT=${MICROVM_INITRAMFS_FORMAT:-gz}
case $FORMAT in gz | gzip) FORMAT=gz ;; cpio | none) FORMAT=cpio ;; *)
    echo "MICROVM_INITRAMFS_FORMAT must be gz or cpio" >&2
    exit 1
    ;;
esac

T0=${EPOCHREALTIME/[.,]/}
log() {
    local now=${EPOCHREALTIME/[.,]/} ms
    ms=$(((now - T0) / 1000))
    printf '[initramfs %3d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*" >&2
}
die() { log "error: $*"; exit 1; }

[[ -f $HERE/init ]] || die "missing $HERE/init"
mkdir -p "$OUT"
TMPS=()
cleanup() { local d; for d in "${TMPS[@]}"; do rm -rf --one-file-system "$d"; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---- busybox -----------------------------------------------------------------
BUSYBOX=
if [[ $(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null) == "install ok installed" ]]; then
    BUSYBOX=$(dpkg-query -L busybox-static | grep -m1 -E '/s?bin/busybox$')
fi
if [[ -z $BUSYBOX || ! -x $BUSYBOX ]]; then
    ver=$(apt-cache policy busybox-static 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [[ -z $ver || $ver == "(none)" ]]; then
        log "apt-get update (busybox-static unknown to apt)"
        apt-get update -qq >&2
        ver=$(apt-cache policy busybox-static | awk '/Candidate:/ {print $2}')
    fi
    [[ -n $ver && $ver != "(none)" ]] || die "apt knows no busybox-static package"
    dir=$OUT/busybox-static_${ver//:/%3a}
    if [[ ! -x $dir/bin/busybox ]]; then
        log "downloading busybox-static $ver"
        dl=$(mktemp -d "$OUT/.dl.XXXXXX")
        TMPS+=("$dl")
        chmod 0755 "$dl" # lets apt download as _apt (sandboxed)
        (cd "$dl" && apt-get download -q "busybox-static=$ver" >&2)
        dpkg-deb -x "$dl"/busybox-static_*.deb "$dl/x"
        rm -rf "$dir"
        mv -T "$dl/x" "$dir"
    fi
    BUSYBOX=$dir/bin/busybox
fi
"$BUSYBOX" true 2>/dev/null || die "$BUSYBOX does not run"

# ---- microvm-vsock (the guest's end of vsock streams) -----------------------
INIT_BIN=$("$HERE/../../init/build.sh" | tail -n1)
VSOCK_TOOL=${INIT_BIN%/*}/microvm-vsock-${INIT_BIN##*/microvm-init-}
[[ -x $VSOCK_TOOL ]] || die "init/build.sh left no $VSOCK_TOOL"

KEY=$({
    for f in build.sh init; do
        printf '%s\n' "$f"
        sha256sum <"$HERE/$f"
    done
    sha256sum <"$BUSYBOX"
    sha256sum <"$VSOCK_TOOL"
    sha256sum <"$INIT_BIN"
} | sha256sum | cut -c1-16)
GZ=$OUT/test-$KEY.cpio.gz
CPIO=$OUT/test-$KEY.cpio
RESULT=$([[ $FORMAT == gz ]] && echo "$GZ" || echo "$CPIO")

point_latest() {
    local n tmp
    for n in cpio cpio.gz; do
        tmp=$OUT/.test.$n.$$
        { ln -sfn "test-$KEY.$n" "$tmp" && mv -fT "$tmp" "$OUT/test.$n"; } 2>/dev/null || rm -f "$tmp"
    done
}

if [[ -f $GZ && -f $CPIO ]]; then
    log "cache hit: $RESULT"
    point_latest
    echo "$RESULT"
    exit 0
fi

# ---- staging tree ----------------------------------------------------------------
command -v cpio >/dev/null || {
    log "installing host package: cpio"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cpio >&2
}
stage=$(mktemp -d "$OUT/.stage.XXXXXX")
TMPS+=("$stage")
chmod 0755 "$stage"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,run}
chmod 1777 "$stage/tmp"
chmod 0700 "$stage/root"
install -m 0755 "$BUSYBOX" "$stage/bin/busybox"
install -m 0755 "$HERE/init" "$stage/init"
install -m 0755 "$VSOCK_TOOL" "$stage/bin/microvm-vsock"
install -m 0755 "$INIT_BIN" "$stage/bin/microvm-init"
# What `busybox --install -s` would do at boot, done here (saves ~270
# symlink(2) calls in a guest kernel that may be slow): one absolute symlink
# to /bin/busybox per applet, at the applet's usual path (/bin/sh, ...).
n=0
while read -r applet; do
    [[ -n $applet && ! -e $stage/$applet && ! -L $stage/$applet ]] || continue
    [[ $applet == */* ]] && mkdir -p "$stage/${applet%/*}"
    ln -s /bin/busybox "$stage/$applet"
    n=$((n + 1))
done < <("$BUSYBOX" --list-full)
[[ -L $stage/bin/sh ]] || die "no bin/sh applet in $BUSYBOX"
# Console and null for the moment before devtmpfs is mounted (the kernel opens
# /dev/console for PID 1). Needs root; the kernel's built-in initramfs
# usually provides /dev/console anyway.
if ! { mknod -m 600 "$stage/dev/console" c 5 1 && mknod -m 666 "$stage/dev/null" c 1 3; } 2>/dev/null; then
    log "warning: cannot mknod (not root?): archive has no /dev/console"
fi
log "staged busybox ($(du -k "$BUSYBOX" | cut -f1) KiB, $n applet links) + init"

# ---- archive (reproducible: fixed mtimes, owners, order) --------------------------
find "$stage" -exec touch -h -d @0 {} +
tmpc=$OUT/.test-$KEY.cpio.tmp.$$
tmpg=$OUT/.test-$KEY.cpio.gz.tmp.$$
TMPS+=("$tmpc" "$tmpg")
(cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) >"$tmpc"
gzip -9 -n -c "$tmpc" >"$tmpg"
mv -f "$tmpc" "$CPIO"
mv -f "$tmpg" "$GZ"
point_latest
log "built $CPIO ($(du -k "$CPIO" | cut -f1) KiB) and $GZ ($(du -k "$GZ" | cut -f1) KiB)"
echo "$RESULT"
