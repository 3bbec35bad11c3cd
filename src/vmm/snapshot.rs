//! Saving a paused VM to a snapshot, and what a restore checks and how it
//! fails. The restore itself is a build ([`super::builder`]).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{vm_state, Vmm, VmmError};
use crate::config::DeviceId;
use crate::host::unix_now_ns;
use crate::memory;
use crate::rpc::RunState;
use crate::snapshot::{
    self, DiskIdentity, PlatformState, SavedDevice, Snapshot, SnapshotError, SnapshotPaths, FORMAT,
    VERSION,
};
use crate::vcpu::state::VcpuStateError;
use crate::vcpu::thread::VcpuHandle;

/// The part of a VM that could not take on its saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoredPart {
    /// The 16550.
    Serial,
    /// The i8042.
    I8042,
    /// The CMOS RTC.
    Cmos,
    /// The 8259s and the IOAPIC.
    InterruptControllers,
    /// Every vCPU (a host whose XSAVE area the format cannot hold).
    Vcpus,
    /// One virtio device's transport.
    Virtio(DeviceId),
}

impl std::fmt::Display for RestoredPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoredPart::Serial => f.write_str("the serial port"),
            RestoredPart::I8042 => f.write_str("the i8042"),
            RestoredPart::Cmos => f.write_str("the CMOS"),
            RestoredPart::InterruptControllers => f.write_str("the interrupt controllers"),
            RestoredPart::Vcpus => f.write_str("the vCPUs"),
            RestoredPart::Virtio(d) => write!(f, "{d}"),
        }
    }
}

/// Errors building a VM from a snapshot whose files were read and checked.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A device or the VM refused its saved state.
    #[error("cannot restore {part}: {reason}")]
    Part {
        /// Which.
        part: RestoredPart,
        /// Why.
        reason: String,
    },
    /// KVM refused a vCPU's saved state.
    #[error("cannot restore vcpu{index}")]
    Vcpu {
        /// The vCPU.
        index: u8,
        /// Cause.
        #[source]
        source: VcpuStateError,
    },
}

/// `part` refused its saved state, for the reason the device gives.
pub(super) fn restore_part(part: RestoredPart) -> impl FnOnce(String) -> VmmError {
    move |reason| RestoreError::Part { part, reason }.into()
}

/// What a snapshot took, for the log and the benchmark.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotStats {
    /// Bytes in the state file.
    pub state_bytes: u64,
    /// Guest RAM (the memory file's apparent size).
    pub memory_bytes: u64,
    /// Bytes of guest RAM that were not zero (what the file holds on disk).
    pub memory_data_bytes: u64,
    /// Time to write both files.
    pub took: std::time::Duration,
}

/// Larger than this XSAVE area (AMX) does not fit the 4 KiB `kvm_xsave`.
const XSAVE_LEGACY_SIZE: i32 = 4096;

/// The XSAVE area of this host's vCPUs fits `kvm_xsave`.
pub(super) fn check_xsave_size(vm: &kvm_ioctls::VmFd) -> Result<(), String> {
    let size = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    if size > XSAVE_LEGACY_SIZE {
        return Err(format!(
            "this host's XSAVE area is {size} bytes; snapshots handle {XSAVE_LEGACY_SIZE}"
        ));
    }
    Ok(())
}

/// Each drive's backing file is there and has the size the snapshot saw.
pub(super) fn check_disks(snap: &Snapshot) -> Result<(), SnapshotError> {
    for (drive, saved) in snap.config.drives.iter().zip(&snap.disks) {
        let bad = |reason: String| SnapshotError::BadState {
            path: drive.path.clone(),
            reason,
        };
        let meta = std::fs::metadata(&drive.path).map_err(|e| {
            bad(format!(
                "drive '{}': its backing file cannot be used ({e})",
                drive.id
            ))
        })?;
        if meta.len() != saved.size {
            return Err(bad(format!(
                "drive '{}': the backing file has {} bytes, {} when the snapshot was taken",
                drive.id,
                meta.len(),
                saved.size
            )));
        }
    }
    Ok(())
}

impl Vmm {
    /// Write the paused VM to `paths`. Every vCPU and device worker is
    /// parked, so what they recorded when they parked is current.
    /// With `diff`, the memory file holds only the pages written since
    /// the last snapshot (or since the VM started tracking them).
    pub(super) fn snapshot(
        &self,
        vcpus: &[VcpuHandle],
        state: RunState,
        paths: &SnapshotPaths,
        diff: bool,
    ) -> Result<SnapshotStats, VmmError> {
        let not_saveable = |e: String| VmmError::Snapshot(SnapshotError::NotSaveable(e));
        if state != RunState::Paused {
            return Err(not_saveable(
                "the microVM must be paused to create a snapshot".into(),
            ));
        }
        if diff && !self.config.track_dirty_pages {
            return Err(not_saveable(
                "a Diff snapshot needs dirty page tracking: track_dirty_pages: true in \
                 PUT /machine-config (or enable_diff_snapshots when loading a snapshot)"
                    .into(),
            ));
        }
        let t0 = Instant::now();
        check_xsave_size(&self.vm).map_err(not_saveable)?;
        let vcpu_states = vcpus
            .iter()
            .map(VcpuHandle::saved_state)
            .collect::<Result<Vec<_>, _>>()
            .map_err(not_saveable)?;
        let virtio = self
            .devices
            .devices()
            .iter()
            .map(|d| {
                let transport = d
                    .transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .snapshot()
                    .map_err(|e| not_saveable(format!("{}: {e}", d.id)))?;
                Ok(SavedDevice {
                    device: d.id.clone(),
                    transport,
                })
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        let disks = self
            .config
            .drives
            .iter()
            .map(|d| {
                std::fs::metadata(&d.path)
                    .map(|m| DiskIdentity {
                        drive_id: d.id.clone(),
                        size: m.len(),
                    })
                    .map_err(|e| not_saveable(format!("drive '{}': {e}", d.id)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let platform = PlatformState {
            serial: self
                .platform
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .snapshot(),
            cmos: self
                .platform
                .cmos
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .snapshot(),
            i8042: self
                .platform
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .snapshot(),
            exit_status: self.platform.exit_status.load(Ordering::SeqCst),
        };
        let vm = vm_state::read(&self.vm)?;
        // Every snapshot of a tracking VM starts the next diff afresh.
        let dirty = if self.config.track_dirty_pages {
            Some(
                memory::take_dirty_pages(&self.vm, &self.mem)
                    .map_err(|e| not_saveable(crate::error_chain(&e)))?,
            )
        } else {
            None
        };
        // Both files are written under temporary names beside their own
        // and renamed into place (memory, then state) only once both are
        // whole: a snapshot that fails (a full disk) leaves no half files
        // a restore could take for whole, and an older snapshot at the
        // same paths as it was.
        let partial = SnapshotPaths {
            state: snapshot::partial_path(&paths.state),
            memory: snapshot::partial_path(&paths.memory),
        };
        let written = (|| {
            let (memory, memory_data_bytes) = snapshot::save_memory(
                &self.mem,
                &partial.memory,
                dirty.as_deref().filter(|_| diff),
            )?;
            let snap = Snapshot {
                format: FORMAT.into(),
                version: VERSION,
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                saved_at_unix_ns: unix_now_ns(),
                config: self.config.clone(),
                cmdline: self.cmdline.clone(),
                disks,
                memory,
                vm,
                vcpus: vcpu_states,
                platform,
                virtio,
            };
            let state_bytes = snap.write(&partial.state)?;
            snapshot::rename_into_place(&partial.memory, &paths.memory)?;
            snapshot::rename_into_place(&partial.state, &paths.state)?;
            Ok::<_, SnapshotError>((snap, state_bytes, memory_data_bytes))
        })();
        let (snap, state_bytes, memory_data_bytes) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&partial.memory);
                let _ = std::fs::remove_file(&partial.state);
                if let Some(d) = &dirty {
                    memory::restore_dirty_pages(&self.mem, d);
                }
                return Err(e.into());
            }
        };
        let stats = SnapshotStats {
            state_bytes,
            memory_bytes: snap.memory_bytes(),
            memory_data_bytes,
            took: t0.elapsed(),
        };
        log::info!(
            "snapshot: {} and {} in {:?} (state {} bytes, memory {} MiB of which {} MiB not zero)",
            paths.state.display(),
            paths.memory.display(),
            stats.took,
            stats.state_bytes,
            stats.memory_bytes >> 20,
            stats.memory_data_bytes >> 20
        );
        Ok(stats)
    }
}
