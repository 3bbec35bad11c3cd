//! Snapshot files as hostile input: every way a state or memory file can be
//! wrong is an error that says what is wrong, and the memory file round-trips.

use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::VmConfig;
use crate::host::unix_now_ns;

/// A directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "microvm-snapshot-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The smallest consistent snapshot: 16 MiB, one vCPU, no devices.
fn minimal() -> Snapshot {
    let mut config = VmConfig::new("/boot/vmlinux");
    config.memory_mib = 16;
    config.cpus = 1;
    config.console = crate::config::ConsoleMode::Serial;
    Snapshot {
        format: FORMAT.into(),
        version: VERSION,
        vmm_version: "test".into(),
        saved_at_unix_ns: unix_now_ns(),
        config,
        cmdline: "console=ttyS0".into(),
        disks: Vec::new(),
        memory: vec![MemoryRegion {
            guest_addr: 0,
            size: 16 << 20,
            file_offset: 0,
        }],
        vm: VmState::default(),
        vcpus: vec![VcpuState::default()],
        platform: PlatformState::default(),
        virtio: Vec::new(),
    }
}

fn read_err(dir: &TempDir, text: &[u8]) -> String {
    let p = dir.path("state");
    std::fs::write(&p, text).unwrap();
    match Snapshot::read(&p) {
        Ok(_) => panic!(
            "accepted a bad state file: {}",
            String::from_utf8_lossy(text)
        ),
        Err(e) => {
            assert!(e.is_usage_error(), "{e}");
            crate::error_chain(&e)
        }
    }
}

#[test]
fn state_round_trips() {
    let dir = TempDir::new("roundtrip");
    let mut s = minimal();
    s.vcpus[0].regs.rip = 0x1234;
    s.platform.exit_status = 7;
    s.write(&dir.path("state")).unwrap();
    let back = Snapshot::read(&dir.path("state")).unwrap();
    assert_eq!(back.vcpus[0].regs.rip, 0x1234);
    assert_eq!(back.platform.exit_status, 7);
    assert_eq!(back.memory_bytes(), 16 << 20);
}

#[test]
fn bad_state_files_are_refused_with_a_reason() {
    let dir = TempDir::new("bad");
    let good = serde_json::to_vec(&minimal()).unwrap();

    assert!(read_err(&dir, b"").contains("no snapshot header"));
    assert!(read_err(&dir, b"\x00\xff garbage").contains("no snapshot header"));
    // Truncated anywhere after the header.
    for cut in [good.len() / 3, good.len() / 2, good.len() - 1] {
        let e = read_err(&dir, &good[..cut]);
        assert!(e.contains("not a usable snapshot"), "{e}");
    }

    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["version"] = 99.into();
    let e = read_err(&dir, v.to_string().as_bytes());
    assert!(
        e.contains(&format!(
            "format version 99, this microvm reads version {VERSION}"
        )),
        "{e}"
    );

    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["format"] = "firecracker".into();
    assert!(read_err(&dir, v.to_string().as_bytes()).contains("format 'firecracker'"));

    // Counts and layouts that do not match the configuration.
    let mut s = minimal();
    s.vcpus.push(VcpuState::default());
    assert!(read_err(&dir, &serde_json::to_vec(&s).unwrap()).contains("2 vCPU states for 1"));

    let mut s = minimal();
    s.memory[0].size = 1 << 40;
    assert!(read_err(&dir, &serde_json::to_vec(&s).unwrap()).contains("is not the layout"));

    let mut s = minimal();
    s.memory[0].guest_addr = 0xfee0_0000;
    assert!(read_err(&dir, &serde_json::to_vec(&s).unwrap()).contains("is not the layout"));

    let mut s = minimal();
    s.config.memory_mib = 1 << 30;
    assert!(!read_err(&dir, &serde_json::to_vec(&s).unwrap()).is_empty());

    // Devices are named by kind and id: an extra one, a missing one, or
    // one the configuration has under another id are all refused.
    use crate::config::{DeviceId, DeviceKind};
    let saved = |kind, id: &str| SavedDevice {
        device: DeviceId::new(kind, id),
        transport: Default::default(),
    };
    let mut s = minimal();
    s.virtio.push(saved(DeviceKind::Block, "rootfs"));
    let e = read_err(&dir, &serde_json::to_vec(&s).unwrap());
    assert!(
        e.contains("the saved devices (drive 'rootfs') are not the configuration's ()"),
        "{e}"
    );
    let mut s = minimal();
    s.config.console = crate::config::ConsoleMode::Virtio;
    let e = read_err(&dir, &serde_json::to_vec(&s).unwrap());
    assert!(
        e.contains("are not the configuration's (virtio console 'console')"),
        "{e}"
    );
    s.virtio.push(saved(DeviceKind::Net, "console"));
    assert!(read_err(&dir, &serde_json::to_vec(&s).unwrap()).contains("saved devices"));
    s.virtio[0] = saved(DeviceKind::Console, "console");
    assert!(Snapshot::parse(&serde_json::to_vec(&s).unwrap()).is_ok());

    let mut s = minimal();
    s.vcpus[0].msrs = vec![Default::default(); crate::vcpu::state::MAX_MSRS + 1];
    assert!(read_err(&dir, &serde_json::to_vec(&s).unwrap()).contains("more MSRs"));

    let missing = Snapshot::read(&dir.path("nope")).map(|_| ()).unwrap_err();
    assert!(missing.is_usage_error());
}

#[test]
fn oversized_state_file_is_refused_before_parsing() {
    let dir = TempDir::new("huge");
    let p = dir.path("state");
    let f = std::fs::File::create(&p).unwrap();
    // Sparse: no disk space used.
    f.set_len(MAX_STATE_BYTES + 10).unwrap();
    let e = crate::error_chain(&Snapshot::read(&p).map(|_| ()).unwrap_err());
    assert!(e.contains("larger than"), "{e}");
}

#[test]
fn memory_file_is_sparse_round_trips_and_is_copy_on_write() {
    let dir = TempDir::new("memory");
    let mem = crate::memory::create_guest_memory(16).unwrap();
    mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
    mem.write_slice(b"world", GuestAddress((16 << 20) - 5))
        .unwrap();
    let path = dir.path("memory");
    let (regions, data) = save_memory(&mem, &path, None).unwrap();
    assert_eq!(
        regions,
        vec![MemoryRegion {
            guest_addr: 0,
            size: 16 << 20,
            file_offset: 0
        }]
    );
    assert_eq!(
        data,
        2 * PAGE as u64,
        "only the two touched pages hold data"
    );
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "the file is sparse ({} blocks)",
        meta.blocks()
    );

    let restored = map_memory(&path, &regions).unwrap();
    let mut buf = [0u8; 5];
    restored.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
    assert_eq!(&buf, b"hello");
    restored
        .read_slice(&mut buf, GuestAddress((16 << 20) - 5))
        .unwrap();
    assert_eq!(&buf, b"world");
    // The guest's writes stay in the process.
    restored
        .write_slice(b"HELLO", GuestAddress(0x1000))
        .unwrap();
    let again = map_memory(&path, &regions).unwrap();
    again.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
    assert_eq!(&buf, b"hello");
}

/// A diff holds exactly the pages written since the last snapshot (a page
/// that went back to zero too), and laid over its base it gives the memory
/// a full snapshot would.
#[test]
fn a_diff_over_its_base_is_the_full_memory() {
    use crate::memory::take_vmm_dirty_pages;
    let dir = TempDir::new("diff");
    let mem = crate::memory::create_guest_memory(16).unwrap();
    mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
    mem.write_slice(b"world", GuestAddress(0x8000)).unwrap();
    let base = dir.path("base");
    save_memory(&mem, &base, None).unwrap();
    let _ = take_vmm_dirty_pages(&mem);
    // After the base: one page changed, one back to zero, one new.
    mem.write_slice(b"HELLO", GuestAddress(0x1000)).unwrap();
    mem.write_slice(&[0u8; 5], GuestAddress(0x8000)).unwrap();
    mem.write_slice(b"new", GuestAddress((16 << 20) - 3))
        .unwrap();
    let dirty = take_vmm_dirty_pages(&mem);
    let diff = dir.path("diff");
    let (regions, data) = save_memory(&mem, &diff, Some(&dirty)).unwrap();
    assert_eq!(data, 3 * PAGE as u64, "the three written pages, no more");
    assert_eq!(std::fs::metadata(&diff).unwrap().len(), 16 << 20);
    // Nothing written since: an empty diff.
    let empty = take_vmm_dirty_pages(&mem);
    assert!(empty.iter().flatten().all(|&w| w == 0));

    let full = dir.path("full");
    save_memory(&mem, &full, None).unwrap();
    assert_eq!(rebase(&base, &diff).unwrap(), 3 * PAGE as u64);
    let (a, b) = (
        map_memory(&base, &regions).unwrap(),
        map_memory(&full, &regions).unwrap(),
    );
    let (mut x, mut y) = (vec![0u8; 16 << 20], vec![0u8; 16 << 20]);
    a.read_slice(&mut x, GuestAddress(0)).unwrap();
    b.read_slice(&mut y, GuestAddress(0)).unwrap();
    assert!(x == y, "rebased base differs from the full snapshot");
    // A diff of another guest's size is refused.
    let other = dir.path("other");
    std::fs::write(&other, vec![1u8; 4096]).unwrap();
    let e = rebase(&base, &other).unwrap_err();
    assert!(crate::error_chain(&e).contains("not the same guest"), "{e}");
}

#[test]
fn memory_file_of_the_wrong_size_is_refused() {
    let dir = TempDir::new("short");
    let path = dir.path("memory");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let regions = [MemoryRegion {
        guest_addr: 0,
        size: 16 << 20,
        file_offset: 0,
    }];
    let e = map_memory(&path, &regions).map(|_| ()).unwrap_err();
    assert!(e.is_usage_error());
    assert!(crate::error_chain(&e).contains("4096 bytes"), "{e}");
}

/// The fuzz target's seed is a real state file in the current format: a
/// format change that leaves it behind would starve the fuzzer of it.
#[test]
fn the_fuzz_seed_is_a_current_state_file() {
    let seed = include_bytes!("../../fuzz/corpus/snapshot_state/seed-initramfs-vm");
    if let Err(e) = Snapshot::parse(seed) {
        panic!("fuzz/corpus/snapshot_state/seed-initramfs-vm: {e}");
    }
}
