//! End-to-end: the guest console. A shell typed into over virtio-console
//! (the default), the 16550 with `--console serial`, and a boot with
//! `--console none` that prints nothing and still reports its exit status.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const HELLO: &str = "microvm-test-init: hello from userspace";

/// Boot the test initramfs with `extra` microvm arguments (RUST_LOG=info),
/// noting when `marker` shows; None (after reporting) without KVM or images.
fn boot_initramfs(extra: &[&str], marker: Option<&str>) -> Option<Run> {
    let kernel = boot_prereqs()?;
    let initrd = test_initrd()?;
    let mut a = args(&["--kernel", kernel.to_str()?, "--initrd", initrd.to_str()?]);
    a.extend(extra.iter().map(|s| s.to_string()));
    Some(run_env(
        &a,
        &[("RUST_LOG", "info")],
        marker,
        boot_deadline(Duration::from_secs(60), Duration::from_secs(900)),
    ))
}

/// Type a command into the test initramfs' busybox shell over hvc0 and read
/// the answer back from the console; `exit` ends the shell, and the guest
/// reports the status given on its command line.
#[test]
fn shell_over_virtio_console() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let deadline = boot_deadline(Duration::from_secs(60), Duration::from_secs(900));
    let mut child = Command::new(microvm_bin())
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "microvm.test=shell microvm.test=exit=5",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microvm");
    let console = pump(child.stdout.take().unwrap());
    let stderr = pump(child.stderr.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let mut vm = Vm(child);
    let start = Instant::now();
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- console:\n{}\n--- stderr:\n{}",
            console.lock().unwrap(),
            stderr.lock().unwrap()
        )
    };
    let wait_for = |vm: &mut Vm, text: &str| {
        while !console.lock().unwrap().contains(text) {
            if let Ok(Some(st)) = vm.0.try_wait() {
                fail(&format!("microvm exited ({st}) before {text:?}"));
            }
            if start.elapsed() > deadline {
                fail(&format!("no {text:?} before the deadline"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(&mut vm, "microvm-test-init: shell ready");
    let cmdline = console.lock().unwrap().clone();
    if !cmdline.contains("console=hvc0") {
        fail("the default console is not hvc0");
    }
    // The answer is not in what the terminal echoes back.
    stdin
        .write_all(b"echo answer=$((6 * 7)) on $(cat /sys/class/tty/console/active)\n")
        .unwrap();
    stdin.flush().unwrap();
    wait_for(&mut vm, "answer=42 on hvc0");
    stdin.write_all(b"exit\n").unwrap();
    stdin.flush().unwrap();
    wait_for(&mut vm, "microvm-test-init: shell exited");
    let st = wait_with_deadline(&mut vm.0, deadline);
    if st.and_then(|s| s.code()) != Some(5) {
        fail(&format!("exit status 5 expected, got {st:?}"));
    }
}

/// `--console serial`: the 16550 is the console, as before virtio-console.
#[test]
fn serial_console_still_works() {
    let Some(r) = boot_initramfs(
        &["--console", "serial", "--cmdline", "microvm.test=exit=9"],
        Some(HELLO),
    ) else {
        return;
    };
    r.check(r.marker_at.is_some(), "init marker on the serial console");
    r.check(
        r.stdout.contains("console=ttyS0 8250.nr_uarts=1"),
        "the kernel was told ttyS0",
    );
    r.check(r.code() == Some(9), "exit status through the exit device");
}

/// `--console none`: nothing from the guest on stdout, the exit status
/// still arrives, and the boot timer still sees user space.
#[test]
fn no_console_still_reports_the_exit_status() {
    let Some(r) = boot_initramfs(
        &["--console", "none", "--cmdline", "microvm.test=exit=3"],
        None,
    ) else {
        return;
    };
    r.check(r.code() == Some(3), "exit status through the exit device");
    r.check(r.stdout.is_empty(), "no console output");
    r.check(r.stderr.contains("Guest-boot-time"), "user space ran");
}

#[test]
fn bad_console_is_a_usage_error() {
    let r = run(
        &args(&["--kernel", "/bin/sh", "--console", "vga"]),
        None,
        Duration::from_secs(30),
    );
    r.check(r.code() == Some(2), "exit code 2 for --console vga");
    r.check(
        r.stderr.contains("expected virtio, serial or none"),
        "says what is accepted",
    );
}

/// `earlycon` on the 16550 shows the earliest boot messages with the
/// default virtio console; hvc0 takes over once it is there.
#[test]
fn earlycon_on_the_16550() {
    let Some(r) = boot_initramfs(
        &["--cmdline", "earlycon=uart,io,0x3f8 microvm.test=exit=4"],
        Some(HELLO),
    ) else {
        return;
    };
    r.check(
        r.stdout.contains("earlycon: uart") && r.stdout.contains("I/O port 0x3f8"),
        "early messages on the 16550",
    );
    r.check(r.marker_at.is_some(), "init marker, on hvc0");
    r.check(r.code() == Some(4), "exit status through the exit device");
}
