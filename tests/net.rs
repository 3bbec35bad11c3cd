//! End-to-end: the Flask VM on virtio-net, reached from the host side of a TAP.
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

    let mut vm = NetVm::boot(&ns, &kernel, &disk, HOST_IP, GUEST_IP);
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

    vm.sigterm_gives_143();
}
