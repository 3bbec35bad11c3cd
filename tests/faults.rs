//! Faults the host throws at microvm, and the defined way each one ends
//! (docs/ARCHITECTURE.md, "Faults and what they end in"):
//! - stderr a pipe whose reader is gone (`scripts/run 2>&1 | tee log`, and
//!   Ctrl-C ends `tee` too): SIGINT still gives 130, nothing panics;
//! - stdout a pipe whose reader is gone: the console's output is dropped,
//!   the VM runs on, SIGTERM still gives 143;
//! - SIGHUP, SIGTERM and SIGINT during boot, a snapshot write and a
//!   restore: 129, 143, 130, no socket or partial file left;
//! - a seccomp-filtered thread that frees memory: glibc must not open a
//!   file for it (it did, the first time a thread arena's heap shrank);
//! - a thread that panics under its filter: the message on stderr, exit 101.
//!
//! The faults whose guest moves megabytes are in `tests/faults_io.rs`.

mod common;

use std::io::BufReader;
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// What `dir` holds, sorted (file names).
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Stop signals at any moment end with 128+N and leave nothing behind:
/// SIGHUP while the VM boots (129), SIGTERM while it is paused and writing
/// a snapshot (143; the snapshot is finished first, whole), SIGINT while a
/// new process restores that snapshot (130). Each time the API socket is
/// gone afterwards and no `.partial` file is left.
#[test]
fn stop_signals_during_boot_snapshot_and_restore_leave_nothing_behind() {
    use common::api::{call_raw, ApiVm};
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let dir = TempDir::new("faults-signals");
    let snap = dir.path("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let vm_args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "microvm.test=wait",
    ];
    let expect = |vm: &mut ApiVm, sig: &str, code: i32, when: &str| {
        signal(vm.child.id(), sig);
        let st = vm.wait_exit(Duration::from_secs(60));
        vm.check(
            st.and_then(|s| s.code()) == Some(code),
            &format!("{sig} {when}: {st:?}, want {code}"),
        );
        vm.check(
            !vm.sock.exists(),
            &format!("the API socket is removed after {sig} {when}"),
        );
        let err = vm.stderr();
        vm.check(!err.contains("panicked"), "no panic");
    };

    // During boot: the socket is there, the guest has not printed a line.
    let mut vm = ApiVm::start(&dir.path("boot.sock"), &vm_args, &[]);
    expect(&mut vm, "-HUP", 129, "during boot");

    // Paused, in the middle of a snapshot write.
    let mut vm = ApiVm::start(&dir.path("snap.sock"), &vm_args, &[]);
    let boot = boot_deadline(Duration::from_secs(60), Duration::from_secs(600));
    let ok = vm.wait_for(boot, |vm| {
        vm.stdout().contains("tick 1 at") || vm.child_exited()
    });
    let alive = !vm.child_exited();
    vm.check(ok && alive, "the guest ticks");
    vm.checked_call("PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let body = serde_json::json!({ "snapshot_dir": snap }).to_string();
    let raw = format!(
        "PUT /snapshot/create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sock = vm.sock.clone();
    let writer = std::thread::spawn(move || call_raw(&sock, raw.as_bytes()));
    std::thread::sleep(Duration::from_millis(20));
    expect(&mut vm, "-TERM", 143, "while paused and writing a snapshot");
    let answer = writer.join().unwrap();
    let files = listing(&snap);
    eprintln!("SIGTERM during PUT /snapshot/create: answer {answer:?}, files {files:?}");
    assert!(
        files.iter().all(|f| !f.ends_with(".partial")),
        "a partial snapshot file is left: {files:?}"
    );
    assert_eq!(
        files,
        ["memory", "state"],
        "the snapshot is whole (answer {answer:?})"
    );

    // A new process restoring it.
    let sock = dir.path("restore.sock");
    let child = Command::new(microvm_bin())
        .arg("--api-sock")
        .arg(&sock)
        .arg("--restore")
        .arg(&snap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut restoring = Vm(child);
    let stderr = pump(restoring.0.stderr.take().unwrap());
    std::thread::sleep(Duration::from_millis(100));
    signal(restoring.0.id(), "-INT");
    let st = wait_with_deadline(&mut restoring.0, Duration::from_secs(60));
    let err = stderr.lock().unwrap().clone();
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(130),
        "SIGINT during a restore: {st:?}: {err}"
    );
    assert!(
        !sock.exists(),
        "the API socket is removed after SIGINT during a restore"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        listing(&snap),
        ["memory", "state"],
        "a restore never writes its snapshot"
    );
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

/// Run `child` in a new process of this test executable, which runs only
/// `test` there: the child's output, or `None` in the child itself (after
/// `child` returned). For faults that end or kill the whole process.
fn in_child(test: &str, child: fn()) -> Option<std::process::Output> {
    if std::env::var_os("MICROVM_FAULTS_CHILD").is_some_and(|t| t == test) {
        child();
        return None;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--test-threads=1"])
        .env("MICROVM_FAULTS_CHILD", test)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    Some(out)
}

#[test]
fn a_filtered_thread_frees_memory_without_opening_files() {
    let Some(out) = in_child(
        "a_filtered_thread_frees_memory_without_opening_files",
        free_under_a_filter,
    ) else {
        return;
    };
    let st = out.status;
    assert!(
        st.success(),
        "a thread whose filter forbids openat died freeing memory: {st:?} (signal 31 is SIGSYS): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child side of the next test: microvm's panic hook, then a worker
/// thread under a device worker's seccomp filter panics.
fn panic_under_a_filter() {
    microvm::host::install_panic_hook(|| {});
    let t = std::thread::Builder::new()
        .name("virtio-blk-0".into())
        .spawn(|| {
            microvm::seccomp::install(microvm::seccomp::ThreadKind::BlockWorker).unwrap();
            let v: Vec<u8> = Vec::new();
            // A bug in a worker: index out of range.
            std::hint::black_box(v[std::hint::black_box(3)]);
        })
        .unwrap();
    let _ = t.join();
    // Not reached: the hook ends the process.
    std::process::exit(0);
}

/// A thread that panics anyway (a bug) under its seccomp filter: the
/// message reaches stderr, the whole process ends with 101 at once (not
/// SIGSYS from the unwinding, not a VM left running without the thread).
#[test]
fn a_thread_that_panics_under_its_filter_ends_the_process_with_101_and_says_so() {
    let Some(out) = in_child(
        "a_thread_that_panics_under_its_filter_ends_the_process_with_101_and_says_so",
        panic_under_a_filter,
    ) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(101),
        "{:?} (signal 31 is SIGSYS): {err}",
        out.status
    );
    assert!(
        err.contains("microvm: thread 'virtio-blk-0' panicked at")
            && err.contains("the VM is stopped (exit 101)"),
        "{err}"
    );
}
