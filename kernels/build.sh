#!/usr/bin/env bash
# Build the microvm guest kernel (an uncompressed ELF vmlinux) from Debian's
# linux-source-6.1: tinyconfig + kernels/microvm.config + kernels/patches/.
#
#   K=$(kernels/build.sh | tail -1)
#
# The last line of stdout is the path of the vmlinux; progress goes to stderr.
# Results are cached under ${MICROVM_CACHE:-/var/cache/microvm}/kernel,
# keyed by the fragment, the patches, the source package version and this
# script, so a second run with the same inputs only prints the path.
#
# Options:
#   --config-only   configure and verify the fragment, build nothing
# Environment:
#   MICROVM_CACHE   cache root (default /var/cache/microvm)
#   KEEP_BUILD=1    keep the build tree after a successful build
#   VERBOSE=1       stream the kernel build output to stderr
set -euo pipefail
set -E # ERR trap in functions too

readonly SRC_PKG=linux-source-6.1
readonly SRC_TAR=/usr/src/linux-source-6.1.tar.xz
readonly BUILD_DEPS=(build-essential bc bison flex libelf-dev libssl-dev xz-utils cpio)
readonly ARCH=x86_64

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
readonly FRAGMENT=$HERE/microvm.config
readonly CACHE=${MICROVM_CACHE:-/var/cache/microvm}/kernel

CONFIG_ONLY=0
case "${1:-}" in
	"") ;;
	--config-only) CONFIG_ONLY=1 ;;
	*) echo "usage: $0 [--config-only]" >&2; exit 2 ;;
esac

# Everything goes to stderr except the final path (fd 3 is the real stdout).
exec 3>&1 1>&2

START=$SECONDS
STEP=start
STEP_START=$SECONDS
LOG=""

log() {
	printf '[%s +%4ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - START)) "$*" >&2
}

step() {
	if [[ $STEP != start ]]; then
		log "    $STEP done in $((SECONDS - STEP_START))s"
	fi
	STEP=$1
	STEP_START=$SECONDS
	log "==> $STEP"
}

on_error() {
	local rc=$?
	trap - ERR
	if [[ -n $LOG && -s $LOG ]]; then
		echo "---- last lines of $LOG ----" >&2
		tail -n 40 "$LOG" >&2
		echo "----" >&2
	fi
	log "FAILED at step '$STEP' (exit $rc, line ${1:-?})${LOG:+; full log: $LOG}"
	exit "$rc"
}
trap 'on_error $LINENO' ERR
on_signal() {
	trap - ERR
	log "interrupted at step '$STEP'; the next run resumes"
	exit 130
}
trap on_signal INT TERM

die() {
	trap - ERR
	log "FAILED at step '$STEP': $*"
	exit 1
}

# Run a command, sending its output to $LOG (or to stderr with VERBOSE=1).
run() {
	if [[ ${VERBOSE:-0} == 1 || -z $LOG ]]; then
		"$@" >&2
	else
		"$@" >>"$LOG" 2>&1
	fi
}

is_installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# ---------------------------------------------------------------------------
step "check build dependencies"
missing=()
for pkg in "$SRC_PKG" "${BUILD_DEPS[@]}"; do
	is_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
	[[ $(id -u) == 0 ]] || die "missing packages: ${missing[*]} (install them as root)"
	log "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >&2
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
[[ -f $SRC_TAR ]] || die "$SRC_TAR not found after installing $SRC_PKG"
[[ -f $FRAGMENT ]] || die "config fragment $FRAGMENT not found"

# ---------------------------------------------------------------------------
step "compute cache key"
shopt -s nullglob
PATCHES=("$HERE"/patches/*.patch)
shopt -u nullglob
SRC_VERSION=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
KEY=$(
	{
		echo "source $SRC_PKG $SRC_VERSION"
		echo "build.sh"; cat "${BASH_SOURCE[0]}"
		echo "fragment"; cat "$FRAGMENT"
		for p in "${PATCHES[@]}"; do
			echo "patch $(basename "$p")"; cat "$p"
		done
	} | sha256sum | cut -c1-12
)
readonly KEY
readonly OUT=$CACHE/vmlinux-$KEY
readonly WORK=$CACHE/build-$KEY
log "key $KEY ($SRC_PKG $SRC_VERSION, ${#PATCHES[@]} patches)"

mkdir -p "$CACHE"

# Point $CACHE/vmlinux at $OUT, atomically.
link_latest() {
	ln -sfn "$(basename "$OUT")" "$CACHE/vmlinux.tmp.$$"
	mv -fT "$CACHE/vmlinux.tmp.$$" "$CACHE/vmlinux"
}

if ((!CONFIG_ONLY)) && [[ -f $OUT ]]; then
	link_latest
	log "cached"
	echo "$OUT" >&3
	exit 0
fi

# One build per key at a time; a second caller waits and then finds $OUT.
exec 9>"$CACHE/build-$KEY.lock"
if ! flock -n 9; then
	log "another build of $KEY is running; waiting for it"
	flock 9
fi
if ((!CONFIG_ONLY)) && [[ -f $OUT ]]; then
	link_latest
	log "built by the other run"
	echo "$OUT" >&3
	exit 0
fi

# ---------------------------------------------------------------------------
# $WORK only ever holds a fully unpacked and patched tree: it is prepared
# under a temporary name and renamed when done, so an interrupted run leaves
# either nothing or a tree that `make` can simply resume.
SRC=$WORK/linux
if [[ ! -d $SRC ]]; then
	step "unpack $SRC_TAR"
	tmp=$WORK.tmp
	rm -rf "$tmp"
	mkdir -p "$tmp"
	tar -xJf "$SRC_TAR" -C "$tmp"
	[[ -d $tmp/$SRC_PKG ]] || die "$SRC_TAR has no top-level $SRC_PKG/"

	step "apply patches"
	for p in "${PATCHES[@]}"; do
		STEP="apply patch $(basename "$p")"
		log "    $(basename "$p")"
		patch -d "$tmp/$SRC_PKG" -p1 --forward --batch --fuzz=0 \
			--no-backup-if-mismatch -s <"$p" >&2
	done
	STEP="apply patches"
	mkdir -p "$WORK"
	mv -T "$tmp/$SRC_PKG" "$SRC"
	rm -rf "$tmp"
else
	log "resuming in $WORK"
fi
LOG=$WORK/build.log
: >"$LOG"

# ---------------------------------------------------------------------------
step "configure (tinyconfig + $(basename "$FRAGMENT"))"
KMAKE=(make -C "$SRC" ARCH="$ARCH" KBUILD_BUILD_USER=microvm KBUILD_BUILD_HOST=microvm)
run "${KMAKE[@]}" tinyconfig
run env -C "$SRC" scripts/kconfig/merge_config.sh -m .config "$FRAGMENT"
run "${KMAKE[@]}" olddefconfig

step "verify .config against the fragment"
# Every `CONFIG_X=value` line must be in .config verbatim, and every
# `# CONFIG_X is not set` must not have become =y/=m: a typo, a missing
# dependency or a renamed option fails here instead of silently.
bad=()
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		grep -qxF -- "$line" "$SRC/.config" ||
			bad+=("$line  (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$SRC/.config" || echo 'absent'))")
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		if grep -qE "^${BASH_REMATCH[1]}=[ym]$" "$SRC/.config"; then
			bad+=("$line  (got: $(grep -E "^${BASH_REMATCH[1]}=" "$SRC/.config"))")
		fi
	fi
done <"$FRAGMENT"
if ((${#bad[@]})); then
	log "options from $(basename "$FRAGMENT") that did not survive olddefconfig:"
	printf '    %s\n' "${bad[@]}" >&2
	die "${#bad[@]} option(s) not as requested (missing dependency or typo?)"
fi
log "    all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$FRAGMENT") fragment lines hold"

if ((CONFIG_ONLY)); then
	step "done"
	log "config-only: .config is $SRC/.config"
	echo "$SRC/.config" >&3
	exit 0
fi

# ---------------------------------------------------------------------------
step "build vmlinux (make -j$(nproc), log: $LOG)"
run "${KMAKE[@]}" -j"$(nproc)" vmlinux
[[ $(head -c4 "$SRC/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] ||
	die "$SRC/vmlinux is not an ELF file"

step "install into $CACHE"
cp "$SRC/.config" "$OUT.config"
cp "$SRC/vmlinux" "$OUT.tmp.$$"
mv -f "$OUT.tmp.$$" "$OUT"
link_latest
if [[ ${KEEP_BUILD:-0} != 1 ]]; then
	rm -rf "$WORK"
	rm -f "$CACHE/build-$KEY.lock"
fi
# Trees of other keys are left over from interrupted builds of older inputs;
# remove those nobody is building right now.
for lock in "$CACHE"/build-*.lock; do
	[[ -e $lock && $lock != "$CACHE/build-$KEY.lock" ]] || continue
	old=${lock%.lock}
	# Finished (KEEP_BUILD=1) trees are kept.
	[[ -f $CACHE/vmlinux-${old##*/build-} ]] && continue
	if flock -n "$old.lock" true; then
		log "removing stale ${old##*/}"
		rm -rf "$old" "$old.tmp" "$lock"
	fi
done

step "done"
log "$OUT ($(($(stat -c %s "$OUT") / 1024 / 1024)) MiB), total $((SECONDS - START))s"
echo "$OUT" >&3
