//! The virtio-console device (one port, no multiport, no size): features,
//! configuration space, activation, host input, and the worker that waits
//! on the queue ioeventfds and the input eventfd.
//!
//! Queue 0 (receiveq) carries host stdin to the guest, queue 1 (transmitq)
//! guest output to the host. Linux's hvc driver waits (spinning) until each
//! output buffer is returned, so output reaches stdout before the guest goes
//! on: command-mode output is complete before the guest reports its exit
//! status on port 0xf4.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{process_rx, process_tx, BadChains};
use crate::devices::virtio::net::rxtx::LogLimiter;
use crate::devices::virtio::queue_guard::{self, QueueError};
use crate::devices::virtio::{
    read_config_bytes, take_queues, ActivateError, EpollHandler, Interrupt, Served, VirtioDevice,
    WorkerHandle, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
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
/// Host input held for a guest that has not posted buffers yet; stdin waits
/// beyond this.
pub const INPUT_MAX: usize = 4096;
/// `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr. Only
/// read by a driver that accepted a feature we do not offer; one port.
const CONFIG: [u8; 12] = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

const RX: usize = 0;
const TX: usize = 1;
const TOKEN_RX_QUEUE: u64 = 0;
const TOKEN_TX_QUEUE: u64 = 1;
const TOKEN_INPUT: u64 = 2;

/// Host input waiting for the guest, shared by the stdin thread and the
/// worker. [`ConsoleInput::enqueue`] wakes the worker.
#[derive(Clone)]
pub struct ConsoleInput {
    bytes: Arc<Mutex<VecDeque<u8>>>,
    evt: Arc<EventFd>,
}

impl ConsoleInput {
    /// An empty input buffer.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            bytes: Arc::new(Mutex::new(VecDeque::with_capacity(INPUT_MAX))),
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Queue bytes for the guest; returns how many fit (0 when
    /// [`INPUT_MAX`] are waiting already: try again later).
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let n = {
            let mut q = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
            let n = bytes.len().min(INPUT_MAX.saturating_sub(q.len()));
            q.extend(&bytes[..n]);
            n
        };
        if n > 0 {
            if let Err(e) = self.evt.write(1) {
                log::warn!("virtio-console: cannot wake the worker: {e}");
            }
        }
        n
    }
}

/// Where guest output goes.
pub type ConsoleSink = Box<dyn Write + Send>;

/// What the worker and a final flush share: the queues once activated.
struct Queues {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    rx: Queue,
    tx: Queue,
    out: ConsoleSink,
    bad: BadChains,
    logged_bad: u64,
    log: LogLimiter,
    /// A ring is broken: serve nothing until the driver resets the device.
    broken: bool,
}

impl Queues {
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

/// A virtio console.
pub struct Console {
    acked_features: u64,
    queue_sizes: [u16; 2],
    input: ConsoleInput,
    /// The sink, until activation hands it to the queues (and a reset back).
    out: Arc<Mutex<Option<ConsoleSink>>>,
    queues: Option<Arc<Mutex<Queues>>>,
    worker: Option<WorkerHandle>,
}

impl Console {
    /// A console writing guest output to `out` and feeding it `input`.
    pub fn new(out: ConsoleSink, input: ConsoleInput) -> Self {
        Self {
            acked_features: 0,
            queue_sizes: [RX_QUEUE_SIZE, TX_QUEUE_SIZE],
            input,
            out: Arc::new(Mutex::new(Some(out))),
            queues: None,
            worker: None,
        }
    }

    /// Whether a worker serves the queues.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Stop the worker and take the sink back from the queues.
    fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
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
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&CONFIG, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, which we do not offer.
        log::debug!(
            "virtio-console: ignoring config write of {} bytes at {offset:#x}",
            data.len()
        );
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
        let queues = Arc::new(Mutex::new(Queues {
            mem,
            interrupt,
            rx,
            tx,
            out,
            bad: BadChains::default(),
            logged_bad: 0,
            log: LogLimiter::default(),
            broken: false,
        }));
        let handler = ConsoleHandler {
            queues: queues.clone(),
            input: self.input.clone(),
            rx_evt,
            tx_evt,
        };
        self.queues = Some(queues);
        match WorkerHandle::spawn("virtio-console".into(), handler) {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err(e) => {
                self.stop();
                Err(ActivateError::Worker(e))
            }
        }
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked_features = 0;
        true
    }

    /// Whatever the guest queued and the worker has not written yet goes
    /// out now (the VM has stopped).
    fn flush(&mut self) {
        if let Some(q) = &self.queues {
            let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = q.serve(&self.input) {
                log::debug!("virtio-console: final flush: {e}");
            }
        }
    }

    fn pause(&mut self) -> bool {
        self.worker.as_ref().is_none_or(WorkerHandle::pause)
    }

    /// Read from the shared queues: every chain the worker takes it also
    /// returns in the same round, so a parked worker leaves them exact.
    fn queue_positions(&self) -> Option<Vec<crate::devices::virtio::QueuePosition>> {
        use crate::devices::virtio::QueuePosition;
        self.queues.as_ref().map(|q| {
            let q = q.lock().unwrap_or_else(|e| e.into_inner());
            vec![QueuePosition::of(&q.rx), QueuePosition::of(&q.tx)]
        })
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The worker's side: the shared queues and the fds it waits on.
struct ConsoleHandler {
    queues: Arc<Mutex<Queues>>,
    input: ConsoleInput,
    rx_evt: EventFd,
    tx_evt: EventFd,
}

impl EpollHandler for ConsoleHandler {
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
            Err(e) => {
                log::warn!("virtio-console: {e}: device needs reset");
                q.interrupt.needs_reset();
                Served {
                    more: false,
                    stop_watching: vec![TOKEN_RX_QUEUE, TOKEN_TX_QUEUE, TOKEN_INPUT],
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::net::rxtx::tests::{Driver, BUF_BASE};

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
