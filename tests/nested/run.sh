#!/usr/bin/env bash
# Run a command on normal KVM: inside an L1 guest of QEMU's TCG (which emulates
# AMD SVM), where kvm-amd gives a hardware-style /dev/kvm. The L1 sees this
# host's root filesystem read-only at the same paths (virtio-9p), with its own
# tmpfs /tmp, /run, /var/tmp and /dev/shm, so binaries, test executables, the
# guest artifacts in the cache and the repo are where they are here.
# Directories under those four that the job needs are shared into the L1 as
# extra read-only 9p mounts at the same paths: this checkout, the current
# directory, $CARGO_TARGET_DIR, $MICROVM_CACHE, the directories of
# $MICROVM_KERNEL, $MICROVM_INIT, $MICROVM_TEST_INITRD, $MICROVM_ROOTFS and
# $MICROVM_ROOTFS_TREE, and each --share DIR. (A checkout under /tmp was
# invisible in the L1 before: every suite ended with `cd: No such file or
# directory`.)
#
#   tests/nested/run.sh [--timeout S] [--stall S] [--mem MiB] [--cpu MODEL]
#                       [--out DIR] [--share DIR]... -- COMMAND [ARGS...]
#
# COMMAND runs as root in the current directory under bash, with CI, HOME=/tmp
# and every MICROVM_*, BENCH_*, FIRECRACKER, RUST_LOG and RUST_BACKTRACE
# variable of this environment, plus MICROVM_NESTED=1. Its output streams to
# stdout here; the exit status is COMMAND's. The host's tree is read-only in
# the L1: files COMMAND writes into $MICROVM_NESTED_OUT are copied to DIR
# (--out) when it ends.
# --cpu: the L1's QEMU CPU model [max,-xsave]. QEMU 7.2's TCG does not
# intercept XSETBV for a nested guest, so without -xsave every L2 guest needs
# `noxsave`; Firecracker refuses to start without XSAVE in the L1 (it needs
# KVM_CAP_XCRS), so its benchmark lane uses `--cpu max` and `noxsave` guests.
# If nested KVM cannot be had (no QEMU, no SVM under TCG): exit 1 with a message
# when CI=true, else a loud SKIPPED line and exit 0.
# Every QEMU run is bounded: --timeout (default 1800 s) in all, --stall
# (default 600 s) without any new output from the L1 or the job, and 180 s in
# which QEMU uses no CPU (a stalled L1: its vCPU halted for good, seen under
# heavy host load). A run stopped for any of these exits 3.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TIMEOUT=1800
STALL=600
MEM=3072
CPU=max,-xsave
OUT=
SHARE=()
while (($#)); do
    case $1 in
        --timeout) TIMEOUT=$2; shift 2 ;;
        --stall) STALL=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --cpu) CPU=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --share) [[ -d $2 ]] || { echo "$0: --share $2: not a directory" >&2; exit 2; }
            SHARE+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--timeout S] [--stall S] [--mem MiB] [--cpu MODEL] [--out DIR] [--share DIR]... -- COMMAND [ARGS...]" >&2; exit 2 ;;
    esac
done
(($#)) || { echo "usage: $0 [--timeout S] [--stall S] [--mem MiB] [--cpu MODEL] [--out DIR] [--share DIR]... -- COMMAND [ARGS...]" >&2; exit 2; }

log() { printf '[nested] %s\n' "$*" >&2; }
unavailable() {
    if [[ ${CI:-} == true ]]; then
        log "error: nested normal-KVM lane unavailable in CI: $*"
        exit 1
    fi
    printf '\n*** SKIPPED: nested normal-KVM lane: %s ***\n\n' "$*" >&2
    exit 0
}

command -v qemu-system-x86_64 >/dev/null || unavailable "qemu-system-x86_64 not installed (scripts/deps.sh installs qemu-system-x86)"
L1=$("$HERE/build-l1.sh" | tail -n1)
[[ -f $L1/vmlinuz && -f $L1/l1.cpio ]] || unavailable "L1 kernel/initramfs not built"

# ---- what the L1 must see beyond its host root -----------------------------------
# The L1 mounts its own tmpfs on these (scratch space for the job); anything
# the job reads from under them on this host is shared explicitly.
HIDDEN=(/tmp /run /var/tmp /dev/shm)
under_hidden() {
    local h
    for h in "${HIDDEN[@]}"; do
        [[ $1 == "$h" || $1 == "$h"/* ]] && return 0
    done
    return 1
}
want=("$HERE/../.." "$PWD" "${SHARE[@]}")
for v in CARGO_TARGET_DIR MICROVM_CACHE; do
    [[ -n ${!v:-} ]] && want+=("${!v}")
done
for v in MICROVM_KERNEL MICROVM_INIT MICROVM_TEST_INITRD MICROVM_ROOTFS MICROVM_ROOTFS_TREE; do
    [[ -n ${!v:-} && -e ${!v} ]] || continue
    if [[ -d ${!v} ]]; then want+=("${!v}"); else want+=("$(dirname -- "${!v}")"); fi
done
shares=() # absolute paths as the job sees them, outermost only
for d in "${want[@]}"; do
    [[ -d $d ]] || continue
    d=$(cd -- "$d" && pwd -P)
    under_hidden "$d" || continue
    for h in "${HIDDEN[@]}"; do
        [[ $d == "$h" ]] && { log "error: cannot share $d itself into the L1 (it needs its own scratch $d); move the checkout or the target dir below it"; exit 2; }
    done
    shares+=("$d")
done
if ((${#shares[@]})); then
    mapfile -t shares < <(printf '%s\n' "${shares[@]}" | LC_ALL=C sort -u |
        awk '{ for (i = 1; i <= n; i++) if (index($0, keep[i] "/") == 1) next; keep[++n] = $0; print }')
fi

JOB=$(mktemp -d /tmp/microvm-l1.XXXXXX)
QPID=
cleanup() {
    [[ -n $QPID ]] && kill -KILL "$QPID" 2>/dev/null || true
    rm -rf --one-file-system "$JOB"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

{
    echo '#!/bin/bash'
    printf 'cd %q || exit 1\n' "$PWD"
    echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp MICROVM_NESTED=1'
    # Loopback up; and since the L1 has no NIC, an unconnected TAP with a
    # default route stands in for one: passt takes its addresses from the
    # interface with the default route and refuses to start without. No frame
    # leaves it (nothing reads the TAP).
    echo 'ip link set lo up'
    echo 'ip tuntap add dev l1ext0 mode tap && ip addr add 192.0.2.2/24 dev l1ext0 && ip link set l1ext0 up && ip route add default via 192.0.2.1 2>/dev/null'
    while IFS='=' read -r name _; do
        [[ $name =~ ^(MICROVM_[A-Z0-9_]+|BENCH_[A-Z0-9_]+|CI|RUST_LOG|RUST_BACKTRACE|FIRECRACKER)$ ]] || continue
        printf 'export %s=%q\n' "$name" "${!name}"
    done < <(env)
    printf 'export MICROVM_NESTED_OUT=%q\n' "$JOB/out"
    printf '%q ' "$@"
    printf '>%q 2>&1\n' "$JOB/output"
    printf 'echo $? >%q\n' "$JOB/status"
} >"$JOB/job.sh"
: >"$JOB/output"
mkdir "$JOB/out"
# Extra read-only 9p mounts, one "TAG PATH" line each, for l1-init.
share_args=()
: >"$JOB/shares"
for i in "${!shares[@]}"; do
    d=${shares[$i]}
    [[ $d == *$'\n'* ]] && { log "error: cannot share a path with a newline: $d"; exit 2; }
    share_args+=(-fsdev "local,id=share$i,path=${d//,/,,},security_model=none,readonly=on,multidevs=remap"
        -device "virtio-9p-pci,fsdev=share$i,mount_tag=share$i")
    printf 'share%s %s\n' "$i" "$d" >>"$JOB/shares"
done
((${#shares[@]} == 0)) || log "sharing into the L1 (read-only, same paths): ${shares[*]}"

log "L1: $(cat "$L1/kernel-package" 2>/dev/null), TCG -cpu $CPU, 1 vCPU, $MEM MiB; running: $*"
t0=$SECONDS
# One L1 vCPU: two were flaky.
qemu-system-x86_64 -accel tcg -cpu "$CPU" -smp 1 -m "$MEM" \
    -nographic -nic none -no-reboot -nodefaults -serial "file:$JOB/console.log" \
    -kernel "$L1/vmlinuz" -initrd "$L1/l1.cpio" \
    -append "console=ttyS0 panic=-1 loglevel=4 edd=off l1.job=$JOB" \
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev "local,id=job,path=$JOB,security_model=none" \
    -device virtio-9p-pci,fsdev=job,mount_tag=job \
    "${share_args[@]}" \
    </dev/null >"$JOB/qemu.out" 2>&1 &
QPID=$!

# Stream the job's output; stop QEMU past the deadline or after a silent stall.
shown=0
cpu_ticks() { awk '{print $14 + $15}' "/proc/$QPID/stat" 2>/dev/null || echo 0; }
last_cpu=$(cpu_ticks) last_cpu_change=$SECONDS
hz=$(getconf CLK_TCK)
last_change=$SECONDS
last_sizes=
why=
while kill -0 "$QPID" 2>/dev/null; do
    sleep 2
    size=$(stat -c %s "$JOB/output")
    if ((size > shown)); then
        tail -c +$((shown + 1)) "$JOB/output" | head -c $((size - shown))
        shown=$size
    fi
    sizes="$size $(stat -c %s "$JOB/console.log" 2>/dev/null || echo 0)"
    if [[ $sizes != "$last_sizes" ]]; then
        last_sizes=$sizes
        last_change=$SECONDS
    fi
    if ((SECONDS - t0 > TIMEOUT)); then why="timed out after $TIMEOUT s"; fi
    if ((SECONDS - last_change > STALL)); then why="no output for $STALL s"; fi
    cpu=$(cpu_ticks)
    if ((cpu - last_cpu > hz)); then
        last_cpu=$cpu last_cpu_change=$SECONDS
    elif ((SECONDS - last_cpu_change > 180)); then
        why="the L1 used no CPU for 180 s (stalled)"
    fi
    if [[ -n $why ]]; then
        kill -KILL "$QPID" 2>/dev/null || true
        break
    fi
done
wait "$QPID" 2>/dev/null || true
QPID=
size=$(stat -c %s "$JOB/output")
((size > shown)) && tail -c +$((shown + 1)) "$JOB/output"

if [[ -n $OUT ]] && [[ -n $(ls -A "$JOB/out") ]]; then
    mkdir -p "$OUT"
    cp -a "$JOB/out/." "$OUT/"
    log "copied the job's output files to $OUT"
fi
status=$(cat "$JOB/status" 2>/dev/null || true)
log "L1 ran $((SECONDS - t0)) s${why:+ ($why)}; job status: ${status:-none}"
if [[ $status == nokvm ]]; then
    tail -n 20 "$JOB/console.log" >&2 || true
    unavailable "the L1 kernel got no /dev/kvm (QEMU without SVM emulation?)"
fi
if [[ ! $status =~ ^[0-9]+$ ]]; then
    log "error: the job did not finish${why:+ ($why)}; last L1 console lines:"
    tail -n 40 "$JOB/console.log" >&2 || true
    cat "$JOB/qemu.out" >&2 || true
    [[ -n $why ]] && exit 3
    exit 1
fi
exit "$status"
