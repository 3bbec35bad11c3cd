//! End-to-end: the Firecracker-compatible API on a Unix socket.
//!
//! `api_refuses_what_it_must` needs no guest: every error path before boot,
//! the socket's mode and lifetime. `api_drives_a_vm` boots the test
//! initramfs once through the API and checks, in that one boot: state
//! changes, refusals after start, pause (console and vCPU threads stand
//! still), resume, a drive swap the guest notices, Ctrl-Alt-Del and a
//! clean exit.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::api::{call, call_raw, ApiVm};
use common::*;

const HELLO: &str = "microvm-test-init: hello from userspace";

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn fault(resp: &(u16, String)) -> String {
    assert_eq!(resp.0, 400, "expected 400, got {resp:?}");
    json(&resp.1)["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {}", resp.1))
        .to_string()
}

#[test]
fn api_refuses_what_it_must() {
    let dir = TempDir::new("api-errors");
    let sock = dir.path("api.sock");
    // A stale socket at the path (its listener is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut vm = ApiVm::start(&sock, &["--id", "errors-vm"], &[]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode");

    let (code, body) = call(&sock, "GET", "/", None);
    assert_eq!(code, 200);
    let info = json(&body);
    assert_eq!(info["id"], "errors-vm");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "microvm");
    assert!(info["vmm_version"].is_string());
    let (code, body) = call(&sock, "GET", "/version", None);
    assert_eq!(code, 200);
    assert!(json(&body)["firecracker_version"].is_string());

    // Missing kernel.
    let start = r#"{"action_type": "InstanceStart"}"#;
    let msg = fault(&call(&sock, "PUT", "/actions", Some(start)));
    assert!(msg.contains("no kernel image"), "{msg}");
    // Bad JSON, unknown field, missing field, wrong type.
    let msg = fault(&call(
        &sock,
        "PUT",
        "/boot-source",
        Some("{\"kernel_image_path\": "),
    ));
    assert!(msg.starts_with("invalid JSON body"), "{msg}");
    let msg = fault(&call(
        &sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/k", "kernel_args": "x"}"#),
    ));
    assert!(msg.contains("unknown field `kernel_args`"), "{msg}");
    let msg = fault(&call(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1}"#),
    ));
    assert!(msg.contains("missing field `mem_size_mib`"), "{msg}");
    let msg = fault(&call(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": "one", "mem_size_mib": 128}"#),
    ));
    assert!(msg.contains("invalid type"), "{msg}");
    let msg = fault(&call(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 64, "mem_size_mib": 128}"#),
    ));
    assert!(msg.contains("between 1 and 32"), "{msg}");
    // A kernel, initrd or drive file that does not exist is refused at
    // once, as Firecracker does, and nothing is configured.
    let msg = fault(&call(
        &sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
    ));
    assert!(msg.contains("kernel '/nonexistent/vmlinux'"), "{msg}");
    let msg = fault(&call(
        &sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/proc/self/exe", "initrd_path": "/nonexistent/initrd"}"#),
    ));
    assert!(msg.contains("initrd '/nonexistent/initrd'"), "{msg}");
    let msg = fault(&call(
        &sock,
        "PUT",
        "/drives/rootfs",
        Some(
            r#"{"drive_id": "rootfs", "path_on_host": "/nonexistent/root.ext4", "is_root_device": true}"#,
        ),
    ));
    assert!(msg.contains("'/nonexistent/root.ext4'"), "{msg}");
    let (_, body) = call(&sock, "GET", "/vm/config", None);
    assert_eq!(json(&body)["drives"], serde_json::json!([]), "{body}");
    let msg = fault(&call(&sock, "PUT", "/actions", Some(start)));
    assert!(msg.contains("no kernel image"), "{msg}");
    // Paths and methods that do not exist.
    for (m, p) in [
        ("GET", "/nope"),
        ("DELETE", "/"),
        ("GET", "/drives"),
        ("POST", "/actions"),
    ] {
        let msg = fault(&call(&sock, m, p, None));
        assert!(
            msg.starts_with("Invalid request method and/or path"),
            "{m} {p}: {msg}"
        );
    }
    // Ids in path and body must agree.
    let msg = fault(&call(
        &sock,
        "PUT",
        "/drives/a",
        Some(r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#),
    ));
    assert!(msg.contains("differs"), "{msg}");
    // Run-time requests before start.
    let msg = fault(&call(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)));
    assert!(msg.contains("not started"), "{msg}");
    let msg = fault(&call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    ));
    assert!(msg.contains("not running"), "{msg}");
    // Malformed HTTP and oversized bodies are answered, not hung on.
    let out = call_raw(&sock, b"GARBAGE\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = call_raw(
        &sock,
        b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n",
    );
    assert!(
        out.starts_with("HTTP/1.1 400") && out.contains("larger"),
        "{out}"
    );
    // The configuration so far: the refused kernel was not taken.
    let (code, body) = call(&sock, "GET", "/vm/config", None);
    assert_eq!(code, 200);
    assert_eq!(
        json(&body)["boot-source"]["kernel_image_path"],
        "",
        "{body}"
    );

    // A second microvm on the same (live) socket is a usage error.
    let r = run(
        &args(&["--api-sock", sock.to_str().unwrap()]),
        None,
        Duration::from_secs(30),
    );
    r.check(r.code() == Some(2), "exit 2 for a socket in use");
    r.check(r.stderr.contains("in use"), "says the socket is in use");

    // SIGTERM before start: 143, and the socket is gone.
    vm.terminate();
    let st = vm.wait_exit(Duration::from_secs(30));
    vm.check(
        st.and_then(|s| s.code()) == Some(143),
        "exit 143 on SIGTERM",
    );
    assert!(!sock.exists(), "socket removed on exit");

    // A regular file in the way is refused.
    std::fs::write(&sock, b"not a socket").unwrap();
    let r = run(
        &args(&["--api-sock", sock.to_str().unwrap()]),
        None,
        Duration::from_secs(30),
    );
    r.check(
        r.code() == Some(2),
        "exit 2 for a path that is not a socket",
    );
    r.check(r.stderr.contains("already exists"), "says why");
}

fn ticks(console: &str) -> usize {
    console.matches("microvm-test-init: tick ").count()
}

/// What a Firecracker client puts on the command line: every flag
/// Firecracker takes is taken (or refused with the reason), the log goes
/// where `--log-path` says at `--level`, `--version` reads as Kata parses
/// it, and a body over `--http-api-max-payload-size` is refused.
#[test]
fn firecracker_launch_flags() {
    let r = run(&args(&["--version"]), None, Duration::from_secs(30));
    let first = r.stdout.lines().next().unwrap_or_default().to_string();
    let words: Vec<&str> = first.split_whitespace().collect();
    // vX.Y.Z-microvm.A.B.C: the Firecracker API first (tests/kata.rs runs
    // Kata's own check on it).
    r.check(
        r.code() == Some(0)
            && words.len() == 2
            && words[0] == "microvm"
            && words[1]
                .strip_prefix('v')
                .and_then(|v| v.split_once("-microvm."))
                .is_some_and(|(api, ours)| {
                    api.split('.').count() == 3 && ours.split('.').count() == 3
                }),
        &format!("--version is 'microvm vX.Y.Z-microvm.A.B.C': {first:?}"),
    );
    for (flag, says) in [
        ("--metrics-path", "metrics file '/nonexistent/x'"),
        ("--seccomp-filter", "custom filters are not supported"),
    ] {
        let r = run(
            &args(&[flag, "/nonexistent/x", "--api-sock", "/tmp/unused.sock"]),
            None,
            Duration::from_secs(30),
        );
        r.check(
            r.code() == Some(2) && r.stderr.contains(says),
            &format!("{flag}: exit 2, {says:?}"),
        );
    }
    let dir = TempDir::new("fc-flags");
    let sock = dir.path("api.sock");
    let log = dir.path("fc.log");
    let log_s = log.to_str().unwrap();
    let mut vm = ApiVm::start(
        &sock,
        &[
            "--id",
            "fc-vm",
            "--log-path",
            log_s,
            "--level",
            "Info",
            "--show-level",
            "--show-log-origin",
            "--boot-timer",
            "--start-time-us",
            "1",
            "--start-time-cpu-us",
            "2",
            "--parent-cpu-time-us",
            "3",
            "--http-api-max-payload-size",
            "51200",
            "--mmds-size-limit",
            "1000",
            "--enable-pci",
        ],
        &[("RUST_LOG", "")],
    );
    let (code, body) = call(&sock, "GET", "/", None);
    vm.check(
        code == 200 && json(&body)["id"] == "fc-vm",
        &format!("GET /: {body}"),
    );
    let big = format!(
        "PUT /boot-source HTTP/1.1\r\nContent-Length: 60000\r\n\r\n{}",
        " ".repeat(60000)
    );
    let out = call_raw(&sock, big.as_bytes());
    vm.check(
        out.starts_with("HTTP/1.1 400") && out.contains("larger than the limit of 51200"),
        &format!("a body over the payload limit: {out:.200}"),
    );
    vm.terminate();
    let st = vm.wait_exit(Duration::from_secs(30));
    vm.check(
        st.and_then(|s| s.code()) == Some(143),
        "exit 143 on SIGTERM",
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    vm.check(
        text.contains("INFO") && text.contains("API listening on") && text.contains("microvm::"),
        &format!("the log file has info lines with their module: {text:?}"),
    );
    vm.check(
        text.contains("--enable-pci: microvm's devices stay on virtio-mmio"),
        "--enable-pci says what it does here",
    );
}

#[test]
fn api_drives_a_vm() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let dir = TempDir::new("api-vm");
    let sock = dir.path("api.sock");
    let disk_a = dir.path("a.img");
    let disk_b = dir.path("b.img");
    std::fs::write(&disk_a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&disk_b, vec![0u8; 3 << 20]).unwrap();
    let mut vm = ApiVm::start(&sock, &["--id", "api-vm"], &[("RUST_LOG", "info")]);

    let boot_source = serde_json::json!({
        "kernel_image_path": kernel,
        "initrd_path": initrd,
        // Replaces microvm's defaults; the device and host entries are added.
        "boot_args": "console=ttyS0 reboot=k panic=-1 microvm.test=wait",
    })
    .to_string();
    for (m, p, b) in [
        ("PUT", "/boot-source", boot_source.as_str()),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": false}"#,
        ),
        (
            "PUT",
            "/drives/scratch",
            &serde_json::json!({
                "drive_id": "scratch", "path_on_host": disk_a,
                "is_root_device": false, "is_read_only": false
            })
            .to_string(),
        ),
    ] {
        let r = call(&sock, m, p, Some(b));
        vm.check(r.0 == 204, &format!("{m} {p}: {r:?}"));
    }
    let (_, body) = call(&sock, "GET", "/machine-config", None);
    assert_eq!(json(&body)["mem_size_mib"], 128);

    let r = call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    vm.check(r.0 == 204, &format!("InstanceStart: {r:?}"));
    let (_, body) = call(&sock, "GET", "/", None);
    assert_eq!(json(&body)["state"], "Running");

    // Pre-boot-only requests are refused now.
    let msg = fault(&call(&sock, "PUT", "/boot-source", Some(&boot_source)));
    assert!(msg.contains("not supported after starting"), "{msg}");
    let msg = fault(&call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    ));
    assert!(msg.contains("already running"), "{msg}");

    let boot = boot_deadline(Duration::from_secs(60), Duration::from_secs(400));
    let booted = vm.wait_for(boot, |vm| ticks(&vm.stdout()) >= 2 || vm.child_exited());
    vm.check(
        booted && ticks(&vm.stdout()) >= 2,
        "the guest ticks on its console (an init without microvm.test=wait means the \
         test initramfs predates tests/initramfs/init: run tests/initramfs/build.sh)",
    );
    let console = vm.stdout();
    vm.check(console.contains(HELLO), "init marker");
    // boot_args replaced the defaults (8250.nr_uarts=1 is one of them) but
    // the drive's virtio_mmio entry was still added.
    let cmdline = console
        .lines()
        .find(|l| l.contains("microvm-test-init: cmdline:"))
        .unwrap_or_default()
        .to_string();
    vm.check(
        cmdline.contains("microvm.test=wait")
            && cmdline.contains("virtio_mmio.device=")
            && !cmdline.contains("8250.nr_uarts"),
        &format!("command line from boot_args: {cmdline}"),
    );

    // Pause: the console stops and the vCPU threads use no CPU.
    let r = call(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    vm.check(r.0 == 204, &format!("pause: {r:?}"));
    let (_, body) = call(&sock, "GET", "/", None);
    assert_eq!(json(&body)["state"], "Paused");
    std::thread::sleep(Duration::from_millis(500));
    let (ticks0, cpu0) = (ticks(&vm.stdout()), vm.thread_cpu_ticks("fc_vcpu"));
    std::thread::sleep(Duration::from_secs(4));
    let (ticks1, cpu1) = (ticks(&vm.stdout()), vm.thread_cpu_ticks("fc_vcpu"));
    eprintln!(
        "paused 4 s: console ticks {ticks0} -> {ticks1}, vCPU CPU time {} -> {} clock ticks",
        cpu0, cpu1
    );
    vm.check(ticks1 == ticks0, "console stands still while paused");
    vm.check(cpu1 - cpu0 <= 1, "vCPU threads idle while paused");

    // Resume: it goes on.
    let r = call(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    vm.check(r.0 == 204, &format!("resume: {r:?}"));
    let resumed = vm.wait_for(Duration::from_secs(120), |vm| {
        ticks(&vm.stdout()) > ticks1 + 1
    });
    vm.check(resumed, "console advances after resume");

    // Swap the drive: the guest sees the new capacity (3 MiB = 6144 sectors).
    let r = call(
        &sock,
        "PATCH",
        "/drives/scratch",
        Some(&serde_json::json!({"drive_id": "scratch", "path_on_host": disk_b}).to_string()),
    );
    vm.check(r.0 == 204, &format!("PATCH drive: {r:?}"));
    let noticed = vm.wait_for(Duration::from_secs(120), |vm| {
        vm.stdout().contains("new size: 6144")
    });
    vm.check(noticed, "the guest sees the new disk size");
    let (_, body) = call(&sock, "GET", "/vm/config", None);
    assert_eq!(
        json(&body)["drives"][0]["path_on_host"],
        disk_b.display().to_string()
    );
    // The caller grows the file and PATCHes the same path (what a client
    // does after resizing a disk): not refused by microvm's own lock, and
    // the guest sees the new size (4 MiB = 8192 sectors).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk_b)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let r = call(
        &sock,
        "PATCH",
        "/drives/scratch",
        Some(&serde_json::json!({"drive_id": "scratch", "path_on_host": disk_b}).to_string()),
    );
    vm.check(
        r.0 == 204,
        &format!("PATCH drive to its own, grown file: {r:?}"),
    );
    let noticed = vm.wait_for(Duration::from_secs(120), |vm| {
        vm.stdout().contains("new size: 8192")
    });
    vm.check(noticed, "the guest sees the grown disk's size");

    // Ctrl-Alt-Del: the i8042 delivers the keys, the guest kernel's
    // keyboard driver turns them into a SIGINT to the init, which reboots.
    let r = call(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    vm.check(r.0 == 204, &format!("SendCtrlAltDel: {r:?}"));
    let rebooted = vm.wait_for(Duration::from_secs(120), |vm| {
        vm.stdout().contains("ctrl-alt-del, rebooting")
    });
    vm.check(rebooted, "the guest reboots on Ctrl-Alt-Del");
    let st = vm.wait_exit(boot);
    vm.check(st.and_then(|s| s.code()) == Some(0), "clean exit 0");
    assert!(!sock.exists(), "socket removed on exit");
}
