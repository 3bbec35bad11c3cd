//! End-to-end: microvm driven the way Kata Containers drives Firecracker
//! (its `firecracker.go`): the `--version` check, the launch line, a config
//! file of Kata's shape (a read-only non-root `rootfs`, eight empty
//! placeholder drives, vsock, a logger and metrics on FIFOs), `GET /`
//! polled every 10 ms until Running with the vsock socket already there,
//! a container disk attached by `PATCH /drives/drive_3` and read by the
//! guest, metrics lines that parse, vCPU threads named `fc_vcpu*`, and
//! SIGTERM ending it well within Kata's 15 s before SIGKILL.
//!
//! Kata reaches its own agent on vsock port 1024; the test initramfs runs
//! microvm's agent (port 52) instead, through which the guest's reads are
//! checked.

mod common;

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::call;
use common::*;

/// Kata's check: the second space-separated word of the output, without a
/// leading `v`, is a semver of at least 0.21.1.
fn kata_accepts(version_output: &str) -> Result<(), String> {
    let field = version_output
        .split(' ')
        .nth(1)
        .ok_or("no second word")?
        .trim()
        .trim_start_matches('v');
    let (core, _pre) = field.split_once('-').unwrap_or((field, ""));
    let n: Vec<u64> = core
        .split('.')
        .map(|p| p.parse().map_err(|_| format!("{field:?} is not semver")))
        .collect::<Result<_, _>>()?;
    if n.len() != 3 {
        return Err(format!("{field:?} is not major.minor.patch"));
    }
    if (n[0], n[1], n[2]) < (0, 21, 1) {
        return Err(format!("{field} < 0.21.1"));
    }
    Ok(())
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path for the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// Read the FIFO at `path` in the background (opened now, before any
/// writer, as Kata does); everything read so far.
fn fifo_reader(path: &Path) -> Arc<Mutex<String>> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap();
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match f.read(&mut buf) {
                Ok(n) if n > 0 => t
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
                // No writer yet, or nothing now.
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    text
}

fn exec_out(uds: &Path, args: &[&str]) -> std::process::Output {
    Command::new(microvm_bin())
        .arg("exec")
        .arg("--vsock")
        .arg(uds)
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn version_passes_katas_check() {
    let out = Command::new(microvm_bin())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    kata_accepts(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(kata_accepts("Firecracker v0.21.0\n").is_err());
    assert!(kata_accepts("Firecracker v1.17.0-dev\n").is_ok());
}

#[test]
fn kata_shaped_launch_patch_metrics_and_sigterm() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let dir = TempDir::new("kata");
    let run = dir.path("run");
    std::fs::create_dir_all(&run).unwrap();
    let api = run.join("firecracker.socket");
    let uds = dir.path("kata.hvsock");
    let log_fifo = dir.path("log.fifo");
    let metrics_fifo = dir.path("metrics.fifo");
    mkfifo(&log_fifo);
    mkfifo(&metrics_fifo);
    let log = fifo_reader(&log_fifo);
    let metrics = fifo_reader(&metrics_fifo);

    let rootfs = dir.path("kata-containers.img");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    let mut drives = vec![serde_json::json!({
        "drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": false,
        "is_read_only": true, "cache_type": "Unsafe", "io_engine": "Sync",
    })];
    for i in 0..8 {
        let p = dir.path(&format!("drive_{i}"));
        std::fs::write(&p, b"").unwrap();
        drives.push(serde_json::json!({
            "drive_id": format!("drive_{i}"), "path_on_host": p,
            "is_root_device": false, "is_read_only": false,
        }));
    }
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": "console=hvc0 microvm.test=agent microvm.test=wait",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256, "smt": false},
        "drives": drives,
        "vsock": {"guest_cid": 3, "uds_path": uds, "vsock_id": "root"},
        "logger": {"level": "Debug", "log_path": log_fifo, "show_level": true, "show_log_origin": true},
        "metrics": {"metrics_path": metrics_fifo},
    });
    let cfg_path = run.join("fcConfig.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let child = Command::new(microvm_bin())
        .arg("--api-sock")
        .arg(&api)
        .arg("--config-file")
        .arg(&cfg_path)
        .args(["--id", "kata-sandbox"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Vm(child);
    let console = pump(vm.0.stdout.take().unwrap());
    let stderr = pump(vm.0.stderr.take().unwrap());
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- console:\n{}\n--- stderr:\n{}\n--- log FIFO:\n{}\n--- metrics FIFO:\n{}",
            console.lock().unwrap(),
            stderr.lock().unwrap(),
            log.lock().unwrap(),
            metrics.lock().unwrap()
        )
    };

    // GET / every 10 ms until Running; the vsock socket must be there then.
    let start = Instant::now();
    loop {
        if start.elapsed() > Duration::from_secs(30) {
            fail("never Running");
        }
        if let Ok(Some(st)) = vm.0.try_wait() {
            fail(&format!("microvm exited: {st}"));
        }
        if std::os::unix::net::UnixStream::connect(&api).is_ok() {
            let (code, body) = call(&api, "GET", "/", None);
            if code == 200 && body.contains("\"Running\"") {
                if !uds.exists() {
                    fail("Running, but the vsock socket does not exist yet");
                }
                if !body.contains("kata-sandbox") {
                    fail(&format!("GET / without the id: {body}"));
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // vCPU threads by Kata's prefix.
    let pid = vm.0.id();
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    if !names.iter().any(|n| n.starts_with("fc_vcpu")) {
        fail(&format!("no fc_vcpu thread: {names:?}"));
    }

    // The guest's agent answers (it starts in the background).
    let deadline = boot_deadline(Duration::from_secs(90), Duration::from_secs(900));
    while exec_out(&uds, &["true"]).status.code() != Some(0) {
        if start.elapsed() > deadline {
            fail("the agent never answered");
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // A container's disk on drive_3 (/dev/vde): the guest reads it.
    let disk = dir.path("container-disk.img");
    let mut content = b"kata drive 3\n".to_vec();
    content.resize(1 << 20, 0);
    std::fs::write(&disk, &content).unwrap();
    let body = serde_json::json!({"drive_id": "drive_3", "path_on_host": disk}).to_string();
    let (code, resp) = call(&api, "PATCH", "/drives/drive_3", Some(&body));
    if code != 204 {
        fail(&format!("PATCH /drives/drive_3: {code} {resp}"));
    }
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let out = exec_out(&uds, &["head", "-c", "13", "/dev/vde"]);
        if out.stdout == b"kata drive 3\n" {
            break;
        }
        if Instant::now() > until {
            fail(&format!("the guest does not read the new drive_3: {out:?}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // A rate limiter put on the running drive: 64 KiB/s. 512 KiB the guest
    // has not read yet take seconds, the drive counts its throttled
    // requests, and the VM's config shows the limiter.
    let body = serde_json::json!({
        "drive_id": "drive_3",
        "rate_limiter": {"bandwidth": {"size": 65536, "refill_time": 1000}, "ops": null},
    })
    .to_string();
    let (code, resp) = call(&api, "PATCH", "/drives/drive_3", Some(&body));
    if code != 204 {
        fail(&format!(
            "PATCH /drives/drive_3 with a rate limiter: {code} {resp}"
        ));
    }
    let t = Instant::now();
    let out = exec_out(
        &uds,
        &[
            "dd",
            "if=/dev/vde",
            "of=/dev/null",
            "bs=65536",
            "skip=4",
            "count=8",
        ],
    );
    let took = t.elapsed();
    if out.status.code() != Some(0) || took < Duration::from_secs(2) {
        fail(&format!(
            "512 KiB at 64 KiB/s took {took:?} (want 2 s or more): {out:?}"
        ));
    }
    let (code, resp) = call(&api, "GET", "/vm/config", None);
    let cfg: serde_json::Value = serde_json::from_str(&resp).unwrap_or_default();
    let shown = cfg["drives"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["drive_id"] == "drive_3"))
        .map(|d| d["rate_limiter"]["bandwidth"]["size"].clone());
    if code != 200 || shown != Some(serde_json::json!(65536)) {
        fail(&format!(
            "GET /vm/config does not show the limiter: {code} {resp}"
        ));
    }

    // FlushMetrics: a line that parses, time first, the drive's reads in it
    // (the line after those written so far: one a minute comes on its own).
    let before = metrics.lock().unwrap().lines().count();
    let (code, resp) = call(
        &api,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    if code != 204 {
        fail(&format!("FlushMetrics: {code} {resp}"));
    }
    let until = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = metrics.lock().unwrap().clone();
        if let Some(l) = text.lines().nth(before).filter(|_| text.ends_with('\n')) {
            break l.to_string();
        }
        if Instant::now() > until {
            fail("no metrics line");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !line.starts_with("{\"utc_timestamp_ms\":") {
        fail(&format!(
            "metrics line does not start with the time: {line}"
        ));
    }
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| fail(&format!("{e}: {line}")));
    // Deltas: their sum over every line so far is the total.
    let reads: u64 = metrics
        .lock()
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["block_drive_3"]["read_count"].as_u64())
        .sum();
    if reads == 0 || v["vcpu"]["exit_mmio_write"].as_u64().is_none() {
        fail(&format!(
            "metrics without drive_3's reads or vCPU exits: {line}"
        ));
    }
    let throttled: u64 = metrics
        .lock()
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["block_drive_3"]["rate_limiter_throttled_events"].as_u64())
        .sum();
    if throttled == 0 {
        fail(&format!("drive_3's limiter held nothing back: {line}"));
    }
    if !log.lock().unwrap().contains("DEBUG") {
        fail("nothing at Debug level in the log FIFO");
    }

    // SIGTERM, as Kata stops its hypervisor: 143 well before its SIGKILL.
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    match wait_with_deadline(&mut vm.0, Duration::from_secs(15)) {
        Some(st) if st.code() == Some(143) => {}
        other => fail(&format!(
            "after SIGTERM: {other:?}, want exit 143 within 15 s"
        )),
    }
    if uds.exists() || api.exists() {
        fail("sockets left behind");
    }
}
