//! The virtio-console worker: the queues once activated (shared with the
//! device for its final flush and queue positions) and the worker thread's
//! answer to a kick or to host input.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::input::{ConsoleInput, ConsoleSink};
use super::queue::{process_rx, process_tx, BadChains};
use crate::devices::virtio::queue_guard::{self, QueueError};
use crate::devices::virtio::{
    EpollHandler, GuestLog, Interrupt, QueuePosition, Served, VIRTIO_MMIO_INT_VRING,
};
use crate::memory::GuestMemoryMmap;

const RX: usize = 0;
const TX: usize = 1;
const TOKEN_RX_QUEUE: u64 = 0;
const TOKEN_TX_QUEUE: u64 = 1;
const TOKEN_INPUT: u64 = 2;

/// What the worker and a final flush share: the queues once activated.
pub(super) struct Queues {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    rx: Queue,
    tx: Queue,
    pub(super) out: ConsoleSink,
    bad: BadChains,
    logged_bad: u64,
    log: GuestLog,
    /// A ring is broken: serve nothing until the driver resets the device.
    broken: bool,
}

impl Queues {
    /// The activated queues, writing guest output to `out`.
    pub(super) fn new(
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        rx: Queue,
        tx: Queue,
        out: ConsoleSink,
    ) -> Self {
        Self {
            mem,
            interrupt,
            rx,
            tx,
            out,
            bad: BadChains::default(),
            logged_bad: 0,
            log: GuestLog::default(),
            broken: false,
        }
    }

    /// Serve what is left once the VM has stopped.
    pub(super) fn final_flush(&mut self, input: &ConsoleInput) {
        if let Err(e) = self.serve(input) {
            log::debug!("virtio-console: final flush: {e}");
        }
    }

    /// Where the device stands in both queues.
    pub(super) fn positions(&self) -> Vec<QueuePosition> {
        vec![QueuePosition::of(&self.rx), QueuePosition::of(&self.tx)]
    }

    /// Guest output to the sink; host input into posted buffers.
    fn serve(&mut self, input: &ConsoleInput) -> Result<(), QueueError> {
        if self.broken {
            return Ok(());
        }
        let res = self.serve_inner(input);
        if self.bad.count != self.logged_bad {
            self.logged_bad = self.bad.count;
            let (n, why) = (self.bad.count, self.bad.last.unwrap_or("bad chain"));
            self.log.warn(
                "virtio-console",
                format_args!("{why} ({n} bad chains so far)"),
            );
        }
        if res.is_err() {
            self.broken = true;
        }
        res
    }

    fn serve_inner(&mut self, input: &ConsoleInput) -> Result<(), QueueError> {
        if process_tx(&mut self.tx, &self.mem, &mut self.out, &mut self.bad)? {
            self.signal(TX);
        }
        let moved = {
            let mut bytes = input.bytes.lock().unwrap_or_else(|e| e.into_inner());
            process_rx(&mut self.rx, &self.mem, &mut bytes, &mut self.bad)?
        };
        if moved {
            self.signal(RX);
        }
        Ok(())
    }

    fn signal(&mut self, which: usize) {
        let q = if which == RX {
            &mut self.rx
        } else {
            &mut self.tx
        };
        if queue_guard::wants_interrupt(q, &self.mem).unwrap_or(true) {
            self.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }
}

/// The worker's side: the shared queues and the fds it waits on.
pub(super) struct ConsoleWorker {
    pub(super) queues: Arc<Mutex<Queues>>,
    pub(super) input: ConsoleInput,
    pub(super) rx_evt: EventFd,
    pub(super) tx_evt: EventFd,
}

impl EpollHandler for ConsoleWorker {
    fn seccomp_kind(&self) -> Option<crate::seccomp::ThreadKind> {
        Some(crate::seccomp::ThreadKind::ConsoleWorker)
    }

    fn watch(&self) -> Vec<(RawFd, u64, EventSet)> {
        vec![
            (self.rx_evt.as_raw_fd(), TOKEN_RX_QUEUE, EventSet::IN),
            (self.tx_evt.as_raw_fd(), TOKEN_TX_QUEUE, EventSet::IN),
            (self.input.evt.as_raw_fd(), TOKEN_INPUT, EventSet::IN),
        ]
    }

    fn serve(&mut self, _ready: &[u64]) -> Served {
        // Whatever woke us (or nothing, at start), both directions are
        // cheap to look at. EAGAIN: merged with an earlier kick.
        let _ = self.rx_evt.read();
        let _ = self.tx_evt.read();
        let _ = self.input.evt.read();
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        match q.serve(&self.input) {
            Ok(()) => Served::default(),
            // A ring is broken: stop watching (until the driver resets the
            // device, which stops this worker) and tell the driver.
            Err(e) => Served::broken_ring(
                "virtio-console",
                &e,
                &q.interrupt,
                vec![TOKEN_RX_QUEUE, TOKEN_TX_QUEUE, TOKEN_INPUT],
            ),
        }
    }
}
