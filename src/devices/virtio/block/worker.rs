//! The virtio-blk worker: what the worker thread owns, and its answer to a
//! kick. Each kick drains the queue ([`process_queue`]) and raises the
//! interrupt; a broken ring makes the worker report DEVICE_NEEDS_RESET and
//! stop watching the queue until the driver resets the device.

use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::disk::{current, SharedDisk};
use super::queue::process_queue;
use crate::devices::virtio::{
    EpollHandler, GuestLog, Interrupt, QueuePosition, Served, VIRTIO_MMIO_INT_VRING,
};
use crate::memory::GuestMemoryMmap;

const TOKEN_QUEUE: u64 = 0;

/// What the worker thread owns: the queue and the disk it serves.
pub(super) struct BlockWorker {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queue: Queue,
    pub(super) queue_evt: EventFd,
    pub(super) interrupt: Interrupt,
    pub(super) disk: SharedDisk,
    pub(super) acked_features: u64,
    pub(super) errors: GuestLog,
}

impl EpollHandler for BlockWorker {
    fn seccomp_kind(&self) -> Option<crate::seccomp::ThreadKind> {
        Some(crate::seccomp::ThreadKind::BlockWorker)
    }

    fn watch(&self) -> Vec<(RawFd, u64, EventSet)> {
        vec![(self.queue_evt.as_raw_fd(), TOKEN_QUEUE, EventSet::IN)]
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        vec![QueuePosition::of(&self.queue)]
    }

    fn serve(&mut self, _ready: &[u64]) -> Served {
        // The only fd is the queue's: whether kicked or at start, drain it.
        // Non-blocking: EAGAIN just means another kick was merged.
        let _ = self.queue_evt.read();
        let disk = current(&self.disk);
        let limits = disk.negotiated_limits(self.acked_features);
        match process_queue(&self.mem, &mut self.queue, &disk, &limits, &mut self.errors) {
            Ok(true) => self.interrupt.trigger(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => {
                return Served::broken_ring("virtio-blk", &e, &self.interrupt, vec![TOKEN_QUEUE])
            }
        }
        Served::default()
    }
}
