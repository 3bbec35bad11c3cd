//! End-to-end: `microvm --kernel K --rootfs R -- CMD...` exits with CMD's status.
//!
//! Each test boots a throw-away copy of the Flask root filesystem in command mode.

mod common;

use std::time::Duration;

use common::*;

/// Boot the rootfs (a private copy) running `cmd`; return the run.
fn run_command(tag: &str, cmd: &[&str], extra: &[&str]) -> Option<Run> {
    let kernel = boot_prereqs()?;
    let rootfs = rootfs()?;
    let dir = TempDir::new(tag);
    let disk = dir.path("rootfs.ext4");
    std::fs::copy(&rootfs, &disk).expect("copy rootfs");
    let mut a = args(&["--kernel", kernel.to_str()?, "--rootfs", disk.to_str()?]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push("--".into());
    a.extend(cmd.iter().map(|s| s.to_string()));
    Some(run(
        &a,
        None,
        boot_deadline(Duration::from_secs(60), Duration::from_secs(1200)),
    ))
}

#[test]
fn true_exits_zero() {
    let Some(r) = run_command("true", &["true"], &[]) else {
        return;
    };
    r.check(r.code() == Some(0), "`true` in the guest -> exit 0");
}

#[test]
fn false_exits_one() {
    let Some(r) = run_command("false", &["false"], &[]) else {
        return;
    };
    r.check(r.code() == Some(1), "`false` in the guest -> exit 1");
}

#[test]
fn exit_status_and_output_order_and_clock() {
    let script =
        "echo clock=$(date -u +%s); for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 42";
    let Some(r) = run_command("exit42", &["sh", "-c", script], &[]) else {
        return;
    };
    r.check(r.code() == Some(42), "`sh -c 'exit 42'` -> exit 42");
    let lines: Vec<&str> = r
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("out") || l.starts_with("err"))
        .collect();
    r.check(
        lines == ["out1", "err1", "out2", "err2", "out3", "err3"],
        "stdout and stderr of the command arrive in order on stdout",
    );
    // The guest's wall clock (the CMOS RTC or kvmclock) is the host's.
    let clock = r
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("clock="))
        .and_then(|v| v.parse::<i64>().ok());
    r.check(clock.is_some(), "the command printed the guest clock");
    r.check_guest_clock(clock.unwrap_or_default(), Duration::from_secs(5));
}

#[test]
fn death_by_signal_is_128_plus_n() {
    let Some(r) = run_command("kill9", &["sh", "-c", "kill -9 $$"], &[]) else {
        return;
    };
    r.check(r.code() == Some(137), "killed by SIGKILL -> 137");
}

/// The deadline applies whatever the guest is doing; here it fires during boot,
/// which exercises the same stop path as a command that overruns.
#[test]
fn timeout_stops_the_vm_with_124() {
    let Some(r) = run_command("timeout", &["sleep", "100000"], &["--timeout", "3"]) else {
        return;
    };
    r.check(r.code() == Some(124), "--timeout -> exit 124");
    r.check(
        r.stderr.contains("timed out after 3.0 s"),
        "says it timed out",
    );
    r.check(r.elapsed < Duration::from_secs(30), "stops promptly");
}

/// Spawn a VM booting the test initramfs, without waiting.
fn spawn_initramfs_vm(kernel: &std::path::Path, initrd: &std::path::Path) -> std::process::Child {
    spawn(
        &args(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
        ]),
        &[],
    )
}

#[test]
fn sigterm_stops_the_vm_with_143() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let mut child = spawn_initramfs_vm(&kernel, &initrd);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY-free: signal the child we spawned, by its PID.
    let pid = child.id().to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(ok.success());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(143), "SIGTERM -> exit 143");
}

/// A SIGTERM that arrives while microvm is still building the VM (it has
/// opened /dev/kvm, the vCPUs do not run yet) must end it the same way:
/// exit 143, not death by the signal.
#[test]
fn sigterm_while_the_vm_is_built_gives_143() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let mut child = spawn_initramfs_vm(&kernel, &initrd);
    let fd_dir = format!("/proc/{}/fd", child.id());
    let opened_kvm = || {
        std::fs::read_dir(&fd_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|t| t == std::path::Path::new("/dev/kvm"))
            })
    };
    let start = std::time::Instant::now();
    while !opened_kvm() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_micros(100));
    }
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on the PID of the child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = wait_with_deadline(&mut child, Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(143),
        "SIGTERM once /dev/kvm is open -> exit 143 (got {status:?})"
    );
}
