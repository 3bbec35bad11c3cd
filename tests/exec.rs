//! End-to-end: `microvm exec` and `microvm cp` into a running VM through
//! its vsock device and the agent of microvm-init (the test initramfs's
//! `microvm.test=agent` mode), then the same on the VM restored from a
//! snapshot, whose agent is told the host's clock and entropy.
//!
//! Sizes: stdin of 64 MiB through `sha256sum` and 20 execs at once on
//! normal KVM; 1 MiB and 4 where KVM interprets guest kernel code (every
//! byte and every fork costs interpreted kernel instructions there), and
//! the restored VM there gets only the clock, entropy and cp checks.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::api::ApiVm;
use common::*;

fn exec(uds: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(microvm_bin());
    c.arg("exec").arg("--vsock").arg(uds).args(args);
    c
}

/// `microvm exec --vsock UDS ARGS`, its output; stdin empty.
fn run_exec(uds: &Path, args: &[&str]) -> Output {
    exec(uds, args)
        .stdin(Stdio::null())
        .output()
        .expect("run microvm exec")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Retry `true` until the agent answers (it starts in the background).
fn wait_for_agent(vm: &mut ApiVm, uds: &Path, deadline: Duration) {
    let end = Instant::now() + deadline;
    loop {
        let out = run_exec(uds, &["--", "true"]);
        if out.status.code() == Some(0) {
            return;
        }
        let alive = !vm.child_exited();
        vm.check(
            Instant::now() < end && alive,
            &format!("the agent never answered: {}", text(&out.stderr)),
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The execs every VM of this file must serve.
fn check_execs(vm: &ApiVm, uds: &Path, stdin_mib: usize, at_once: usize) {
    let out = run_exec(uds, &["--", "sh", "-c", "exit 7"]);
    vm.check(out.status.code() == Some(7), &format!("exit 7: {out:?}"));
    let out = run_exec(uds, &["--", "sh", "-c", "kill -9 $$"]);
    vm.check(
        out.status.code() == Some(137),
        &format!("SIGKILL gives 137: {out:?}"),
    );
    let out = run_exec(uds, &["--", "sh", "-c", "echo out; echo err >&2"]);
    vm.check(
        text(&out.stdout) == "out\n" && text(&out.stderr) == "err\n",
        &format!("stdout and stderr apart: {out:?}"),
    );
    // stdin through sha256sum.
    let data: Vec<u8> = (0..stdin_mib << 20)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let t = Instant::now();
    let mut child = exec(uds, &["--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = {
        let data = data.clone();
        std::thread::spawn(move || stdin.write_all(&data))
    };
    let out = child.wait_with_output().unwrap();
    let _ = feed.join();
    let got = text(&out.stdout);
    vm.check(
        out.status.success() && got.starts_with(&sha256_hex(&data)),
        &format!(
            "{stdin_mib} MiB through sha256sum: {got:?} {}",
            text(&out.stderr)
        ),
    );
    eprintln!(
        "exec: {stdin_mib} MiB of stdin through sha256sum in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // A TTY of the size asked for. `script`-free: the client's --tty with
    // no local terminal still asks the agent for a pty.
    let out = run_exec(uds, &["--tty", "--", "stty", "size"]);
    vm.check(
        out.status.success() && text(&out.stdout).contains(' '),
        &format!("a TTY exec reads its size: {out:?}"),
    );
    // Several at once.
    let t = Instant::now();
    let kids: Vec<_> = (0..at_once)
        .map(|i| {
            exec(uds, &["--", "sh", "-c", &format!("echo {i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        vm.check(
            out.status.success() && text(&out.stdout) == format!("{i}\n"),
            &format!("concurrent exec {i}: {out:?}"),
        );
    }
    eprintln!(
        "exec: {at_once} concurrent execs in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // Round trip of `true`, p50 of 10.
    let mut times: Vec<Duration> = (0..if at_once > 4 { 10 } else { 3 })
        .map(|_| {
            let t = Instant::now();
            let out = run_exec(uds, &["--", "true"]);
            assert!(out.status.success(), "{out:?}");
            t.elapsed()
        })
        .collect();
    times.sort();
    eprintln!(
        "exec: `true` round trip p50 {:?} of {}",
        times[times.len() / 2],
        times.len()
    );
}

/// cp of a directory into the guest and back, compared file by file.
fn check_cp(vm: &ApiVm, uds: &Path, dir: &TempDir, tag: &str) {
    let src = dir.path(&format!("tree-{tag}"));
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"hello\n").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("sub/big.bin"), &big).unwrap();
    let guest = format!("VM:/tmp/{tag}");
    let cp = |a: &str, b: &str| {
        Command::new(microvm_bin())
            .args(["cp", "--vsock"])
            .arg(uds)
            .args([a, b])
            .output()
            .unwrap()
    };
    let out = cp(src.to_str().unwrap(), &guest);
    vm.check(out.status.success(), &format!("cp into the guest: {out:?}"));
    let out = run_exec(
        uds,
        &["--", "sha256sum", &format!("/tmp/{tag}/sub/big.bin")],
    );
    vm.check(
        text(&out.stdout).starts_with(&sha256_hex(&big)),
        &format!("the guest has the same bytes: {out:?}"),
    );
    let back = dir.path(&format!("back-{tag}"));
    let out = cp(&guest, back.to_str().unwrap());
    vm.check(
        out.status.success(),
        &format!("cp out of the guest: {out:?}"),
    );
    vm.check(
        std::fs::read(back.join("sub/big.bin")).ok().as_deref() == Some(&big[..])
            && std::fs::read(back.join("a.txt")).ok().as_deref() == Some(&b"hello\n"[..]),
        "the tree came back the same",
    );
}

#[test]
fn exec_and_cp_through_the_agent_before_and_after_restore() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    // Where KVM interprets guest kernel code one exec takes seconds (a
    // fork and exec are millions of kernel instructions): less there.
    let emulated = microvm::host::kvm_is_emulated();
    let (mib, at_once) = if emulated { (1, 4) } else { (64, 20) };
    let dir = TempDir::new("exec");
    let uds = dir.path("v.sock");
    let vsock = format!("cid=3,uds={}", uds.display());
    let boot = boot_deadline(Duration::from_secs(90), Duration::from_secs(900));
    let mut vm = ApiVm::start(
        &dir.path("api.sock"),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "512",
            "--vsock",
            &vsock,
            "--cmdline",
            "microvm.test=agent microvm.test=wait",
        ],
        &[("RUST_LOG", "info")],
    );
    let ok = vm.wait_for(boot, |vm| {
        vm.stdout().contains("agent started") || vm.child_exited()
    });
    vm.check(ok, "the agent starts");
    wait_for_agent(&mut vm, &uds, boot);
    check_execs(&vm, &uds, mib, at_once);
    check_cp(&vm, &uds, &dir, "boot");
    let boot_id = text(&run_exec(&uds, &["--", "cat", "/proc/sys/kernel/random/boot_id"]).stdout);

    // Snapshot, then restore twice from it.
    let snap = dir.path("snap");
    std::fs::create_dir_all(&snap).unwrap();
    vm.pause_and_snapshot(&snap);
    vm.stop_with_sigterm();

    let mut randoms = Vec::new();
    for round in 0..2 {
        // Time passes while saved: the agent must set the clock on.
        std::thread::sleep(Duration::from_secs(3));
        let t = Instant::now();
        let mut vm = ApiVm::start(
            &dir.path(&format!("api-r{round}.sock")),
            &["--restore", snap.to_str().unwrap()],
            &[("RUST_LOG", "info")],
        );
        wait_for_agent(&mut vm, &uds, boot);
        eprintln!("exec: restore -> first exec result in {:?}", t.elapsed());
        // The agent's clock notice comes from a thread of the VMM: wait for it.
        let ok = vm.wait_for(Duration::from_secs(30), |vm| {
            vm.stderr()
                .contains("the guest's clock and entropy were refreshed")
        });
        vm.check(ok, "the VMM told the agent about the restore");
        let out = run_exec(&uds, &["--", "date", "+%s"]);
        let guest_now: i64 = text(&out.stdout).trim().parse().unwrap_or(0);
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        vm.check(
            (guest_now - host_now).abs() <= 2,
            &format!("the guest clock after restore: {guest_now}, host {host_now}"),
        );
        let id = text(&run_exec(&uds, &["--", "cat", "/proc/sys/kernel/random/boot_id"]).stdout);
        vm.check(id == boot_id, "the same boot_id after restore");
        let r = run_exec(
            &uds,
            &["--", "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"],
        );
        randoms.push(text(&r.stdout));
        if round == 0 {
            if !emulated {
                check_execs(&vm, &uds, 8, at_once);
            }
            check_cp(&vm, &uds, &dir, "restored");
        }
        vm.terminate();
        let st = vm.wait_exit(Duration::from_secs(60));
        vm.check(
            st.and_then(|s| s.code()) == Some(143),
            "SIGTERM gives 143 after restore",
        );
        let err = vm.stderr();
        vm.check(
            !err.contains("panicked") && !err.contains("SIGSYS"),
            "no panic, no seccomp kill",
        );
    }
    assert_ne!(
        randoms[0], randoms[1],
        "two restores read different random bytes"
    );
}
