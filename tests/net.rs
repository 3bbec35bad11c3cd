//! End-to-end: the Flask VM on virtio-net, reached from the host side of a TAP.
//!
//! Everything runs inside a network namespace this test creates and deletes:
//! the TAP, its host address, the VM and the HTTP client. No traffic leaves it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

    let bin = microvm_bin();
    let net = format!("host={HOST_IP}/30,guest={GUEST_IP}");
    let start = Instant::now();
    let mut child = ns
        .command(&[
            bin.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--rootfs",
            disk.to_str().unwrap(),
            "--memory",
            "256",
            "--net",
            &net,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microvm in the namespace");
    let console = pump(child.stdout.take().unwrap());
    let stderr = pump(child.stderr.take().unwrap());
    let mut vm = Vm(child);

    let report = |what: &str| -> ! {
        panic!(
            "{what}\n--- console:\n{}\n--- stderr:\n{}",
            console.lock().unwrap(),
            stderr.lock().unwrap()
        )
    };

    let deadline = boot_deadline(Duration::from_secs(60), Duration::from_secs(1500));
    loop {
        if console
            .lock()
            .unwrap()
            .contains("microvm-init: app ready on port 80")
        {
            break;
        }
        if let Ok(Some(st)) = vm.0.try_wait() {
            report(&format!("microvm exited early: {st}"));
        }
        if start.elapsed() > deadline {
            report("app not ready before the deadline");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "boot to Flask app ready: {:.1} s",
        start.elapsed().as_secs_f64()
    );
    {
        let c = console.lock().unwrap();
        if !c.contains("EXT4-fs (vda): mounted filesystem") {
            drop(c);
            report("kernel did not report mounting ext4 from /dev/vda");
        }
    }

    let url = format!("http://{GUEST_IP}/");
    let one = ns.exec(&["curl", "-s", "--max-time", "120", &url]);
    let body = String::from_utf8_lossy(&one.stdout).to_string();
    if body.trim() != "Hello, World!" {
        report(&format!(
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
        report(&format!("only {ok}/100 requests succeeded: {codes}"));
    }

    // Stop the VM the way a user would; it must exit 143.
    let pid = vm.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let st = vm.0.wait().unwrap();
    if st.code() != Some(143) {
        report(&format!("SIGTERM should give exit 143, got {st}"));
    }
}
