//! Small platform devices: the i8042 reset line, our exit-status port and the
//! Firecracker-compatible boot timer.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::bus::BusDevice;
use vm_superio::I8042Device;

/// Called when the guest resets the machine.
pub struct ResetCallback(Box<dyn Fn() + Send>);

impl vm_superio::Trigger for ResetCallback {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// i8042 controller: only the CPU reset command matters; it calls `on_reset`.
pub struct I8042 {
    inner: I8042Device<ResetCallback>,
}

impl I8042 {
    /// A controller that calls `on_reset` when the guest resets the CPU.
    pub fn new(on_reset: impl Fn() + Send + 'static) -> Self {
        Self {
            inner: I8042Device::new(ResetCallback(Box::new(on_reset))),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let Ok(()) = self.inner.write(offset as u8, data[0]);
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
        data.fill(if v < 0 { 0xff } else { v as u8 });
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
}
