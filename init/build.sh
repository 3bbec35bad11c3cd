#!/usr/bin/env bash
# Build microvm-init, the guest's PID 1, as a static binary (no libc needed in
# the image it runs in), cached by its inputs; and beside it microvm-vsock,
# the guest's end of a vsock stream (a static tool for the test initramfs).
#
#   INIT=$(init/build.sh | tail -n1)
#
# Cache: ${MICROVM_CACHE:-/var/cache/microvm}/init/microvm-init-<key>, keyed by
# the init's sources, Cargo.lock, the profile and rustc's version; symlink
# microvm-init -> the latest; microvm-vsock-<key> beside it. A hit returns at
# once.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(cd "$HERE/.." && pwd)
OUT=${MICROVM_CACHE:-/var/cache/microvm}/init
TARGET=x86_64-unknown-linux-gnu
log() { printf '[init] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v cargo >/dev/null || die "cargo not found on PATH"
KEY=$({
    cd "$TOP"
    for f in init/build.sh init/Cargo.toml init/src/*.rs init/src/bin/*.rs Cargo.lock Cargo.toml; do
        printf '%s\n' "$f"
        sha256sum <"$f"
    done
    rustc -vV
} | sha256sum | cut -c1-16)
BIN=$OUT/microvm-init-$KEY

point_latest() {
    ln -sfn "microvm-init-$KEY" "$OUT/.microvm-init.$$" && mv -fT "$OUT/.microvm-init.$$" "$OUT/microvm-init"
}

if [[ -x $BIN && -x $OUT/microvm-vsock-$KEY ]]; then
    log "cache hit: $BIN"
    point_latest
    echo "$BIN"
    exit 0
fi

mkdir -p "$OUT"
log "building (static, $TARGET)"
# Its own target directory: other RUSTFLAGS would rebuild the VMM's deps.
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=$TOP/target/init \
    cargo build --release --locked -q --target "$TARGET" -p microvm-init --bins >&2
for name in microvm-vsock microvm-init; do
    built=$TOP/target/init/$TARGET/release/$name
    # A dynamic binary would not run in an image without libc.
    if readelf -lW "$built" | grep -q 'Requesting program interpreter'; then
        die "$built is not static"
    fi
    tmp=$OUT/.$name-$KEY.$$
    install -m 0755 "$built" "$tmp"
    strip "$tmp" 2>/dev/null || true
    mv -f "$tmp" "$OUT/$name-$KEY"
done
point_latest
log "ready: $BIN ($(du -h "$BIN" | cut -f1))"
echo "$BIN"
