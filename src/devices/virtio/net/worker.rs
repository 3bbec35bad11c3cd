//! What the worker thread of one activated virtio-net device does (the loop
//! itself, with pause and stop, is the shared [`crate::devices::virtio::epoll_helper`]).
//!
//! It sleeps in epoll on three fds and never polls:
//! - the backend's fd (edge-triggered): frames for the guest;
//! - the RX queue eventfd: the guest posted buffers, so retry a deferred frame;
//! - the TX queue eventfd: the guest queued frames.
//!
//! With edge triggering the backend only reports new frames, so the RX path must
//! read until `EAGAIN` or until the guest runs out of buffers; in the second
//! case the frame stays pending and the backend is left alone until the guest
//! kicks the RX queue. Batches are bounded so RX and TX take turns; the
//! guest is interrupted after each batch.
//!
//! A broken ring ends the serving: the worker reports DEVICE_NEEDS_RESET and
//! then waits only for its control eventfd (pause, resume, stop), never
//! polling the device's fds again.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::rxtx::{FrameSink, FrameSource, NetStats, RxPath, RxStop, TxPath};
use crate::devices::virtio::queue_guard::{self, QueueError};
use crate::devices::virtio::throttle::Throttle;
use crate::devices::virtio::{EpollHandler, Interrupt, Served, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestMemoryMmap;
use crate::net::backend::{recv_with_vnet_hdr, send_with_vnet_hdr};
use crate::net::FrameBackend;

const TOKEN_BACKEND: u64 = 0;
const TOKEN_RX_QUEUE: u64 = 1;
const TOKEN_TX_QUEUE: u64 = 2;
/// The rx rate limiter's two fds: this token and the next.
const TOKEN_RX_LIMIT: u64 = 3;
/// The tx rate limiter's two fds: this token and the next.
const TOKEN_TX_LIMIT: u64 = 5;

/// Frames moved to the guest before it is interrupted and TX gets a turn.
const RX_BUDGET: u32 = 128;
/// TX drain passes (each up to a queue's worth) before RX gets a turn.
const TX_PASSES: usize = 4;

/// The backend seen by the frame paths, which always use a vnet header.
struct BackendIo<'a>(&'a dyn FrameBackend);

impl FrameSink for BackendIo<'_> {
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        send_with_vnet_hdr(self.0, frame)
    }
}

impl FrameSource for BackendIo<'_> {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv_with_vnet_hdr(self.0, buf)
    }
}

/// Everything the worker thread owns.
pub(super) struct Worker {
    pub(super) label: String,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Interrupt,
    pub(super) rx_queue: Queue,
    pub(super) tx_queue: Queue,
    pub(super) rx_evt: EventFd,
    pub(super) tx_evt: EventFd,
    pub(super) backend: Arc<dyn FrameBackend>,
    pub(super) rx: RxPath,
    pub(super) tx: TxPath,
    pub(super) stats: Arc<NetStats>,
    /// The backend may hold more frames than the last batch took.
    pub(super) rx_more: bool,
    /// The TX queue may hold more chains than the last batch took.
    pub(super) tx_more: bool,
    /// Rate limiters: a held-back frame waits on its limiter's timer.
    pub(super) rx_throttle: Throttle,
    pub(super) tx_throttle: Throttle,
}

impl EpollHandler for Worker {
    fn seccomp_kind(&self) -> Option<crate::seccomp::ThreadKind> {
        Some(crate::seccomp::ThreadKind::NetWorker)
    }

    fn queue_positions(&self) -> Vec<crate::devices::virtio::QueuePosition> {
        use crate::devices::virtio::QueuePosition;
        vec![
            QueuePosition::of(&self.rx_queue),
            QueuePosition::of(&self.tx_queue),
        ]
    }

    fn watch(&self) -> Vec<(RawFd, u64, EventSet)> {
        vec![
            (
                self.backend.poll_fd(),
                TOKEN_BACKEND,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.rx_evt.as_raw_fd(), TOKEN_RX_QUEUE, EventSet::IN),
            (self.tx_evt.as_raw_fd(), TOKEN_TX_QUEUE, EventSet::IN),
        ]
        .into_iter()
        .chain(self.rx_throttle.watch(TOKEN_RX_LIMIT))
        .chain(self.tx_throttle.watch(TOKEN_TX_LIMIT))
        .collect()
    }

    /// Frames may have reached the backend, and the driver may have queued TX,
    /// before the edge-triggered watch existed: the first call (with nothing
    /// ready) looks at both.
    fn serve(&mut self, ready: &[u64]) -> Served {
        if ready.is_empty() && !self.rx_more && !self.tx_more {
            self.rx_more = true;
            self.tx_more = true;
        }
        for token in ready {
            match *token {
                TOKEN_BACKEND => self.rx_more = true,
                TOKEN_RX_QUEUE => {
                    let _ = self.rx_evt.read();
                    self.rx_more = true;
                }
                TOKEN_TX_QUEUE => {
                    let _ = self.tx_evt.read();
                    self.tx_more = true;
                }
                _ => {}
            }
        }
        if self.rx_throttle.woke(ready, TOKEN_RX_LIMIT) {
            self.rx_more = true;
        }
        if self.tx_throttle.woke(ready, TOKEN_TX_LIMIT) {
            self.tx_more = true;
        }
        match self.serve_queues() {
            Ok(()) => Served {
                more: self.rx_more || self.tx_more,
                stop_watching: Vec::new(),
            },
            // A ring is broken: stop watching the queues and the backend (until
            // the driver resets the device, which stops this worker) and
            // tell the driver.
            Err(e) => {
                (self.rx_more, self.tx_more) = (false, false);
                Served::broken_ring(
                    &self.label,
                    &e,
                    &self.interrupt,
                    vec![
                        TOKEN_BACKEND,
                        TOKEN_RX_QUEUE,
                        TOKEN_TX_QUEUE,
                        TOKEN_RX_LIMIT,
                        TOKEN_RX_LIMIT + 1,
                        TOKEN_TX_LIMIT,
                        TOKEN_TX_LIMIT + 1,
                    ],
                )
            }
        }
    }
}

impl Worker {
    /// One turn of TX then RX; an error when a ring is broken.
    fn serve_queues(&mut self) -> Result<(), QueueError> {
        if self.tx_more {
            self.tx_more = self.handle_tx()?;
        }
        if self.rx_more {
            self.rx_more = self.handle_rx()?;
        }
        Ok(())
    }

    /// Interrupt the guest unless the driver asked not to be.
    fn signal(interrupt: &Interrupt, queue: &mut Queue, mem: &GuestMemoryMmap) {
        if queue.needs_notification(mem).unwrap_or(true) {
            interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// Drain the TX queue with guest notifications off; true if work is left.
    fn handle_tx(&mut self) -> Result<bool, QueueError> {
        for _ in 0..TX_PASSES {
            queue_guard::disable_notification(&mut self.tx_queue, &self.mem)?;
            let throttle = &mut self.tx_throttle;
            let batch = self.tx.process_limited(
                &mut self.tx_queue,
                &self.mem,
                &mut BackendIo(self.backend.as_ref()),
                &self.stats,
                |bytes| throttle.admit(bytes, 1),
            )?;
            if batch.used > 0 {
                Self::signal(&self.interrupt, &mut self.tx_queue, &self.mem);
            }
            if batch.throttled {
                // Notifications stay off: the limiter's timer brings us back.
                return Ok(false);
            }
            if batch.more {
                continue;
            }
            // Re-enable, then look again: the driver may have added chains
            // while it believed we were not listening.
            if !queue_guard::enable_notification(&mut self.tx_queue, &self.mem)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Move one batch of frames to the guest; true if the backend may have more.
    fn handle_rx(&mut self) -> Result<bool, QueueError> {
        let throttle = &mut self.rx_throttle;
        let batch = self.rx.process_limited(
            &mut self.rx_queue,
            &self.mem,
            &mut BackendIo(self.backend.as_ref()),
            &self.stats,
            RX_BUDGET,
            |bytes| throttle.admit(bytes, 1),
        )?;
        if batch.used > 0 {
            Self::signal(&self.interrupt, &mut self.rx_queue, &self.mem);
        }
        Ok(batch.stop == RxStop::Budget)
    }
}
