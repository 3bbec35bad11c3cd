//! End-to-end: user-mode networking (`--net user --publish`), without
//! CAP_NET_ADMIN and without creating any host network interface.
//!
//! One boot of the Flask VM checks: guest-to-host TCP (the guest connects to
//! a listener this test opens on host loopback, at the gateway 10.0.2.2),
//! the published port (`curl http://127.0.0.1:P/`, then 100 sequential
//! requests), that a published port already in use is refused before a
//! second VM boots, that a client of the published port is closed at once
//! (not left hanging) once the guest's app has stopped, that microvm ran
//! without CAP_NET_ADMIN, that `ip -o link` is unchanged, and that passt
//! ends with the VM. A short second run checks
//! that a passt that dies ends the VM with a message. All traffic is on
//! loopback.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .collect()
}

/// PIDs of the direct children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// passt's PID from microvm's log line "user-mode networking through passt
/// (pid N)" (RUST_LOG=info).
fn logged_passt_pid(stderr: &str) -> Option<u32> {
    let rest = stderr.split("through passt (pid ").nth(1)?;
    rest.split(')').next()?.parse().ok()
}

/// The passt that microvm `vm` started: wait for the event itself (microvm
/// logs passt's PID once it has spawned it) up to a generous deadline, and
/// check that PID is microvm's child running passt. `Err` says what did not
/// happen, or that microvm exited first (with its status): a busy machine
/// makes this slow, not wrong.
fn wait_for_passt(
    vm: &mut Vm,
    stderr: &std::sync::Mutex<String>,
    deadline: Duration,
) -> Result<u32, String> {
    let pid = vm.0.id();
    let t = Instant::now();
    loop {
        if let Some(passt) = logged_passt_pid(&stderr.lock().unwrap()) {
            // It is reaped only after it exits, and microvm lives: it is ours.
            if !children(pid).contains(&passt) {
                return Err(format!(
                    "passt pid {passt} (from the log) is not a child of microvm {pid}"
                ));
            }
            let name = comm(passt);
            if !name.starts_with("passt") {
                return Err(format!("microvm's child {passt} runs {name:?}, not passt"));
            }
            return Ok(passt);
        }
        if let Ok(Some(st)) = vm.0.try_wait() {
            return Err(format!(
                "microvm exited ({st}) before it logged starting passt"
            ));
        }
        if t.elapsed() > deadline {
            return Err(format!(
                "microvm did not log \"user-mode networking through passt (pid N)\" within {deadline:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Effective capabilities of `pid` (the CapEff mask).
fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .expect("CapEff");
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).unwrap()
}

const CAP_NET_ADMIN: u32 = 12;

use common::have_command as have;

fn curl(url: &str, extra: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-s", "--noproxy", "*", "--max-time", "120"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl")
}

#[test]
fn flask_over_user_networking_without_net_admin() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(rootfs) = rootfs() else { return };
    if !have("curl", "--version") || !have("passt", "--version") || !have("setpriv", "--version") {
        return;
    }
    let dir = TempDir::new("usernet");
    let disk = dir.path("root.ext4");
    std::fs::copy(&rootfs, &disk).unwrap();

    // The host service the guest must reach, on loopback only.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();
    // It keeps the connection: the test tells the guest over it, later, to
    // stop its app.
    let (said_tx, said_rx) = mpsc::channel::<(String, std::net::TcpStream)>();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut line = String::new();
            let _ = BufReader::new(conn.try_clone().unwrap()).read_line(&mut line);
            let _ = conn.write_all(b"host-says-hi\n");
            let _ = said_tx.send((line, conn));
        }
    });

    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    // The guest sends nothing until the app has served a request from the
    // host: a published port must work for a guest that never spoke first.
    // Then it connects to the host listener (bash's /dev/tcp, no fork). When
    // the host says so on that connection, it stops the app (the published
    // port's listener is gone) and idles.
    let guest_cmd = format!(
        "python3 /app/app.py >/tmp/app.log 2>&1 & \
         until grep -q '\"GET / ' /tmp/app.log; do sleep 1; done; \
         exec 3<>/dev/tcp/10.0.2.2/{host_port} && echo guest-says-hi >&3 && read -r r <&3 \
         && echo \"microvm-usernet: host said $r\"; \
         read -r r <&3; kill %1; wait; echo \"microvm-usernet: app stopped ($r)\"; \
         while :; do sleep 1000; done"
    );
    let links_before = links();
    let bin = microvm_bin();
    let start = Instant::now();
    let mut child = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
            "--",
        ])
        .arg(&bin)
        .args(["--kernel", kernel.to_str().unwrap()])
        .args(["--rootfs", disk.to_str().unwrap(), "--memory", "256"])
        .args(["--net", "user", "--publish", &publish])
        .args(["--", "bash", "-c", &guest_cmd])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microvm under setpriv");
    let console = pump(child.stdout.take().unwrap());
    let stderr = pump(child.stderr.take().unwrap());
    let mut vm = Vm(child);
    let pid = vm.0.id();
    let report = |what: &str| -> ! {
        panic!(
            "{what}\n--- console:\n{}\n--- stderr:\n{}",
            console.lock().unwrap(),
            stderr.lock().unwrap()
        )
    };

    // setpriv has exec'd microvm by the time passt exists.
    let passt = match wait_for_passt(
        &mut vm,
        &stderr,
        boot_deadline(Duration::from_secs(60), Duration::from_secs(300)),
    ) {
        Ok(p) => p,
        Err(e) => report(&e),
    };
    let caps = cap_eff(pid);
    if caps & (1 << CAP_NET_ADMIN) != 0 {
        report(&format!(
            "microvm runs with CAP_NET_ADMIN (CapEff {caps:x})"
        ));
    }

    // A second VM publishing the same port fails before it boots.
    let second = run(
        &args(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--net",
            "user",
            "--publish",
            &publish,
        ]),
        None,
        Duration::from_secs(60),
    );
    second.check(
        second.code() == Some(2),
        "a published port in use must be a usage error (exit 2)",
    );
    second.check(
        second
            .stderr
            .contains(&format!("127.0.0.1:{port}/tcp is already in use")),
        "message names the port",
    );
    second.check(second.stdout.is_empty(), "no guest output: it never booted");

    let deadline = boot_deadline(Duration::from_secs(120), Duration::from_secs(1500));
    // The app takes a while to import Flask; poll the published port.
    let url = format!("http://127.0.0.1:{port}/");
    let body = loop {
        let out = curl(&url, &["--max-time", "5"]);
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        if !body.is_empty() {
            break body;
        }
        if let Ok(Some(st)) = vm.0.try_wait() {
            report(&format!("microvm exited early: {st}"));
        }
        if start.elapsed() > deadline {
            report("the app never answered on the published port");
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    if body.trim() != "Hello, World!" {
        report(&format!("unexpected body {body:?}"));
    }
    eprintln!("app answered after {:.1} s", start.elapsed().as_secs_f64());
    let (said, mut host_conn) = loop {
        if let Ok(said) = said_rx.try_recv() {
            break said;
        }
        if let Ok(Some(st)) = vm.0.try_wait() {
            report(&format!("microvm exited early: {st}"));
        }
        if start.elapsed() > deadline {
            report("the guest never connected to the host listener at 10.0.2.2");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if said.trim() != "guest-says-hi" {
        report(&format!("host listener got {said:?}"));
    }
    eprintln!(
        "guest reached host loopback after {:.1} s",
        start.elapsed().as_secs_f64()
    );

    if !console
        .lock()
        .unwrap()
        .contains("microvm-usernet: host said host-says-hi")
    {
        std::thread::sleep(Duration::from_secs(2));
        if !console
            .lock()
            .unwrap()
            .contains("microvm-usernet: host said host-says-hi")
        {
            report("the guest did not get the host's reply");
        }
    }

    // 100 sequential requests from one client process; every one a 200.
    let mut argv: Vec<&str> = vec!["-w", "%{http_code}\\n"];
    for _ in 0..100 {
        argv.extend(["-o", "/dev/null", url.as_str()]);
    }
    let t = Instant::now();
    let out = Command::new("curl")
        .args(["-s", "--noproxy", "*", "--max-time", "120"])
        .args(&argv)
        .output()
        .expect("curl");
    let codes = String::from_utf8_lossy(&out.stdout).to_string();
    let ok = codes.lines().filter(|l| l.trim() == "200").count();
    eprintln!(
        "100 sequential requests over user mode: {ok} OK in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if ok != 100 {
        report(&format!("only {ok}/100 requests succeeded: {codes}"));
    }

    // The published port's listener gone (the app exited): passt still
    // accepts on the host side, and closes each connection at once when the
    // guest refuses it; no client hangs, and the VM runs on.
    host_conn.write_all(b"stop-app\n").unwrap();
    let stopped = "microvm-usernet: app stopped (stop-app)";
    let t = Instant::now();
    while !console.lock().unwrap().contains(stopped) {
        if let Ok(Some(st)) = vm.0.try_wait() {
            report(&format!("microvm exited while its app stopped: {st}"));
        }
        if t.elapsed() > boot_deadline(Duration::from_secs(30), Duration::from_secs(120)) {
            report(&format!("the guest never said {stopped:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    let out = curl(&url, &["--max-time", "60"]);
    let took = t.elapsed().as_secs_f64();
    let code = out.status.code();
    eprintln!("published port without a listener: curl exit {code:?} after {took:.2} s");
    // 7: refused, 52: empty reply (closed), 56: reset. 28 would be a hang.
    if !matches!(code, Some(7 | 52 | 56)) || !out.stdout.is_empty() {
        report(&format!(
            "a published port whose listener is gone must close the client's connection: \
             curl exit {code:?} after {took:.2} s, body {:?}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    if let Ok(Some(st)) = vm.0.try_wait() {
        report(&format!("microvm exited after its app stopped: {st}"));
    }

    let links_during = links();
    if links_during != links_before {
        report(&format!(
            "host interfaces changed: before {links_before:?}, during {links_during:?}"
        ));
    }

    // Stop the VM the way a user would: exit 143, and passt goes with it.
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let st = wait_with_deadline(&mut vm.0, Duration::from_secs(60));
    if st.and_then(|s| s.code()) != Some(143) {
        report(&format!("SIGTERM should give exit 143, got {st:?}"));
    }
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{passt}")).exists()
        && comm(passt).starts_with("passt")
    {
        if t.elapsed() > Duration::from_secs(10) {
            report(&format!(
                "passt (pid {passt}) still runs after the VM ended"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = stderr.lock().unwrap().clone();
    if err.contains("Failed to send") {
        report("passt's syslog noise reached stderr");
    }
    if links() != links_before {
        report("host interfaces changed after the run");
    }
}

/// A passt that dies ends the VM with a message naming it (exit 125).
///
/// The guest runs until stopped (`microvm.test=wait`: a tick a second), so
/// the VM can end only because passt died. (With the test initramfs's default
/// the guest rebooted by itself seconds after boot, and the test raced it: on
/// a busy machine it could find no passt left, with nothing on stderr.)
#[test]
fn passt_that_dies_ends_the_vm() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    if !have("passt", "--version") {
        return;
    }
    let child = spawn(
        &args(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--net",
            "user",
            "--cmdline",
            "microvm.test=wait",
            "--timeout",
            "1800",
        ]),
        &[("RUST_LOG", "info")],
    );
    let mut vm = Vm(child);
    let err = pump(vm.0.stderr.take().unwrap());
    let out = pump(vm.0.stdout.take().unwrap());
    let report = |what: &str| -> ! {
        panic!(
            "{what}\n--- console:\n{}\n--- stderr:\n{}",
            out.lock().unwrap(),
            err.lock().unwrap()
        )
    };
    let deadline = boot_deadline(Duration::from_secs(60), Duration::from_secs(1200));
    let passt = match wait_for_passt(&mut vm, &err, deadline) {
        Ok(p) => p,
        Err(e) => report(&e),
    };
    // Kill it while the guest runs: wait for the guest's first tick.
    let t = Instant::now();
    while !out.lock().unwrap().contains("tick ") {
        if let Ok(Some(st)) = vm.0.try_wait() {
            report(&format!("microvm exited ({st}) before the guest ticked"));
        }
        if t.elapsed() > deadline {
            report(&format!(
                "no guest tick (microvm.test=wait) on the console within {deadline:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-KILL", &passt.to_string()])
        .status()
        .unwrap();
    let st = wait_with_deadline(&mut vm.0, Duration::from_secs(120));
    // Let the pump threads see the pipes close.
    std::thread::sleep(Duration::from_millis(300));
    if st.and_then(|s| s.code()) != Some(125) {
        report(&format!(
            "a killed passt must end the VM with exit 125, got {st:?} (None: still running after 120 s)"
        ));
    }
    let text = err.lock().unwrap().clone();
    if !(text.contains("passt") && text.contains("lost its network")) {
        report("the message must name passt and say the guest lost its network");
    }
}
