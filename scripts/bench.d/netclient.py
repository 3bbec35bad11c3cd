#!/usr/bin/env python3
"""Host side of scripts/bench's network measurements (python3 stdlib only).

scripts/bench runs it inside the benchmark's own network namespace
(`ip netns exec microvm-bench-PID ...`), so it can only reach the guest on
the TAP link of that namespace; for user-mode runs, outside it, against a
port published on 127.0.0.1. Every mode is bounded in time and volume.

  netclient.py http HOST[:PORT] SECS MAX_REQUESTS
      sequential HTTP GET / (new connection each, like the Flask development
      server wants), until SECS elapse or MAX_REQUESTS are done; PORT 80
      unless given (a port published with --net user).
  netclient.py net GUEST_IP PORT SECS REPS
      TCP throughput against bench.d/guest-io.sh's endpoint: REPS times
      host->guest ("RX": the guest measures) and guest->host ("TX": we
      measure), SECS seconds each, then "QUIT".
  netclient.py wait GUEST_IP PORT SECS
      wait until a TCP connect to GUEST_IP:PORT succeeds.
Prints one JSON object on stdout.
"""
import http.client
import json
import socket
import sys
import time

MAX_BYTES = 1 << 30  # never send more than 1 GiB in one direction


def http_mode(host, secs, max_req):
    host, _, port = host.partition(":")
    port = int(port or 80)
    lat, errors, t0 = [], [], time.monotonic()
    end = t0 + secs
    while len(lat) < max_req and time.monotonic() < end:
        s = time.monotonic()
        try:
            c = http.client.HTTPConnection(host, port, timeout=60)
            c.request("GET", "/")
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status != 200 or b"Hello" not in body:
                errors.append(f"status {r.status}")
                continue
        except OSError as e:
            errors.append(repr(e))
            if len(errors) > 5:
                break
            continue
        lat.append(time.monotonic() - s)
    el = time.monotonic() - t0
    return {"requests": len(lat), "secs": el, "rps": len(lat) / el if el > 0 else 0.0,
            "lat_median_ms": sorted(lat)[len(lat) // 2] * 1000 if lat else None,
            "errors": errors[:5]}


def connect(host, port, timeout=60):
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def net_mode(host, port, secs, reps):
    res = {"rx": [], "tx": [], "errors": []}
    chunk = b"\xa5" * (256 * 1024)
    buf = bytearray(256 * 1024)
    for _ in range(reps):
        try:  # host -> guest; the guest reports what it received and how long it took
            s = connect(host, port)
            s.sendall(b"RX\n")
            end, sent = time.monotonic() + secs, 0
            while time.monotonic() < end and sent < MAX_BYTES:
                s.sendall(chunk)
                sent += len(chunk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(120)
            reply = b""
            while not reply.endswith(b"\n"):
                b = s.recv(100)
                if not b:
                    break
                reply += b
            s.close()
            n, el = reply.split()
            res["rx"].append({"bytes": int(n), "secs": float(el)})
        except (OSError, ValueError) as e:
            res["errors"].append("rx: " + repr(e))
        try:  # guest -> host; measured here, first byte to EOF
            s = connect(host, port)
            s.sendall(f"TX {secs}\n".encode())
            s.settimeout(120)
            n, t0 = 0, None
            while True:
                k = s.recv_into(buf)
                if not k:
                    break
                if t0 is None:
                    t0 = time.monotonic()
                n += k
            el = time.monotonic() - t0 if t0 else 0.0
            s.close()
            res["tx"].append({"bytes": n, "secs": el})
        except OSError as e:
            res["errors"].append("tx: " + repr(e))
    try:
        s = connect(host, port, timeout=10)
        s.sendall(b"QUIT\n")
        s.close()
    except OSError as e:
        res["errors"].append("quit: " + repr(e))
    return res


def wait_mode(host, port, secs):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return {"ok": True}
        except OSError:
            time.sleep(0.5)
    return {"ok": False}


def main(argv):
    mode = argv[1]
    if mode == "http":
        out = http_mode(argv[2], float(argv[3]), int(argv[4]))
    elif mode == "net":
        out = net_mode(argv[2], int(argv[3]), float(argv[4]), int(argv[5]))
    elif mode == "wait":
        out = wait_mode(argv[2], int(argv[3]), float(argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
