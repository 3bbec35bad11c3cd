//! virtio devices over the virtio-mmio transport.
//!
//! A device is split in three, as in the rust-vmm reference VMM:
//! - the device itself ([`VirtioDevice`]): features, config space, activation;
//! - pure queue logic (drain the available ring, do the work, fill the used
//!   ring), testable with `virtio-queue`'s mock memory and no KVM;
//! - the glue: an [`EpollHandler`] run by one worker thread per activated
//!   device ([`epoll_helper`]) that waits on the queue ioeventfds (and, for
//!   net, the TAP fd) and runs the queue logic.

pub mod block;
pub mod buffers;
pub mod common;
pub mod console;
pub mod epoll_helper;
pub mod guest_log;
pub mod mmio;
pub mod net;
pub mod queue_guard;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod throttle;
pub mod vsock;

pub use common::VirtioCommon;
pub use epoll_helper::{EpollHandler, QueuePosition, Served, WorkerHandle};
pub use guest_log::GuestLog;

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: we only speak the modern (1.x) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: the device used a buffer.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Errors a device can report while being activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("driver set up {got} queues, device needs {want}")]
    QueueCount {
        /// Queues the device needs.
        want: usize,
        /// Queues the driver offered.
        got: usize,
    },
    /// A host resource (thread, epoll, fd) could not be created.
    #[error("cannot start the device worker")]
    Worker(#[source] std::io::Error),
}

/// Copy the bytes of a device configuration space `config` at `offset`
/// into `data`; bytes past its end (or an offset no slice can hold) read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(start) = usize::try_from(offset).ok().filter(|&o| o < config.len()) else {
        return;
    };
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// The `N` queues and their notify eventfds a device of `N` queues was
/// activated with, or the error naming how many the driver set up.
pub fn take_queues<const N: usize>(
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
) -> Result<([Queue; N], [EventFd; N]), ActivateError> {
    let count = |got| ActivateError::QueueCount { want: N, got };
    let (nq, ne) = (queues.len(), queue_evts.len());
    let queues: [Queue; N] = queues.try_into().map_err(|_| count(nq))?;
    let evts: [EventFd; N] = queue_evts.try_into().map_err(|_| count(ne))?;
    Ok((queues, evts))
}

/// How a device raises its interrupt: sets a bit in the transport's
/// InterruptStatus register and kicks the irqfd bound to the device's GSI.
/// Also how it tells the driver it cannot go on ([`Interrupt::needs_reset`]).
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: EventFd,
    needs_reset: Arc<AtomicBool>,
}

impl Interrupt {
    /// An interrupt that sets bits in `status` and signals `irqfd`.
    pub fn new(status: Arc<AtomicU32>, irqfd: EventFd) -> Self {
        Self::with_needs_reset(status, Arc::new(AtomicBool::new(false)), irqfd)
    }

    /// Like [`Interrupt::new`], with the flag the transport reports as
    /// `DEVICE_NEEDS_RESET` in its Status register.
    pub fn with_needs_reset(
        status: Arc<AtomicU32>,
        needs_reset: Arc<AtomicBool>,
        irqfd: EventFd,
    ) -> Self {
        Self {
            status,
            irqfd,
            needs_reset,
        }
    }

    /// Raise `bits` (`VIRTIO_MMIO_INT_*`).
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio: cannot signal irqfd: {e}");
        }
    }

    /// The device stopped serving its queues until the driver resets it:
    /// set `DEVICE_NEEDS_RESET` and send a configuration change interrupt
    /// (virtio 1.2, 2.1.2), once.
    pub fn needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// Whether [`Interrupt::needs_reset`] was called.
    pub fn is_needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus register shared with the transport.
    pub fn status(&self) -> &Arc<AtomicU32> {
        &self.status
    }
}

/// Any `'static` value as [`Any`], so the device manager can reach a
/// device's own methods (a drive's backing file) behind `dyn VirtioDevice`.
pub trait AsAny: Any {
    /// `self` as `&mut dyn Any`.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A virtio device behind the MMIO transport. A device embeds a
/// [`VirtioCommon`] and the provided methods answer from it; it writes its
/// config space and its activation (the worker it starts), and overrides a
/// provided method only for work of its own (net programs its TAP's
/// offloads when features are acked).
pub trait VirtioDevice: Send + AsAny {
    /// The state every device shares.
    fn common(&self) -> &VirtioCommon;
    /// The state every device shares.
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// Read the device configuration space at `offset` (out-of-range bytes read as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Start serving `queues`; `queue_evts[i]` is signalled when the driver notifies queue `i`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError>;

    /// Virtio device ID (2 = block, 1 = net, 3 = console).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_sizes()
    }
    /// Features the device offers, `VIRTIO_F_VERSION_1` included.
    fn avail_features(&self) -> u64 {
        self.common().avail_features()
    }
    /// Features the driver accepted (kept to a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64) {
        self.common_mut().ack_features(features);
    }
    /// Write the device configuration space; devices without writable
    /// fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "{}: ignoring a config write of {} bytes at {offset:#x}",
            self.common().label(),
            data.len()
        );
    }
    /// Stop serving queues (driver reset). Returns true when the device can be activated again.
    fn reset(&mut self) -> bool {
        self.common_mut().reset();
        true
    }
    /// The device is about to take on a saved state (a restore): drop what
    /// the guest cannot have kept. Called before the transport reactivates it.
    fn restoring(&mut self) {}
    /// Flush any buffered state to the host (called before the VMM exits).
    fn flush(&mut self) {}
    /// The device's counters so far, under Firecracker's metric names
    /// (`src/metrics.rs` turns them into deltas); none by default.
    fn metrics(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Stop serving queues until [`Self::resume`] (the VM is paused); true
    /// once the device's worker is parked.
    fn pause(&mut self) -> bool {
        self.common().pause()
    }
    /// Serve queues again.
    fn resume(&mut self) {
        self.common().resume();
    }
    /// Where the paused device's worker stands in each queue (for a
    /// snapshot); `None` when no worker runs.
    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.common().queue_positions()
    }
}
