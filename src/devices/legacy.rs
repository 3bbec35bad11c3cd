//! Small platform devices: the i8042 (reset line and a Ctrl-Alt-Del
//! keyboard), our exit-status port and the Firecracker-compatible boot timer.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use std::collections::VecDeque;

use super::bus::BusDevice;
use vmm_sys_util::eventfd::EventFd;

/// Offset of the data port (0x60) in the i8042 window.
const I8042_DATA: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
const I8042_COMMAND: u64 = 4;
/// Status: output buffer full.
const I8042_STATUS_OBF: u8 = 0x01;
/// Status: system flag (self-test passed) and keyboard not inhibited.
const I8042_STATUS_BASE: u8 = 0x14;
/// Command byte bit: raise IRQ 1 when the output buffer fills.
const I8042_CMD_BYTE_KBD_INT: u8 = 0x01;
/// Bytes the output buffer holds; more are dropped, as a real 8042 would.
const I8042_BUFFER: usize = 16;
/// Command byte bit: translate the keyboard's set-2 scancodes to set 1.
/// On, as PC firmware leaves it; Linux keeps it unless booted with
/// `i8042.direct`, and then reads set 1.
const I8042_CMD_BYTE_XLATE: u8 = 0x40;
/// Command byte bit: system flag (self-test passed).
const I8042_CMD_BYTE_SYS: u8 = 0x04;
/// Set-2 scancodes of Ctrl, Alt and Delete pressed (Delete is extended),
/// what the keyboard sends.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
/// The same keys in set 1, what the controller hands on when it translates.
const CTRL_ALT_DEL_XLATED: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];

/// i8042 controller: the CPU reset line (command 0xFE, which `reboot=k`
/// uses) calls `on_reset`, and a keyboard whose only keys are the
/// Ctrl-Alt-Del the API sends, delivered on IRQ 1. Enough of the controller
/// commands for Linux's i8042 driver to probe it.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
    kbd_irq: Option<EventFd>,
    out: VecDeque<u8>,
    command_byte: u8,
    /// A command that takes a data byte next (0x60 write command byte,
    /// 0xD1 write output port, 0xD4 write to the aux device).
    pending: Option<u8>,
}

/// The i8042's state, for a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    /// Bytes waiting in the output buffer.
    pub out: Vec<u8>,
    /// The controller command byte.
    pub command_byte: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
}

impl I8042 {
    /// The controller's state.
    pub fn snapshot(&self) -> I8042Snapshot {
        I8042Snapshot {
            out: self.out.iter().copied().collect(),
            command_byte: self.command_byte,
            pending: self.pending,
        }
    }

    /// Take on a saved state; an output buffer longer than the
    /// controller's is refused.
    pub fn restore(&mut self, s: &I8042Snapshot) -> Result<(), String> {
        if s.out.len() > I8042_BUFFER {
            return Err(format!(
                "i8042 state: {} bytes in a {I8042_BUFFER}-byte buffer",
                s.out.len()
            ));
        }
        self.out = s.out.iter().copied().collect();
        self.command_byte = s.command_byte;
        self.pending = s.pending;
        Ok(())
    }

    /// A controller that calls `on_reset` when the guest resets the CPU and
    /// signals `kbd_irq` (an irqfd on IRQ 1, if any) for keyboard input.
    pub fn new(on_reset: impl Fn() + Send + 'static) -> Self {
        Self {
            on_reset: Box::new(on_reset),
            kbd_irq: None,
            out: VecDeque::new(),
            command_byte: I8042_CMD_BYTE_KBD_INT | I8042_CMD_BYTE_SYS | I8042_CMD_BYTE_XLATE,
            pending: None,
        }
    }

    /// Raise keyboard interrupts on `irq`.
    pub fn with_kbd_irq(mut self, irq: EventFd) -> Self {
        self.kbd_irq = Some(irq);
        self
    }

    fn push(&mut self, bytes: &[u8]) {
        let was_empty = self.out.is_empty();
        for &b in bytes {
            if self.out.len() < I8042_BUFFER {
                self.out.push_back(b);
            }
        }
        if was_empty && !self.out.is_empty() {
            self.interrupt();
        }
    }

    fn interrupt(&self) {
        if self.command_byte & I8042_CMD_BYTE_KBD_INT == 0 {
            return;
        }
        if let Some(irq) = &self.kbd_irq {
            if let Err(e) = irq.write(1) {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    /// Press Ctrl-Alt-Del: the guest sees the three make codes on IRQ 1.
    pub fn press_ctrl_alt_del(&mut self) {
        if self.command_byte & I8042_CMD_BYTE_XLATE != 0 {
            self.push(&CTRL_ALT_DEL_XLATED);
        } else {
            self.push(&CTRL_ALT_DEL);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.push(&[self.command_byte]),
            0x60 | 0xd1 | 0xd4 => self.pending = Some(cmd),
            0xaa => self.push(&[0x55]), // controller self-test passed
            0xa9 | 0xab => self.push(&[0x00]), // interface tests passed
            0xfe => (self.on_reset)(),
            _ => {} // enable/disable ports and the rest: nothing to do
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(0x60) => self.command_byte = value,
            Some(_) => {} // output port or aux device: not modelled
            // A command to the keyboard itself: reset answers ACK and
            // self-test passed, everything else ACK.
            None if value == 0xff => self.push(&[0xfa, 0xaa]),
            None => self.push(&[0xfa]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (I8042_COMMAND, 1) => {
                I8042_STATUS_BASE
                    | if self.out.is_empty() {
                        0
                    } else {
                        I8042_STATUS_OBF
                    }
            }
            (I8042_DATA, 1) => {
                let v = self.out.pop_front().unwrap_or(0);
                // Linux reads one byte per interrupt.
                if !self.out.is_empty() {
                    self.interrupt();
                }
                v
            }
            _ => 0,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (I8042_COMMAND, [cmd]) => self.command(*cmd),
            (I8042_DATA, [v]) => self.data(*v),
            _ => {}
        }
    }
}

/// Exit status the guest reported through the exit port, or -1 for none yet.
pub type ExitStatus = Arc<AtomicI32>;

/// The exit device: a one-byte I/O port. The guest writes the exit status of
/// its command (0..=255) and then reboots; `microvm` exits with that status.
/// Reads return the last status written (0xff before any write).
pub struct ExitDevice {
    status: ExitStatus,
}

impl ExitDevice {
    /// A device recording into `status`.
    pub fn new(status: ExitStatus) -> Self {
        Self { status }
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let v = self.status.load(Ordering::SeqCst);
        // The status is one byte; a restored snapshot may hold any i32: its low byte.
        data.fill(if v < 0 { 0xff } else { v.to_le_bytes()[0] });
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            log::debug!("guest reported exit status {b}");
            self.status.store(i32::from(*b), Ordering::SeqCst);
        }
    }
}

/// Value the guest writes when user space starts (Firecracker's convention).
pub const BOOT_TIMER_USERSPACE: u8 = 123;
/// Value our rootfs init writes when the guest's service is ready.
pub const BOOT_TIMER_APP_READY: u8 = 124;

/// Boot timer: logs the time from process start (and from VM construction) to
/// the guest's markers.
pub struct BootTimer {
    process_start: Instant,
    build_start: Instant,
    /// Microseconds to the user-space marker, once seen.
    pub userspace_us: Option<u128>,
}

impl BootTimer {
    /// Timer measuring from `process_start` and `build_start`.
    pub fn new(process_start: Instant, build_start: Instant) -> Self {
        Self {
            process_start,
            build_start,
            userspace_us: None,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.len() != 1 {
            return;
        }
        let total = self.process_start.elapsed().as_micros();
        let vm = self.build_start.elapsed().as_micros();
        match data[0] {
            BOOT_TIMER_USERSPACE => {
                self.userspace_us = Some(total);
                log::info!("Guest-boot-time = {total} us ({vm} us since VM construction)");
            }
            BOOT_TIMER_APP_READY => {
                log::info!("Guest-app-ready-time = {total} us ({vm} us since VM construction)");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_device_records_status() {
        let st: ExitStatus = Arc::new(AtomicI32::new(-1));
        let mut d = ExitDevice::new(st.clone());
        let mut b = [0u8; 1];
        d.read(0, &mut b);
        assert_eq!(b[0], 0xff);
        d.write(0, &[42]);
        assert_eq!(st.load(Ordering::SeqCst), 42);
        d.write(0, &[]);
        assert_eq!(st.load(Ordering::SeqCst), 42);
    }

    #[test]
    fn i8042_reset_signals() {
        let resets = Arc::new(AtomicI32::new(0));
        let r = resets.clone();
        let mut d = I8042::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        d.write(4, &[0x01]);
        assert_eq!(
            resets.load(Ordering::SeqCst),
            0,
            "no reset for other commands"
        );
        d.write(4, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn i8042_delivers_ctrl_alt_del_one_byte_per_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = I8042::new(|| {}).with_kbd_irq(irq.try_clone().unwrap());
        let status = |d: &mut I8042| {
            let mut b = [0u8];
            d.read(4, &mut b);
            b[0]
        };
        let data = |d: &mut I8042| {
            let mut b = [0u8];
            d.read(0, &mut b);
            b[0]
        };
        assert_eq!(status(&mut d) & 1, 0, "empty output buffer");
        // Linux's probe: self-test, read the command byte, keyboard reset.
        d.write(4, &[0xaa]);
        assert_eq!(data(&mut d), 0x55);
        d.write(4, &[0x20]);
        assert_eq!(data(&mut d) & 1, 1, "keyboard interrupt enabled");
        d.write(0, &[0xff]);
        assert_eq!((data(&mut d), data(&mut d)), (0xfa, 0xaa));
        while irq.read().is_ok() {}

        d.press_ctrl_alt_del();
        assert_eq!(irq.read().unwrap(), 1);
        let mut got = Vec::new();
        while status(&mut d) & 1 == 1 {
            got.push(data(&mut d));
            if status(&mut d) & 1 == 1 {
                assert!(irq.read().is_ok(), "an interrupt for each further byte");
            }
        }
        // Translation is on, as Linux leaves it: set-1 codes.
        assert_eq!(got, CTRL_ALT_DEL_XLATED);

        // `i8042.direct`: the driver clears translation and reads set 2.
        d.write(4, &[0x60]);
        d.write(0, &[I8042_CMD_BYTE_KBD_INT]);
        while irq.read().is_ok() {}
        d.press_ctrl_alt_del();
        let mut got = Vec::new();
        while status(&mut d) & 1 == 1 {
            got.push(data(&mut d));
        }
        assert_eq!(got, CTRL_ALT_DEL);

        // With the interrupt masked in the command byte, no IRQ.
        d.write(4, &[0x60]);
        d.write(0, &[0x00]);
        while irq.read().is_ok() {}
        d.press_ctrl_alt_del();
        assert!(irq.read().is_err());
    }
}
