//! 16550 UART on COM1 (vm-superio), wired to the host's stdout and stdin.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// An irqfd as a vm-superio interrupt trigger.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The line the Linux kernel prints when it panics.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Guest console output: copied to the host and scanned for a kernel panic,
/// so that a panic-triggered reboot is not mistaken for a clean one.
pub struct ConsoleOutput<W: Write> {
    out: W,
    matched: usize,
    panicked: Arc<AtomicBool>,
}

impl<W: Write> ConsoleOutput<W> {
    /// Copy to `out`; set `panicked` when the guest kernel reports a panic.
    pub fn new(out: W, panicked: Arc<AtomicBool>) -> Self {
        Self {
            out,
            matched: 0,
            panicked,
        }
    }

    fn scan(&mut self, b: u8) {
        if b == PANIC_MARKER[self.matched] {
            self.matched += 1;
            if self.matched == PANIC_MARKER.len() {
                self.panicked.store(true, Ordering::SeqCst);
                self.matched = 0;
            }
        } else {
            self.matched = usize::from(b == PANIC_MARKER[0]);
        }
    }

    /// The host-side writer.
    pub fn inner(&self) -> &W {
        &self.out
    }
}

impl<W: Write> Write for ConsoleOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for b in buf {
            self.scan(*b);
        }
        // The guest cannot do anything about a closed stdout; never fail the UART on it.
        let _ = self.out.write_all(buf);
        let _ = self.out.flush();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The UART as a bus device.
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOutput<W>>,
}

/// The UART's registers and receive FIFO, for a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOutput<W>) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A UART in the state `saved` describes; an error if the state is
    /// impossible (a receive FIFO longer than the UART's).
    pub fn from_snapshot(
        irq: EventFd,
        out: ConsoleOutput<W>,
        saved: &SerialSnapshot,
    ) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor[0],
            baud_divisor_high: saved.baud_divisor[1],
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map(|uart| Self { uart })
            .map_err(|e| format!("serial port state: {e:?}"))
    }

    /// The UART's state.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queue host input for the guest. Returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// The console output wrapper.
    pub fn output(&self) -> &ConsoleOutput<W> {
        self.uart.writer()
    }
}

/// The UART register (0..=7) a one-byte access at `offset` reaches, if any.
fn register(offset: u64, len: usize) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|&reg| reg <= 7 && len == 1)
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(reg) = register(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        data[0] = self.uart.read(reg);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = register(offset, data.len()) else {
            return;
        };
        if let Err(e) = self.uart.write(reg, data[0]) {
            log::debug!("serial write failed: {e:?}");
        }
    }
}

/// Feed the host's stdin to the guest's console until EOF: `enqueue` takes
/// bytes and says how many fit (the UART's FIFO, virtio-console's input
/// buffer). Runs on its own thread.
pub fn forward_stdin(mut enqueue: impl FnMut(&[u8]) -> usize) {
    use std::io::Read;
    let mut stdin = io::stdin();
    let mut buf = [0u8; 64];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut sent = 0;
        while sent < n {
            let k = enqueue(&buf[sent..n]);
            sent += k;
            if k == 0 {
                // Full: the guest has not read yet; wait a little.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

/// [`forward_stdin`]'s `enqueue` for the UART.
pub fn uart_input<W: Write + Send>(
    serial: Arc<Mutex<SerialDevice<W>>>,
) -> impl FnMut(&[u8]) -> usize {
    move |bytes| {
        serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_panic_marker_across_writes() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut out = ConsoleOutput::new(Vec::new(), flag.clone());
        out.write_all(b"[ 1.0] Kernel pan").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        out.write_all(b"ic - not syncing: Attempted to kill init!")
            .unwrap();
        assert!(flag.load(Ordering::SeqCst));
        assert!(out.inner().starts_with(b"[ 1.0] Kernel panic"));
    }

    #[test]
    fn near_miss_is_not_a_panic() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut out = ConsoleOutput::new(Vec::new(), flag.clone());
        out.write_all(b"KKernel panic - not syncin\n").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        out.write_all(b"KKernel panic - not syncing").unwrap();
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn uart_transmits_and_ignores_bad_sizes() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut dev = SerialDevice::new(
            EventFd::new(0).unwrap(),
            ConsoleOutput::new(Vec::new(), flag),
        );
        dev.write(0, b"A");
        dev.write(0, b"BC"); // 2-byte access to a byte register: ignored
        dev.write(100, b"D");
        let mut lsr = [0u8; 1];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter ready");
        let mut big = [0u8; 4];
        dev.read(0, &mut big);
        assert_eq!(big, [0xff; 4]);
        assert_eq!(dev.output().inner(), b"A");
        assert_eq!(dev.enqueue_input(b"hi"), 2);
        let mut rx = [0u8; 1];
        dev.read(0, &mut rx);
        assert_eq!(rx[0], b'h');
    }
}
