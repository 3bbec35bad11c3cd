//! Snapshots: a paused VM written to two files, and a new process that
//! runs it on from there.
//!
//! - The **state file** is one JSON document (serde): a format name and
//!   version first, then the configuration (drives, NICs, memory size), the
//!   guest memory layout, every vCPU's KVM state, the VM's interrupt
//!   controllers, PIT and KVM clock, and each device's registers and queues.
//!   A file with another format version is refused with a message naming
//!   both versions.
//! - The **memory file** is guest RAM, region after region, as a sparse file
//!   (pages that are all zero are holes). A restore maps it `MAP_PRIVATE`:
//!   nothing is read until the guest touches a page, and the guest's writes
//!   never reach the file, so one snapshot can be restored any number of
//!   times.
//!
//! Both files are input the VMM did not write in this process: every size,
//! count and address in them is checked before it is used (see
//! [`Snapshot::check`]); a bad file is an error, never a panic or a
//! half-built VM. Disks are the caller's, as in Firecracker: the state names
//! the backing files and their sizes, and a restore refuses a missing file or
//! one whose size changed.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

use crate::config::{DeviceId, VmConfig};
use crate::devices::legacy::I8042Snapshot;
use crate::devices::rtc::CmosSnapshot;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;
use crate::memory::GuestMemoryMmap;
use crate::vcpu::state::VcpuState;

/// What the state file says it is.
pub const FORMAT: &str = "microvm-snapshot";
/// The state layout this build writes and reads.
/// Version 2 names each virtio device by kind and id.
pub const VERSION: u32 = 2;
/// Largest state file read (a 8-vCPU VM writes well under 1 MiB).
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// Granule of the sparse memory file.
const PAGE: usize = 4096;
/// Bytes copied out of guest memory at a time when saving.
const CHUNK: usize = 1 << 20;

/// The names `microvm --restore DIR` and the API's short form use in DIR.
pub const STATE_FILE: &str = "state";
/// See [`STATE_FILE`].
pub const MEMORY_FILE: &str = "memory";

/// Errors creating or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read, written or created.
    #[error("snapshot file '{path}'")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a snapshot this build can read.
    #[error("'{path}' is not a usable snapshot state file: {reason}")]
    BadState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The memory file does not match the state.
    #[error("memory file '{path}': {reason}")]
    BadMemory {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The VM cannot be saved in the state it is in.
    #[error("cannot snapshot the VM: {0}")]
    NotSaveable(String),
}

impl SnapshotError {
    /// The error is the caller's input (a bad or mismatched file), not a
    /// failure of the VMM or the host.
    pub fn is_usage_error(&self) -> bool {
        matches!(
            self,
            SnapshotError::BadState { .. } | SnapshotError::BadMemory { .. }
        ) || matches!(self, SnapshotError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a snapshot goes, or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPaths {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub memory: PathBuf,
}

impl SnapshotPaths {
    /// `DIR/state` and `DIR/memory`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            state: dir.join(STATE_FILE),
            memory: dir.join(MEMORY_FILE),
        }
    }
}

/// The interrupt controllers, PIT and clock KVM keeps for the VM (read and
/// written by the VMM, `src/vmm/vm_state.rs`).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
    /// Wall-clock time the clock was read (ns since the Unix epoch).
    pub read_at_unix_ns: u64,
}

/// The platform devices' registers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PlatformState {
    /// The 16550.
    pub serial: SerialSnapshot,
    /// The CMOS.
    pub cmos: CmosSnapshot,
    /// The i8042.
    pub i8042: I8042Snapshot,
    /// What the guest wrote to the exit port so far (-1: nothing).
    pub exit_status: i32,
}

/// One region of guest RAM and where it sits in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// One backing file as the snapshot saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// The drive.
    pub drive_id: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Everything in the state file.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The microvm that wrote it.
    pub vmm_version: String,
    /// Wall-clock time of the save, in ns since the Unix epoch.
    pub saved_at_unix_ns: u64,
    /// The VM's configuration (NIC MACs filled in).
    pub config: VmConfig,
    /// The kernel command line the guest booted with.
    pub cmdline: String,
    /// Sizes of the drives' backing files.
    pub disks: Vec<DiskIdentity>,
    /// Guest RAM regions.
    pub memory: Vec<MemoryRegion>,
    /// KVM's VM-level state.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The platform devices.
    pub platform: PlatformState,
    /// Every virtio device with its transport, in the order of
    /// [`VmConfig::virtio_devices`].
    pub virtio: Vec<SavedDevice>,
}

/// One virtio device as saved: which it is, and its transport's registers
/// and queues.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedDevice {
    /// Kind and id.
    pub device: DeviceId,
    /// The virtio-mmio transport.
    pub transport: TransportSnapshot,
}

/// The first two fields, read before the rest so that a file of another
/// version is refused by version, not by whichever field changed.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

impl Snapshot {
    /// Everything a restore relies on that the types alone do not promise:
    /// the memory layout is the one this build gives `memory_mib`, counts
    /// match the configuration, lists are within what KVM takes.
    pub fn check(&self) -> Result<(), String> {
        let c = &self.config;
        VmConfig::validate_machine(u64::from(c.cpus), c.memory_mib).map_err(|e| e.to_string())?;
        if self.vcpus.len() != usize::from(c.cpus) {
            return Err(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                c.cpus
            ));
        }
        let want = crate::memory::ram_regions(c.memory_mib << 20);
        let mut offset = 0u64;
        if self.memory.len() != want.len() {
            return Err(format!(
                "{} memory regions where {} MiB has {}",
                self.memory.len(),
                c.memory_mib,
                want.len()
            ));
        }
        for (r, (addr, size)) in self.memory.iter().zip(&want) {
            if r.guest_addr != addr.raw_value() || r.size != *size as u64 || r.file_offset != offset
            {
                return Err(format!(
                    "memory region {:#x}+{:#x} at file offset {:#x} is not the layout of {} MiB",
                    r.guest_addr, r.size, r.file_offset, c.memory_mib
                ));
            }
            offset += r.size;
        }
        let want = c.virtio_devices();
        let saved = self.virtio.iter().map(|d| &d.device);
        if !saved.clone().eq(want.iter()) {
            let names = |l: Vec<&DeviceId>| {
                l.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "the saved devices ({}) are not the configuration's ({})",
                names(saved.collect()),
                names(want.iter().collect())
            ));
        }
        if self.disks.len() != c.drives.len()
            || self
                .disks
                .iter()
                .zip(&c.drives)
                .any(|(d, c)| d.drive_id != c.id)
        {
            return Err("the disk list does not match the drives".into());
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.msrs.len() > crate::vcpu::state::MAX_MSRS
                || v.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES
            {
                return Err(format!(
                    "vcpu{i}: more MSRs or CPUID entries than KVM takes"
                ));
            }
        }
        Ok(())
    }

    /// Total guest RAM, which is the memory file's size.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.iter().map(|r| r.size).sum()
    }

    /// Write the state file at `path` (replacing it).
    pub fn write(&self, path: &Path) -> Result<u64, SnapshotError> {
        let text =
            serde_json::to_vec(self).map_err(|e| SnapshotError::NotSaveable(e.to_string()))?;
        std::fs::write(path, &text).map_err(io_err(path))?;
        Ok(text.len() as u64)
    }

    /// Read and check the state file at `path`.
    pub fn read(path: &Path) -> Result<Self, SnapshotError> {
        let bad = |reason: String| SnapshotError::BadState {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io_err(path))?;
        let mut text = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io_err(path))?;
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(bad(format!("larger than {MAX_STATE_BYTES} bytes")));
        }
        Self::parse(&text).map_err(bad)
    }

    /// Parse and check a state file's bytes; the error says what is wrong.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let header: Header =
            serde_json::from_slice(text).map_err(|e| format!("no snapshot header ({e})"))?;
        if header.format != FORMAT {
            return Err(format!("format '{}', expected '{FORMAT}'", header.format));
        }
        if header.version != VERSION {
            return Err(format!(
                "format version {}, this microvm reads version {VERSION}",
                header.version
            ));
        }
        let snap: Snapshot = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        snap.check()?;
        Ok(snap)
    }
}

/// Write guest RAM to a new sparse file at `path`, region after region;
/// returns the regions and how many bytes were written. With `dirty` (one
/// bitmap per region, a bit per [`PAGE`], as
/// [`crate::memory::take_dirty_pages`] gives them) the file is a diff:
/// exactly the pages marked, zero or not, and holes for the rest, to be
/// laid over its base ([`rebase`]); without, every page that is not all
/// zero.
pub fn save_memory(
    mem: &GuestMemoryMmap,
    path: &Path,
    dirty: Option<&[Vec<u64>]>,
) -> Result<(Vec<MemoryRegion>, u64), SnapshotError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (index, region) in mem.iter().enumerate() {
        let size = region.len();
        let start = region.start_addr();
        let marked = dirty.map(|d| d.get(index).map_or(&[][..], Vec::as_slice));
        let wanted = |page: u64, bytes: &[u8]| match marked {
            None => bytes.iter().any(|&b| b != 0),
            Some(bits) => usize::try_from(page / 64)
                .ok()
                .and_then(|w| bits.get(w))
                .is_some_and(|w| w & (1 << (page % 64)) != 0),
        };
        let mut done = 0u64;
        while done < size {
            let n = usize::try_from((size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let addr = start.unchecked_add(done);
            mem.get_slice(addr, n)
                .map_err(|e| {
                    SnapshotError::NotSaveable(format!("guest memory at {addr:#x?}: {e}"))
                })?
                .copy_to(&mut buf[..n]);
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                let at = done + (i * PAGE) as u64;
                if wanted(at / PAGE as u64, page) {
                    file.write_all_at(page, offset + at).map_err(io_err(path))?;
                    written += page.len() as u64;
                }
            }
            done += n as u64;
        }
        regions.push(MemoryRegion {
            guest_addr: start.raw_value(),
            size,
            file_offset: offset,
        });
        offset += size;
    }
    // The holes at the end are part of the file too.
    file.set_len(offset).map_err(io_err(path))?;
    Ok((regions, written))
}

/// Where a snapshot file is written before it is renamed to `path`:
/// `.NAME.partial` beside it (the same file system, so the rename is atomic).
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Rename the finished file `from` to `to`.
pub fn rename_into_place(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    std::fs::rename(from, to).map_err(io_err(to))
}

/// Lay the diff memory file `diff` over its base `base`: every data extent
/// of `diff` (`SEEK_DATA`/`SEEK_HOLE`: what [`save_memory`] wrote) is copied
/// to the same offset of `base`. Both are the same size: the same guest.
/// Firecracker's `rebase-snap` does the same for its files. Returns the
/// bytes copied.
pub fn rebase(base: &Path, diff: &Path) -> Result<u64, SnapshotError> {
    use std::os::fd::AsRawFd;
    let src = File::open(diff).map_err(io_err(diff))?;
    let dst = OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(io_err(base))?;
    let len = src.metadata().map_err(io_err(diff))?.len();
    let base_len = dst.metadata().map_err(io_err(base))?.len();
    if len != base_len {
        return Err(SnapshotError::BadMemory {
            path: diff.to_path_buf(),
            reason: format!(
                "{len} bytes, its base '{}' has {base_len}: not the same guest",
                base.display()
            ),
        });
    }
    let seek = |at: u64, whence: i32| -> Result<Option<u64>, SnapshotError> {
        let Ok(at) = libc::off_t::try_from(at) else {
            return Ok(None);
        };
        // SAFETY: lseek only reads its integer arguments; the fd is `src`'s.
        let r = unsafe { libc::lseek(src.as_raw_fd(), at, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(io_err(diff)(e))
            };
        }
        Ok(u64::try_from(r).ok())
    };
    let mut copied = 0u64;
    let mut at = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while at < len {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut pos = data;
        while pos < end {
            let n = usize::try_from((end - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
            src.read_exact_at(&mut buf[..n], pos)
                .map_err(io_err(diff))?;
            dst.write_all_at(&buf[..n], pos).map_err(io_err(base))?;
            pos += n as u64;
            copied += n as u64;
        }
        at = end;
    }
    dst.sync_all().map_err(io_err(base))?;
    Ok(copied)
}

/// Map the memory file at `path` as guest RAM laid out as `regions`,
/// copy-on-write: pages are read when the guest touches them, and its
/// writes stay in this process.
pub fn map_memory(path: &Path, regions: &[MemoryRegion]) -> Result<GuestMemoryMmap, SnapshotError> {
    let bad = |reason: String| SnapshotError::BadMemory {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let want: u64 = regions.iter().map(|r| r.size).sum();
    if len != want {
        // A shorter file would fault the guest (SIGBUS) at the first page past its end.
        return Err(bad(format!(
            "{len} bytes, the snapshot's guest has {want} bytes of RAM"
        )));
    }
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let size = usize::try_from(r.size).map_err(|_| bad("region too large".into()))?;
        let fd = file.try_clone().map_err(io_err(path))?;
        // A bitmap as long as the region: the VMM's writes are tracked as
        // in a booted VM (a builder's default bitmap is empty).
        let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::new(fd, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| {
                bad(format!(
                    "cannot map {size} bytes at offset {}: {e}",
                    r.file_offset
                ))
            })?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| bad(format!("region at {:#x} overflows", r.guest_addr)))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| bad(e.to_string()))
}

pub mod command;
#[cfg(test)]
mod tests;
