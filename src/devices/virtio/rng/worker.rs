//! The virtio-rng worker: on each kick of the request queue, fill what the
//! driver posted from the host's `getrandom` and raise the interrupt. A
//! broken ring makes it report DEVICE_NEEDS_RESET and stop watching the
//! queue until the driver resets the device.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::queue::{host_random, process_queue_limited, RngStats};
use crate::devices::virtio::queue_guard;
use crate::devices::virtio::throttle::Throttle;
use crate::devices::virtio::{
    EpollHandler, GuestLog, Interrupt, QueuePosition, Served, VIRTIO_MMIO_INT_VRING,
};
use crate::memory::GuestMemoryMmap;

const TOKEN_QUEUE: u64 = 0;
/// The rate limiter's two fds: this token and the next.
const TOKEN_LIMIT: u64 = 1;

/// What the worker thread owns.
pub(super) struct RngWorker {
    pub(super) mem: GuestMemoryMmap,
    pub(super) queue: Queue,
    pub(super) queue_evt: EventFd,
    pub(super) interrupt: Interrupt,
    pub(super) stats: Arc<Mutex<RngStats>>,
    pub(super) log: GuestLog,
    pub(super) throttle: Throttle,
}

impl EpollHandler for RngWorker {
    fn seccomp_kind(&self) -> Option<crate::seccomp::ThreadKind> {
        Some(crate::seccomp::ThreadKind::RngWorker)
    }

    fn watch(&self) -> Vec<(RawFd, u64, EventSet)> {
        let mut w = vec![(self.queue_evt.as_raw_fd(), TOKEN_QUEUE, EventSet::IN)];
        w.extend(self.throttle.watch(TOKEN_LIMIT));
        w
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        vec![QueuePosition::of(&self.queue)]
    }

    fn serve(&mut self, ready: &[u64]) -> Served {
        // EAGAIN: merged with an earlier kick.
        let _ = self.queue_evt.read();
        self.throttle.woke(ready, TOKEN_LIMIT);
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mut source = host_random;
        let throttle = &mut self.throttle;
        match process_queue_limited(
            &mut self.queue,
            &self.mem,
            &mut source,
            &mut stats,
            &mut self.log,
            |bytes, ops| throttle.admit(bytes, ops),
        ) {
            Ok(true) => {
                if queue_guard::wants_interrupt(&mut self.queue, &self.mem).unwrap_or(true) {
                    self.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
                }
            }
            Ok(false) => {}
            Err(e) => {
                return Served::broken_ring(
                    "virtio-rng",
                    &e,
                    &self.interrupt,
                    vec![TOKEN_QUEUE, TOKEN_LIMIT, TOKEN_LIMIT + 1],
                )
            }
        }
        Served::default()
    }
}
