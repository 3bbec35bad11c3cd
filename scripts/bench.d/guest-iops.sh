# scripts/bench.d/guest-iops.sh: guest side of the io_engine benchmark.
#
# scripts/bench writes this file, padded with newlines, to a small read-only
# raw drive (/dev/vdd) and boots the Flask root filesystem in command mode with
#     -- bash /dev/vdd MIB REPS SECS
# /dev/vdb is served by the Sync engine, /dev/vdc by the Async one (io_uring),
# both over the same kind of file. Each pass reads 4 KiB blocks at random
# (O_DIRECT) from each drive for SECS seconds at queue depth 1, then 32 (one
# thread per outstanding read: the GIL is let go inside each pread), the two
# drives interleaved so both see the same moment of a noisy host. Results are
# console lines "BENCH iops dev=D qd=Q ops=N secs=S".
MIB=${1:-64} REPS=${2:-3} SECS=${3:-5}
for d in /dev/vdb /dev/vdc; do
    if [[ ! -b $d ]]; then echo "BENCH error no block device $d"; exit 3; fi
done
exec python3 - "$MIB" "$REPS" "$SECS" <<'PY'
import mmap, os, random, sys, threading, time

mib, reps, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
blocks = mib * 256


def reader(dev, seed, end, counts, i):
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    rnd = random.Random(seed)
    n = 0
    try:
        while time.monotonic() < end:
            os.preadv(fd, [buf], rnd.randrange(blocks) * 4096)
            n += 1
    finally:
        os.close(fd)
    counts[i] = n


for rep in range(1, reps + 1):
    for qd in (1, 32):
        for dev in ("/dev/vdb", "/dev/vdc"):
            counts = [0] * qd
            t0 = time.monotonic()
            end = t0 + secs
            ts = [threading.Thread(target=reader, args=(dev, rep * 1000 + i, end, counts, i)) for i in range(qd)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            el = time.monotonic() - t0
            print(f"BENCH iops dev={dev[5:]} qd={qd} ops={sum(counts)} secs={el:.6f}", flush=True)
print("BENCH done", flush=True)
PY
