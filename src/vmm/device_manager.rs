//! Attaching devices: port-I/O and MMIO platform devices on their buses, and
//! virtio-mmio devices with their windows, IRQs, irqfd/ioeventfd and kernel
//! command line entries.
//!
//! Device `n` (in attach order) gets the MMIO window
//! `VIRTIO_MMIO_START + n * VIRTIO_MMIO_SIZE` and the IRQ `IRQ_VIRTIO_START + n`,
//! and announces itself to the guest kernel with
//! `virtio_mmio.device=4K@0x<base>:<irq>`. The guest probes devices in command
//! line order; the builder attaches them in `VmConfig::virtio_devices`
//! order, drives first, so they become /dev/vda, /dev/vdb, ...
//!
//! The in-kernel irqchip must exist before the first attach (irqfds route to it).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DeviceId, DeviceKind, DriveConfig};
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::virtio::block::{Block, DiskError};
use crate::devices::virtio::mmio::{MmioError, MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::throttle::ThrottleHandle;
use crate::devices::virtio::VirtioDevice;
use crate::layout::{IRQ_MAX, IRQ_VIRTIO_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::GuestMemoryMmap;

/// Errors while attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// Every virtio IRQ is taken.
    #[error(
        "too many virtio devices: device {index} would need IRQ {irq}, the last usable one is {IRQ_MAX}"
    )]
    OutOfIrqs {
        /// Attach position of the refused device.
        index: usize,
        /// IRQ it would have needed.
        irq: u64,
    },
    /// The block device's backing file cannot be used.
    #[error("cannot set up block device {path}")]
    Block {
        /// Backing file.
        path: String,
        /// Cause.
        #[source]
        source: DiskError,
    },
    /// The transport could not be created.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] MmioError),
    /// KVM refused the irqfd.
    #[error("cannot register the irqfd for IRQ {irq}")]
    Irqfd {
        /// GSI.
        irq: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused an ioeventfd.
    #[error("cannot register the ioeventfd for queue {queue} at {addr:#x}")]
    Ioeventfd {
        /// Queue index (the datamatch value).
        queue: usize,
        /// QueueNotify address.
        addr: u64,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MMIO window is taken.
    #[error("cannot place the device at {base:#x}")]
    Bus {
        /// Window start.
        base: u64,
        /// Cause.
        #[source]
        source: BusError,
    },
    /// The kernel command line has no room left.
    #[error("cannot add the device to the kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// A platform device's window is taken.
    #[error("cannot place {what} at {base:#x}")]
    Platform {
        /// The device.
        what: &'static str,
        /// Window start.
        base: u64,
        /// Cause.
        #[source]
        source: BusError,
    },
    /// The activate eventfd could not be shared with a transport.
    #[error("cannot share the activate eventfd")]
    ActivateEvt(#[source] std::io::Error),
    /// No device has this id.
    #[error("no drive with id '{0}'")]
    UnknownDrive(String),
    /// No NIC has this id.
    #[error("no network interface with id '{0}'")]
    UnknownNet(String),
}

/// Where one device lives in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Start of the register window.
    pub base: u64,
    /// Size of the register window.
    pub len: u64,
    /// Interrupt line (GSI).
    pub irq: u32,
}

impl MmioSlot {
    /// The window and IRQ of the `index`-th device.
    pub fn for_index(index: usize) -> Result<Self, DeviceManagerError> {
        let irq = u64::from(IRQ_VIRTIO_START).saturating_add(index as u64);
        if irq > u64::from(IRQ_MAX) {
            return Err(DeviceManagerError::OutOfIrqs { index, irq });
        }
        Ok(Self {
            // Cannot overflow: index <= IRQ_MAX.
            base: VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
            len: VIRTIO_MMIO_SIZE,
            irq: irq as u32,
        })
    }
}

/// One attached device.
pub struct AttachedDevice {
    /// Which device of the VM's list it is.
    pub id: DeviceId,
    /// Where it lives.
    pub slot: MmioSlot,
    /// Its transport, shared with the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Which bus a platform device sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    /// Port I/O (`in`/`out`).
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// The devices of one VM and the two buses the vCPUs dispatch exits to.
#[derive(Default)]
pub struct DeviceManager {
    devices: Vec<AttachedDevice>,
    pio_bus: Bus,
    mmio_bus: Bus,
    activate_evt: Option<EventFd>,
}

impl DeviceManager {
    /// No devices yet; virtio devices activate at once on DRIVER_OK.
    pub fn new() -> Self {
        Self::default()
    }

    /// No devices yet; virtio transports signal `activate_evt` on DRIVER_OK
    /// and the owner calls [`Self::activate_pending`].
    pub fn with_activate_evt(activate_evt: EventFd) -> Self {
        Self {
            activate_evt: Some(activate_evt),
            ..Self::default()
        }
    }

    /// Put a platform (non-virtio) device, `what` in errors, at
    /// `[base, base + len)` on the port-I/O or the MMIO bus.
    pub fn attach_platform(
        &mut self,
        bus: BusKind,
        what: &'static str,
        device: SharedDevice,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceManagerError> {
        let bus = match bus {
            BusKind::Pio => &mut self.pio_bus,
            BusKind::Mmio => &mut self.mmio_bus,
        };
        bus.insert(device, base, len)
            .map_err(|source| DeviceManagerError::Platform { what, base, source })
    }

    /// The port-I/O bus, for the vCPUs.
    pub fn pio_bus(&self) -> Arc<Bus> {
        Arc::new(self.pio_bus.clone())
    }

    /// The MMIO bus, for the vCPUs.
    pub fn mmio_bus(&self) -> Arc<Bus> {
        Arc::new(self.mmio_bus.clone())
    }

    /// Activate every virtio device whose driver set DRIVER_OK since the
    /// last call. Runs on the main thread, never on a vCPU.
    pub fn activate_pending(&self) {
        for d in &self.devices {
            d.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .activate_if_pending();
        }
    }

    /// Park every device worker (the vCPUs are already paused); false if
    /// one did not park in time.
    pub fn pause_all(&self) -> bool {
        let mut all = true;
        for d in &self.devices {
            all &= d
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_mut()
                .pause();
        }
        all
    }

    /// Let every device worker serve again.
    pub fn resume_all(&self) {
        for d in &self.devices {
            d.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_mut()
                .resume();
        }
    }

    /// The transport of the drive with id `id`.
    pub fn drive(&self, id: &str) -> Result<&Arc<Mutex<MmioTransport>>, DeviceManagerError> {
        self.devices
            .iter()
            .find(|d| d.id.kind == DeviceKind::Block && d.id.id == id)
            .map(|d| &d.transport)
            .ok_or_else(|| DeviceManagerError::UnknownDrive(id.to_string()))
    }

    /// Put `device` behind a new virtio-mmio transport: the next free window
    /// and IRQ, an irqfd for the IRQ, one ioeventfd per queue on QueueNotify
    /// (datamatch = queue index), the window on `mmio_bus`, and
    /// `virtio_mmio.device=...` on `cmdline`.
    ///
    /// On error the VM should be abandoned: registrations already made with
    /// KVM are not undone.
    pub fn attach_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        id: DeviceId,
        device: Box<dyn VirtioDevice>,
        cmdline: &mut Cmdline,
    ) -> Result<MmioSlot, DeviceManagerError> {
        let slot = MmioSlot::for_index(self.devices.len())?;
        let mut transport =
            MmioTransport::new(mem.clone(), device).map_err(DeviceManagerError::Transport)?;
        if let Some(evt) = &self.activate_evt {
            transport.set_activate_evt(evt.try_clone().map_err(DeviceManagerError::ActivateEvt)?);
        }

        vm.register_irqfd(transport.interrupt_evt(), slot.irq)
            .map_err(|source| DeviceManagerError::Irqfd {
                irq: slot.irq,
                source,
            })?;
        let notify = slot.base + REG_QUEUE_NOTIFY;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            // A u32 datamatch makes KVM match 4-byte writes of exactly `queue`.
            vm.register_ioevent(evt, &IoEventAddress::Mmio(notify), queue as u32)
                .map_err(|source| DeviceManagerError::Ioeventfd {
                    queue,
                    addr: notify,
                    source,
                })?;
        }

        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), slot.base, slot.len)
            .map_err(|source| DeviceManagerError::Bus {
                base: slot.base,
                source,
            })?;
        cmdline
            .add_virtio_mmio_device(slot.len, GuestAddress(slot.base), slot.irq, None)
            .map_err(DeviceManagerError::Cmdline)?;

        log::debug!("{id}: virtio-mmio at {:#x}, IRQ {}", slot.base, slot.irq);
        self.devices.push(AttachedDevice {
            id,
            slot,
            transport,
        });
        Ok(slot)
    }

    /// Serve the drive `id` from the file at `path` from now on, and tell
    /// the driver its configuration (the capacity) changed.
    pub fn swap_drive_file(
        &self,
        id: &str,
        path: &std::path::Path,
    ) -> Result<(), DeviceManagerError> {
        let mut t = self.drive(id)?.lock().unwrap_or_else(|e| e.into_inner());
        let block = t
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Block>()
            .ok_or_else(|| DeviceManagerError::UnknownDrive(id.to_string()))?;
        block
            .swap_backing_file(path)
            .map_err(|source| DeviceManagerError::Block {
                path: path.display().to_string(),
                source,
            })?;
        t.config_changed();
        Ok(())
    }

    /// The rate limiter of drive `id`.
    pub fn drive_rate_limit(&self, id: &str) -> Result<ThrottleHandle, DeviceManagerError> {
        let mut t = self.drive(id)?.lock().unwrap_or_else(|e| e.into_inner());
        t.device_mut()
            .as_any_mut()
            .downcast_mut::<Block>()
            .map(|b| b.rate_limit().clone())
            .ok_or_else(|| DeviceManagerError::UnknownDrive(id.to_string()))
    }

    /// The rx and tx rate limiters of NIC `id`.
    pub fn net_rate_limits(&self, id: &str) -> Result<[ThrottleHandle; 2], DeviceManagerError> {
        let unknown = || DeviceManagerError::UnknownNet(id.to_string());
        let d = self
            .devices
            .iter()
            .find(|d| d.id.kind == DeviceKind::Net && d.id.id == id)
            .ok_or_else(unknown)?;
        let mut t = d.transport.lock().unwrap_or_else(|e| e.into_inner());
        t.device_mut()
            .as_any_mut()
            .downcast_mut::<Net>()
            .map(|n| n.rate_limits().clone())
            .ok_or_else(unknown)
    }

    /// Every attached device, in attach order.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// Every device's counters for the metrics: one group per kind (the
    /// sum over its devices) and one per drive and NIC (`block_<id>`,
    /// `net_<id>`), as Firecracker names them.
    pub fn metrics(&self) -> crate::metrics::Sample {
        use crate::config::DeviceKind;
        let mut kinds: Vec<(String, Vec<(&'static str, u64)>)> = Vec::new();
        let mut own = Vec::new();
        for d in &self.devices {
            let t = d.transport.lock().unwrap_or_else(|e| e.into_inner());
            let counters = t.device().metrics();
            if counters.is_empty() {
                continue;
            }
            let kind = match d.id.kind {
                DeviceKind::Block => "block",
                DeviceKind::Net => "net",
                DeviceKind::Rng => "entropy",
                DeviceKind::Vsock => "vsock",
                DeviceKind::Console => continue,
            };
            if matches!(d.id.kind, DeviceKind::Block | DeviceKind::Net) {
                own.push((format!("{kind}_{}", d.id.id), counters.clone()));
            }
            match kinds.iter_mut().find(|(k, _)| k == kind) {
                Some((_, sum)) => {
                    for (s, (_, v)) in sum.iter_mut().zip(&counters) {
                        s.1 += v;
                    }
                }
                None => kinds.push((kind.to_string(), counters)),
            }
        }
        kinds.extend(own);
        kinds
    }

    /// Flush every device's buffered state to the host (before the VMM exits).
    pub fn flush_all(&self) {
        for d in &self.devices {
            // A poisoned lock means a vCPU thread panicked mid-access; the
            // device state is still worth flushing.
            let mut t = d.transport.lock().unwrap_or_else(|e| e.into_inner());
            t.device_mut().flush();
        }
    }
}

/// Open the drive's backing file and build its virtio-blk device.
pub fn block_device(cfg: &DriveConfig) -> Result<Box<dyn VirtioDevice>, DeviceManagerError> {
    let block = Block::new(cfg).map_err(|source| DeviceManagerError::Block {
        path: cfg.path.display().to_string(),
        source,
    })?;
    Ok(Box::new(block))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::devices::virtio::block::test_utils::TempImage;
    use crate::devices::virtio::mmio::{MMIO_MAGIC_VALUE, REG_DEVICE_ID, REG_MAGIC_VALUE};

    #[test]
    fn slots_follow_the_layout() {
        let s0 = MmioSlot::for_index(0).unwrap();
        assert_eq!(
            s0,
            MmioSlot {
                base: 0xD000_0000,
                len: 0x1000,
                irq: 5
            }
        );
        let s2 = MmioSlot::for_index(2).unwrap();
        assert_eq!((s2.base, s2.irq), (0xD000_2000, 7));
        let last = (IRQ_MAX - IRQ_VIRTIO_START) as usize;
        assert_eq!(MmioSlot::for_index(last).unwrap().irq, IRQ_MAX);
        assert!(matches!(
            MmioSlot::for_index(last + 1),
            Err(DeviceManagerError::OutOfIrqs { irq: 24, .. })
        ));
        assert!(MmioSlot::for_index(usize::MAX).is_err());
    }

    #[test]
    fn block_device_errors_name_the_file() {
        let cfg = DriveConfig {
            path: "/nonexistent/disk.img".into(),
            is_root: true,
            ..Default::default()
        };
        let Err(e) = block_device(&cfg) else {
            panic!("opened a missing file");
        };
        assert_eq!(
            e.to_string(),
            "cannot set up block device /nonexistent/disk.img"
        );
    }

    /// A VM with an in-kernel irqchip; `None` (after saying so) without /dev/kvm.
    fn kvm_vm() -> Option<VmFd> {
        if !Path::new("/dev/kvm").exists() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("/dev/kvm is missing on CI: the device manager tests need KVM");
            }
            println!("SKIPPED: /dev/kvm missing");
            return None;
        }
        let kvm = kvm_ioctls::Kvm::new().expect("cannot open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM failed");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP failed");
        Some(vm)
    }

    fn read32(bus: &Bus, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(bus.read(addr, &mut b), "nothing at {addr:#x}");
        u32::from_le_bytes(b)
    }

    #[test]
    fn attach_block_devices_with_kvm() {
        let Some(vm) = kvm_vm() else { return };
        let mem = crate::memory::create_guest_memory(16).unwrap();
        let a = TempImage::new(&[0u8; 64 * 1024]);
        let b = TempImage::new(&[0u8; 4096]);
        let drives = [
            DriveConfig {
                id: "a".into(),
                path: a.path().to_owned(),
                is_root: true,
                ..Default::default()
            },
            DriveConfig {
                id: "b".into(),
                path: b.path().to_owned(),
                read_only: true,
                ..Default::default()
            },
        ];
        let mut cmdline = Cmdline::new(2048).unwrap();
        cmdline.insert_str("console=ttyS0").unwrap();
        let mut dm = DeviceManager::new();
        for d in &drives {
            let id = DeviceId::new(DeviceKind::Block, &d.id);
            dm.attach_virtio(&vm, &mem, id, block_device(d).unwrap(), &mut cmdline)
                .unwrap();
        }
        let bus = dm.mmio_bus();
        assert!(dm.drive("b").is_ok() && dm.drive("c").is_err());

        let line = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            line,
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(dm.devices().len(), 2);
        assert_eq!(dm.devices()[1].slot.irq, 6);

        // Guest accesses reach the transports through the bus.
        assert_eq!(
            read32(&bus, 0xd000_0000 + REG_MAGIC_VALUE),
            MMIO_MAGIC_VALUE
        );
        assert_eq!(read32(&bus, 0xd000_1000 + REG_DEVICE_ID), 2);
        // Capacity (config space offset 0) of the first drive: 128 sectors.
        assert_eq!(read32(&bus, 0xd000_0100), 128);
        assert!(!bus.read(0xd000_2000, &mut [0u8; 4]));

        // KVM already holds the irqfd and the ioeventfd: registering them
        // again collides (EBUSY / EEXIST), which proves the first registration.
        {
            let t = dm.devices()[0].transport.lock().unwrap();
            assert!(vm.register_irqfd(t.interrupt_evt(), 5).is_err());
            let notify = IoEventAddress::Mmio(0xd000_0000 + REG_QUEUE_NOTIFY);
            assert!(vm
                .register_ioevent(&t.queue_evts()[0], &notify, 0u32)
                .is_err());
            // A different datamatch on the same address is free.
            assert!(vm
                .register_ioevent(&t.queue_evts()[0], &notify, 1u32)
                .is_ok());
        }

        // A second user of a read-write image is refused with a clear message.
        let Err(e) = block_device(&drives[0]) else {
            panic!("opened a locked image");
        };
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(
            cause.ends_with("is locked by another process (is another microvm using it?)"),
            "{cause}"
        );

        dm.flush_all();
    }
}
