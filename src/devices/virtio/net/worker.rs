//! The thread serving one activated virtio-net device.
//!
//! It sleeps in epoll on four fds and never polls:
//! - the TAP (edge-triggered): frames for the guest;
//! - the RX queue eventfd: the guest posted buffers, so retry a deferred frame;
//! - the TX queue eventfd: the guest queued frames;
//! - a kill eventfd the device signals on reset and drop.
//!
//! With edge triggering the TAP only reports new frames, so the RX path must
//! read until `EAGAIN` or until the guest runs out of buffers; in the second
//! case the frame stays pending and the TAP is left alone until the guest
//! kicks the RX queue. Batches are bounded so RX and TX take turns; the
//! guest is interrupted after each batch.
//!
//! A broken ring ends the serving: the worker reports DEVICE_NEEDS_RESET and
//! then waits only for the kill eventfd, never polling again.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::rxtx::{FrameSink, FrameSource, NetStats, RxPath, RxStop, TxPath};
use crate::devices::virtio::queue_guard::{self, QueueError};
use crate::devices::virtio::{Interrupt, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestMemoryMmap;
use crate::net::Tap;

const TOKEN_TAP: u64 = 0;
const TOKEN_RX_QUEUE: u64 = 1;
const TOKEN_TX_QUEUE: u64 = 2;
const TOKEN_KILL: u64 = 3;

/// Frames moved to the guest before it is interrupted and TX gets a turn.
const RX_BUDGET: u32 = 128;
/// TX drain passes (each up to a queue's worth) before RX gets a turn.
const TX_PASSES: usize = 4;

/// The TAP seen by the frame paths.
struct TapIo<'a>(&'a Tap);

impl FrameSink for TapIo<'_> {
    fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = self.0.write_frame(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short TAP write: {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }
}

impl FrameSource for TapIo<'_> {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_frame(buf)
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
    pub(super) kill_evt: EventFd,
    pub(super) tap: Arc<Tap>,
    pub(super) rx: RxPath,
    pub(super) tx: TxPath,
    pub(super) stats: Arc<NetStats>,
}

impl Worker {
    /// Start the thread, named after the device (`virtio-net-N`).
    pub(super) fn spawn(self) -> io::Result<JoinHandle<()>> {
        thread::Builder::new()
            .name(self.label.clone())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        log::debug!("{}: worker started", self.label);
        match self.event_loop() {
            Ok(()) => log::debug!("{}: worker stopped", self.label),
            Err(e) => log::error!("{}: worker failed: {e}", self.label),
        }
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let watch = [
            (
                self.tap.as_raw_fd(),
                TOKEN_TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.rx_evt.as_raw_fd(), TOKEN_RX_QUEUE, EventSet::IN),
            (self.tx_evt.as_raw_fd(), TOKEN_TX_QUEUE, EventSet::IN),
            (self.kill_evt.as_raw_fd(), TOKEN_KILL, EventSet::IN),
        ];
        for (fd, token, events) in watch {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        }

        let mut events = [EpollEvent::default(); 8];
        // Frames may have reached the TAP, and the driver may have queued TX,
        // before the edge-triggered watch existed: look once without waiting.
        let mut rx_more = true;
        let mut tx_more = true;
        loop {
            let timeout = if rx_more || tx_more { 0 } else { -1 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_KILL => return Ok(()),
                    TOKEN_TAP => rx_more = true,
                    TOKEN_RX_QUEUE => {
                        let _ = self.rx_evt.read();
                        rx_more = true;
                    }
                    TOKEN_TX_QUEUE => {
                        let _ = self.tx_evt.read();
                        tx_more = true;
                    }
                    _ => {}
                }
            }
            if let Err(e) = self.serve(&mut rx_more, &mut tx_more) {
                self.stop_serving(&epoll, &e)?;
                (rx_more, tx_more) = (false, false);
            }
        }
    }

    /// One turn of TX then RX; an error when a ring is broken.
    fn serve(&mut self, rx_more: &mut bool, tx_more: &mut bool) -> Result<(), QueueError> {
        if *tx_more {
            *tx_more = self.handle_tx()?;
        }
        if *rx_more {
            *rx_more = self.handle_rx()?;
        }
        Ok(())
    }

    /// A ring is broken: stop watching the queues and the TAP (until the
    /// driver resets the device, which stops this thread) and tell the driver.
    fn stop_serving(&self, epoll: &Epoll, e: &QueueError) -> io::Result<()> {
        log::warn!("{}: {e}: device needs reset", self.label);
        self.interrupt.needs_reset();
        for fd in [
            self.tap.as_raw_fd(),
            self.rx_evt.as_raw_fd(),
            self.tx_evt.as_raw_fd(),
        ] {
            epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
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
            let batch = self.tx.process(
                &mut self.tx_queue,
                &self.mem,
                &mut TapIo(&self.tap),
                &self.stats,
            )?;
            if batch.used > 0 {
                Self::signal(&self.interrupt, &mut self.tx_queue, &self.mem);
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

    /// Move one batch of frames to the guest; true if the TAP may have more.
    fn handle_rx(&mut self) -> Result<bool, QueueError> {
        let batch = self.rx.process(
            &mut self.rx_queue,
            &self.mem,
            &mut TapIo(&self.tap),
            &self.stats,
            RX_BUDGET,
        )?;
        if batch.used > 0 {
            Self::signal(&self.interrupt, &mut self.rx_queue, &self.mem);
        }
        Ok(batch.stop == RxStop::Budget)
    }
}
