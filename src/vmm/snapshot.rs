//! Saving a paused VM to a snapshot, and building a VM from one.
//!
//! Restore is the build of [`Vmm::build`] with the boot steps replaced:
//! guest RAM is the memory file mapped copy-on-write, no kernel is loaded
//! and no boot registers are set; every device and vCPU takes on its saved
//! state instead. The order matters to KVM and to interrupts:
//! 1. interrupt controllers and PIT, 2. vCPUs (LAPICs included), 3. virtio
//!    transports, whose devices start again and may interrupt at once (after
//!    1 and 2, so no interrupt is overwritten), 4. the KVM clock, last, with
//!    the time the VM spent saved added to it and to each TSC.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use linux_loader::loader::Cmdline;

use super::event_loop::EventLoop;
use super::{
    attach_virtio_devices, cmdline_err, create_vcpu_fds, create_vm, new_devices, open_kvm,
    restore_err, stdin_target, RunState, VcpuParts, Vmm, VmmError,
};
use crate::layout;
use crate::memory;
use crate::snapshot::{
    self, DiskIdentity, PlatformState, Snapshot, SnapshotError, VmState, FORMAT, VERSION,
};
use crate::vcpu::thread::VcpuHandle;
use crate::vcpu::ExitCounters;

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
            state: dir.join(snapshot::STATE_FILE),
            memory: dir.join(snapshot::MEMORY_FILE),
        }
    }
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
fn check_xsave_size(vm: &kvm_ioctls::VmFd) -> Result<(), String> {
    let size = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    if size > XSAVE_LEGACY_SIZE {
        return Err(format!(
            "this host's XSAVE area is {size} bytes; snapshots handle {XSAVE_LEGACY_SIZE}"
        ));
    }
    Ok(())
}

/// Each drive's backing file is there and has the size the snapshot saw.
fn check_disks(snap: &Snapshot) -> Result<(), SnapshotError> {
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
    pub(super) fn snapshot(
        &self,
        vcpus: &[VcpuHandle],
        state: RunState,
        paths: &SnapshotPaths,
    ) -> Result<SnapshotStats, String> {
        if state != RunState::Paused {
            return Err("the microVM must be paused to create a snapshot".into());
        }
        let t0 = Instant::now();
        check_xsave_size(&self.vm)?;
        let vcpu_states = vcpus
            .iter()
            .map(VcpuHandle::saved_state)
            .collect::<Result<Vec<_>, _>>()?;
        let virtio = self
            .devices
            .devices()
            .iter()
            .map(|d| {
                d.transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .snapshot()
            })
            .collect::<Result<Vec<_>, _>>()?;
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
                    .map_err(|e| format!("drive '{}': {e}", d.id))
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
        let vm = VmState::read(&self.vm).map_err(|e| crate::error_chain(&e))?;
        let (memory, memory_data_bytes) =
            snapshot::save_memory(&self.mem, &paths.memory).map_err(|e| crate::error_chain(&e))?;
        let snap = Snapshot {
            format: FORMAT.into(),
            version: VERSION,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            saved_at_unix_ns: crate::host::unix_now_ns(),
            config: self.config.clone(),
            cmdline: self.cmdline.clone(),
            disks,
            memory,
            vm,
            vcpus: vcpu_states,
            platform,
            virtio,
        };
        let state_bytes = snap
            .write(&paths.state)
            .map_err(|e| crate::error_chain(&e))?;
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

    /// Build the VM saved in `paths`, serving `events` as the VM named `id`;
    /// it starts running when [`Vmm::run`] is called, or parked if
    /// `resume` is false. `timeout` bounds the restored VM's run.
    pub fn restore(
        paths: &SnapshotPaths,
        resume: bool,
        timeout: Option<std::time::Duration>,
        process_start: Instant,
        events: Rc<EventLoop>,
        id: String,
    ) -> Result<Self, VmmError> {
        let build_start = Instant::now();
        let snap = Snapshot::read(&paths.state)?;
        check_disks(&snap)?;
        let Snapshot {
            mut config,
            cmdline: saved_cmdline,
            memory: regions,
            vm: vm_state,
            mut vcpus,
            platform: saved_platform,
            virtio,
            ..
        } = snap;
        config.timeout = timeout;
        let (kvm, emulated_kvm) = open_kvm()?;
        let mem = snapshot::map_memory(&paths.memory, &regions)?;
        let vm = create_vm(&kvm)?;
        check_xsave_size(&vm).map_err(restore_err("the vCPUs"))?;
        memory::register_with_kvm(&vm, &mem)?;
        let (mut devices, platform) = new_devices(
            &vm,
            &events,
            (process_start, build_start),
            Some(&saved_platform),
        )?;
        // The guest read its command line at boot; the entries the devices
        // add are not used again.
        let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(cmdline_err)?;
        let console_input = attach_virtio_devices(
            &vm,
            &mem,
            &mut devices,
            &mut config,
            &platform,
            &mut cl,
            events.sender(),
        )?;
        let stdin_to = stdin_target(&config, &saved_cmdline, console_input);

        vm_state.write_devices(&vm)?;
        let vcpu_fds = create_vcpu_fds(&vm, config.cpus)?;
        let counters = Arc::new(ExitCounters::default());
        let parts = VcpuParts::new(&kvm, &devices, &mem, emulated_kvm, &counters);
        let mut restored = Vec::with_capacity(vcpu_fds.len());
        for ((index, fd), state) in (0u8..).zip(vcpu_fds).zip(&mut vcpus) {
            // From when the vCPU parked: its TSC kept counting while the
            // VM stayed paused before the snapshot, as the KVM clock did.
            state.advance_tsc(crate::host::unix_now_ns().saturating_sub(state.read_at_unix_ns));
            state
                .write(&fd, index)
                .map_err(|e| crate::error_chain(&e))
                .map_err(restore_err(format!("vcpu{index}")))?;
            restored.push(parts.vcpu(fd, index));
        }
        for (i, (d, s)) in devices.devices().iter().zip(&virtio).enumerate() {
            d.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(s)
                .map_err(restore_err(format!("virtio device {i}")))?;
        }
        let elapsed = vm_state.write_clock(&vm)?;
        for v in &restored {
            // Tells a guest using kvmclock that it was stopped, so that its
            // soft-lockup watchdog does not count the time saved; EINVAL
            // when the guest has no kvmclock page, which is fine.
            if let Err(e) = v.fd().kvmclock_ctrl() {
                log::debug!("vcpu{}: KVM_KVMCLOCK_CTRL: {e}", v.index());
            }
        }
        if !resume {
            devices.pause_all();
        }
        log::info!(
            "restored {} in {:?} ({} s after it was saved)",
            paths.state.display(),
            build_start.elapsed(),
            elapsed / 1_000_000_000
        );
        Ok(Self {
            config,
            id,
            _kvm: kvm,
            vm,
            mem,
            vcpus: restored,
            platform,
            devices,
            events,
            counters,
            process_start,
            start_paused: !resume,
            cmdline: saved_cmdline,
            stdin_to,
        })
    }
}
