//! End-to-end: snapshot and restore.
//!
//! - `ticking_guest_resumes_from_a_snapshot`: the test initramfs ticks once
//!   a second; paused after a few ticks, saved through the API, stopped;
//!   `--restore DIR` in a new process goes on with the next tick and a wall
//!   clock that agrees with the host's. The same files restore a second time
//!   through `PUT /snapshot/load` with `resume_vm` false (paused until
//!   `PATCH /vm`), and bad files (a memory file of the wrong size, a state
//!   file of another version, a drive whose size changed) are refused with
//!   exit 2 and a message, nothing started.
//! - `diff_snapshot_over_its_base_restores_the_later_guest`: a Full, then a
//!   Diff snapshot of a `--track-dirty-pages` VM, rebased and restored; a
//!   Diff of a VM that does not track is refused, and a snapshot onto a
//!   full disk fails, leaves no file behind, and the VM resumes.
//! - `flask_vm_serves_after_restore`: the Flask rootfs with user networking
//!   and a published port, snapshotted once it answers; two restores one
//!   after the other each answer `Hello, World!` on the same port, and a line
//!   typed into each restored guest is written to its scratch drive and is
//!   in the image file afterwards.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::api::{call, ApiVm};
use common::{boot_deadline, boot_prereqs, rootfs, test_initrd, TempDir};

fn ticks(console: &str) -> Vec<(u64, i64)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.split("microvm-test-init: tick ").nth(1)?;
            let (n, at) = rest.split_once(" at ")?;
            Some((n.trim().parse().ok()?, at.trim().parse().ok()?))
        })
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `microvm ARGS` must fail with exit 2 and a message containing `want`.
fn refused(args: &[&str], want: &str) {
    // Bounded: a file wrongly taken for good runs its VM until this ends it.
    let out = Command::new(common::microvm_bin())
        .args(args)
        .args(["--timeout", "120"])
        .output()
        .expect("run microvm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit 2 expected: {err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert!(
        out.stdout.is_empty(),
        "nothing ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn ticking_guest_resumes_from_a_snapshot() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let dir = TempDir::new("snapshot-ticks");
    let snap = dir.path("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let scratch = dir.path("scratch.img");
    std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
    let boot = boot_deadline(Duration::from_secs(60), Duration::from_secs(600));

    let mut vm = ApiVm::start(
        &dir.path("api.sock"),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--drive",
            scratch.to_str().unwrap(),
            "--cmdline",
            "microvm.test=wait",
        ],
        &[("RUST_LOG", "info")],
    );
    let ok = vm.wait_for(boot, |vm| {
        ticks(&vm.stdout()).len() >= 3 || vm.child_exited()
    });
    vm.check(ok && ticks(&vm.stdout()).len() >= 3, "the guest ticks");
    // How far the guest's clock is behind the host's as a tick arrives
    // (seconds; about 0 on normal KVM, a few where KVM interprets the guest).
    let lag_before = unix_now() - ticks(&vm.stdout()).last().unwrap().1;
    vm.pause_and_snapshot(&snap);
    let last = ticks(&vm.stdout()).last().copied().unwrap();
    vm.stop_with_sigterm();

    // Time passes while saved: the restored guest's clock must move on by
    // as much, not resume at the moment it was saved.
    std::thread::sleep(Duration::from_secs(6));
    let snap_s = snap.to_str().unwrap();
    let t = Instant::now();
    let mut vm = ApiVm::start(
        &dir.path("api2.sock"),
        &["--restore", snap_s],
        &[("RUST_LOG", "info")],
    );
    let (_, info) = call(&vm.sock, "GET", "/", None);
    vm.check(
        info.contains(r#""state":"Running""#),
        &format!("GET /: {info}"),
    );
    let ok = vm.wait_for(Duration::from_secs(60), |vm| ticks(&vm.stdout()).len() >= 3);
    vm.check(ok, "the restored guest ticks");
    eprintln!(
        "restore: {:?} to the third tick; {}",
        t.elapsed(),
        vm.stderr()
            .lines()
            .filter(|l| l.contains("restored") || l.contains("first KVM_RUN"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let after = ticks(&vm.stdout());
    vm.check(
        after[0].0 == last.0 + 1,
        &format!("the first tick after restore follows {last:?}: {after:?}"),
    );
    let lag_after = unix_now() - after.last().unwrap().1;
    eprintln!(
        "guest clock lag behind the host: {lag_before} s before, {lag_after} s after restore"
    );
    vm.check(
        (lag_after - lag_before).abs() <= 2,
        &format!(
            "the guest's clock lags the host's by {lag_before} s before the snapshot and \
             {lag_after} s after restore (ticks {after:?}, last before {last:?})"
        ),
    );
    vm.stop_with_sigterm();

    // The same files again, paused until resumed.
    let mut vm = ApiVm::start(&dir.path("api3.sock"), &[], &[]);
    let body = serde_json::json!({ "snapshot_dir": snap, "resume_vm": false }).to_string();
    let r = call(&vm.sock, "PUT", "/snapshot/load", Some(&body));
    vm.check(r.0 == 204, &format!("snapshot/load: {r:?}"));
    let (_, info) = call(&vm.sock, "GET", "/", None);
    vm.check(
        info.contains(r#""state":"Paused""#),
        &format!("GET /: {info}"),
    );
    std::thread::sleep(Duration::from_secs(3));
    vm.check(
        ticks(&vm.stdout()).is_empty(),
        "no ticks while loaded paused",
    );
    let r = call(&vm.sock, "PUT", "/snapshot/load", Some(&body));
    vm.check(r.0 == 400, &format!("a second load is refused: {r:?}"));
    let r = call(&vm.sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    vm.check(r.0 == 204, &format!("resume: {r:?}"));
    let ok = vm.wait_for(Duration::from_secs(60), |vm| {
        !ticks(&vm.stdout()).is_empty()
    });
    vm.check(ok, "ticks after resume");
    // Stop it from its console: the init reboots and microvm exits 0.
    let stdin = vm.stdin.as_mut().unwrap();
    stdin.write_all(b"stop\n").unwrap();
    stdin.flush().unwrap();
    let st = vm.wait_exit(Duration::from_secs(120));
    vm.check(st.and_then(|s| s.code()) == Some(0), "clean exit 0");

    // Bad files are refused before anything runs.
    let bad = dir.path("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let state = std::fs::read(snap.join("state")).unwrap();
    std::fs::write(bad.join("state"), &state).unwrap();
    std::fs::write(bad.join("memory"), b"short").unwrap();
    let bad_s = bad.to_str().unwrap();
    refused(&["--restore", bad_s], "bytes, the snapshot's guest has");
    std::fs::copy(snap.join("memory"), bad.join("memory")).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&state).unwrap();
    v["version"] = 99.into();
    std::fs::write(bad.join("state"), v.to_string()).unwrap();
    refused(&["--restore", bad_s], "format version 99");
    std::fs::write(bad.join("state"), &state[..state.len() / 2]).unwrap();
    refused(&["--restore", bad_s], "not a usable snapshot");
    std::fs::write(bad.join("state"), &state).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&scratch)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    refused(&["--restore", bad_s], "the backing file has 2097152 bytes");
    std::fs::remove_file(&scratch).unwrap();
    refused(&["--restore", bad_s], "cannot be used");
    refused(
        &["--restore", dir.path("nowhere").to_str().unwrap()],
        "No such file",
    );
}

/// Diff snapshots: a ticking guest booted with `--track-dirty-pages` is
/// saved in full, runs a few ticks more and is saved as a Diff. The diff
/// holds a small part of the memory the full one does; laid over the full
/// one's memory (`microvm snapshot rebase`) and restored with the diff's
/// state, the guest goes on from the diff's moment: its first tick follows
/// the last one before the diff (a diff that missed pages the guest wrote
/// restores a guest that crashes or ticks from the wrong count). A VM that
/// does not track dirty pages refuses a Diff with a message.
#[test]
fn diff_snapshot_over_its_base_restores_the_later_guest() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let dir = TempDir::new("snapshot-diff");
    let (full, diff, merged) = (dir.path("full"), dir.path("diff"), dir.path("merged"));
    for d in [&full, &diff, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    let boot = boot_deadline(Duration::from_secs(60), Duration::from_secs(600));
    let mut vm = ApiVm::start(
        &dir.path("api.sock"),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "microvm.test=wait",
            "--track-dirty-pages",
        ],
        &[("RUST_LOG", "info")],
    );
    let ok = vm.wait_for(boot, |vm| {
        ticks(&vm.stdout()).len() >= 2 || vm.child_exited()
    });
    vm.check(ok, "the guest ticks");
    let (_, mc) = call(&vm.sock, "GET", "/machine-config", None);
    vm.check(
        mc.contains(r#""track_dirty_pages":true"#),
        &format!("GET /machine-config: {mc}"),
    );
    vm.pause_and_snapshot(&full);
    let at_full = ticks(&vm.stdout()).len();
    vm.checked_call("PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    let ok = vm.wait_for(boot, |vm| ticks(&vm.stdout()).len() >= at_full + 2);
    vm.check(ok, "the guest ticks on after the full snapshot");
    vm.checked_call("PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let body = serde_json::json!({ "snapshot_type": "Diff", "snapshot_dir": diff }).to_string();
    vm.checked_call("PUT", "/snapshot/create", &body, 204);
    let last = ticks(&vm.stdout()).last().copied().unwrap();
    vm.stop_with_sigterm();

    use std::os::unix::fs::MetadataExt;
    let allocated = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let (full_bytes, diff_bytes) = (
        allocated(&full.join("memory")),
        allocated(&diff.join("memory")),
    );
    eprintln!(
        "memory files: full {} KiB, diff {} KiB on disk (same apparent size)",
        full_bytes >> 10,
        diff_bytes >> 10
    );
    assert!(
        diff_bytes > 0 && diff_bytes * 4 < full_bytes,
        "the diff holds the pages written since the full snapshot, not all: \
         {diff_bytes} vs {full_bytes} bytes"
    );

    let out = Command::new(common::microvm_bin())
        .args(["snapshot", "rebase", "--base-file"])
        .arg(full.join("memory"))
        .arg("--diff-file")
        .arg(diff.join("memory"))
        .output()
        .expect("run microvm snapshot rebase");
    assert!(
        out.status.success(),
        "rebase: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(full.join("memory"), merged.join("memory")).unwrap();
    std::fs::copy(diff.join("state"), merged.join("state")).unwrap();
    let mut vm = ApiVm::start(
        &dir.path("api2.sock"),
        &["--restore", merged.to_str().unwrap()],
        &[("RUST_LOG", "info")],
    );
    let ok = vm.wait_for(Duration::from_secs(120), |vm| {
        ticks(&vm.stdout()).len() >= 2 || vm.child_exited()
    });
    let after = ticks(&vm.stdout());
    vm.check(ok, "the rebased snapshot's guest ticks");
    vm.check(
        after[0].0 == last.0 + 1,
        &format!("the first tick after restore follows the diff's last {last:?}: {after:?}"),
    );
    // This VM was restored without tracking: a Diff is refused, it runs on.
    vm.checked_call("PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let body =
        serde_json::json!({ "snapshot_type": "Diff", "snapshot_dir": dir.path("no") }).to_string();
    let (code, msg) = call(&vm.sock, "PUT", "/snapshot/create", Some(&body));
    vm.check(
        code == 400 && msg.contains("track_dirty_pages"),
        &format!("a Diff without tracking: {code} {msg}"),
    );
    // A snapshot onto a full disk fails with the reason and leaves no file
    // behind (both are written under temporary names, renamed once whole);
    // the VM stays paused and resumes.
    let small = dir.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "microvm-test"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if mounted || common::missing("a 4 MiB tmpfs for the full-disk snapshot (mount needs root)") {
        let body = serde_json::json!({ "snapshot_dir": small }).to_string();
        let (code, msg) = call(&vm.sock, "PUT", "/snapshot/create", Some(&body));
        let left: Vec<_> = std::fs::read_dir(&small)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let _ = Command::new("umount").arg(&small).status();
        vm.check(
            code == 400 && msg.contains("No space left"),
            &format!("a snapshot onto a full disk: {code} {msg}"),
        );
        vm.check(left.is_empty(), &format!("files left behind: {left:?}"));
        let (_, info) = call(&vm.sock, "GET", "/", None);
        vm.check(
            info.contains(r#""state":"Paused""#),
            &format!("GET /: {info}"),
        );
    }
    let before = ticks(&vm.stdout()).len();
    vm.checked_call("PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    let ok = vm.wait_for(Duration::from_secs(60), |vm| {
        ticks(&vm.stdout()).len() > before
    });
    vm.check(ok, "the guest ticks on after the failed snapshot");
    vm.stop_with_sigterm();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn curl(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-s", "--noproxy", "*", "--max-time", "20"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn flask_vm_serves_after_restore() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(rootfs) = rootfs() else { return };
    if !common::have_command("passt", "--version") || !common::have_command("curl", "--version") {
        return;
    }
    let dir = TempDir::new("snapshot-flask");
    let disk = dir.path("root.ext4");
    std::fs::copy(&rootfs, &disk).unwrap();
    let scratch = dir.path("scratch.img");
    std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
    let snap = dir.path("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    // The app, and a loop that writes each console line to the scratch
    // drive (what a restored guest does with its disk).
    let guest = "python3 /app/app.py >/tmp/app.log 2>&1 & \
                 while read -r line; do \
                 printf '%s\\n' \"$line\" | dd of=/dev/vdb conv=fsync,notrunc status=none; \
                 echo \"microvm-snapshot: wrote $line\"; done";
    let boot = boot_deadline(Duration::from_secs(240), Duration::from_secs(1500));
    let t = Instant::now();
    let mut vm = ApiVm::start(
        &dir.path("api.sock"),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--rootfs",
            disk.to_str().unwrap(),
            "--drive",
            scratch.to_str().unwrap(),
            "--memory",
            "256",
            "--net",
            "user",
            "--publish",
            &publish,
            "--",
            "bash",
            "-c",
            guest,
        ],
        &[("RUST_LOG", "info")],
    );
    let ok = vm.wait_for(boot, |vm| {
        vm.child_exited() || curl(port) == "Hello, World!"
    });
    let alive = !vm.child_exited();
    vm.check(ok && alive, "the app answers on the published port");
    eprintln!("cold boot to first HTTP response: {:?}", t.elapsed());
    vm.pause_and_snapshot(&snap);
    vm.stop_with_sigterm();

    for (round, word) in ["first-restore", "second-restore"].iter().enumerate() {
        let t = Instant::now();
        let mut vm = ApiVm::start(
            &dir.path(&format!("api-r{round}.sock")),
            &["--restore", snap.to_str().unwrap()],
            &[("RUST_LOG", "info")],
        );
        let answered = vm.wait_for(Duration::from_secs(120), |vm| {
            vm.child_exited() || curl(port) == "Hello, World!"
        });
        let alive = !vm.child_exited();
        vm.check(
            answered && alive,
            &format!("restore {round}: Hello, World! on port {port}"),
        );
        eprintln!(
            "restore {round}: first HTTP response after {:?}",
            t.elapsed()
        );
        let stdin = vm.stdin.as_mut().unwrap();
        writeln!(stdin, "{word}").unwrap();
        stdin.flush().unwrap();
        let wrote = vm.wait_for(Duration::from_secs(120), |vm| {
            vm.stdout()
                .contains(&format!("microvm-snapshot: wrote {word}"))
        });
        vm.check(
            wrote,
            &format!("restore {round}: the guest writes its drive"),
        );
        vm.stop_with_sigterm();
        let image = std::fs::read(&scratch).unwrap();
        let want = format!("{word}\n");
        assert!(
            image.starts_with(want.as_bytes()),
            "restore {round}: the drive image starts with {:?}",
            String::from_utf8_lossy(&image[..32])
        );
    }
}
