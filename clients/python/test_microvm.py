"""Tests of clients/python/microvm.py against the real programs: the agent
(`microvm-init agent --unix`, $MICROVM_AGENT_BIN) on this host, reached
directly and through a stand-in for the hybrid vsock socket, and microvm's
API before boot ($MICROVM_BIN --api-sock, no KVM needed). Run by
tests/python_client.rs."""

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import microvm  # noqa: E402

AGENT = os.environ.get("MICROVM_AGENT_BIN", "")
MICROVM = os.environ.get("MICROVM_BIN", "")


def wait_socket(path, proc, what):
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.returncode}")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} never listened on {path}")


def hybrid_stand_in(path, agent_sock):
    """A Unix server that speaks the VMM's side of `CONNECT 52`: answers
    OK and splices the stream to the agent's own socket."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(16)

    def pump(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            line = b""
            while not line.endswith(b"\n"):
                line += c.recv(1)
            if line != b"CONNECT 52\n":
                c.close()
                continue
            up = socket.socket(socket.AF_UNIX)
            up.connect(agent_sock)
            c.sendall(b"OK 1073741824\n")
            threading.Thread(target=pump, args=(c, up), daemon=True).start()
            threading.Thread(target=pump, args=(up, c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


@unittest.skipUnless(AGENT and os.path.isfile(AGENT), "MICROVM_AGENT_BIN not set")
class AgentTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="microvm-py-")
        cls.sock = os.path.join(cls.dir, "agent.sock")
        cls.proc = subprocess.Popen([AGENT, "agent", "--unix", cls.sock], stdin=subprocess.DEVNULL)
        wait_socket(cls.sock, cls.proc, "the agent")
        cls.agent = microvm.Agent(unix=cls.sock)

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(30)

    def test_exit_codes_and_signals(self):
        self.assertEqual(self.agent.run(["true"])[0], 0)
        self.assertEqual(self.agent.run(["sh", "-c", "exit 7"])[0], 7)
        self.assertEqual(self.agent.run(["sh", "-c", "kill -9 $$"])[0], 137)

    def test_streams_stay_apart_and_arrive_as_they_come(self):
        chunks = []
        code = self.agent.exec(["sh", "-c", "echo out; echo err >&2"], stdout=chunks.append,
                               stderr=lambda b: chunks.append(b"E:" + b))
        self.assertEqual(code, 0)
        self.assertIn(b"out\n", b"".join(c for c in chunks if not c.startswith(b"E:")))
        self.assertIn(b"E:err\n", chunks)

    def test_stdin_through_sha256sum_env_and_cwd(self):
        data = os.urandom(3 << 20)
        code, out, _ = self.agent.run(["sha256sum"], stdin=data)
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith(hashlib.sha256(data).hexdigest().encode()), out)
        code, out, _ = self.agent.run(["sh", "-c", 'echo "$FOO $(pwd)"'], env=["FOO=bar"], cwd="/tmp")
        self.assertEqual(out, b"bar /tmp\n")

    def test_put_and_get_and_errors(self):
        path = os.path.join(self.dir, "put.bin")
        data = os.urandom(200_000)
        self.agent.put_bytes(data, path, 0o600)
        self.assertEqual(self.agent.get_file(path), data)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with self.assertRaises(microvm.MicrovmError):
            self.agent.get_file(os.path.join(self.dir, "missing"))

    def test_several_at_once_and_through_the_hybrid_socket(self):
        hybrid = os.path.join(self.dir, "v.sock")
        srv = hybrid_stand_in(hybrid, self.sock)
        try:
            agent = microvm.Agent(vsock=hybrid)
            results = [None] * 5
            def one(i):
                results[i] = agent.run(["sh", "-c", f"echo {i}; exit {i}"])
            ts = [threading.Thread(target=one, args=(i,)) for i in range(5)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            for i, r in enumerate(results):
                self.assertEqual(r[:2], (i, f"{i}\n".encode()))
            with self.assertRaises(microvm.MicrovmError):
                microvm.Agent(vsock=hybrid, port=53).run(["true"])
        finally:
            srv.close()


@unittest.skipUnless(MICROVM and os.path.isfile(MICROVM), "MICROVM_BIN not set")
class ApiTest(unittest.TestCase):
    def test_configure_before_boot(self):
        d = tempfile.mkdtemp(prefix="microvm-py-api-")
        sock = os.path.join(d, "api.sock")
        proc = subprocess.Popen([MICROVM, "--api-sock", sock, "--id", "py-test"],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_socket(sock, proc, "microvm")
            api = microvm.Api(sock)
            info = api.info()
            self.assertEqual((info["id"], info["state"]), ("py-test", "Not started"))
            api.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 128})
            api.put("/vsock", {"guest_cid": 3, "uds_path": os.path.join(d, "v.sock")})
            cfg = api.get("/vm/config")
            self.assertEqual(cfg["machine-config"]["vcpu_count"], 2)
            self.assertEqual(cfg["vsock"]["guest_cid"], 3)
            with self.assertRaises(microvm.MicrovmError) as e:
                api.put("/vsock", {"guest_cid": 1, "uds_path": "/tmp/x"})
            self.assertIn("reserved", str(e.exception))
            with self.assertRaises(microvm.MicrovmError):
                api.pause()
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    unittest.main()
