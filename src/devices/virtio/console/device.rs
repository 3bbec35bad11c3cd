//! The virtio-console device (one port, no multiport, no size): features,
//! configuration space, activation and host input; the worker that waits
//! on the queue ioeventfds and the input eventfd is in [`super::worker`].
//!
//! Queue 0 (receiveq) carries host stdin to the guest, queue 1 (transmitq)
//! guest output to the host. Linux's hvc driver waits (spinning) until each
//! output buffer is returned, so output reaches stdout before the guest goes
//! on: command-mode output is complete before the guest reports its exit
//! status on port 0xf4.

use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::input::{ConsoleInput, ConsoleSink};
use super::worker::{ConsoleWorker, Queues};
use crate::devices::virtio::{
    read_config_bytes, take_queues, ActivateError, Interrupt, QueuePosition, VirtioCommon,
    VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// virtio device ID of a console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// Size of the receive queue. Linux fills it at probe with one page-sized
/// buffer per entry and a kick each (an ioeventfd exit and a worker wakeup
/// per buffer): 256 entries cost 256 round trips and 1 MiB of guest RAM
/// for a console that receives what a person types.
pub const RX_QUEUE_SIZE: u16 = 16;
/// Size of the transmit queue (hvc keeps one buffer in flight at a time).
pub const TX_QUEUE_SIZE: u16 = 64;
/// `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr. Only
/// read by a driver that accepted a feature we do not offer; one port.
const CONFIG: [u8; 12] = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

/// A virtio console.
pub struct Console {
    common: VirtioCommon,
    input: ConsoleInput,
    /// The sink, until activation hands it to the queues (and a reset back).
    out: Arc<Mutex<Option<ConsoleSink>>>,
    queues: Option<Arc<Mutex<Queues>>>,
}

impl Console {
    /// A console writing guest output to `out` and feeding it `input`.
    pub fn new(out: ConsoleSink, input: ConsoleInput) -> Self {
        Self {
            common: VirtioCommon::new(
                VIRTIO_ID_CONSOLE,
                "virtio-console".into(),
                VIRTIO_F_VERSION_1,
                &[RX_QUEUE_SIZE, TX_QUEUE_SIZE],
            ),
            input,
            out: Arc::new(Mutex::new(Some(out))),
            queues: None,
        }
    }

    /// Whether a worker serves the queues.
    pub fn is_active(&self) -> bool {
        self.common.is_active()
    }

    /// Stop the worker and take the sink back from the queues.
    fn stop(&mut self) {
        self.common.stop_worker();
        if let Some(q) = self.queues.take() {
            // The worker is gone: the handler's clone went with it.
            let sink = match Arc::try_unwrap(q) {
                Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()).out,
                Err(shared) => {
                    // Cannot happen once the worker is joined; keep output
                    // working rather than lose the sink.
                    let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
                    std::mem::replace(&mut g.out, Box::new(std::io::sink()))
                }
            };
            *self.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
        }
    }
}

impl VirtioDevice for Console {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&CONFIG, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let ([rx, tx], [rx_evt, tx_evt]) = take_queues::<2>(queues, queue_evts)?;
        self.stop();
        let out = self
            .out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| Box::new(std::io::sink()));
        let queues = Arc::new(Mutex::new(Queues::new(mem, interrupt, rx, tx, out)));
        let handler = ConsoleWorker {
            queues: queues.clone(),
            input: self.input.clone(),
            rx_evt,
            tx_evt,
        };
        self.queues = Some(queues);
        let started = self.common.start_worker(handler);
        if started.is_err() {
            self.stop();
        }
        started
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.common.reset();
        true
    }

    /// Whatever the guest queued and the worker has not written yet goes
    /// out now (the VM has stopped).
    fn flush(&mut self) {
        if let Some(q) = &self.queues {
            q.lock()
                .unwrap_or_else(|e| e.into_inner())
                .final_flush(&self.input);
        }
    }

    /// Read from the shared queues: every chain the worker takes it also
    /// returns in the same round, so a parked worker leaves them exact.
    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.queues
            .as_ref()
            .map(|q| q.lock().unwrap_or_else(|e| e.into_inner()).positions())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use super::super::input::INPUT_MAX;
    use super::*;
    use crate::devices::virtio::net::rxtx::tests::{Driver, BUF_BASE};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A sink the test can read while the worker writes.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn mem() -> GuestMemoryMmap {
        crate::memory::create_guest_memory(32).unwrap()
    }

    #[test]
    fn identity_and_config() {
        let dev = Console::new(Box::new(std::io::sink()), ConsoleInput::new().unwrap());
        assert_eq!(dev.device_type(), 3);
        assert_eq!(dev.queue_max_sizes(), &[RX_QUEUE_SIZE, TX_QUEUE_SIZE]);
        assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
        let mut b = [0xffu8; 4];
        dev.read_config(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "max_nr_ports");
        dev.read_config(10, &mut b);
        assert_eq!(b, [0; 4], "past the end reads as zero");
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn activate_rejects_wrong_queue_count() {
        let mut dev = Console::new(Box::new(std::io::sink()), ConsoleInput::new().unwrap());
        let m = mem();
        let drv = Driver::new(&m, 0, 16);
        let irq = Interrupt::new(Arc::new(AtomicU32::new(0)), EventFd::new(0).unwrap());
        let err = dev
            .activate(
                m.clone(),
                irq,
                vec![drv.queue()],
                vec![EventFd::new(0).unwrap()],
            )
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { want: 2, got: 1 }));
        assert!(!dev.is_active());
    }

    #[test]
    fn output_and_input_through_the_worker() {
        let m = mem();
        let mut rx = Driver::new(&m, 0, 16);
        let mut tx = Driver::new(&m, 0x1_0000, 16);
        let sink = Shared::default();
        let input = ConsoleInput::new().unwrap();
        let mut dev = Console::new(Box::new(sink.clone()), input.clone());
        let status = Arc::new(AtomicU32::new(0));
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(status.clone(), irqfd.try_clone().unwrap());
        let (rx_evt, tx_evt) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        // Output queued before activation goes out at once.
        m.write_slice(b"early ", GuestAddress(BUF_BASE)).unwrap();
        tx.add_chain(&[(BUF_BASE, 6, false)]);
        // Input typed before activation waits for buffers.
        assert_eq!(input.enqueue(b"echo hi\n"), 8);
        dev.activate(
            m.clone(),
            irq,
            vec![rx.queue(), tx.queue()],
            vec![rx_evt.try_clone().unwrap(), tx_evt.try_clone().unwrap()],
        )
        .unwrap();
        assert!(dev.is_active());
        eventually("early output", || {
            sink.0.lock().unwrap().as_slice() == b"early "
        });

        m.write_slice(b"late\n", GuestAddress(BUF_BASE + 0x100))
            .unwrap();
        tx.add_chain(&[(BUF_BASE + 0x100, 5, false)]);
        tx_evt.write(1).unwrap();
        eventually("late output", || {
            sink.0.lock().unwrap().as_slice() == b"early late\n"
        });
        assert_ne!(irqfd.read().unwrap(), 0, "the guest was interrupted");

        let head = rx.add_chain(&[(BUF_BASE + 0x1000, 64, true)]);
        rx_evt.write(1).unwrap();
        let mut used = Vec::new();
        eventually("input delivered", || {
            used.extend(rx.take_used());
            !used.is_empty()
        });
        assert_eq!(used, vec![(head, 8)]);
        let mut got = [0u8; 8];
        m.read_slice(&mut got, GuestAddress(BUF_BASE + 0x1000))
            .unwrap();
        assert_eq!(&got, b"echo hi\n");

        // Input beyond the buffer limit is refused until the guest reads.
        let big = vec![b'a'; INPUT_MAX + 10];
        assert_eq!(input.enqueue(&big), INPUT_MAX);
        assert_eq!(input.enqueue(b"b"), 0);

        // Reset stops the worker and keeps the sink for the next activation.
        assert!(dev.reset());
        assert!(!dev.is_active());
        assert!(dev.out.lock().unwrap().is_some());
    }

    #[test]
    fn a_broken_ring_needs_reset_and_stops_serving() {
        let m = mem();
        let rx = Driver::new(&m, 0, 16);
        let mut tx = Driver::new(&m, 0x1_0000, 16);
        let sink = Shared::default();
        let mut dev = Console::new(Box::new(sink.clone()), ConsoleInput::new().unwrap());
        let needs_reset = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let irq = Interrupt::with_needs_reset(
            Arc::new(AtomicU32::new(0)),
            needs_reset.clone(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        let tx_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.activate(
            m.clone(),
            irq,
            vec![rx.queue(), tx.queue()],
            vec![
                EventFd::new(EFD_NONBLOCK).unwrap(),
                tx_evt.try_clone().unwrap(),
            ],
        )
        .unwrap();
        tx.vq.avail().idx().store(1000);
        tx_evt.write(1).unwrap();
        eventually("DEVICE_NEEDS_RESET", || {
            needs_reset.load(std::sync::atomic::Ordering::SeqCst)
        });
        // A final flush serves nothing on the broken ring, and does not panic.
        dev.flush();
        assert!(sink.0.lock().unwrap().is_empty());
        let _ = tx.take_used();
    }
}
