#!/usr/bin/env bash
# Build the microvm guest root filesystem: Debian bookworm minbase with
# python3-flask, the app in /app and microvm-init (init/, a static binary, the
# same init `microvm image build` puts in images) as /sbin/init, as an ext4 image.
#
#   rootfs/build.sh            -> last stdout line: path of the ext4 image
#
# Cache (MICROVM_CACHE, default /var/cache/microvm):
#   rootfs/base-<bkey>/        debootstrap'd tree, keyed by suite + packages
#                              (+ BASE_RECIPE); rebuilt only when those change
#   rootfs/app-<key>.ext4      image, keyed by this script, the init binary,
#                              app files, suite + packages; a hit returns at once
#   rootfs/app.ext4            symlink to the image of the latest run
#   rootfs/debs/               downloaded .debs (debootstrap --cache-dir)
#   rootfs/debootstrap.log     log of the last debootstrap
# Images are built under a temporary name and renamed when complete.
#
# The cached image is the pristine one: a VM writes to the disk it boots, so
# callers that boot it read-write must boot a copy:
#   cp --reflink=auto "$(rootfs/build.sh | tail -n1)" /tmp/vm-disk.ext4
#
# Needs root when it has to build (debootstrap, device nodes, ownership) and
# the Debian mirror that this host's apt uses (or MICROVM_DEBIAN_MIRROR).
set -euo pipefail

SUITE=bookworm
PACKAGES=(python3-flask busybox-static iproute2)
BASE_RECIPE=1 # bump when the debootstrap or clean-up steps below change

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MICROVM_CACHE:-/var/cache/microvm}
OUT=$CACHE/rootfs

T0=${EPOCHREALTIME/[.,]/}
log() {
    local now=${EPOCHREALTIME/[.,]/} ms
    ms=$(((now - T0) / 1000))
    printf '[rootfs %4d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*" >&2
}
die() { log "error: $*"; exit 1; }

# ---- cache keys ---------------------------------------------------------------
sha() { sha256sum | cut -c1-16; }
APP_FILES=()
while IFS= read -r -d '' f; do APP_FILES+=("$f"); done \
    < <(cd "$HERE" && find app -type f ! -name '*.pyc' ! -path '*/__pycache__/*' ! -name Dockerfile -print0 | LC_ALL=C sort -z)
[[ -f $HERE/app/app.py ]] || die "missing $HERE/app/app.py"
# The guest init, built static and cached by its own inputs (init/build.sh).
INIT_BIN=$("$HERE/../init/build.sh" | tail -n1)
[[ -x $INIT_BIN ]] || die "init/build.sh did not produce the init binary"

# What the init runs: the Dockerfile's CMD, ENV, WORKDIR and EXPOSE
# (app/Dockerfile), in the init's config format (rootfs/README.md).
INIT_CONF='# microvm-init config v1
cmd python3
cmd /app/app.py
env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
env LANG=C.UTF-8
env PYTHONUNBUFFERED=1
workdir /app
port 80
'

BASE_KEY=$(printf '%s\n' "suite=$SUITE" "recipe=$BASE_RECIPE" "arch=amd64" "${PACKAGES[@]}" | sha)
KEY=$({
    for f in build.sh "${APP_FILES[@]}"; do
        printf '%s\n' "$f"
        sha256sum <"$HERE/$f"
    done
    printf 'init\n'
    sha256sum <"$INIT_BIN"
    printf '%s' "$INIT_CONF" | sha256sum
    printf '%s\n' "base=$BASE_KEY"
} | sha)
IMAGE=$OUT/app-$KEY.ext4
BASE=$OUT/base-$BASE_KEY

point_latest() { # atomically repoint $OUT/app.ext4 -> app-$KEY.ext4
    local tmp=$OUT/.app.ext4.$$
    { ln -sfn "app-$KEY.ext4" "$tmp" && mv -fT "$tmp" "$OUT/app.ext4"; } 2>/dev/null ||
        { rm -f "$tmp" 2>/dev/null; log "note: could not update $OUT/app.ext4"; }
}

if [[ -f $IMAGE ]]; then
    log "cache hit: $IMAGE"
    point_latest
    echo "$IMAGE"
    exit 0
fi

# ---- from here on we build ----------------------------------------------------
[[ $EUID -eq 0 ]] || die "building needs root (debootstrap, device nodes, file ownership); run as root or point MICROVM_CACHE at a cache that has app-$KEY.ext4"
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
if ! flock -n 9; then
    log "waiting for another build ($OUT/.lock)"
    flock 9
fi
if [[ -f $IMAGE ]]; then # built by the run we waited for
    log "cache hit: $IMAGE"
    point_latest
    echo "$IMAGE"
    exit 0
fi

# Temporary paths, removed on exit. Anything debootstrap left mounted below
# them is unmounted first, and rm never crosses into another file system.
TMPS=()
cleanup() {
    local d m
    for d in "${TMPS[@]}"; do
        [[ -e $d ]] || continue
        if [[ -d $d ]]; then
            { findmnt -rn -o TARGET | awk -v p="$d/" 'index($0 "/", p) == 1' | sort -r |
                while read -r m; do umount -l "$m" 2>/dev/null || true; done; } || true
            rm -rf --one-file-system "$d" 2>/dev/null || log "warning: could not remove $d"
        else
            rm -f "$d"
        fi
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# Host tools: install what is missing (apt-get update only when installing).
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
{ command -v mkfs.ext4 && command -v e2fsck; } >/dev/null || missing+=(e2fsprogs)
if ((${#missing[@]})); then
    log "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# The Debian mirror this host's apt uses for $SUITE (this machine may reach
# nothing else). Override: MICROVM_DEBIAN_MIRROR=http://.../debian
MIRROR=${MICROVM_DEBIAN_MIRROR:-}
KEYRING=
find_mirror() {
    local f type rest opts uri suite
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        while read -r type rest; do
            [[ $type == deb ]] || continue
            opts=
            if [[ $rest == \[* ]]; then
                opts=${rest%%]*}
                rest=${rest#*]}
            fi
            read -r uri suite _ <<<"$rest"
            if [[ $suite == "$SUITE" ]]; then
                MIRROR=$uri
                [[ $opts =~ signed-by=([^ \]]+) ]] && KEYRING=${BASH_REMATCH[1]}
                return 0
            fi
        done <"$f"
    done
    # deb822 (*.sources): stanzas separated by blank lines
    local line key val types uris suites enabled signed
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        types= uris= suites= enabled=yes signed=
        while :; do
            line=
            IFS= read -r line || [[ -n $line ]] || line=$'\x04' # EOF sentinel
            if [[ -z ${line//[[:space:]]/} || $line == $'\x04' ]]; then
                if [[ " $types " == *" deb "* && " $suites " == *" $SUITE "* && $enabled != no && -n $uris ]]; then
                    read -r MIRROR _ <<<"$uris"
                    [[ $signed == /* ]] && KEYRING=$signed
                    return 0
                fi
                types= uris= suites= enabled=yes signed=
                [[ $line == $'\x04' ]] && break
                continue
            fi
            [[ $line == \#* || $line == [[:space:]]* ]] && continue
            key=${line%%:*}
            val=${line#*:}
            val=${val#"${val%%[![:space:]]*}"}   # trim leading blanks
            val=${val%"${val##*[![:space:]]}"}   # trim trailing blanks
            case ${key,,} in
                types) types=$val ;;
                uris) uris=$val ;;
                suites) suites=$val ;;
                enabled) enabled=${val,,} ;;
                signed-by) signed=$val ;;
            esac
        done <"$f"
    done
    return 1
}
if [[ -z $MIRROR ]]; then
    find_mirror || die "no apt source for suite '$SUITE' in /etc/apt/sources.list{,.d/*}; set MICROVM_DEBIAN_MIRROR"
fi
# Use apt's proxy too, if it has one and the environment has none.
if [[ -z ${http_proxy:-} ]]; then
    eval "$(apt-config shell APT_HTTP_PROXY Acquire::http::Proxy 2>/dev/null)" || true
    [[ -n ${APT_HTTP_PROXY:-} && ${APT_HTTP_PROXY:-} != DIRECT ]] && export http_proxy=$APT_HTTP_PROXY
fi

# ---- base tree: debootstrap (slow; cached by suite + package list) -------------
clean_tree() { # shrink a debootstrap'd tree; keeps copyright files and .pyc
    local r=$1
    rm -rf "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
        "$r"/var/lib/apt/lists/* "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old \
        "$r"/usr/share/man "$r"/usr/share/info "$r"/usr/share/groff "$r"/usr/share/lintian \
        "$r"/usr/share/linda "$r"/usr/share/bug
    mkdir -p "$r"/var/lib/apt/lists/partial
    find "$r"/usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
    find "$r"/usr/share/doc -mindepth 1 -type d -empty -delete
    find "$r"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    find "$r"/var/log -type f -delete
}

if [[ -d $BASE ]]; then
    log "base tree cached: $BASE"
else
    tmpbase=$(mktemp -d "$OUT/.base-$BASE_KEY.XXXXXX")
    TMPS+=("$tmpbase")
    chmod 0755 "$tmpbase" # becomes the image's / : not mktemp's 0700
    mkdir -p "$OUT/debs"
    dlog=$OUT/debootstrap.log
    log "debootstrap $SUITE minbase + ${PACKAGES[*]} from $MIRROR (a few minutes; log: $dlog)"
    pkgs=$(IFS=,; echo "${PACKAGES[*]}")
    if ! debootstrap --variant=minbase --arch=amd64 --components=main \
        --include="$pkgs" --cache-dir="$OUT/debs" ${KEYRING:+--keyring="$KEYRING"} \
        "$SUITE" "$tmpbase" "$MIRROR" >"$dlog" 2>&1; then
        tail -n 30 "$dlog" >&2
        die "debootstrap failed (full log: $dlog)"
    fi
    log "debootstrap done"
    # Leftover mounts (debootstrap unmounts on success) must not get copied.
    if findmnt -rn -o TARGET | grep -q "^$tmpbase/"; then
        die "file systems still mounted below $tmpbase"
    fi
    clean_tree "$tmpbase"
    # Sanity: the app's stack must import (-B: write no bytecode).
    chroot "$tmpbase" /usr/bin/python3 -B -c 'import flask' ||
        die "python3 -c 'import flask' fails in the new tree"
    chroot "$tmpbase" /bin/busybox true || die "no /bin/busybox in the new tree"
    mv -T "$tmpbase" "$BASE"
    log "base tree ready: $BASE ($(du -sh "$BASE" | cut -f1))"
fi

# ---- image: copy base, add app + init, mkfs.ext4 -d (seconds) -------------------
stage=$(mktemp -d "$OUT/.stage-$KEY.XXXXXX")
TMPS+=("$stage")
root=$stage/root
log "copying base tree"
cp -a --reflink=auto "$BASE" "$root"

mkdir -p "$root/app"
for f in "${APP_FILES[@]}"; do
    install -D -m 0644 "$HERE/$f" "$root/$f"
done
rm -f "$root/sbin/init" # /sbin -> usr/sbin in bookworm (merged /usr)
install -m 0755 "$INIT_BIN" "$root/sbin/microvm-init"
ln -s microvm-init "$root/sbin/init" # the kernel's default init, no init= needed
install -d -m 0755 "$root/etc/microvm"
printf '%s' "$INIT_CONF" >"$root/etc/microvm/init.conf"
# debootstrap copied the build host's hostname and resolv.conf: replace them.
echo microvm >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tmicrovm\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
# The kernel's `ip=` autoconfiguration publishes DNS servers there.
rm -f "$root/etc/resolv.conf"
ln -s /proc/net/pnp "$root/etc/resolv.conf"

# Size: used space + 25% + 64 MiB (journal, metadata, room for the guest to
# write); inodes: files + 50% + 8192.
used_kib=$(du -sk -x "$root" | cut -f1)
nfiles=$(find "$root" -xdev | wc -l)
inodes=$((nfiles + nfiles / 2 + 8192))
size_mib=$(((used_kib * 5 / 4 + inodes / 4 + 1023) / 1024 + 64))
tmpimg=$OUT/.app-$KEY.ext4.tmp.$$
TMPS+=("$tmpimg")
log "mkfs.ext4: ${used_kib} KiB in $nfiles files -> ${size_mib} MiB image"
# 4 KiB blocks (mke2fs would pick 1 KiB for a "small" fs); no metadata_csum
# (software crc32c is costly where the guest kernel is interpreted); inode
# tables and journal zeroed now so the guest kernel has no lazy init to do.
mkfs.ext4 -q -F -L rootfs -d "$root" -b 4096 -I 256 -N "$inodes" -m 0 \
    -O ^metadata_csum -E lazy_itable_init=0,lazy_journal_init=0 \
    "$tmpimg" "${size_mib}M" >&2
e2fsck -fn "$tmpimg" >/dev/null 2>&1 || { e2fsck -fn "$tmpimg" >&2 || true; die "e2fsck reports problems in the new image"; }
mv -f "$tmpimg" "$IMAGE"
point_latest
log "image ready: $IMAGE ($(du -h --apparent-size "$IMAGE" | cut -f1) apparent, $(du -h "$IMAGE" | cut -f1) allocated)"
echo "$IMAGE"
