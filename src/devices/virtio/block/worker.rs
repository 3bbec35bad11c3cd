//! The virtio-blk worker: what the worker thread owns, and its answer to a
//! kick. Each kick drains the queue ([`process_queue`]) and raises the
//! interrupt, in passes of at most [`super::PASS_BYTES`] with a look at the
//! control events (pause, reset, stop) between two; a broken ring makes the
//! worker report DEVICE_NEEDS_RESET and stop watching the queue until the
//! driver resets the device.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::disk::{current, SharedDisk};
use super::queue::{complete_and_finish, process_queue_async, process_queue_limited, Pass};
use super::uring::Uring;
use crate::devices::virtio::throttle::Throttle;
use crate::devices::virtio::{
    EpollHandler, GuestLog, Interrupt, QueuePosition, Served, VIRTIO_MMIO_INT_VRING,
};
use crate::memory::GuestMemoryMmap;

const TOKEN_QUEUE: u64 = 0;
/// The rate limiter's two fds: this token and the next.
const TOKEN_LIMIT: u64 = 1;
/// The io_uring engine's completions (after the limiter's two).
const TOKEN_DONE: u64 = 3;

/// What the worker thread owns: the queue and the disk it serves.
pub(super) struct BlockWorker {
    /// The io_uring engine, for an `Async` drive. First, so it is dropped
    /// (it waits for the kernel) before anything else goes.
    pub(super) uring: Option<Uring>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) queue: Queue,
    pub(super) queue_evt: EventFd,
    pub(super) interrupt: Interrupt,
    pub(super) disk: SharedDisk,
    pub(super) acked_features: u64,
    pub(super) errors: GuestLog,
    /// The drive's rate limiter: a refused request stays on the ring and
    /// the worker waits on the limiter's timer.
    pub(super) throttle: Throttle,
}

impl EpollHandler for BlockWorker {
    fn seccomp_kind(&self) -> Option<crate::seccomp::ThreadKind> {
        Some(crate::seccomp::ThreadKind::BlockWorker)
    }

    fn watch(&self) -> Vec<(RawFd, u64, EventSet)> {
        let mut w = vec![(self.queue_evt.as_raw_fd(), TOKEN_QUEUE, EventSet::IN)];
        w.extend(self.throttle.watch(TOKEN_LIMIT));
        if let Some(u) = &self.uring {
            w.push((u.done_fd(), TOKEN_DONE, EventSet::IN));
        }
        w
    }

    fn quiesce(&mut self) {
        if let Some(u) = &mut self.uring {
            finish_in_flight(
                u,
                &self.mem,
                &mut self.queue,
                &mut self.errors,
                &self.interrupt,
            );
        }
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        vec![QueuePosition::of(&self.queue)]
    }

    fn serve(&mut self, ready: &[u64]) -> Served {
        // Kicked, at start, or the limiter lets more through: drain the
        // queue. Non-blocking: EAGAIN just means another kick was merged.
        let _ = self.queue_evt.read();
        self.throttle.woke(ready, TOKEN_LIMIT);
        let disk = current(&self.disk);
        let limits = disk.negotiated_limits(self.acked_features);
        let throttle = &mut self.throttle;
        let mut pass = Pass::default();
        let served = match &mut self.uring {
            None => process_queue_limited(
                &self.mem,
                &mut self.queue,
                &disk,
                &limits,
                &mut self.errors,
                // The pass first: the limiter's tokens are taken only for
                // a request that is served now.
                |bytes, ops| pass.admit(bytes) && throttle.admit(bytes, ops),
            ),
            Some(u) => {
                if !Arc::ptr_eq(u.disk(), &disk) {
                    // A PATCH gave the drive a new file: let what the old
                    // one is doing finish, then register the new one.
                    finish_in_flight(
                        u,
                        &self.mem,
                        &mut self.queue,
                        &mut self.errors,
                        &self.interrupt,
                    );
                    if let Err(e) = u.swap_disk(disk) {
                        log::error!(
                            "virtio-blk: io_uring: cannot use the new backing file (requests go to the old one): {e}"
                        );
                    }
                }
                process_queue_async(
                    &self.mem,
                    &mut self.queue,
                    u,
                    &limits,
                    &mut self.errors,
                    |bytes, ops| throttle.admit(bytes, ops),
                )
            }
        };
        match served {
            Ok(true) => self.interrupt.trigger(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => {
                return Served::broken_ring(
                    "virtio-blk",
                    &e,
                    &self.interrupt,
                    vec![TOKEN_QUEUE, TOKEN_LIMIT, TOKEN_LIMIT + 1, TOKEN_DONE],
                )
            }
        }
        // Chains the engine had no room for, and nothing left in flight to
        // bring the worker back (it all completed inside the submit).
        let engine_idle = self
            .uring
            .as_ref()
            .is_some_and(Uring::held_with_nothing_in_flight);
        Served {
            more: pass.ended() || engine_idle,
            stop_watching: Vec::new(),
        }
    }
}

/// Wait for everything in flight on `u` and put it on the used ring,
/// interrupting the driver if it wants that.
fn finish_in_flight(
    u: &mut Uring,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    errors: &mut GuestLog,
    interrupt: &Interrupt,
) {
    let done = u.wait_idle();
    if complete_and_finish(mem, queue, done, errors) {
        interrupt.trigger(VIRTIO_MMIO_INT_VRING);
    }
}
