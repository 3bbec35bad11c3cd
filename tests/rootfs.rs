//! End-to-end: the root filesystem on virtio-blk, and data safety on extra drives.
//!
//! One boot checks several things: the kernel mounts ext4 from /dev/vda, the
//! init runs, a file written by the guest to a second drive reaches the host
//! image byte for byte, and a read-only drive refuses writes (the extra
//! drives use the io_uring engine, the root drive the Sync one).

mod common;

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use common::*;

fn mkfs(path: &std::path::Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "data"])
        .arg(path)
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(st.success(), "mkfs.ext4 failed");
}

fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn debugfs_cat(image: &std::path::Path, file: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    out.stdout
}

#[test]
fn guest_writes_reach_the_image_and_ro_drives_refuse_writes() {
    let Some(kernel) = boot_prereqs() else { return };
    let Some(rootfs) = rootfs() else { return };
    let dir = TempDir::new("data");
    let root = dir.path("root.ext4");
    std::fs::copy(&rootfs, &root).unwrap();
    let data = dir.path("data.ext4");
    let ro = dir.path("ro.ext4");
    mkfs(&data, 64);
    mkfs(&ro, 16);
    let ro_before = std::fs::read(&ro).unwrap();

    // 3 MiB of random bytes written through the page cache, synced, checksummed
    // in the guest; then a write attempt to the read-only drive, both as a
    // filesystem and as a raw block device.
    let script = r#"
set -u
mkdir -p /mnt/data /mnt/ro
mount /dev/vdb /mnt/data || exit 10
head -c 3145728 /dev/urandom > /mnt/data/payload.bin || exit 11
sync
echo "guest-sha256: $(sha256sum /mnt/data/payload.bin | cut -d' ' -f1)"
umount /mnt/data || exit 12
echo "ro-flag: $(cat /sys/block/vdc/ro)"
mount /dev/vdc /mnt/ro 2>/dev/null || mount -o ro /dev/vdc /mnt/ro || exit 13
if touch /mnt/ro/nope 2>/dev/null; then echo "ro-fs: writable"; else echo "ro-fs: refused"; fi
umount /mnt/ro
if dd if=/dev/zero of=/dev/vdc bs=4096 count=1 oflag=direct 2>/dev/null; then echo "ro-dev: writable"; else echo "ro-dev: refused"; fi
exit 0
"#;
    let r = run(
        &args(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--rootfs",
            root.to_str().unwrap(),
            // Both extra drives on the io_uring engine: its writes, reads,
            // flushes and read-only refusals under the workers' filters.
            "--drive",
            &format!("{},io=async", data.display()),
            "--drive",
            &format!("{},ro,io=async", ro.display()),
            "--cmdline",
            "loglevel=7 microvm.verbose",
            "--",
            "bash",
            "-c",
            script,
        ]),
        Some("microvm-init: userspace up"),
        boot_deadline(Duration::from_secs(60), Duration::from_secs(1200)),
    );
    r.check(r.code() == Some(0), "the guest script succeeded");
    r.check(
        r.stdout.contains("EXT4-fs (vda): mounted filesystem"),
        "kernel mounted ext4 from /dev/vda",
    );
    r.check(r.marker_at.is_some(), "init marker on the console");
    eprintln!(
        "rootfs boot to init marker: {:.1} s",
        r.marker_at.unwrap().as_secs_f64()
    );

    let guest_sum = r
        .stdout
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("guest-sha256: "))
        .map(str::to_string);
    r.check(guest_sum.is_some(), "guest printed its checksum");
    let host_bytes = debugfs_cat(&data, "/payload.bin");
    r.check(
        host_bytes.len() == 3 << 20,
        "host image holds the whole file",
    );
    r.check(
        sha256(&host_bytes) == guest_sum.unwrap(),
        "host reads the same bytes the guest wrote",
    );

    r.check(
        r.stdout.contains("ro-flag: 1"),
        "guest sees /dev/vdc read-only",
    );
    r.check(
        r.stdout.contains("ro-fs: refused"),
        "filesystem on the ro drive refuses writes",
    );
    r.check(
        r.stdout.contains("ro-dev: refused"),
        "raw writes to the ro drive are refused",
    );
    r.check(
        std::fs::read(&ro).unwrap() == ro_before,
        "read-only image unchanged",
    );
}

#[test]
fn image_in_use_is_refused() {
    let Some(kernel) = boot_prereqs() else { return };
    let dir = TempDir::new("lock");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // Hold the lock the way a running microvm does.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    // SAFETY: flock on a descriptor we own and keep open.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    let r = run(
        &args(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--drive",
            disk.to_str().unwrap(),
        ]),
        None,
        Duration::from_secs(30),
    );
    r.check(r.code() == Some(2), "exit 2 when the drive is locked");
    r.check(
        r.stderr.contains("is locked by another process"),
        "the error says the image is in use",
    );
    drop(f);
}
