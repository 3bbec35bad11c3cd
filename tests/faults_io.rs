//! Faults the host throws at microvm whose guest side moves megabytes
//! (docs/ARCHITECTURE.md, "Faults and what they end in"):
//! - stdout a pipe nobody reads: after 2 s without progress the console's
//!   output is dropped (and said so on stderr), the guest runs to its exit
//!   status;
//! - a drive whose host file system fills up: IOERR for the guest's write,
//!   the synced data intact, the VM runs on;
//! - SIGKILL while the guest syncs records to two ext4 drives (Unsafe and
//!   Writeback): both consistent after the journal replay, every synced
//!   record there.
//!
//! Both lanes. A guest that writes its console two bytes at a time (`yes`)
//! costs a virtio-console round trip per two bytes: about 160 bytes a
//! second where KVM interprets guest kernel code, so the guests here write
//! with `cat`, `tr` and `dd` (4-64 KiB per call); the suite then takes
//! about 4 minutes on this project's build hosts.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The test initramfs's shell on the console (status 7 when it exits),
/// started with `args` (which name the kernel and initrd): the process,
/// its stderr as it comes, and its stdout once the shell is ready.
fn shell_vm<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> (Vm, Arc<Mutex<String>>, BufReader<ChildStdout>) {
    let child = Command::new(microvm_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Vm(child);
    let stderr = pump(vm.0.stderr.take().unwrap());
    let mut out = BufReader::new(vm.0.stdout.take().unwrap());
    assert!(
        read_until(&mut out, "microvm-test-init: shell ready", boot_time()),
        "the shell starts: {}",
        stderr.lock().unwrap()
    );
    (vm, stderr, out)
}

/// How long a boot, or the guest's part of a test, may take.
fn boot_time() -> Duration {
    boot_deadline(Duration::from_secs(60), Duration::from_secs(900))
}

/// `--kernel K --initrd I --cmdline "microvm.test=shell microvm.test=exit=7"`
/// and `extra`.
fn shell_args(kernel: &std::path::Path, initrd: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "microvm.test=shell microvm.test=exit=7",
        "--timeout",
        "1800",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn a_stdout_nobody_reads_does_not_stop_the_guest() {
    use std::io::Write;
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let args = shell_args(&kernel, &initrd, &[]);
    let (mut vm, stderr, out) = shell_vm(&args);
    let boot = boot_time();
    // From here on nobody reads stdout (a pipe into a stuck consumer), and
    // the guest prints 1 MB: far more than the pipe and microvm's buffer.
    let mut stdin = vm.0.stdin.take().unwrap();
    // Written with `cat` (64 KiB writes): `yes` writes two bytes at a time,
    // one virtio-console round trip each.
    stdin
        .write_all(b"head -c 1000000 /dev/zero >/tmp/zeros; cat /tmp/zeros; exit\n")
        .unwrap();
    stdin.flush().unwrap();
    let t = Instant::now();
    let st = wait_with_deadline(&mut vm.0, boot);
    let err = stderr.lock().unwrap().clone();
    eprintln!(
        "the guest printed 1 MB into an unread stdout and exited after {:?}",
        t.elapsed()
    );
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(7),
        "the guest's exit status with stdout unread ({st:?}; none: it hung on stdout): {err}"
    );
    assert!(err.contains("guest console output is dropped"), "{err}");
    drop(out);
}

/// A drive whose host file system fills up: the guest's write gets an I/O
/// error (VIRTIO_BLK_S_IOERR from ENOSPC), microvm runs on, the data the
/// guest synced before is intact in the file, and the guest reaches its
/// exit status.
#[test]
fn a_full_host_disk_is_an_io_error_for_the_guest_and_nothing_more() {
    use std::io::Write;
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    let dir = TempDir::new("faults-disk-full");
    let small = dir.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "microvm-test"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted && !common::missing("a 2 MiB tmpfs for the full disk (mount needs root)") {
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    // 8 MiB of disk on 2 MiB of file system.
    let image = small.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();

    let args = shell_args(&kernel, &initrd, &["--drive", image.to_str().unwrap()]);
    let (mut vm, stderr, out) = shell_vm(&args);
    let boot = boot_time();
    let console = pump(out);
    let mut stdin = vm.0.stdin.take().unwrap();
    // 1 MiB synced first; then 4 MiB more, which the host cannot hold.
    stdin
        .write_all(
            b"head -c 1048576 /dev/zero | tr '\\0' s | dd of=/dev/vda bs=64k conv=fsync; echo first=$?\n\
              head -c 4194304 /dev/zero | tr '\\0' m | dd of=/dev/vda bs=64k seek=16 conv=fsync; echo second=$?\n\
              dmesg | grep -m1 'I/O error, dev vda'; echo still-running; exit\n",
        )
        .unwrap();
    stdin.flush().unwrap();
    let st = wait_with_deadline(&mut vm.0, boot);
    let text = console.lock().unwrap().clone();
    let err = stderr.lock().unwrap().clone();
    assert_eq!(st.and_then(|s| s.code()), Some(7), "{st:?}\n{text}\n{err}");
    assert!(
        text.contains("first=0"),
        "the first write and its sync succeed:\n{text}"
    );
    assert!(
        text.contains("second=1"),
        "the write past the host's free space fails in the guest:\n{text}"
    );
    assert!(
        text.contains("I/O error, dev vda") && text.contains("still-running"),
        "the guest saw an I/O error on vda and ran on:\n{text}"
    );
    assert!(err.contains("No space left"), "microvm says why: {err}");
    let got = std::fs::read(&image).unwrap();
    assert!(
        got[..1 << 20].iter().all(|&b| b == b's'),
        "the synced megabyte is intact"
    );
}

/// `cmd args` succeeded (its output, for the message).
fn run_tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Power loss for the guest: microvm SIGKILLed while the guest appends a
/// record to a file on each of two ext4 drives and syncs, over and over
/// (one drive `cache_type: Unsafe`, the other `Writeback`). Afterwards each
/// file system is consistent once its journal is replayed (what the next
/// mount does): `e2fsck -fn` finds nothing, and every record the guest
/// reported synced is in the file. Unsafe promises no more than this:
/// writes reach the host's page cache when the guest sees them complete,
/// so the death of microvm loses nothing; only Writeback's flushes (an
/// `fdatasync` each) make them survive the host's own power loss.
#[test]
fn sigkill_while_the_guest_syncs_leaves_consistent_file_systems_with_every_synced_record() {
    use std::io::Write;
    let Some(kernel) = boot_prereqs() else { return };
    let Some(initrd) = test_initrd() else { return };
    for tool in ["mkfs.ext4", "e2fsck", "debugfs"] {
        if !have_command(tool, "-V") {
            return;
        }
    }
    let dir = TempDir::new("faults-power-loss");
    let images = [dir.path("unsafe.ext4"), dir.path("writeback.ext4")];
    for img in &images {
        std::fs::File::create(img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let (ok, text) = run_tool("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        assert!(ok, "mkfs.ext4: {text}");
    }
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": "microvm.test=shell",
        },
        "drives": [
            {"drive_id": "unsafe", "path_on_host": images[0], "is_root_device": false,
             "is_read_only": false, "cache_type": "Unsafe"},
            {"drive_id": "writeback", "path_on_host": images[1], "is_root_device": false,
             "is_read_only": false, "cache_type": "Writeback"},
        ],
    });
    let config_path = dir.path("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (mut vm, stderr, mut out) = shell_vm(["--config-file", config_path.to_str().unwrap()]);
    let boot = boot_time();
    let mut stdin = vm.0.stdin.take().unwrap();
    stdin
        .write_all(
            b"mkdir -p /a /b && mount /dev/vda /a && mount /dev/vdb /b && echo both-mounted\n\
              i=0; while :; do echo record $i >>/a/log; echo record $i >>/b/log; sync; \
              echo synced $i; i=$((i+1)); done\n",
        )
        .unwrap();
    stdin.flush().unwrap();
    assert!(
        read_until(&mut out, "both-mounted", boot),
        "the guest mounts both drives: {}",
        stderr.lock().unwrap()
    );
    // Let it sync a dozen times, then pull the plug mid-loop.
    let mut synced = None;
    let end = Instant::now() + boot;
    let mut line = String::new();
    while synced.is_none_or(|n: u32| n < 12) && Instant::now() < end {
        line.clear();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(n) = line
            .trim()
            .strip_prefix("synced ")
            .and_then(|n| n.parse().ok())
        {
            synced = Some(n);
        }
    }
    signal(vm.0.id(), "-KILL");
    let st = wait_with_deadline(&mut vm.0, Duration::from_secs(60));
    let last = synced.expect("the guest reported synced records");
    eprintln!("SIGKILL after the guest reported record {last} synced ({st:?})");
    for img in &images {
        let img = img.to_str().unwrap();
        // The replay a mount would do, then a check that changes nothing.
        let (_, replay) = run_tool("e2fsck", &["-E", "journal_only", "-y", img]);
        let (clean, check) = run_tool("e2fsck", &["-fn", img]);
        assert!(
            clean,
            "{img}: e2fsck -fn after the journal replay:\n{replay}\n{check}"
        );
        let (_, log) = run_tool("debugfs", &["-R", "cat /log", img]);
        let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("record ")).collect();
        for n in 0..=last {
            assert_eq!(
                lines.get(n as usize).copied(),
                Some(format!("record {n}").as_str()),
                "{img}: record {n} was reported synced: {:?}",
                &lines[..lines.len().min(5)]
            );
        }
        eprintln!(
            "{img}: clean, {} records (the last reported synced: {last})",
            lines.len()
        );
    }
}
