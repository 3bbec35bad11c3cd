//! Helper processes microvm starts for a device and supervises: passt for a
//! user-mode NIC, virtiofsd for a shared directory.
//!
//! [`Helper::spawn`] starts the child with its stderr piped to a thread of
//! our own, which forwards the child's lines to our log, waits for the child
//! to exit and reaps it. If the child exits while the VM runs (not because
//! we ended it), the thread calls the [`ExitNotify`] given at start with a
//! message that names the helper, its status and its last lines; the VMM
//! then stops the VM. Dropping the [`Helper`] ends the child and joins the
//! thread.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Called once if the helper exits on its own, with a message saying so.
pub type ExitNotify = Box<dyn FnOnce(String) + Send>;

/// Lines of the helper's stderr kept for the message when it dies.
const STDERR_TAIL: usize = 4;
/// Longest stderr line kept (the helper's input to us is bounded too).
const MAX_LINE: usize = 512;

/// What to do with one line the helper wrote to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// Noise: dropped.
    Ignore,
    /// Logged at debug level only.
    Debug,
    /// Logged as a warning and kept for the exit message.
    Warn,
}

/// How a helper is named and how its stderr is read.
pub struct HelperSpec {
    /// The program's name in messages (`passt`, `virtiofsd`).
    pub name: &'static str,
    /// The device it serves, for log lines and the thread's name (`eth0`).
    pub label: String,
    /// What it does for the guest, in its exit message
    /// ("user-mode networking").
    pub role: &'static str,
    /// What its exit costs the guest, in the message
    /// ("the guest has lost its network").
    pub consequence: &'static str,
    /// How each stderr line is treated.
    pub classify: fn(&str) -> Line,
}

/// Errors starting a helper.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The program is not there.
    #[error("cannot run '{0}': not found ({1})")]
    NotInstalled(String, &'static str),
    /// The program could not be started.
    #[error("cannot start '{0}'")]
    Spawn(String, #[source] io::Error),
    /// The supervising thread could not be started.
    #[error("cannot start the thread that supervises {0}")]
    Thread(&'static str, #[source] io::Error),
}

/// The child process and what tells its supervisor we are ending it.
#[derive(Debug)]
struct Supervised {
    child: Mutex<Child>,
    pid: u32,
    stopping: AtomicBool,
}

/// A running helper process and the thread that supervises it.
#[derive(Debug)]
pub struct Helper {
    proc: Arc<Supervised>,
    watcher: Option<JoinHandle<()>>,
}

impl Helper {
    /// Start `cmd` (stdin and stdout from /dev/null, stderr to us) and its
    /// supervisor. `install_hint` says how to get the program when it is
    /// missing.
    pub fn spawn(
        mut cmd: Command,
        spec: HelperSpec,
        install_hint: &'static str,
        on_exit: ExitNotify,
    ) -> Result<Self, HelperError> {
        let bin = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                HelperError::NotInstalled(bin.clone(), install_hint)
            } else {
                HelperError::Spawn(bin.clone(), e)
            }
        })?;
        let stderr = child.stderr.take();
        let pid = child.id();
        let proc = Arc::new(Supervised {
            child: Mutex::new(child),
            pid,
            stopping: AtomicBool::new(false),
        });
        let name = spec.name;
        let watcher = {
            let proc = Arc::clone(&proc);
            std::thread::Builder::new()
                .name(format!("{}-{}", spec.name, spec.label))
                .spawn(move || supervise(&spec, &proc, stderr, on_exit))
        };
        match watcher {
            Ok(w) => Ok(Self {
                proc,
                watcher: Some(w),
            }),
            Err(e) => {
                kill(&proc);
                Err(HelperError::Thread(name, e))
            }
        }
    }

    /// The helper's process ID.
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        kill(&self.proc);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

fn kill(proc: &Supervised) {
    proc.stopping.store(true, Ordering::SeqCst);
    // Reaping happens only under this lock, so the PID is still the helper's.
    if let Ok(mut child) = proc.child.lock() {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
    }
}

/// Forward the helper's stderr to our log until it closes, wait for the
/// helper to exit, reap it, and report the exit unless we caused it.
fn supervise(
    spec: &HelperSpec,
    proc: &Supervised,
    stderr: Option<ChildStderr>,
    on_exit: ExitNotify,
) {
    let (name, label) = (spec.name, spec.label.as_str());
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Helper) {
        log::error!("{label}: {}", crate::error_chain(&e));
    }
    let mut tail: VecDeque<String> = VecDeque::new();
    if let Some(stderr) = stderr {
        let mut r = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if text.is_empty() {
                continue;
            }
            match (spec.classify)(&text) {
                Line::Ignore => continue,
                Line::Debug => log::debug!("{label}: {name}: {text}"),
                Line::Warn => {
                    log::warn!("{label}: {name}: {text}");
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(text);
                }
            }
        }
    }
    // Wait for the exit without reaping, so a kill() racing with us still
    // signals the helper and not a recycled PID.
    // SAFETY: waitid(2) writes one siginfo_t, which lives on this stack frame.
    let rc = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            proc.pid,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    if rc < 0 {
        log::debug!("{label}: waitid({name}): {}", io::Error::last_os_error());
    }
    let status = match proc.child.lock() {
        Ok(mut child) => child.wait().map(|s| s.to_string()),
        Err(_) => return,
    };
    if proc.stopping.load(Ordering::SeqCst) {
        log::debug!("{label}: {name} ended");
        return;
    }
    let status = status.unwrap_or_else(|e| format!("unknown status ({e})"));
    let mut msg = format!(
        "{label}: {name} (pid {}, {}) exited ({status}): {}",
        proc.pid, spec.role, spec.consequence
    );
    if !tail.is_empty() {
        msg.push_str(&format!("; {name} said: "));
        msg.push_str(&Vec::from(tail).join(" / "));
    }
    on_exit(msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(label: &str) -> HelperSpec {
        HelperSpec {
            name: "sh",
            label: label.to_string(),
            role: "a test helper",
            consequence: "the test goes on",
            classify: |l| {
                if l.starts_with("noise") {
                    Line::Ignore
                } else {
                    Line::Warn
                }
            },
        }
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn an_exit_on_its_own_is_reported_with_the_last_lines() {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = Helper::spawn(
            sh("echo noise >&2; echo one >&2; echo two >&2; exit 3"),
            spec("t0"),
            "a shell",
            Box::new(move |m| {
                let _ = tx.send(m);
            }),
        )
        .unwrap();
        let msg = rx.recv_timeout(Duration::from_secs(10)).expect("reported");
        assert!(
            msg.starts_with(&format!("t0: sh (pid {}, ", h.pid())),
            "{msg}"
        );
        assert!(
            msg.contains("a test helper) exited (exit status: 3): the test goes on"),
            "{msg}"
        );
        assert!(msg.ends_with("sh said: one / two"), "{msg}");
    }

    /// Whether process `pid` runs `sleep`.
    fn runs_sleep(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|s| s.trim() == "sleep")
    }

    #[test]
    fn ended_by_us_is_not_reported() {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let h = Helper::spawn(
            sh("exec sleep 100"),
            spec("t1"),
            "a shell",
            Box::new(move |m| {
                let _ = tx.send(m);
            }),
        )
        .unwrap();
        let pid = h.pid();
        // The shell execs sleep: running, not exited.
        let t = std::time::Instant::now();
        while !runs_sleep(pid) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the helper never ran sleep"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(h);
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        assert!(!runs_sleep(pid), "the helper outlived its Helper");
    }

    #[test]
    fn a_missing_program_says_how_to_install_it() {
        let e = Helper::spawn(
            Command::new("/nonexistent/helper"),
            spec("t2"),
            "install it",
            Box::new(|_| {}),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot run '/nonexistent/helper': not found (install it)"
        );
    }
}
