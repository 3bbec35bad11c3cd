"""A stdlib-only client for microvm: its Firecracker-style API and the
guest agent of microvm-init (docs/API.md, docs/AGENT.md).

    import microvm
    api = microvm.Api("/tmp/vm.api")
    api.put("/boot-source", {"kernel_image_path": "vmlinux"})
    api.put("/vsock", {"guest_cid": 3, "uds_path": "/tmp/vm.vsock"})
    api.start()
    agent = microvm.Agent(vsock="/tmp/vm.vsock")
    code = agent.exec(["sh", "-c", "echo hi"], stdout=sys.stdout.buffer.write)
    agent.put_file("app.py", "/srv/app.py")
    data = agent.get_file("/etc/os-release")

Every call opens its own connection; an error from the VMM or the agent
raises `MicrovmError` with its message.
"""

import json
import os
import socket
import struct
import threading

AGENT_PORT = 52
VERSION = 1
MAX_FRAME = 1 << 20
CHUNK = 64 << 10
STDIN_WINDOW = 1 << 20

HELLO, EXEC, STDIN, STDIN_CLOSE, STDIN_ACK, RESIZE, SIGNAL = 0x01, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15
STDOUT, STDERR, EXIT = 0x18, 0x19, 0x1A
PUT, DATA, END, GET, GET_REPLY = 0x20, 0x21, 0x22, 0x23, 0x24
RESUMED, DONE, ERROR = 0x30, 0x31, 0x7F


class MicrovmError(Exception):
    """An error answer from the VMM's API or the guest agent."""


# ---- the API ---------------------------------------------------------------


class Api:
    """Firecracker's REST API of one microvm process, on its Unix socket."""

    def __init__(self, sock, timeout=60.0):
        self.sock = sock
        self.timeout = timeout

    def request(self, method, path, body=None):
        """(status, decoded JSON body or None)."""
        data = b"" if body is None else json.dumps(body).encode()
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(self.timeout)
        try:
            s.connect(self.sock)
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            )
            s.sendall(head.encode() + data)
            reply = b""
            while b"\r\n\r\n" not in reply:
                b = s.recv(65536)
                if not b:
                    raise MicrovmError("the API closed the connection")
                reply += b
            head, _, rest = reply.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            while len(rest) < length:
                b = s.recv(65536)
                if not b:
                    break
                rest += b
        finally:
            s.close()
        return status, (json.loads(rest) if rest else None)

    def _call(self, method, path, body=None):
        status, reply = self.request(method, path, body)
        if status >= 300:
            msg = reply.get("fault_message") if isinstance(reply, dict) else reply
            raise MicrovmError(f"{method} {path}: {status}: {msg}")
        return reply

    def get(self, path):
        return self._call("GET", path)

    def put(self, path, body):
        return self._call("PUT", path, body)

    def patch(self, path, body):
        return self._call("PATCH", path, body)

    def info(self):
        """`GET /`: id, state, vmm_version."""
        return self.get("/")

    def start(self):
        self.put("/actions", {"action_type": "InstanceStart"})

    def pause(self):
        self.patch("/vm", {"state": "Paused"})

    def resume(self):
        self.patch("/vm", {"state": "Resumed"})

    def snapshot(self, directory):
        """Save the paused VM in `directory` (state and memory files)."""
        self.put("/snapshot/create", {"snapshot_dir": os.fspath(directory)})

    def load_snapshot(self, directory, resume=True):
        self.put("/snapshot/load", {"snapshot_dir": os.fspath(directory), "resume_vm": resume})


# ---- the agent's frames ----------------------------------------------------


def _str(s):
    b = s.encode()
    return struct.pack("<I", len(b)) + b


def _list(items):
    return struct.pack("<I", len(items)) + b"".join(_str(i) for i in items)


def _owner(user):
    if user is None:
        return b"\x00"
    uid, gid = user
    return b"\x01" + struct.pack("<II", uid, gid)


def _read_str(b, at):
    (n,) = struct.unpack_from("<I", b, at)
    return b[at + 4 : at + 4 + n].decode(), at + 4 + n


class _Conn:
    """One greeted connection to the agent."""

    def __init__(self, vsock=None, unix=None, port=AGENT_PORT, timeout=60.0):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(vsock or unix)
        if vsock:
            self.s.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                b = self.s.recv(1)
                if not b:
                    raise MicrovmError(f"vsock port {port}: closed without OK (is the agent running?)")
                line += b
                if len(line) > 64:
                    raise MicrovmError("vsock answer line too long")
            if not line.startswith(b"OK "):
                raise MicrovmError(f"vsock port {port}: answered {line!r}")
        self.lock = threading.Lock()
        self.send(HELLO, b"MVAG" + struct.pack("<H", VERSION))
        kind, payload = self.recv()
        if kind == ERROR:
            raise MicrovmError(_read_str(payload, 0)[0])
        if kind != HELLO or payload[:4] != b"MVAG":
            raise MicrovmError(f"no hello from the agent (frame {kind:#x})")
        (version,) = struct.unpack_from("<H", payload, 4)
        if version != VERSION:
            raise MicrovmError(f"agent protocol version {version}, this client speaks {VERSION}")
        self.s.settimeout(None)

    def send(self, kind, payload=b""):
        if len(payload) > MAX_FRAME:
            raise ValueError("frame too long")
        with self.lock:
            self.s.sendall(struct.pack("<IB", len(payload), kind) + payload)

    def _exactly(self, n):
        buf = b""
        while len(buf) < n:
            b = self.s.recv(n - len(buf))
            if not b:
                return None
            buf += b
        return buf

    def recv(self):
        head = self._exactly(5)
        if head is None:
            raise MicrovmError("the agent closed the connection")
        n, kind = struct.unpack("<IB", head)
        if n > MAX_FRAME:
            raise MicrovmError(f"frame of {n} bytes from the agent")
        payload = self._exactly(n) if n else b""
        if payload is None:
            raise MicrovmError("the agent closed the connection mid-frame")
        return kind, payload

    def close(self):
        self.s.close()


class Agent:
    """microvm-init's agent in a running VM: through the VM's hybrid vsock
    socket (`vsock=`, the `uds_path`) or an agent's own Unix socket
    (`unix=`, `microvm-init agent --unix PATH`)."""

    def __init__(self, vsock=None, unix=None, port=AGENT_PORT, timeout=60.0):
        if (vsock is None) == (unix is None):
            raise ValueError("give vsock= or unix=")
        self._args = dict(vsock=vsock, unix=unix, port=port, timeout=timeout)

    def _conn(self):
        return _Conn(**self._args)

    def exec(self, argv, stdin=b"", env=(), cwd="", user=None, stdout=None, stderr=None):
        """Run `argv` in the guest; its exit code (128+N for signal N).
        `stdin` is bytes; `stdout`/`stderr` are callables given each chunk
        as it arrives (collected and dropped when None)."""
        c = self._conn()
        try:
            c.send(EXEC, _list(list(argv)) + _list(list(env)) + _str(cwd) + _owner(user) + b"\x00" + struct.pack("<HH", 24, 80))
            acked = [0]
            cond = threading.Condition()

            def feed():
                sent = 0
                try:
                    while sent < len(stdin):
                        with cond:
                            while sent - acked[0] + CHUNK > STDIN_WINDOW and not done[0]:
                                cond.wait(1)
                            if done[0]:
                                return
                        part = stdin[sent : sent + CHUNK]
                        c.send(STDIN, part)
                        sent += len(part)
                    c.send(STDIN_CLOSE)
                except OSError:
                    pass

            done = [False]
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            try:
                while True:
                    kind, payload = c.recv()
                    if kind == STDOUT:
                        if stdout:
                            stdout(payload)
                    elif kind == STDERR:
                        if stderr:
                            stderr(payload)
                    elif kind == STDIN_ACK:
                        with cond:
                            acked[0] += struct.unpack("<I", payload)[0]
                            cond.notify_all()
                    elif kind == EXIT:
                        how, value = struct.unpack("<Bi", payload)
                        return value if how == 0 else 128 + value
                    elif kind == ERROR:
                        raise MicrovmError(_read_str(payload, 0)[0])
                    else:
                        raise MicrovmError(f"unexpected frame {kind:#x} during exec")
            finally:
                with cond:
                    done[0] = True
                    cond.notify_all()
        finally:
            c.close()

    def run(self, argv, stdin=b"", **kw):
        """`exec`, collecting the output: (code, stdout bytes, stderr bytes)."""
        out, err = [], []
        code = self.exec(argv, stdin=stdin, stdout=out.append, stderr=err.append, **kw)
        return code, b"".join(out), b"".join(err)

    def put_file(self, local, guest, mode=None):
        """Copy the host file `local` to the guest path `guest`."""
        with open(local, "rb") as f:
            data = f.read()
        if mode is None:
            mode = os.stat(local).st_mode & 0o7777
        self.put_bytes(data, guest, mode)

    def put_bytes(self, data, guest, mode=0o644):
        c = self._conn()
        try:
            c.send(PUT, _str(guest) + b"\x00" + struct.pack("<I", mode) + _owner(None))
            for i in range(0, len(data), CHUNK):
                c.send(DATA, data[i : i + CHUNK])
            c.send(END)
            kind, payload = c.recv()
            if kind == ERROR:
                raise MicrovmError(_read_str(payload, 0)[0])
            if kind != DONE:
                raise MicrovmError(f"unexpected frame {kind:#x} after a put")
        finally:
            c.close()

    def get_file(self, guest):
        """The bytes of the guest file `guest`."""
        c = self._conn()
        try:
            c.send(GET, _str(guest))
            kind, payload = c.recv()
            if kind == ERROR:
                raise MicrovmError(_read_str(payload, 0)[0])
            if kind != GET_REPLY or payload[:1] != b"\x00":
                raise MicrovmError(f"{guest} is not a file (frame {kind:#x})")
            parts = []
            while True:
                kind, payload = c.recv()
                if kind == DATA:
                    parts.append(payload)
                elif kind == END:
                    return b"".join(parts)
                elif kind == ERROR:
                    raise MicrovmError(_read_str(payload, 0)[0])
                else:
                    raise MicrovmError(f"unexpected frame {kind:#x} in a get")
        finally:
            c.close()
