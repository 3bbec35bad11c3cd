//! The virtio-vsock worker: serves the three queues and the muxer's host
//! sockets (through the muxer's own epoll fd). A broken ring makes it
//! report DEVICE_NEEDS_RESET and stop watching the queues until the driver
//! resets the device.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Muxer, VsockStats, MAX_PAYLOAD};
use super::queue::{process_event, process_rx, process_tx};
use crate::devices::virtio::buffers::Buffers;
use crate::devices::virtio::queue_guard::{self, QueueError};
use crate::devices::virtio::{
    EpollHandler, GuestLog, Interrupt, QueuePosition, Served, VIRTIO_MMIO_INT_VRING,
};
use crate::memory::GuestMemoryMmap;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_HOST: u64 = 3;

/// What the worker thread owns.
pub(super) struct VsockWorker {
    pub(super) mem: GuestMemoryMmap,
    /// rx, tx, event.
    pub(super) queues: [Queue; 3],
    pub(super) queue_evts: [EventFd; 3],
    pub(super) interrupt: Interrupt,
    pub(super) muxer: Muxer,
    /// A transport reset is owed to the guest (after a restore).
    pub(super) reset_owed: bool,
    /// The reset was written and the muxer holds host clients until the
    /// guest posts an event buffer again: Linux does so right after it has
    /// dropped its connections.
    pub(super) reset_delivered: bool,
    pub(super) held: Option<Buffers>,
    pub(super) scratch: Box<[u8]>,
    pub(super) stats: Arc<Mutex<VsockStats>>,
    pub(super) log: GuestLog,
}

impl VsockWorker {
    fn round(&mut self, ready: &[u64]) -> Result<bool, QueueError> {
        for (token, evt) in [TOKEN_RX, TOKEN_TX, TOKEN_EVENT]
            .iter()
            .zip(&self.queue_evts)
        {
            if ready.contains(token) {
                // EAGAIN: merged with an earlier kick.
                let _ = evt.read();
            }
        }
        let [rx, tx, event] = &mut self.queues;
        let mut used = false;
        if self.reset_delivered && ready.contains(&TOKEN_EVENT) {
            self.reset_delivered = false;
            self.muxer.release_clients();
        }
        if ready.is_empty() || ready.contains(&TOKEN_EVENT) {
            let owed = self.reset_owed;
            used |= process_event(event, &self.mem, &mut self.reset_owed, &mut self.log)?;
            self.reset_delivered |= owed && !self.reset_owed;
        }
        if ready.is_empty() || ready.contains(&TOKEN_HOST) {
            self.muxer.on_host_events();
        }
        let tx_used = process_tx(
            tx,
            &self.mem,
            &mut self.muxer,
            &mut self.scratch,
            &mut self.log,
        )?;
        if tx_used && queue_guard::wants_interrupt(tx, &self.mem).unwrap_or(true) {
            used = true;
        }
        let (rx_used, more) = process_rx(
            rx,
            &self.mem,
            &mut self.muxer,
            &mut self.held,
            &mut self.scratch,
            &mut self.log,
        )?;
        if rx_used > 0 {
            used = true;
        }
        if used {
            self.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        Ok(more)
    }
}

impl EpollHandler for VsockWorker {
    fn seccomp_kind(&self) -> Option<crate::seccomp::ThreadKind> {
        Some(crate::seccomp::ThreadKind::VsockWorker)
    }

    fn watch(&self) -> Vec<(RawFd, u64, EventSet)> {
        vec![
            (self.queue_evts[0].as_raw_fd(), TOKEN_RX, EventSet::IN),
            (self.queue_evts[1].as_raw_fd(), TOKEN_TX, EventSet::IN),
            (self.queue_evts[2].as_raw_fd(), TOKEN_EVENT, EventSet::IN),
            (self.muxer.epoll_fd(), TOKEN_HOST, EventSet::IN),
        ]
    }

    fn queue_positions(&self) -> Vec<QueuePosition> {
        // A chain held for rx is given back: the restored guest posts it again.
        let mut rx = QueuePosition::of(&self.queues[0]);
        if self.held.is_some() {
            rx.next_avail = rx.next_avail.wrapping_sub(1);
        }
        vec![
            rx,
            QueuePosition::of(&self.queues[1]),
            QueuePosition::of(&self.queues[2]),
        ]
    }

    fn serve(&mut self, ready: &[u64]) -> Served {
        let served = match self.round(ready) {
            Ok(more) => Served {
                more,
                stop_watching: Vec::new(),
            },
            Err(e) => Served::broken_ring(
                "virtio-vsock",
                &e,
                &self.interrupt,
                vec![TOKEN_RX, TOKEN_TX, TOKEN_EVENT, TOKEN_HOST],
            ),
        };
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = self.muxer.stats();
        served
    }
}

/// Bytes of the worker's copy buffer: one packet's payload.
pub(super) const SCRATCH_LEN: usize = MAX_PAYLOAD;
