#!/usr/bin/env python3
"""Exits per boot and boot to init, by console (scripts/bench-console runs it).

Boots the test initramfs to power-off, round-robin over the variants so that
host noise spreads over all of them, and prints a markdown table of medians
(min-max): KVM exits to user space per boot, process start to the init's
first user-space instruction that we can see (the boot timer's
Guest-boot-time, written by the init before it prints anything, so it is
the same point with or without a console), and process start to exit. Then
for each variant the addresses that cost the most exits in its median run.

A variant is MODE[+ARG...][@BINARY]: --console MODE with the kernel
parameters ARG added (e.g. virtio+i8042.noprobe) to measure what one
parameter saves, run with BINARY instead of BENCH_MICROVM (a build from
before a change, beside the current one). The variant `firecracker` (with
FIRECRACKER set) boots the same kernel and initramfs in Firecracker with
microvm's `--console serial` command line, for the side-by-side figure.

Every variant also gets "spawn to marker": process start to the init's
first console line read from the VMM's stdout pipe, the one point all VMMs
share (Firecracker has no Guest-boot-time here); with a serial console that
includes what each VMM's UART path costs, byte by byte.

Environment: MICROVM_KERNEL, MICROVM_TEST_INITRD (required), BENCH_MICROVM
(the binary), BENCH_RUNS [5], BENCH_CONSOLE_VARIANTS [virtio,serial,none],
BENCH_GUEST_CMDLINE (added to every boot), BENCH_BOOT_TIMEOUT [120],
FIRECRACKER (a firecracker binary, for the `firecracker` variant).
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

MICROVM = os.environ["BENCH_MICROVM"]
KERNEL = os.environ["MICROVM_KERNEL"]
INITRD = os.environ["MICROVM_TEST_INITRD"]
RUNS = int(os.environ.get("BENCH_RUNS") or 5)
VARIANTS = [v for v in (os.environ.get("BENCH_CONSOLE_VARIANTS") or "virtio,serial,none").split(",") if v]
EXTRA = os.environ.get("BENCH_GUEST_CMDLINE", "").split()
TIMEOUT = float(os.environ.get("BENCH_BOOT_TIMEOUT") or 120)


MARKER = b"microvm-test-init: hello from userspace"
FIRECRACKER = os.environ.get("FIRECRACKER", "")


def spawn_timed(argv, env=None):
    """Run argv to its end, stdout read as it comes; (returncode, stderr,
    wall ms, ms from spawn to the marker line or None)."""
    err = tempfile.TemporaryFile()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    marker = None
    for line in p.stdout:
        if marker is None and MARKER in line:
            marker = (time.monotonic() - t0) * 1000
    rc = p.wait(timeout=TIMEOUT + 60)
    wall = (time.monotonic() - t0) * 1000
    err.seek(0)
    return rc, err.read().decode(errors="replace"), wall, marker


def serial_cmdline():
    """microvm's kernel command line with --console serial (its debug log)."""
    argv = [MICROVM, "--kernel", KERNEL, "--initrd", INITRD, "--console", "serial", "--timeout", "0.5"]
    p = subprocess.run(argv, env=dict(os.environ, RUST_LOG="debug"), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60)
    m = re.search(r"kernel command line: (.*)$", p.stderr, re.M)
    if not m:
        raise RuntimeError("microvm did not log its kernel command line")
    return " ".join(w for w in m.group(1).split() if not w.startswith("virtio_mmio.device="))


def boot_firecracker():
    cfg = {"boot-source": {"kernel_image_path": KERNEL, "initrd_path": INITRD,
                           "boot_args": " ".join(serial_cmdline().split() + EXTRA)},
           "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": False}, "drives": []}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    try:
        rc, err, wall, marker = spawn_timed([FIRECRACKER, "--no-api", "--config-file", f.name,
                                             "--level", "Warning"])
    finally:
        os.unlink(f.name)
    if marker is None:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise RuntimeError(f"firecracker: exit {rc}, no init marker: {tail}")
    return {"exits": None, "init_ms": None, "startup_ms": None, "marker_ms": marker, "wall_ms": wall,
            "line": "(Firecracker: not counted)", "where": ""}


def boot(variant):
    if variant == "firecracker":
        return boot_firecracker()
    spec, _, binary = variant.partition("@")
    mode, *args = spec.split("+")
    cmdline = " ".join(EXTRA + args)
    argv = [binary or MICROVM, "--kernel", KERNEL, "--initrd", INITRD, "--console", mode,
            "--timeout", str(TIMEOUT)] + (["--cmdline", cmdline] if cmdline else [])
    rc, err, wall, marker = spawn_timed(argv, dict(os.environ, RUST_LOG="info"))
    total = re.search(r"KVM exits: total=(\d+)", err)
    init = re.search(r"Guest-boot-time = (\d+) us", err)
    where = re.search(r"KVM exits by address: (.*)", err)
    startup = re.search(r"VMM startup: (\d+) us", err)
    if rc != 0 or not total or not init:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise RuntimeError(f"{variant}: exit {rc}, no figures: {tail}")
    return {"exits": int(total.group(1)), "init_ms": int(init.group(1)) / 1000,
            "startup_ms": int(startup.group(1)) / 1000 if startup else None,
            "marker_ms": marker, "wall_ms": wall,
            "line": re.search(r"KVM exits: (total=.*)", err).group(1),
            "where": where.group(1) if where else ""}


def fmt(values, unit=""):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    digits = 0 if med >= 100 else 1
    return f"{med:.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main():
    results = {v: [] for v in VARIANTS}
    for run in range(RUNS):
        for v in VARIANTS:
            print(f"[bench-console] run {run + 1}/{RUNS}: {v}", file=sys.stderr, flush=True)
            r = boot(v)
            results[v].append(r)
            # As it comes, so a run cut short (an L1 stall) still tells something.
            print(f"[bench-console] run {run + 1}/{RUNS}: {v}: spawn to marker {r['marker_ms']:.0f} ms"
                  + (f", startup {r['startup_ms']:.0f} ms" if r["startup_ms"] is not None else ""),
                  file=sys.stderr, flush=True)
    base = "none" if "none" in results else None
    print(f"Test initramfs booted to power-off, {RUNS} runs per variant, medians (min-max).")
    print(f"Kernel parameters added to every boot: `{' '.join(EXTRA) or '(none)'}`.\n")
    print("| variant | KVM exits to user space | process start to first KVM_RUN (ms) "
          "| process start to init (ms) | vs `none` "
          "| spawn to marker (ms) | vs `firecracker` | process start to exit (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    base_init = statistics.median(r["init_ms"] for r in results[base]) if base else None
    fc = results.get("firecracker")
    fc_marker = statistics.median(r["marker_ms"] for r in fc) if fc else None
    for v, rs in results.items():
        init = [r["init_ms"] for r in rs]
        rel = "-"
        if base_init and None not in init:
            rel = f"{(statistics.median(init) / base_init - 1) * 100:+.1f}%"
        marker = [r["marker_ms"] for r in rs if r["marker_ms"] is not None]
        vs_fc = f"{statistics.median(marker) / fc_marker:.2f}x" if fc_marker and marker else "-"
        print(f"| `{v}` | {fmt([r['exits'] for r in rs])} | {fmt([r['startup_ms'] for r in rs])} "
              f"| {fmt(init)} | {rel} | {fmt(marker)} | {vs_fc} "
              f"| {fmt([r['wall_ms'] for r in rs])} |")
    if fc:
        print("\nPer round, spawn to marker vs Firecracker's in the same round (ratios):\n")
        for v, rs in results.items():
            if v == "firecracker":
                continue
            ratios = [r["marker_ms"] / f["marker_ms"] for r, f in zip(rs, fc) if r["marker_ms"]]
            slower = sum(1 for x in ratios if x > 1)
            print(f"- `{v}`: median {statistics.median(ratios):.3f}x, slower in {slower} of {len(ratios)} rounds")
    print("\nWhere the exits of each variant's median run went (`KVM exits` and `by address` log lines):\n")
    for v, rs in results.items():
        if v == "firecracker":
            continue
        mid = sorted(rs, key=lambda r: r["exits"])[len(rs) // 2]
        print(f"- `{v}`: {mid['line']}; top addresses: {mid['where']}")


if __name__ == "__main__":
    main()
