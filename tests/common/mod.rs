//! Shared helpers for end-to-end tests: find the built artifacts, spawn the
//! `microvm` binary, read its console until a marker or a deadline.
//!
//! A test that needs /dev/kvm or a built image and does not find it fails with
//! a message when `CI=true`, and prints a loud SKIPPED line otherwise.

#![allow(dead_code)]

pub mod api;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Default cache the build scripts write to.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MICROVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/microvm"))
}

/// Path of the microvm binary built for this test run.
pub fn microvm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_microvm"))
}

fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Report a missing prerequisite: panic in CI, loud skip elsewhere. Returns false.
pub fn missing(what: &str) -> bool {
    if in_ci() {
        panic!("prerequisite missing in CI: {what}");
    }
    eprintln!("\n*** SKIPPED: {what} ***\n");
    false
}

/// `cmd arg` runs (the tool is installed); reports it missing otherwise.
pub fn have_command(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).output().is_ok() || missing(&format!("{cmd} is not installed"))
}

/// /dev/kvm is usable.
pub fn have_kvm() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => missing(&format!("/dev/kvm is not usable ({e})")),
    }
}

/// An artifact from `env_var` or the cache path; None (after reporting) if absent.
pub fn artifact(env_var: &str, cached: &str, how: &str) -> Option<PathBuf> {
    let p = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join(cached));
    if p.is_file() {
        Some(p)
    } else {
        missing(&format!(
            "{} not found (set {env_var} or run {how})",
            p.display()
        ));
        None
    }
}

/// The guest kernel built by kernels/build.sh.
pub fn kernel() -> Option<PathBuf> {
    artifact("MICROVM_KERNEL", "kernel/vmlinux", "kernels/build.sh")
}

/// The test initramfs built by tests/initramfs/build.sh.
pub fn test_initrd() -> Option<PathBuf> {
    artifact(
        "MICROVM_TEST_INITRD",
        "initramfs/test.cpio",
        "tests/initramfs/build.sh",
    )
}

/// The Flask root filesystem built by rootfs/build.sh (pristine: copy before booting it rw).
pub fn rootfs() -> Option<PathBuf> {
    artifact("MICROVM_ROOTFS", "rootfs/app.ext4", "rootfs/build.sh")
}

/// Kernel + /dev/kvm, or None after reporting.
pub fn boot_prereqs() -> Option<PathBuf> {
    if !have_kvm() {
        return None;
    }
    kernel()
}

/// A private scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let base = std::env::var_os("MICROVM_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let p = base.join(format!("microvm-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished (or killed) run produced.
pub struct Run {
    /// Exit status, None if we had to kill it at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// Time from spawn to the first occurrence of the awaited marker, if any.
    pub marker_at: Option<Duration>,
    pub elapsed: Duration,
    /// Host wall-clock time at spawn.
    pub started_at: std::time::SystemTime,
}

impl Run {
    /// Check that a guest clock reading (Unix seconds) printed during this run
    /// lies within the run's host wall-clock span, give or take `slack`.
    pub fn check_guest_clock(&self, guest_unix: i64, slack: Duration) {
        let start = self
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .expect("host clock after 1970")
            .as_secs_f64();
        let (lo, hi) = (
            start - slack.as_secs_f64(),
            start + self.elapsed.as_secs_f64() + slack.as_secs_f64(),
        );
        let g = guest_unix as f64;
        self.check(
            (lo..=hi).contains(&g),
            &format!(
                "guest clock {guest_unix} is off: the host's ran from {start:.0} to {:.0} (off by {:+.0} s)",
                start + self.elapsed.as_secs_f64(),
                if g < lo { g - start } else { g - (start + self.elapsed.as_secs_f64()) }
            ),
        );
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Panic with both streams if `cond` fails.
    pub fn check(&self, cond: bool, what: &str) {
        if !cond {
            panic!(
                "{what}\n--- exit: {:?} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                self.status, self.elapsed, self.stdout, self.stderr
            );
        }
    }
}

/// Spawn microvm with `args` (stdin closed) without waiting.
pub fn spawn(args: &[String], envs: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(microvm_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn microvm")
}

/// Run microvm to completion or until `deadline`, noting when `marker` first
/// shows on stdout. A run over the deadline is killed (by its PID) and has no status.
pub fn run(args: &[String], marker: Option<&str>, deadline: Duration) -> Run {
    run_env(args, &[], marker, deadline)
}

/// [`run`] with extra environment variables.
pub fn run_env(
    args: &[String],
    envs: &[(&str, &str)],
    marker: Option<&str>,
    deadline: Duration,
) -> Run {
    let start = Instant::now();
    let started_at = std::time::SystemTime::now();
    let mut child = spawn(args, envs);
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let tx2 = tx.clone();
    let t1 = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send((true, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    let t2 = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 || tx2.send((false, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut marker_at = None;
    let mut status = None;
    loop {
        let now = Instant::now();
        if now >= start + deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((is_out, data)) => {
                if is_out {
                    stdout.extend_from_slice(&data);
                    if marker_at.is_none() {
                        if let Some(m) = marker {
                            if String::from_utf8_lossy(&stdout).contains(m) {
                                marker_at = Some(start.elapsed());
                            }
                        }
                    }
                } else {
                    stderr.extend_from_slice(&data);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                status = child.wait().ok();
                break;
            }
        }
        if let Ok(Some(s)) = child.try_wait() {
            // Drain what is left in the pipes.
            let _ = t1.join();
            let _ = t2.join();
            while let Ok((is_out, data)) = rx.try_recv() {
                if is_out {
                    stdout.extend_from_slice(&data)
                } else {
                    stderr.extend_from_slice(&data)
                }
            }
            if marker_at.is_none() {
                if let Some(m) = marker {
                    if String::from_utf8_lossy(&stdout).contains(m) {
                        marker_at = Some(start.elapsed());
                    }
                }
            }
            status = Some(s);
            break;
        }
    }
    Run {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        marker_at,
        elapsed: start.elapsed(),
        started_at,
    }
}

/// Inside the nested lane's L1 (tests/nested/run.sh sets MICROVM_NESTED=1).
pub fn in_nested_l1() -> bool {
    std::env::var("MICROVM_NESTED")
        .map(|v| v == "1")
        .unwrap_or(false)
}

/// Deadline for one boot: generous on hosts whose KVM interprets guest kernel code.
/// In the nested lane the KVM is normal but the whole L1 is emulated by QEMU's
/// TCG on one host core shared with other work, so `normal` is doubled there:
/// a busy machine must not fail a test that is merely slow. Not more: a test
/// that waits twice must still fail with its own message before the nested
/// lane's per-suite bound (420 s, tests/nested/e2e.sh) stops the whole L1.
pub fn boot_deadline(normal: Duration, emulated: Duration) -> Duration {
    // The same detection microvm itself uses.
    let emulated_host = microvm::host::kvm_is_emulated();
    if emulated_host {
        emulated
    } else if in_nested_l1() {
        normal * 2
    } else {
        normal
    }
}

/// Say what a long test is doing, at once, on this process's stderr (a
/// direct write: libtest captures only `print!`/`eprint!`). The nested lane
/// stops an L1 that prints nothing for 10 minutes; a long step says so.
pub fn progress(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "  [progress] {what}");
}

/// A long step of a test: says when it starts, every `HEARTBEAT` while it
/// runs, and how long it took when dropped.
pub struct Step {
    what: String,
    start: Instant,
    done: Option<mpsc::Sender<()>>,
}

const HEARTBEAT: Duration = Duration::from_secs(60);

impl Step {
    pub fn start(what: &str) -> Self {
        progress(&format!("{what} ..."));
        let (tx, rx) = mpsc::channel::<()>();
        let label = what.to_string();
        let start = Instant::now();
        std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HEARTBEAT) {
                progress(&format!(
                    "{label}: still running after {:.0} s",
                    start.elapsed().as_secs_f64()
                ));
            }
        });
        Self {
            what: what.to_string(),
            start,
            done: Some(tx),
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        drop(self.done.take());
        progress(&format!(
            "{}: {:.1} s",
            self.what,
            self.start.elapsed().as_secs_f64()
        ));
    }
}

/// Strings to owned args.
pub fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Wait for `child` up to `deadline`; kill it (by its PID) past that and return None.
pub fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if start.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace deleted on drop (also when the test panics).
pub struct Netns(pub String);

impl Netns {
    pub fn create() -> Option<Self> {
        let name = format!("microvm-test-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        match Command::new("ip").args(["netns", "add", &name]).status() {
            Ok(s) if s.success() => {}
            other => {
                missing(&format!(
                    "cannot create a network namespace with `ip netns add` ({other:?}); needs root and iproute2"
                ));
                return None;
            }
        }
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(argv);
        c
    }

    pub fn exec(&self, argv: &[&str]) -> std::process::Output {
        self.command(argv).output().expect("ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Kills the VM (by the PID we started) if the test ends early.
pub struct Vm(pub std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collect everything `r` produces into a shared string, on a thread; never
/// hold the lock while blocked in `read`.
pub fn pump(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            t.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

/// A VM with a root filesystem and one virtio-net interface, started inside
/// `ns`; its console and stderr are collected on threads.
pub struct NetVm {
    pub vm: Vm,
    pub console: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    pub start: Instant,
}

impl NetVm {
    /// Boot `disk` (a private copy) with 256 MiB and `--net host=HOST/30,guest=GUEST`.
    pub fn boot(
        ns: &Netns,
        kernel: &std::path::Path,
        disk: &std::path::Path,
        host: &str,
        guest: &str,
    ) -> Self {
        Self::boot_with(ns, kernel, disk, host, guest, &[])
    }

    /// [`Self::boot`] with `extra` microvm arguments after those.
    pub fn boot_with(
        ns: &Netns,
        kernel: &std::path::Path,
        disk: &std::path::Path,
        host: &str,
        guest: &str,
        extra: &[&str],
    ) -> Self {
        let net = format!("host={host}/30,guest={guest}");
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--rootfs",
            disk.to_str().unwrap(),
            "--memory",
            "256",
            "--net",
            &net,
        ];
        args.extend_from_slice(extra);
        Self::spawn(ns, &args)
    }

    /// `microvm ARGS` inside `ns`.
    pub fn spawn(ns: &Netns, args: &[&str]) -> Self {
        let bin = microvm_bin();
        let start = Instant::now();
        let mut argv = vec![bin.to_str().unwrap()];
        argv.extend_from_slice(args);
        let mut child = ns
            .command(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn microvm in the namespace");
        let console = pump(child.stdout.take().unwrap());
        let stderr = pump(child.stderr.take().unwrap());
        Self {
            vm: Vm(child),
            console,
            stderr,
            start,
        }
    }

    /// Fail the test with `what` and everything the VM printed.
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- console:\n{}\n--- stderr:\n{}",
            self.console.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Does the console show `text`?
    pub fn console_has(&self, text: &str) -> bool {
        self.console.lock().unwrap().contains(text)
    }

    /// Wait until the console shows `marker`; fail if the VM exits first or
    /// the boot deadline passes. Returns the time since spawn.
    pub fn wait_for(&mut self, marker: &str) -> Duration {
        let _step = Step::start(&format!("waiting for {marker:?} on the console"));
        let deadline = boot_deadline(Duration::from_secs(60), Duration::from_secs(1500));
        while !self.console_has(marker) {
            if let Ok(Some(st)) = self.vm.0.try_wait() {
                self.fail(&format!("microvm exited early: {st}"));
            }
            if self.start.elapsed() > deadline {
                self.fail(&format!("no {marker:?} before the deadline"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.start.elapsed()
    }

    /// Stop the VM the way a user would; it must exit 143.
    pub fn sigterm_gives_143(&mut self) {
        let pid = self.vm.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let st = self.vm.0.wait().unwrap();
        if st.code() != Some(143) {
            self.fail(&format!("SIGTERM should give exit 143, got {st}"));
        }
    }
}

/// Read `r` line by line until one contains `what` (or the deadline).
pub fn read_until(r: &mut impl std::io::BufRead, what: &str, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    let mut line = String::new();
    while Instant::now() < end {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.contains(what) => return true,
            Ok(_) => {}
        }
    }
    false
}

/// `kill SIG PID` (the test's own child).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}
