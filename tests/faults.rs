//! Faults the host throws at microvm, and the defined way each one ends
//! (docs/ARCHITECTURE.md, "Faults and what they end in"):
//! - stderr a pipe whose reader is gone (`scripts/run 2>&1 | tee log`, and
//!   Ctrl-C ends `tee` too): SIGINT still gives 130, nothing panics;
//! - stdout a pipe whose reader is gone: the console's output is dropped,
//!   the VM runs on, SIGTERM still gives 143;
//! - a seccomp-filtered thread that frees memory: glibc must not open a
//!   file for it (it did, the first time a thread arena's heap shrank).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "microvm-test-init: hello from userspace";

/// The test initramfs ticking until stopped, stdout and stderr piped to us.
fn waiting_vm(kernel: &std::path::Path, initrd: &std::path::Path) -> Vm {
    let child = Command::new(microvm_bin())
        .args(["--kernel", kernel.to_str().unwrap()])
        .args(["--initrd", initrd.to_str().unwrap()])
        .args(["--cmdline", "microvm.test=wait", "--timeout", "1800"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Vm(child)
}

/// Read `r` line by line until one contains `what` (or the deadline).
fn read_until(r: &mut impl BufRead, what: &str, deadline: Duration) -> bool {
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

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

#[test]
fn sigint_with_stderr_into_a_dead_pipe_gives_130() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let mut vm = waiting_vm(&kernel, &initrd);
    let mut out = BufReader::new(vm.0.stdout.take().unwrap());
    let boot = boot_deadline(Duration::from_secs(60), Duration::from_secs(900));
    assert!(read_until(&mut out, HELLO, boot), "the guest booted");
    // The reader of stderr goes away, as `tee` does on the same Ctrl-C.
    drop(vm.0.stderr.take());
    let _console = pump(out);
    signal(vm.0.id(), "-INT");
    let st = wait_with_deadline(&mut vm.0, Duration::from_secs(60));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(130),
        "SIGINT with stderr closed: {st:?} (101 is a panic, 159 a seccomp kill)"
    );
}

#[test]
fn stdout_into_a_dead_pipe_drops_the_console_and_the_vm_runs_on() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let mut vm = waiting_vm(&kernel, &initrd);
    let stderr = pump(vm.0.stderr.take().unwrap());
    let mut out = BufReader::new(vm.0.stdout.take().unwrap());
    let boot = boot_deadline(Duration::from_secs(60), Duration::from_secs(900));
    assert!(
        read_until(&mut out, "tick 1 at", boot),
        "the guest ticks: {}",
        stderr.lock().unwrap()
    );
    // `| head -c 300`: the reader is gone, the guest keeps printing ticks.
    drop(out);
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        matches!(vm.0.try_wait(), Ok(None)),
        "microvm ended when its stdout reader went away: {}",
        stderr.lock().unwrap()
    );
    signal(vm.0.id(), "-TERM");
    let st = wait_with_deadline(&mut vm.0, Duration::from_secs(60));
    let err = stderr.lock().unwrap().clone();
    assert_eq!(st.and_then(|s| s.code()), Some(143), "{st:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The child side of the next test: with microvm's malloc settings, a
/// thread whose filter kills the process on `openat` allocates and frees
/// 16 MiB in small blocks (its arena's heap grows, then would shrink).
fn free_under_a_filter() {
    use std::collections::BTreeMap;
    microvm::seccomp::limit_malloc_arenas();
    let t = std::thread::spawn(|| {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            [(libc::SYS_openat, vec![]), (libc::SYS_open, vec![])]
                .into_iter()
                .collect();
        let filter = seccompiler::SeccompFilter::new(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::KillProcess,
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap();
        let prog: seccompiler::BpfProgram = filter.try_into().unwrap();
        seccompiler::apply_filter(&prog).unwrap();
        for _ in 0..4 {
            let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 4000]).collect();
            drop(blocks);
        }
    });
    t.join().unwrap();
}

#[test]
fn a_filtered_thread_frees_memory_without_opening_files() {
    if std::env::var_os("MICROVM_FAULTS_CHILD").is_some() {
        free_under_a_filter();
        return;
    }
    let st = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_filtered_thread_frees_memory_without_opening_files",
            "--test-threads=1",
        ])
        .env("MICROVM_FAULTS_CHILD", "1")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "a thread whose filter forbids openat died freeing memory: {st:?} (signal 31 is SIGSYS)"
    );
}
