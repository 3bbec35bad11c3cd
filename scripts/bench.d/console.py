#!/usr/bin/env python3
"""Exits per boot and boot to init, by console (scripts/bench-console runs it).

Boots the test initramfs to power-off, round-robin over the variants so that
host noise spreads over all of them, and prints a markdown table of medians
(min-max): KVM exits to user space per boot, process start to the init's
first user-space instruction that we can see (the boot timer's
Guest-boot-time, written by the init before it prints anything, so it is
the same point with or without a console), and process start to exit. Then
for each variant the addresses that cost the most exits in its median run.

A variant is MODE[+ARG...]: --console MODE with the kernel parameters ARG
added (e.g. virtio+i8042.noprobe) to measure what one parameter saves.

Environment: MICROVM_KERNEL, MICROVM_TEST_INITRD (required), BENCH_MICROVM
(the binary), BENCH_RUNS [5], BENCH_CONSOLE_VARIANTS [virtio,serial,none],
BENCH_GUEST_CMDLINE (added to every boot), BENCH_BOOT_TIMEOUT [120].
"""
import os
import re
import statistics
import subprocess
import sys
import time

MICROVM = os.environ["BENCH_MICROVM"]
KERNEL = os.environ["MICROVM_KERNEL"]
INITRD = os.environ["MICROVM_TEST_INITRD"]
RUNS = int(os.environ.get("BENCH_RUNS") or 5)
VARIANTS = [v for v in (os.environ.get("BENCH_CONSOLE_VARIANTS") or "virtio,serial,none").split(",") if v]
EXTRA = os.environ.get("BENCH_GUEST_CMDLINE", "").split()
TIMEOUT = float(os.environ.get("BENCH_BOOT_TIMEOUT") or 120)


def boot(variant):
    mode, *args = variant.split("+")
    cmdline = " ".join(EXTRA + args)
    argv = [MICROVM, "--kernel", KERNEL, "--initrd", INITRD, "--console", mode,
            "--timeout", str(TIMEOUT)] + (["--cmdline", cmdline] if cmdline else [])
    env = dict(os.environ, RUST_LOG="info")
    t0 = time.monotonic()
    p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=TIMEOUT + 60)
    wall = time.monotonic() - t0
    err = p.stderr
    total = re.search(r"KVM exits: total=(\d+)", err)
    init = re.search(r"Guest-boot-time = (\d+) us", err)
    where = re.search(r"KVM exits by address: (.*)", err)
    if p.returncode != 0 or not total or not init:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise RuntimeError(f"{variant}: exit {p.returncode}, no figures: {tail}")
    return {"exits": int(total.group(1)), "init_ms": int(init.group(1)) / 1000,
            "wall_ms": wall * 1000, "line": re.search(r"KVM exits: (total=.*)", err).group(1),
            "where": where.group(1) if where else ""}


def fmt(values, unit=""):
    med = statistics.median(values)
    digits = 0 if med >= 100 else 1
    return f"{med:.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main():
    results = {v: [] for v in VARIANTS}
    for run in range(RUNS):
        for v in VARIANTS:
            print(f"[bench-console] run {run + 1}/{RUNS}: {v}", file=sys.stderr, flush=True)
            results[v].append(boot(v))
    base = "none" if "none" in results else None
    print(f"Test initramfs booted to power-off, {RUNS} runs per variant, medians (min-max).")
    print(f"Kernel parameters added to every boot: `{' '.join(EXTRA) or '(none)'}`.\n")
    print("| variant | KVM exits to user space | process start to init (ms) | vs `none` | process start to exit (ms) |")
    print("|---|---|---|---|---|")
    base_init = statistics.median(r["init_ms"] for r in results[base]) if base else None
    for v, rs in results.items():
        init = [r["init_ms"] for r in rs]
        rel = f"{(statistics.median(init) / base_init - 1) * 100:+.1f}%" if base_init else "-"
        print(f"| `{v}` | {fmt([r['exits'] for r in rs])} | {fmt(init)} | {rel} | {fmt([r['wall_ms'] for r in rs])} |")
    print("\nWhere the exits of each variant's median run went (`KVM exits` and `by address` log lines):\n")
    for v, rs in results.items():
        mid = sorted(rs, key=lambda r: r["exits"])[len(rs) // 2]
        print(f"- `{v}`: {mid['line']}; top addresses: {mid['where']}")


if __name__ == "__main__":
    main()
