//! virtio-mmio transport, version 2 (the virtio 1.x "modern" register layout only).
//!
//! One [`MmioTransport`] sits in a 4 KiB MMIO window and wraps one
//! [`VirtioDevice`]. It keeps the generic part of the device state (status,
//! feature negotiation, queue setup, interrupt status) and forwards the
//! configuration space (offset 0x100 and up) to the device.
//!
//! Queue notifications normally never reach this code: the device manager
//! binds each queue's [`EventFd`] to the QueueNotify register with an
//! ioeventfd (datamatch = queue index). A notify that does come through the
//! bus (no ioeventfd, or a different access size) signals the same EventFd.
//!
//! Every register access comes from the guest and is treated as hostile:
//! wrong sizes, unknown offsets, out-of-order status writes and out-of-range
//! queue selectors are ignored with a rate-limited log, never a panic.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::guest_log::GuestLog;
use super::queue_guard::{self, QueueError};
use super::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemoryMmap;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// We only implement the modern (non-legacy) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Our virtio vendor ID ("MVM" in ASCII); the guest does not interpret it.
pub const MMIO_VENDOR_ID: u32 = 0x004d_564d;

// Register offsets (virtio 1.2, 4.2.2 "MMIO Device Register Layout").
/// Magic value register.
pub const REG_MAGIC_VALUE: u64 = 0x000;
/// Version register.
pub const REG_VERSION: u64 = 0x004;
/// Device ID register.
pub const REG_DEVICE_ID: u64 = 0x008;
/// Vendor ID register.
pub const REG_VENDOR_ID: u64 = 0x00c;
/// Device features, 32 bits selected by `REG_DEVICE_FEATURES_SEL`.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// Device features word selector.
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// Driver features, 32 bits selected by `REG_DRIVER_FEATURES_SEL`.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// Driver features word selector.
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// Queue selector.
pub const REG_QUEUE_SEL: u64 = 0x030;
/// Maximum size of the selected queue (0: no such queue).
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// Size of the selected queue.
pub const REG_QUEUE_NUM: u64 = 0x038;
/// Ready bit of the selected queue.
pub const REG_QUEUE_READY: u64 = 0x044;
/// Queue notifier; the value written is the queue index.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// Interrupt status.
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// Interrupt acknowledge.
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// Device status.
pub const REG_STATUS: u64 = 0x070;
/// Descriptor table address, low 32 bits.
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// Descriptor table address, high 32 bits.
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// Available ring ("driver area") address, low 32 bits.
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
/// Available ring ("driver area") address, high 32 bits.
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
/// Used ring ("device area") address, low 32 bits.
pub const REG_QUEUE_USED_LOW: u64 = 0x0a0;
/// Used ring ("device area") address, high 32 bits.
pub const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
/// Shared memory region selector.
pub const REG_SHM_SEL: u64 = 0x0ac;
/// Shared memory region length, low 32 bits.
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
/// Shared memory region length, high 32 bits.
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
/// Shared memory region base, low 32 bits.
pub const REG_SHM_BASE_LOW: u64 = 0x0b8;
/// Shared memory region base, high 32 bits.
pub const REG_SHM_BASE_HIGH: u64 = 0x0bc;
/// Configuration atomicity value.
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const STATUS_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// Errors of the virtio-mmio transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created or duplicated.
    #[error("cannot create an eventfd for the virtio-mmio transport")]
    EventFd(#[source] std::io::Error),
    /// The device declared a queue size virtio-queue cannot handle.
    #[error("device queue {index} has an invalid maximum size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Declared maximum size.
        size: u16,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// DRIVER_OK was set while a queue cannot be served.
    #[error("queue {index} cannot be served")]
    InvalidQueue {
        /// Queue index.
        index: usize,
        /// Cause.
        #[source]
        source: QueueError,
    },
    /// The queue state could not be handed to the device.
    #[error("cannot copy the state of queue {index}")]
    QueueState {
        /// Queue index.
        index: usize,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// A previous reset of the device failed, so it cannot run again.
    #[error("device could not be reset earlier and cannot be activated again")]
    NotResettable,
    /// The device refused to start.
    #[error("device activation failed")]
    Activate(#[source] ActivateError),
}

/// The virtio-mmio register block in front of one virtio device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt_status: Arc<AtomicU32>,
    interrupt_evt: EventFd,
    /// Set by the running device when it found a broken ring.
    device_needs_reset: Arc<AtomicBool>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    driver_status: u32,
    config_generation: u32,
    device_activated: bool,
    /// DRIVER_OK was set and the VMM's event loop has yet to activate.
    activation_pending: bool,
    /// Signalled on DRIVER_OK so that the main thread activates the device
    /// (spawns workers, programs the TAP), not the vCPU thread that wrote
    /// the status; `None` activates at once (tests without an event loop).
    activate_evt: Option<EventFd>,
    reset_failed: bool,
    problems: GuestLog,
}

impl MmioTransport {
    /// Wrap `device`, creating one notification EventFd per queue and the interrupt EventFd.
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|source| MmioError::QueueMaxSize {
                    index,
                    size,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let interrupt_evt = EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?;
        Ok(Self {
            device,
            mem,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            interrupt_evt,
            device_needs_reset: Arc::new(AtomicBool::new(false)),
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            driver_status: 0,
            config_generation: 0,
            device_activated: false,
            activation_pending: false,
            activate_evt: None,
            reset_failed: false,
            problems: GuestLog::default(),
        })
    }

    /// One EventFd per queue, in queue order: register each as an ioeventfd on
    /// `base + REG_QUEUE_NOTIFY` with the queue index as datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The EventFd the device signals to interrupt the guest: register it as an irqfd.
    pub fn interrupt_evt(&self) -> &EventFd {
        &self.interrupt_evt
    }

    /// The InterruptStatus register, shared with the device through [`Interrupt`].
    pub fn interrupt_status(&self) -> &Arc<AtomicU32> {
        &self.interrupt_status
    }

    /// Defer activation to whoever waits on `evt` (see [`Self::activate_if_pending`]).
    pub fn set_activate_evt(&mut self, evt: EventFd) {
        self.activate_evt = Some(evt);
    }

    /// Activate the device if the driver set DRIVER_OK since the last call
    /// (run by the VMM's event loop when the activate eventfd fires).
    pub fn activate_if_pending(&mut self) {
        if std::mem::take(&mut self.activation_pending) {
            self.finish_activation();
        }
    }

    /// Tell the driver the configuration space changed (a new disk size).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.driver_status & STATUS_DRIVER_OK != 0 {
            self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// The device behind this transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind this transport (to flush it before exit).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status as the driver last set it (plus DEVICE_NEEDS_RESET).
    pub fn status(&self) -> u32 {
        if self.device_needs_reset.load(Ordering::SeqCst) {
            self.driver_status | STATUS_NEEDS_RESET
        } else {
            self.driver_status
        }
    }

    /// True between a successful DRIVER_OK and the next reset.
    pub fn is_activated(&self) -> bool {
        self.device_activated
    }

    fn bad_access(&mut self, what: fmt::Arguments<'_>) {
        self.guest_problem(format_args!("ignoring {what}"));
    }

    /// Log something the guest caused, rate-limited: it may do it in a loop.
    fn guest_problem(&mut self, what: fmt::Arguments<'_>) {
        let device_type = self.device.device_type();
        self.problems.warn(
            format_args!("virtio-mmio (device type {device_type})"),
            what,
        );
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// The selected queue, if the driver may configure it now: after
    /// FEATURES_OK and before DRIVER_OK (virtio 1.2, 3.1.1 steps 7-8).
    fn configurable_queue(&mut self, reg: u64) -> Option<&mut Queue> {
        let s = self.driver_status;
        let in_setup = s & STATUS_FEATURES_OK != 0
            && s & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET) == 0;
        let sel = self.queue_select;
        if !in_setup {
            self.bad_access(format_args!(
                "queue register {reg:#x} write in status {s:#x}"
            ));
            return None;
        }
        if sel as usize >= self.queues.len() {
            self.bad_access(format_args!(
                "queue register {reg:#x} write for queue {sel}"
            ));
            return None;
        }
        self.queues.get_mut(sel as usize)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.avail_features();
                match self.device_features_select {
                    0 => (features & 0xffff_ffff) as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            REG_STATUS => self.status(),
            // No shared memory regions: a length of -1 says "no such region".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.bad_access(format_args!("read of register {offset:#x}"));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM => self.write_queue_num(value),
            REG_QUEUE_READY => {
                if value > 1 {
                    self.bad_access(format_args!("QueueReady value {value:#x}"));
                } else if let Some(q) = self.configurable_queue(offset) {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            REG_QUEUE_DESC_LOW..=REG_QUEUE_USED_HIGH => self.write_queue_address(offset, value),
            REG_SHM_SEL => {}
            _ => self.bad_access(format_args!("write of {value:#x} to register {offset:#x}")),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let s = self.driver_status;
        if s & STATUS_DRIVER == 0 || s & STATUS_FEATURES_OK != 0 {
            self.bad_access(format_args!("DriverFeatures write in status {s:#x}"));
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // Feature bits past 63 do not exist; the spec says writes there are
            // harmless only if zero.
            sel => {
                if value != 0 {
                    self.bad_access(format_args!("DriverFeatures word {sel} = {value:#x}"));
                }
            }
        }
    }

    fn write_queue_num(&mut self, value: u32) {
        let Some(q) = self.configurable_queue(REG_QUEUE_NUM) else {
            return;
        };
        // virtio-queue rejects 0, sizes above the maximum and non-powers of two.
        let ok = u16::try_from(value)
            .ok()
            .is_some_and(|size| q.try_set_size(size).is_ok());
        if !ok {
            self.bad_access(format_args!("QueueNum {value}"));
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.configurable_queue(offset) else {
            return;
        };
        let high = offset & 0x4 != 0;
        let merge = |old: u64| {
            if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        let result = match offset & !0x4 {
            REG_QUEUE_DESC_LOW => q.try_set_desc_table_address(GuestAddress(merge(q.desc_table()))),
            REG_QUEUE_AVAIL_LOW => {
                q.try_set_avail_ring_address(GuestAddress(merge(q.avail_ring())))
            }
            REG_QUEUE_USED_LOW => q.try_set_used_ring_address(GuestAddress(merge(q.used_ring()))),
            // 0x88, 0x8c, 0x98, 0x9c: holes in the register block.
            _ => {
                self.bad_access(format_args!("write of {value:#x} to register {offset:#x}"));
                return;
            }
        };
        if let Err(e) = result {
            self.bad_access(format_args!("queue address {value:#x} at {offset:#x}: {e}"));
        }
    }

    fn notify(&mut self, value: u32) {
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::warn!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => self.bad_access(format_args!("notify of queue {value}")),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.driver_status;
        // The driver may only add bits (it resets with 0 to start over), and
        // DEVICE_NEEDS_RESET belongs to the device.
        if value & old & !STATUS_NEEDS_RESET != old & !STATUS_NEEDS_RESET {
            self.bad_access(format_args!("status {value:#x} clearing bits of {old:#x}"));
            return;
        }
        let new = value & !old & !STATUS_NEEDS_RESET;
        let mut status = old;

        if new & STATUS_ACKNOWLEDGE != 0 {
            status |= STATUS_ACKNOWLEDGE;
        }
        if new & STATUS_DRIVER != 0 {
            if status & STATUS_ACKNOWLEDGE != 0 {
                status |= STATUS_DRIVER;
            } else {
                self.bad_access(format_args!("DRIVER before ACKNOWLEDGE"));
            }
        }
        if new & STATUS_FAILED != 0 {
            log::info!(
                "virtio-mmio: driver gave up on device type {}",
                self.device.device_type()
            );
            status |= STATUS_FAILED;
        }
        if new & STATUS_FEATURES_OK != 0 {
            if status & STATUS_DRIVER == 0 {
                self.bad_access(format_args!("FEATURES_OK before DRIVER"));
            } else if self.features_acceptable() {
                self.device.set_acked_features(self.acked_features);
                status |= STATUS_FEATURES_OK;
            } else {
                // Leaving FEATURES_OK clear tells the driver we refuse its features.
                let (acked, offered) = (self.acked_features, self.device.avail_features());
                self.guest_problem(format_args!(
                    "refusing driver features {acked:#x} (device offers {offered:#x})"
                ));
            }
        }
        if new & STATUS_DRIVER_OK != 0 {
            if status & STATUS_FEATURES_OK == 0 || status & STATUS_FAILED != 0 {
                self.bad_access(format_args!("DRIVER_OK in status {status:#x}"));
            } else {
                status |= STATUS_DRIVER_OK;
                self.driver_status = status;
                match &self.activate_evt {
                    Some(evt) => {
                        self.activation_pending = true;
                        if let Err(e) = evt.write(1) {
                            log::error!("virtio-mmio: cannot request activation: {e}");
                        }
                    }
                    None => self.finish_activation(),
                }
                return;
            }
        }
        self.driver_status = status;
    }

    fn finish_activation(&mut self) {
        if let Err(e) = self.activate() {
            let e = crate::error_chain(&e);
            self.guest_problem(format_args!("activation failed, device needs reset: {e}"));
            self.driver_status |= STATUS_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
            self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// The driver accepted only features the device offered, and VERSION_1,
    /// which a modern transport requires.
    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.acked_features & !offered == 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        if self.reset_failed {
            return Err(MmioError::NotResettable);
        }
        // Every queue, ready or not: an unready one is never touched, a
        // ready one must be one the device can follow.
        for (index, q) in self.queues.iter().enumerate() {
            queue_guard::check(q, &self.mem)
                .map_err(|source| MmioError::InvalidQueue { index, source })?;
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                let mut copy = Queue::try_from(q.state())
                    .map_err(|source| MmioError::QueueState { index, source })?;
                copy.set_event_idx(event_idx);
                Ok(copy)
            })
            .collect::<Result<Vec<_>, MmioError>>()?;
        let queue_evts = self
            .queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let irqfd = self.interrupt_evt.try_clone().map_err(MmioError::EventFd)?;
        self.device_needs_reset.store(false, Ordering::SeqCst);
        let interrupt = Interrupt::with_needs_reset(
            self.interrupt_status.clone(),
            self.device_needs_reset.clone(),
            irqfd,
        );
        self.device
            .activate(self.mem.clone(), interrupt, queues, queue_evts)
            .map_err(MmioError::Activate)?;
        self.device_activated = true;
        Ok(())
    }

    fn raise_interrupt(&self, bits: u32) {
        self.interrupt_status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.interrupt_evt.write(1) {
            log::warn!("virtio-mmio: cannot signal irqfd: {e}");
        }
    }

    /// Back to the power-on state (status 0): stops an activated device.
    fn reset(&mut self) {
        self.activation_pending = false;
        if self.device_activated {
            if !self.device.reset() {
                log::warn!(
                    "virtio-mmio: device type {} cannot be reset; it stays unusable",
                    self.device.device_type()
                );
                self.reset_failed = true;
            }
            self.device_activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.driver_status = 0;
        self.device_needs_reset.store(false, Ordering::SeqCst);
        self.interrupt_status.store(0, Ordering::SeqCst);
    }
}

/// One queue as the driver set it up, and how far the device got in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The device's next available entry.
    pub next_avail: u16,
    /// The device's next used entry.
    pub next_used: u16,
}

/// The transport's registers and queues, for a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    /// Device ID of the device behind it (checked on restore).
    pub device_type: u32,
    /// Device status as the driver set it.
    pub driver_status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device had reported DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// The device was serving its queues (or about to).
    pub activated: bool,
    /// Every queue, in order.
    pub queues: Vec<QueueSnapshot>,
}

impl MmioTransport {
    /// The transport's state; the device must be paused, so that the
    /// positions its worker recorded are current.
    pub fn snapshot(&self) -> Result<TransportSnapshot, String> {
        let activated = self.device_activated || self.activation_pending;
        let positions = if self.device_activated {
            let p = self.device.queue_positions().ok_or_else(|| {
                format!(
                    "virtio device type {} is active but reports no queue positions",
                    self.device.device_type()
                )
            })?;
            if p.len() != self.queues.len() {
                return Err(format!(
                    "virtio device type {} reports {} queue positions for {} queues",
                    self.device.device_type(),
                    p.len(),
                    self.queues.len()
                ));
            }
            p
        } else {
            vec![Default::default(); self.queues.len()]
        };
        let queues = self
            .queues
            .iter()
            .zip(positions)
            .map(|(q, p)| QueueSnapshot {
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail: p.next_avail,
                next_used: p.next_used,
            })
            .collect();
        Ok(TransportSnapshot {
            device_type: self.device.device_type(),
            driver_status: self.driver_status,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            needs_reset: self.device_needs_reset.load(Ordering::SeqCst),
            activated,
            queues,
        })
    }

    /// Take on a saved state (the transport is new, nothing has run) and,
    /// if the device was serving its queues, start it again where it left
    /// off. Every field comes from a file and is checked like a guest write.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), String> {
        let kind = self.device.device_type();
        if s.device_type != kind {
            return Err(format!(
                "device type {} in the snapshot, {kind} here",
                s.device_type
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "device type {kind}: {} queues in the snapshot, {} here",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let offered = self.device.avail_features();
        if s.acked_features & !offered != 0 {
            return Err(format!(
                "device type {kind}: the guest accepted features {:#x}, this host's device offers {offered:#x}",
                s.acked_features
            ));
        }
        let known = STATUS_ACKNOWLEDGE
            | STATUS_DRIVER
            | STATUS_FEATURES_OK
            | STATUS_DRIVER_OK
            | STATUS_FAILED;
        if s.driver_status & !known != 0 || (s.activated && s.driver_status & STATUS_DRIVER_OK == 0)
        {
            return Err(format!(
                "device type {kind}: impossible status {:#x}",
                s.driver_status
            ));
        }
        for (i, (q, saved)) in self.queues.iter_mut().zip(&s.queues).enumerate() {
            let state = virtio_queue::QueueState {
                max_size: q.max_size(),
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                event_idx_enabled: false,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            };
            *q = Queue::try_from(state)
                .map_err(|e| format!("device type {kind}, queue {i}: {e}"))?;
        }
        self.queue_select = s.queue_select;
        self.device_features_select = s.device_features_select;
        self.driver_features_select = s.driver_features_select;
        self.acked_features = s.acked_features;
        self.driver_status = s.driver_status;
        self.config_generation = s.config_generation;
        self.interrupt_status
            .store(s.interrupt_status, Ordering::SeqCst);
        if s.driver_status & STATUS_FEATURES_OK != 0 {
            self.device.set_acked_features(s.acked_features);
        }
        self.device.restoring();
        if s.activated && !s.needs_reset {
            self.activate().map_err(|e| crate::error_chain(&e))?;
        }
        self.device_needs_reset
            .store(s.needs_reset, Ordering::SeqCst);
        if s.interrupt_status != 0 {
            // Whatever the guest had not acknowledged yet: a second look
            // at InterruptStatus is harmless, a lost interrupt is not.
            self.raise_interrupt(0);
        }
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            self.bad_access(format_args!(
                "{}-byte read of register {offset:#x}",
                data.len()
            ));
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access(format_args!(
                "{}-byte write to register {offset:#x}",
                data.len()
            ));
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_queue::mock::MockSplitQueue;

    use super::*;

    const FEATURE_A: u64 = 1 << 3;
    const FEATURE_UNOFFERED: u64 = 1 << 4;

    #[derive(Default)]
    struct MockState {
        acked: u64,
        activations: usize,
        queues: Vec<(bool, u16, u64, u64, u64)>,
        interrupt: Option<Interrupt>,
        evts: Vec<EventFd>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
        fail_activate: bool,
        reset_result: bool,
        /// What `queue_positions` reports (a paused worker's).
        report_positions: Option<Vec<super::super::QueuePosition>>,
        /// (next_avail, next_used) of each queue handed to `activate`.
        activated_positions: Vec<(u16, u16)>,
    }

    struct MockDevice {
        common: super::super::VirtioCommon,
        state: Arc<Mutex<MockState>>,
        config: Vec<u8>,
    }

    fn mock_common(sizes: &[u16]) -> super::super::VirtioCommon {
        super::super::VirtioCommon::new(2, "mock".into(), VIRTIO_F_VERSION_1 | FEATURE_A, sizes)
    }

    impl VirtioDevice for MockDevice {
        fn common(&self) -> &super::super::VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut super::super::VirtioCommon {
            &mut self.common
        }
        fn set_acked_features(&mut self, features: u64) {
            self.state.lock().unwrap().acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset
                    .checked_add(i as u64)
                    .and_then(|o| self.config.get(usize::try_from(o).ok()?))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.state
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            interrupt: Interrupt,
            queues: Vec<Queue>,
            queue_evts: Vec<EventFd>,
        ) -> Result<(), ActivateError> {
            let mut s = self.state.lock().unwrap();
            if s.fail_activate {
                return Err(ActivateError::QueueCount {
                    want: 9,
                    got: queues.len(),
                });
            }
            s.activations += 1;
            s.activated_positions = queues
                .iter()
                .map(|q| (q.next_avail(), q.next_used()))
                .collect();
            s.queues = queues
                .iter()
                .map(|q| {
                    (
                        q.ready(),
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring(),
                    )
                })
                .collect();
            s.interrupt = Some(interrupt);
            s.evts = queue_evts;
            Ok(())
        }
        fn queue_positions(&self) -> Option<Vec<super::super::QueuePosition>> {
            self.state.lock().unwrap().report_positions.clone()
        }
        fn reset(&mut self) -> bool {
            let mut s = self.state.lock().unwrap();
            s.resets += 1;
            s.interrupt = None;
            s.reset_result
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn transport(sizes: Vec<u16>) -> (MmioTransport, Arc<Mutex<MockState>>) {
        let state = Arc::new(Mutex::new(MockState {
            reset_result: true,
            ..Default::default()
        }));
        let dev = MockDevice {
            common: mock_common(&sizes),
            state: state.clone(),
            config: vec![0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7],
        };
        (MmioTransport::new(mem(), Box::new(dev)).unwrap(), state)
    }

    fn r32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        w32(t, REG_STATUS, 0);
        w32(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w32(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(t, REG_DRIVER_FEATURES_SEL, 0);
        w32(t, REG_DRIVER_FEATURES, (features & 0xffff_ffff) as u32);
        w32(t, REG_DRIVER_FEATURES_SEL, 1);
        w32(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w32(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        r32(t, REG_STATUS) & STATUS_FEATURES_OK != 0
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, desc: u64, avail: u64, used: u64, num: u32) {
        w32(t, REG_QUEUE_SEL, index);
        assert_eq!(r32(t, REG_QUEUE_READY), 0);
        w32(t, REG_QUEUE_NUM, num);
        w32(t, REG_QUEUE_DESC_LOW, (desc & 0xffff_ffff) as u32);
        w32(t, REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w32(t, REG_QUEUE_AVAIL_LOW, (avail & 0xffff_ffff) as u32);
        w32(t, REG_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        w32(t, REG_QUEUE_USED_LOW, (used & 0xffff_ffff) as u32);
        w32(t, REG_QUEUE_USED_HIGH, (used >> 32) as u32);
        w32(t, REG_QUEUE_READY, 1);
        assert_eq!(r32(t, REG_QUEUE_READY), 1);
    }

    const OK_STATUS: u32 =
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(vec![16]);
        assert_eq!(r32(&mut t, REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r32(&mut t, REG_VERSION), 2);
        assert_eq!(r32(&mut t, REG_DEVICE_ID), 2);
        assert_eq!(r32(&mut t, REG_VENDOR_ID), MMIO_VENDOR_ID);
        w32(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            r32(&mut t, REG_DEVICE_FEATURES),
            crate::narrow::u32_of(FEATURE_A)
        );
        w32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 1);
        w32(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 0);
        assert_eq!(r32(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(r32(&mut t, REG_CONFIG_GENERATION), 0);
    }

    #[test]
    fn snapshot_restores_where_the_device_stopped_and_refuses_impossible_states() {
        use super::super::{QueuePosition, VIRTIO_MMIO_INT_VRING};
        let (mut t, state) = transport(vec![16]);
        let m = mem();
        let q0 = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1 | FEATURE_A));
        let (d, a, u) = (q0.desc_table_addr().0, q0.avail_addr().0, q0.used_addr().0);
        setup_queue(&mut t, 0, d, a, u, 16);
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert!(t.is_activated());
        // An active device that cannot say where it is cannot be saved.
        assert!(t.snapshot().unwrap_err().contains("no queue positions"));
        state.lock().unwrap().report_positions = Some(vec![QueuePosition {
            next_avail: 7,
            next_used: 5,
        }]);
        t.interrupt_status()
            .store(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        let snap = t.snapshot().unwrap();
        assert!(snap.activated);
        assert_eq!(snap.driver_status, OK_STATUS);
        assert_eq!(snap.acked_features, VIRTIO_F_VERSION_1 | FEATURE_A);
        assert_eq!(
            (snap.queues[0].next_avail, snap.queues[0].next_used),
            (7, 5)
        );
        assert_eq!(snap.queues[0].desc_table, d);

        // A new transport takes it on and starts the device where it was.
        let (mut t2, state2) = transport(vec![16]);
        // The guest's memory as it was: 7 entries made available (avail.idx).
        use vm_memory::Bytes;
        t2.mem.write_obj(7u16, GuestAddress(a + 2)).unwrap();
        t2.restore(&snap).unwrap();
        assert!(t2.is_activated());
        let s2 = state2.lock().unwrap();
        assert_eq!(s2.activations, 1);
        assert_eq!(s2.acked, VIRTIO_F_VERSION_1 | FEATURE_A);
        assert_eq!(s2.activated_positions, vec![(7, 5)]);
        assert_eq!(s2.queues[0], (true, 16, d, a, u));
        drop(s2);
        assert_eq!(r32(&mut t2, REG_STATUS), OK_STATUS);
        assert_eq!(r32(&mut t2, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);

        // Every impossible state is refused and starts nothing.
        let bad = |f: &dyn Fn(&mut TransportSnapshot), want: &str| {
            let mut s = snap.clone();
            f(&mut s);
            let (mut t3, st3) = transport(vec![16]);
            t3.mem.write_obj(7u16, GuestAddress(a + 2)).unwrap();
            let e = t3.restore(&s).unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert_eq!(st3.lock().unwrap().activations, 0);
        };
        bad(&|s| s.device_type = 1, "device type 1 in the snapshot");
        bad(
            &|s| s.queues.push(Default::default()),
            "2 queues in the snapshot",
        );
        bad(
            &|s| s.acked_features |= FEATURE_UNOFFERED,
            "this host's device offers",
        );
        bad(&|s| s.driver_status |= 0x100, "impossible status");
        bad(
            &|s| s.driver_status &= !STATUS_DRIVER_OK,
            "impossible status",
        );
        bad(&|s| s.queues[0].size = 12, "queue 0");
        bad(&|s| s.queues[0].size = 32, "queue 0");
        bad(&|s| s.queues[0].desc_table = 0x1001, "queue 0");
        // Rings outside guest RAM, a device position the guest's ring
        // contradicts: the activation check refuses them.
        bad(&|s| s.queues[0].used_ring = 0x4000_0000, "cannot be served");
        bad(&|s| s.queues[0].next_avail = 60_000, "cannot be served");
    }

    #[test]
    fn activation_waits_for_the_event_loop() {
        let (mut t, state) = transport(vec![16]);
        let m = mem();
        let q0 = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        t.set_activate_evt(evt.try_clone().unwrap());
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        let (d, a, u) = (q0.desc_table_addr().0, q0.avail_addr().0, q0.used_addr().0);
        setup_queue(&mut t, 0, d, a, u, 16);

        // DRIVER_OK on the "vCPU": recorded and signalled, not activated.
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert_eq!(r32(&mut t, REG_STATUS), OK_STATUS);
        assert!(!t.is_activated());
        assert_eq!(state.lock().unwrap().activations, 0);
        assert_eq!(evt.read().unwrap(), 1);
        // The event loop activates, once.
        t.activate_if_pending();
        assert!(t.is_activated());
        t.activate_if_pending();
        assert_eq!(state.lock().unwrap().activations, 1);

        // A reset before the loop gets to it cancels the activation.
        w32(&mut t, REG_STATUS, 0);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, d, a, u, 16);
        w32(&mut t, REG_STATUS, OK_STATUS);
        w32(&mut t, REG_STATUS, 0);
        t.activate_if_pending();
        assert!(!t.is_activated());
        assert_eq!(state.lock().unwrap().activations, 1);
    }

    #[test]
    fn full_handshake_activates_and_reset_stops() {
        let (mut t, state) = transport(vec![16, 8]);
        let m = mem();
        let q0 = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let q1 = MockSplitQueue::create(&m, GuestAddress(0x4000), 8);

        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1 | FEATURE_A));
        assert_eq!(state.lock().unwrap().acked, VIRTIO_F_VERSION_1 | FEATURE_A);

        w32(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 16);
        w32(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 8);
        let (d0, a0, u0) = (q0.desc_table_addr().0, q0.avail_addr().0, q0.used_addr().0);
        let (d1, a1, u1) = (q1.desc_table_addr().0, q1.avail_addr().0, q1.used_addr().0);
        setup_queue(&mut t, 0, d0, a0, u0, 16);
        setup_queue(&mut t, 1, d1, a1, u1, 4);

        assert!(!t.is_activated());
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert!(t.is_activated());
        assert_eq!(r32(&mut t, REG_STATUS), OK_STATUS);
        {
            let s = state.lock().unwrap();
            assert_eq!(s.activations, 1);
            assert_eq!(
                s.queues,
                vec![(true, 16, d0, a0, u0), (true, 4, d1, a1, u1)]
            );
            assert_eq!(s.evts.len(), 2);
        }

        // Queue registers are frozen after DRIVER_OK.
        w32(&mut t, REG_QUEUE_SEL, 1);
        w32(&mut t, REG_QUEUE_NUM, 8);
        w32(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r32(&mut t, REG_QUEUE_READY), 1);

        // The device interrupts through the shared status and the irqfd.
        let device_interrupt = |f: &dyn Fn(&Interrupt)| {
            f(state.lock().unwrap().interrupt.as_ref().unwrap());
        };
        device_interrupt(&|i| i.trigger(crate::devices::virtio::VIRTIO_MMIO_INT_VRING));
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 1);
        assert_eq!(t.interrupt_evt().read().unwrap(), 1);
        w32(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 0);

        // A device that found a broken ring says so through Status and a
        // configuration change interrupt; reset clears it.
        device_interrupt(&Interrupt::needs_reset);
        assert_eq!(r32(&mut t, REG_STATUS), OK_STATUS | STATUS_NEEDS_RESET);
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        w32(&mut t, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);

        // A notify through the bus signals the queue's EventFd (the same
        // eventfd the device holds a clone of).
        w32(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(state.lock().unwrap().evts[1].read().unwrap(), 1);
        assert!(t.queue_evts()[0].read().is_err(), "queue 0 not signalled");

        // Reset.
        w32(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(r32(&mut t, REG_STATUS), 0);
        assert_eq!(state.lock().unwrap().resets, 1);
        w32(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r32(&mut t, REG_QUEUE_READY), 0);

        // And the driver can start over.
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, d0, a0, u0, 16);
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert!(t.is_activated());
        let s = state.lock().unwrap();
        assert_eq!(s.activations, 2);
        // Queue 1 was not set up this time: handed over, but not ready.
        assert!(!s.queues[1].0);
    }

    #[test]
    fn unoffered_features_are_refused() {
        let (mut t, state) = transport(vec![16]);
        assert!(!negotiate(&mut t, VIRTIO_F_VERSION_1 | FEATURE_UNOFFERED));
        assert_eq!(state.lock().unwrap().acked, 0);
        // DRIVER_OK without FEATURES_OK does nothing.
        w32(&mut t, REG_STATUS, OK_STATUS & !STATUS_FEATURES_OK);
        assert!(!t.is_activated());
        assert_eq!(state.lock().unwrap().activations, 0);
        // A modern transport needs VERSION_1.
        assert!(!negotiate(&mut t, FEATURE_A));
        // Feature writes are ignored once FEATURES_OK is set.
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        w32(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w32(
            &mut t,
            REG_DRIVER_FEATURES,
            crate::narrow::u32_of(FEATURE_A),
        );
        assert_eq!(t.acked_features, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let (mut t, state) = transport(vec![16]);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        // Rings beyond the 1 MiB of guest memory.
        setup_queue(&mut t, 0, 0x10_0000, 0x20_0000, 0x30_0000, 16);
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert!(!t.is_activated());
        assert_eq!(r32(&mut t, REG_STATUS), OK_STATUS | STATUS_NEEDS_RESET);
        assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(r32(&mut t, REG_CONFIG_GENERATION), 1);
        assert_eq!(state.lock().unwrap().activations, 0);
        // Writing status back with NEEDS_RESET clear is not "clearing a bit".
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert_eq!(r32(&mut t, REG_STATUS), OK_STATUS | STATUS_NEEDS_RESET);
        w32(&mut t, REG_STATUS, 0);
        assert_eq!(r32(&mut t, REG_STATUS), 0);
        // Never activated, so the device was not asked to reset.
        assert_eq!(state.lock().unwrap().resets, 0);
    }

    /// Rings the device cannot follow are refused at DRIVER_OK, so no worker
    /// ever starts on them.
    #[test]
    fn unusable_rings_at_driver_ok_set_needs_reset() {
        use vm_memory::Bytes;
        let (mut t, state) = transport(vec![16, 16]);
        // Queue 0 with its available ring at `avail` and index `avail_idx`.
        let mut driver_ok = |avail: u64, avail_idx: u16| {
            w32(&mut t, REG_STATUS, 0);
            assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
            setup_queue(&mut t, 0, 0x1000, avail, 0x3000, 16);
            t.mem.write_obj(avail_idx, GuestAddress(avail + 2)).unwrap();
            w32(&mut t, REG_STATUS, OK_STATUS);
            (t.is_activated(), r32(&mut t, REG_STATUS))
        };
        let refused = (false, OK_STATUS | STATUS_NEEDS_RESET);
        // A ready queue whose available ring is at guest address 0.
        assert_eq!(driver_ok(0, 0), refused);
        // An available index more than a queue ahead of the device.
        assert_eq!(driver_ok(0x2000, 17), refused);
        // 16 ahead is a full ring, which is fine.
        assert_eq!(driver_ok(0x2000, 16), (true, OK_STATUS));
        assert_eq!(state.lock().unwrap().activations, 1);
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, state) = transport(vec![16]);
        state.lock().unwrap().fail_activate = true;
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert!(!t.is_activated());
        assert_ne!(r32(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn device_that_cannot_reset_is_not_reactivated() {
        let (mut t, state) = transport(vec![16]);
        state.lock().unwrap().reset_result = false;
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert!(t.is_activated());
        w32(&mut t, REG_STATUS, 0);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        w32(&mut t, REG_STATUS, OK_STATUS);
        assert!(!t.is_activated());
        assert_ne!(r32(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_eq!(state.lock().unwrap().activations, 1);
    }

    #[test]
    fn config_space_is_forwarded() {
        let (mut t, state) = transport(vec![16]);
        let mut b = [0u8; 4];
        t.read(0x104, &mut b);
        assert_eq!(b, [0xa4, 0xa5, 0xa6, 0xa7]);
        let mut one = [0u8; 1];
        t.read(0x101, &mut one);
        assert_eq!(one, [0xa1]);
        let mut wide = [0xffu8; 8];
        t.read(0x106, &mut wide);
        assert_eq!(wide, [0xa6, 0xa7, 0, 0, 0, 0, 0, 0]);
        t.write(0x102, &[1, 2]);
        assert_eq!(state.lock().unwrap().config_writes, vec![(2, vec![1, 2])]);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let (mut t, state) = transport(vec![16]);
        // Wrong sizes: reads give zeros, writes do nothing.
        for len in [0usize, 1, 2, 3, 8] {
            let mut b = vec![0xffu8; len];
            t.read(REG_MAGIC_VALUE, &mut b);
            assert!(b.iter().all(|&x| x == 0));
            t.write(REG_STATUS, &vec![1u8; len]);
        }
        assert_eq!(r32(&mut t, REG_STATUS), 0);
        // Unknown and unaligned offsets.
        for off in [0x1, 0x18, 0x28, 0x3c, 0x40, 0x88, 0x9c, 0xa8, 0xc0, 0xfb] {
            assert_eq!(r32(&mut t, off), 0, "offset {off:#x}");
            w32(&mut t, off, 0xffff_ffff);
        }
        // Offsets far outside the window reach the config space handler safely.
        let mut b = [0u8; 4];
        t.read(u64::MAX, &mut b);
        t.read(u64::MAX - 2, &mut b);
        t.write(u64::MAX, &[1, 2, 3, 4]);
        assert_eq!(b, [0; 4]);

        // Out-of-order status.
        w32(&mut t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(r32(&mut t, REG_STATUS), 0);
        w32(&mut t, REG_STATUS, OK_STATUS);
        // ACK and DRIVER are taken, FEATURES_OK is refused (no features
        // acked), so DRIVER_OK is too.
        assert_eq!(r32(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert!(!t.is_activated());

        // Queue setup before FEATURES_OK is ignored.
        w32(&mut t, REG_QUEUE_SEL, 0);
        w32(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r32(&mut t, REG_QUEUE_READY), 0);

        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        // Clearing a bit is refused.
        w32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(
            r32(&mut t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );

        // Out-of-range queue selector.
        for sel in [1, 16, u32::MAX] {
            w32(&mut t, REG_QUEUE_SEL, sel);
            assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 0);
            assert_eq!(r32(&mut t, REG_QUEUE_READY), 0);
            w32(&mut t, REG_QUEUE_NUM, 4);
            w32(&mut t, REG_QUEUE_READY, 1);
            w32(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
            w32(&mut t, REG_QUEUE_NOTIFY, sel);
        }
        // Bad queue sizes and misaligned rings are refused.
        w32(&mut t, REG_QUEUE_SEL, 0);
        for num in [0, 3, 32, 0x1_0000 + 8, u32::MAX] {
            w32(&mut t, REG_QUEUE_NUM, num);
            assert_eq!(t.queues[0].size(), 16, "QueueNum {num}");
        }
        w32(&mut t, REG_QUEUE_DESC_LOW, 0x1001);
        w32(&mut t, REG_QUEUE_AVAIL_LOW, 0x1001);
        w32(&mut t, REG_QUEUE_USED_LOW, 0x1002);
        assert_eq!(t.queues[0].desc_table(), 0);
        assert_eq!(t.queues[0].avail_ring(), 0);
        assert_eq!(t.queues[0].used_ring(), 0);
        w32(&mut t, REG_QUEUE_READY, 2);
        assert_eq!(r32(&mut t, REG_QUEUE_READY), 0);

        // The default ring addresses (0) are inside guest memory, so a driver
        // that skipped setup gets a valid queue at 0: harmless.
        assert_eq!(state.lock().unwrap().activations, 0);
        assert!(t.problems.count() > 0);
    }

    #[test]
    fn queue_sizes_are_checked_at_creation() {
        let state = Arc::new(Mutex::new(MockState::default()));
        let dev = MockDevice {
            common: mock_common(&[16, 3]),
            state,
            config: Vec::new(),
        };
        assert!(matches!(
            MmioTransport::new(mem(), Box::new(dev)),
            Err(MmioError::QueueMaxSize {
                index: 1,
                size: 3,
                ..
            })
        ));
    }
}
