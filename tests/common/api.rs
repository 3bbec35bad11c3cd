//! A tiny HTTP/1.1 client over a Unix socket, as a Firecracker client would
//! talk to the API, and a handle on a microvm serving it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request on a fresh connection; the status and the body.
pub fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    parse_response(&out)
}

/// Send raw bytes and return the raw answer (for malformed requests).
pub fn call_raw(sock: &Path, raw: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Status code and body of a response.
pub fn parse_response(out: &str) -> (u16, String) {
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// A microvm process with its console collected in the background.
pub struct ApiVm {
    pub child: Child,
    pub sock: PathBuf,
    pub stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl ApiVm {
    /// Start `microvm --api-sock SOCK ARGS...` and wait for the socket.
    pub fn start(sock: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(super::microvm_bin());
        cmd.arg("--api-sock")
            .arg(sock)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn microvm");
        let stdout = super::pump(child.stdout.take().unwrap());
        let stderr = super::pump(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        let mut vm = Self {
            child,
            sock: sock.to_owned(),
            stdin,
            stdout,
            stderr,
        };
        let ok = vm.wait_for(Duration::from_secs(30), |vm| {
            UnixStream::connect(&vm.sock).is_ok()
        });
        vm.check(ok, "the API socket appears");
        vm
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Poll `cond` every 100 ms until it holds or `deadline` passes.
    pub fn wait_for(
        &mut self,
        deadline: Duration,
        mut cond: impl FnMut(&mut Self) -> bool,
    ) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if cond(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        cond(self)
    }

    /// Panic with the console and the log if `ok` is false.
    pub fn check(&self, ok: bool, what: &str) {
        if !ok {
            panic!(
                "{what}\n--- stdout:\n{}\n--- stderr:\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }

    /// Wait for the process to exit (killed past `deadline`).
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        super::wait_with_deadline(&mut self.child, deadline)
    }

    /// The process has exited.
    pub fn child_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Send SIGTERM to the process (by its PID).
    pub fn terminate(&self) {
        // SAFETY: kill(2) on the PID of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// User + system CPU ticks of the process's threads named `prefix*`.
    pub fn thread_cpu_ticks(&self, prefix: &str) -> u64 {
        let dir = format!("/proc/{}/task", self.child.id());
        let mut total = 0;
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = entry.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if !comm.trim().starts_with(prefix) {
                continue;
            }
            let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
            // Fields after the parenthesised name: state is field 3; utime 14, stime 15.
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            total += n(11) + n(12);
        }
        total
    }

    /// One API call; a failed one fails the test with the VM's output.
    pub fn checked_call(&mut self, method: &str, path: &str, body: &str, want: u16) {
        let sock = self.sock.clone();
        let r = std::panic::catch_unwind(|| call(&sock, method, path, Some(body)));
        let alive = !self.child_exited();
        self.check(
            matches!(&r, Ok((s, _)) if *s == want) && alive,
            &format!("{method} {path}: {r:?} (microvm still running: {alive})"),
        );
    }

    /// Pause the VM and save it in `dir` (state and memory).
    pub fn pause_and_snapshot(&mut self, dir: &Path) {
        self.checked_call("PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
        let body = serde_json::json!({ "snapshot_dir": dir }).to_string();
        let t = Instant::now();
        self.checked_call("PUT", "/snapshot/create", &body, 204);
        let size = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "snapshot created in {:?}: state {} bytes, memory {} MiB",
            t.elapsed(),
            size("state"),
            size("memory") >> 20
        );
    }

    /// SIGTERM; it must exit 143.
    pub fn stop_with_sigterm(&mut self) {
        self.terminate();
        let st = self.wait_exit(Duration::from_secs(60));
        self.check(st.and_then(|s| s.code()) == Some(143), "SIGTERM gives 143");
    }
}

impl Drop for ApiVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
