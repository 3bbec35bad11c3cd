//! End-to-end: the Flask VM on virtio-net, reached from the host side of a
//! TAP; then snapshotted and restored in a new process on a new TAP.
//!
//! Everything runs inside a network namespace this test creates and deletes:
//! the TAP, its host address, the VM and the HTTP client. No traffic leaves it.

mod common;

use std::process::Command;
use std::time::Instant;

use common::*;

const HOST_IP: &str = "10.213.0.1";
const GUEST_IP: &str = "10.213.0.2";

#[test]
fn flask_app_answers_over_virtio_net() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(rootfs) = rootfs() else { return };
    if Command::new("curl").arg("--version").output().is_err() {
        missing("curl is not installed");
        return;
    }
    let Some(ns) = Netns::create() else { return };
    let dir = TempDir::new("net");
    let disk = dir.path("root.ext4");
    std::fs::copy(&rootfs, &disk).unwrap();

    let sock = dir.path("api.sock");
    let mut vm = NetVm::boot_with(
        &ns,
        &kernel,
        &disk,
        HOST_IP,
        GUEST_IP,
        &["--api-sock", sock.to_str().unwrap()],
    );
    let ready = vm.wait_for("microvm-init: app ready on port 80");
    eprintln!("boot to Flask app ready: {:.1} s", ready.as_secs_f64());
    if !vm.console_has("EXT4-fs (vda): mounted filesystem") {
        vm.fail("kernel did not report mounting ext4 from /dev/vda");
    }

    let url = format!("http://{GUEST_IP}/");
    let one = ns.exec(&["curl", "-s", "--max-time", "120", &url]);
    let body = String::from_utf8_lossy(&one.stdout).to_string();
    if body.trim() != "Hello, World!" {
        vm.fail(&format!(
            "unexpected body {body:?} (curl status {:?})",
            one.status
        ));
    }

    // 100 sequential requests from one client process; every one must be a 200.
    // `-o` applies to one URL, so each URL gets its own.
    let mut argv = vec!["curl", "-s", "-w", "%{http_code}\\n", "--max-time", "120"];
    for _ in 0..100 {
        argv.extend(["-o", "/dev/null", url.as_str()]);
    }
    let t = Instant::now();
    let many = ns.exec(&argv);
    let codes = String::from_utf8_lossy(&many.stdout).to_string();
    let ok = codes.lines().filter(|l| l.trim() == "200").count();
    eprintln!(
        "100 sequential requests: {ok} OK in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if ok != 100 {
        vm.fail(&format!("only {ok}/100 requests succeeded: {codes}"));
    }

    // Snapshot the running VM and restore it in a new process: microvm
    // creates the TAP anew (same host address and MAC), the guest keeps
    // its address and answers at once.
    let snap = dir.path("snap");
    std::fs::create_dir_all(&snap).unwrap();
    for (method, path, body) in [
        ("PATCH", "/vm", r#"{"state": "Paused"}"#.to_string()),
        (
            "PUT",
            "/snapshot/create",
            serde_json::json!({ "snapshot_dir": snap }).to_string(),
        ),
    ] {
        let r = common::api::call(&sock, method, path, Some(&body));
        if r.0 != 204 {
            vm.fail(&format!("{method} {path}: {r:?}"));
        }
    }
    vm.sigterm_gives_143();
    let t = Instant::now();
    let mut vm = NetVm::spawn(&ns, &["--restore", snap.to_str().unwrap()]);
    // Until the new process has created the TAP there is no route: retry.
    let mut last = None;
    while t.elapsed() < std::time::Duration::from_secs(60) {
        let again = ns.exec(&["curl", "-s", "--max-time", "10", &url]);
        if String::from_utf8_lossy(&again.stdout).trim() == "Hello, World!" {
            last = None;
            break;
        }
        last = Some(again);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if let Some(again) = last {
        vm.fail(&format!(
            "after restore: no Hello, World! in 60 s (last: {:?}, curl status {:?})",
            String::from_utf8_lossy(&again.stdout),
            again.status
        ));
    }
    eprintln!(
        "restored on a new TAP: first answer after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    vm.sigterm_gives_143();
}
