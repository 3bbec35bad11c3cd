# scripts/bench.d/guest-io.sh: guest side of the block and network benchmark.
#
# scripts/bench writes this file, padded with newlines, to a small read-only
# raw drive and boots the Flask root filesystem in command mode with
#     -- bash /dev/vdc MIB REPS IOPS_SECS PORT
# (the kernel command line is too short to carry it). /dev/vdb is the scratch
# drive. Results go to the console as lines starting with "BENCH"; the host
# side parses them. Keep forks to a minimum: where KVM interprets guest kernel
# code every fork+exec costs seconds.
MIB=${1:-32} REPS=${2:-3} IOPS_SECS=${3:-5} PORT=${4:-5001}
DEV=/dev/vdb
echo "BENCH guest-start mib=$MIB reps=$REPS"
if [[ ! -b $DEV ]]; then echo "BENCH error no block device $DEV"; exit 3; fi

# Sequential write then read, 1 MiB blocks, O_DIRECT (no guest page cache).
# dd's summary line ("N bytes (...) copied, S s, ...") follows each marker.
for ((i = 1; i <= REPS; i++)); do
    echo "BENCH-BEGIN dd_write $i"
    dd if=/dev/zero of=$DEV bs=1M count="$MIB" oflag=direct 2>&1
    echo "BENCH-BEGIN dd_read $i"
    dd if=$DEV of=/dev/null bs=1M count="$MIB" iflag=direct 2>&1
done
echo "BENCH-BEGIN python"

# 4 KiB random reads (O_DIRECT, one at a time, aligned mmap buffer), then a
# TCP endpoint for the host's throughput client. python3 starts once for both.
exec python3 - "$DEV" "$MIB" "$REPS" "$IOPS_SECS" "$PORT" <<'PY'
import mmap, os, random, socket, sys, time

dev, mib, reps, secs, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print("BENCH python-up", flush=True)
try:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    blocks = mib * 256
    rnd = random.Random(20240601)
    for rep in range(1, reps + 1):
        n = 0
        t0 = time.monotonic()
        end = t0 + secs
        while True:
            os.preadv(fd, [buf], rnd.randrange(blocks) * 4096)
            n += 1
            if time.monotonic() >= end:
                break
        el = time.monotonic() - t0
        print(f"BENCH randread4k {rep} ops={n} secs={el:.6f}", flush=True)
    os.close(fd)
except Exception as e:  # report and go on to the network part
    print(f"BENCH error randread {e!r}", flush=True)

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(4)
srv.settimeout(900)
print(f"BENCH net-listening {port}", flush=True)
data = bytearray(256 * 1024)
out = b"\0" * (256 * 1024)


def readline(c):
    line = b""
    while not line.endswith(b"\n") and len(line) < 200:
        b = c.recv(1)
        if not b:
            break
        line += b
    return line.decode(errors="replace").strip()


while True:
    try:
        c, _ = srv.accept()
    except socket.timeout:
        print("BENCH error net: no client", flush=True)
        break
    c.settimeout(120)
    try:
        cmd = readline(c).split()
        if not cmd or cmd[0] == "QUIT":
            c.close()
            break
        if cmd[0] == "RX":  # host -> guest: count until EOF, reply "bytes seconds"
            n, t0 = 0, None
            while True:
                k = c.recv_into(data)
                if not k:
                    break
                if t0 is None:
                    t0 = time.monotonic()
                n += k
            el = time.monotonic() - t0 if t0 is not None else 0.0
            c.sendall(f"{n} {el:.6f}\n".encode())
            print(f"BENCH net_rx bytes={n} secs={el:.6f}", flush=True)
        elif cmd[0] == "TX":  # guest -> host for the given seconds
            end = time.monotonic() + float(cmd[1])
            while time.monotonic() < end:
                c.sendall(out)
            c.shutdown(socket.SHUT_WR)
            while c.recv(4096):
                pass
    except Exception as e:
        print(f"BENCH error net {e!r}", flush=True)
    finally:
        c.close()
print("BENCH done", flush=True)
PY
