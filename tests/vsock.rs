//! End-to-end: virtio-vsock in Firecracker's hybrid form, with the test
//! initramfs (its `microvm.test=vsock` mode runs `microvm-vsock`).
//!
//! One VM, at once: host clients connect through `uds_path` with
//! `CONNECT 5000` to the guest's echo server, and the guest connects to
//! the host's port 6000 (`<uds_path>_6000`, an echo server of this test);
//! every stream carries random bytes and must come back the same. Also: no
//! guest listener closes the client, a bad CONNECT line is closed, a host
//! peer that stops reading does not stall the others, and SIGTERM ends the
//! VM with 143 and removes the socket.
//!
//! Sizes: 50 + 50 connections of 1 MiB on normal KVM (Firecracker's own
//! test); on hosts whose KVM interprets guest kernel code every byte costs
//! interpreted kernel instructions, so 4 + 4 of 64 KiB there.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::ApiVm;
use common::*;

/// Deterministic bytes, different for each `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Connect through the hybrid socket to guest `port`; the stream after
/// `OK <host_port>`, or what the muxer answered instead.
fn connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    // Byte by byte: nothing past the line may be taken from the stream.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&line))),
            Err(e) => return Err(format!("no answer: {e}")),
        }
        if line.len() > 32 {
            return Err("answer line too long".into());
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
    {
        Some(_) => Ok(s),
        None => Err(format!("answer {text:?}")),
    }
}

/// [`connect`], retried while the guest's server is not listening yet (it
/// starts in the background).
fn connect_when_listening(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let ready_by = Instant::now() + Duration::from_secs(120);
    loop {
        match connect(uds, port) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > ready_by => return Err(format!("port {port}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Send `data` on `s` from a second thread while reading it back here.
fn echo_round_trip(s: UnixStream, data: Arc<Vec<u8>>) -> Result<(), String> {
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let d = data.clone();
    let sender = std::thread::spawn(move || {
        let r = w.write_all(&d);
        let _ = w.shutdown(std::net::Shutdown::Write);
        r
    });
    let mut back = Vec::with_capacity(data.len());
    let mut r = s;
    r.read_to_end(&mut back)
        .map_err(|e| format!("read back: {e}"))?;
    sender
        .join()
        .map_err(|_| "sender panicked".to_string())?
        .map_err(|e| format!("send: {e}"))?;
    if back.len() != data.len() {
        return Err(format!("{} bytes back of {}", back.len(), data.len()));
    }
    if *back != **data {
        return Err("bytes differ".into());
    }
    Ok(())
}

/// The host's port-6000 server: sends every connection back what it sends.
fn host_echo_server(path: &Path) -> Arc<Mutex<u32>> {
    let listener = UnixListener::bind(path).unwrap();
    let served = Arc::new(Mutex::new(0u32));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                if std::io::copy(&mut c, &mut w).is_ok() {
                    *count.lock().unwrap() += 1;
                }
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    served
}

#[test]
fn vsock_streams_both_ways_and_bad_clients_are_closed() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let emulated = microvm::host::kvm_is_emulated();
    let (count, kib): (u64, usize) = if emulated { (4, 64) } else { (50, 1024) };
    let dir = TempDir::new("vsock");
    let uds = dir.path("v.sock");
    let mut port_6000 = uds.clone().into_os_string();
    port_6000.push("_6000");
    let served = host_echo_server(Path::new(&port_6000));

    let cmdline = format!("microvm.test=vsock={count}:{kib} microvm.test=wait");
    let vsock = format!("cid=3,uds={}", uds.display());
    let mut child = Command::new(microvm_bin())
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "256",
            "--cpus",
            "2",
            "--vsock",
            &vsock,
            "--cmdline",
            &cmdline,
            "--timeout",
            "1800",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microvm");
    let console = pump(child.stdout.take().unwrap());
    let stderr = pump(child.stderr.take().unwrap());
    let mut vm = Vm(child);
    let start = Instant::now();
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- console:\n{}\n--- stderr:\n{}",
            console.lock().unwrap(),
            stderr.lock().unwrap()
        )
    };
    let deadline = boot_deadline(Duration::from_secs(120), Duration::from_secs(1500));
    let wait_for = |vm: &mut Vm, marker: &str| {
        let _step = Step::start(&format!("waiting for {marker:?}"));
        while !console.lock().unwrap().contains(marker) {
            if let Ok(Some(st)) = vm.0.try_wait() {
                fail(&format!("microvm exited early: {st}"));
            }
            if start.elapsed() > deadline {
                fail(&format!("no {marker:?} before the deadline"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(&mut vm, "microvm-test-init: hello from userspace");
    if !uds.exists() {
        fail("the vsock socket does not exist while the guest runs");
    }
    wait_for(&mut vm, "microvm-test-init: vsock echo on port 5000");

    // A client that sends a bad line, and one for a port nobody listens on:
    // each is closed without an OK.
    {
        let mut bad = UnixStream::connect(&uds).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        bad.write_all(b"HELLO 5000\n").unwrap();
        let mut b = Vec::new();
        let r = bad.read_to_end(&mut b);
        if !(r.is_ok() && b.is_empty()) {
            fail(&format!("a bad CONNECT line: {r:?}, {b:?} (want a close)"));
        }
        match connect(&uds, 5999) {
            Err(e) if e.starts_with("closed") => {}
            other => fail(&format!("CONNECT to a port nobody listens on: {other:?}")),
        }
    }

    // A host peer that connects and never reads while the guest echoes to
    // it: it must not stall the connections below.
    let mut stalled = connect_when_listening(&uds, 5000).unwrap_or_else(|e| fail(&e));
    stalled.set_nonblocking(true).unwrap();
    let junk = pattern(999, 4 << 20);
    let mut pushed = 0;
    while pushed < junk.len() {
        match stalled.write(&junk[pushed..]) {
            Ok(n) => pushed += n,
            Err(_) => break,
        }
    }

    let step = Step::start(&format!(
        "{count} host-initiated echo connections of {kib} KiB"
    ));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..count)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let data = Arc::new(pattern(i, kib << 10));
                let s = connect(&uds, 5000)?;
                echo_round_trip(s, data)
            })
        })
        .collect();
    let mut errors = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("connection {i}: {e}")),
            Err(_) => errors.push(format!("connection {i}: panicked")),
        }
    }
    let took = t0.elapsed();
    drop(step);
    if !errors.is_empty() {
        fail(&format!("host-initiated: {}", errors.join("; ")));
    }
    eprintln!(
        "vsock: {count} x {kib} KiB host-initiated echo in {:.2} s ({:.1} MiB/s each way)",
        took.as_secs_f64(),
        (count as usize * kib) as f64 / 1024.0 / took.as_secs_f64()
    );

    let want = format!("microvm-test-init: vsock guest-initiated: {count}/{count} ok");
    wait_for(&mut vm, "microvm-test-init: vsock guest-initiated:");
    if !console.lock().unwrap().contains(&want) {
        fail(&format!("want {want:?}"));
    }
    if *served.lock().unwrap() != count as u32 {
        fail(&format!(
            "the host's port-6000 server finished {} connections, want {count}",
            served.lock().unwrap()
        ));
    }
    drop(stalled);

    // SIGTERM: 143, and the socket file is gone.
    let pid = vm.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let st = wait_with_deadline(&mut vm.0, Duration::from_secs(30))
        .unwrap_or_else(|| fail("microvm did not exit after SIGTERM"));
    if st.code() != Some(143) {
        fail(&format!("exit {st} after SIGTERM, want 143"));
    }
    if uds.exists() {
        fail("the vsock socket file is left behind");
    }
    let err = stderr.lock().unwrap().clone();
    if err.contains("panicked") || err.contains("SIGSYS") {
        fail("a panic or a seccomp kill");
    }
}

#[test]
fn bad_vsock_settings_are_usage_errors() {
    let dir = TempDir::new("vsock-bad");
    let long = format!("cid=3,uds=/tmp/{}", "x".repeat(120));
    let taken = dir.path("taken");
    std::fs::write(&taken, b"a file").unwrap();
    let taken = format!("cid=3,uds={}", taken.display());
    for (bad, says) in [
        ("cid=2,uds=/tmp/v.sock", "reserved"),
        ("cid=x,uds=/tmp/v.sock", "cid 'x'"),
        ("uds=/tmp/v.sock", "cid=N,uds=PATH"),
        ("cid=3,uds=/nonexistent/dir/v.sock", "no directory"),
        (long.as_str(), "at most"),
    ] {
        let r = run(
            &args(&["--kernel", "/bin/sh", "--vsock", bad]),
            None,
            Duration::from_secs(30),
        );
        r.check(
            r.code() == Some(2),
            &format!("exit code 2 for --vsock {bad}"),
        );
        r.check(r.stderr.contains(says), &format!("says {says:?}"));
    }
    // A path taken by a file is refused when the VM is built, before boot.
    if !have_kvm() {
        return;
    }
    let Some(kernel) = kernel() else { return };
    let r = run(
        &args(&["--kernel", kernel.to_str().unwrap(), "--vsock", &taken]),
        None,
        Duration::from_secs(60),
    );
    r.check(r.code() != Some(0), "a socket path taken by a file fails");
    r.check(
        r.stderr.contains("the path exists"),
        "says the path is taken",
    );
}

/// A restored VM: the host socket is back, the guest's listener survived,
/// a connection of the saved VM is gone and new ones work.
#[test]
fn vsock_works_after_restore() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let dir = TempDir::new("vsock-restore");
    let snap = dir.path("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let uds = dir.path("v.sock");
    let vsock = format!("cid=3,uds={}", uds.display());
    let boot = boot_deadline(Duration::from_secs(60), Duration::from_secs(600));
    let mut vm = ApiVm::start(
        &dir.path("api.sock"),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--vsock",
            &vsock,
            "--cmdline",
            "microvm.test=vsock=0:0 microvm.test=wait",
        ],
        &[("RUST_LOG", "info")],
    );
    let ok = vm.wait_for(boot, |vm| {
        vm.stdout().contains("tick 2 at") || vm.child_exited()
    });
    vm.check(ok, "the guest ticks");
    let data = Arc::new(pattern(1, 64 << 10));
    let r = connect_when_listening(&uds, 5000).and_then(|s| echo_round_trip(s, data.clone()));
    vm.check(r.is_ok(), &format!("echo before the snapshot: {r:?}"));
    // A connection open while the VM is saved.
    let mut held = connect(&uds, 5000);
    vm.check(
        held.is_ok(),
        &format!("a second connection: {:?}", held.as_ref().err()),
    );

    vm.pause_and_snapshot(&snap);
    vm.stop_with_sigterm();
    vm.check(!uds.exists(), "the socket file is removed on exit");
    if let Ok(h) = held.as_mut() {
        h.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        let r = h.read(&mut b);
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "the saved VM's connection is closed: {r:?}"
        );
    }

    let mut vm = ApiVm::start(
        &dir.path("api2.sock"),
        &["--restore", snap.to_str().unwrap()],
        &[("RUST_LOG", "info")],
    );
    let ok = vm.wait_for(boot, |vm| uds.exists() || vm.child_exited());
    vm.check(
        ok && uds.exists(),
        "the restored VM listens on the socket again",
    );
    let r = connect_when_listening(&uds, 5000).and_then(|s| echo_round_trip(s, data.clone()));
    vm.check(r.is_ok(), &format!("echo after the restore: {r:?}"));
    let r = connect(&uds, 5000).and_then(|s| echo_round_trip(s, data.clone()));
    vm.check(
        r.is_ok(),
        &format!("a second connection after the restore: {r:?}"),
    );
    vm.terminate();
    let st = vm.wait_exit(Duration::from_secs(60));
    vm.check(
        st.and_then(|s| s.code()) == Some(143),
        "SIGTERM gives 143 after the restore",
    );
    vm.check(
        !vm.stderr().contains("took no transport reset"),
        "the guest took the transport reset before host clients were served",
    );
    let err = vm.stderr();
    vm.check(
        !err.contains("panicked") && !err.contains("SIGSYS"),
        "no panic, no seccomp kill",
    );
}
