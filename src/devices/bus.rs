//! Address-range to device map used for both port I/O and MMIO exits.
//!
//! The vCPU loop hands every PIO/MMIO access to a [`Bus`]; it never names a
//! device address itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes in an address window.
///
/// `offset` is relative to the start of the window the device was inserted at.
/// Implementations must tolerate any offset and length: the guest chooses them.
pub trait BusDevice: Send {
    /// Fill `data` with the value read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Take the value the guest wrote at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new window is empty.
    #[error("device window at {0:#x} has zero length")]
    ZeroLength(u64),
    /// The new window overlaps one that is already there.
    #[error("device window {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected window.
        base: u64,
        /// Length of the rejected window.
        len: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// Shared handle to a device on the bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping device windows.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (Range, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        // The closest window starting at or below the new end - 1 is the only
        // one that can overlap, because windows never overlap each other.
        if let Some((_, (r, _))) = self.devices.range(..end).next_back() {
            if r.base + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (Range { base, len }, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (_, (r, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - r.base;
        // The whole access must sit inside the window.
        if offset.checked_add(size as u64)? <= r.len {
            Some((offset, dev))
        } else {
            None
        }
    }

    /// Route a read. Returns false when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                // A device whose lock was poisoned by a panic elsewhere is still
                // safe to use: its state is plain data.
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                d.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Route a write. Returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                d.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_gaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(a.lock().unwrap().last_write, Some((1, vec![7])));
        assert!(!bus.read(0x3f7, &mut buf));
        assert!(!bus.read(0x400, &mut buf));
        // An access straddling the end of the window is not routed.
        let mut wide = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut wide));
    }

    #[test]
    fn overlap_checks() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(d(), 0x1000, 0x100).unwrap();
        assert!(bus.insert(d(), 0x10ff, 1).is_err());
        assert!(bus.insert(d(), 0xf01, 0x100).is_err());
        assert!(bus.insert(d(), 0x0, 0x2000).is_err());
        assert_eq!(
            bus.insert(d(), 0x2000, 0),
            Err(BusError::ZeroLength(0x2000))
        );
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0xf00, 0x100).unwrap();
        bus.insert(d(), 0x1100, 0x100).unwrap();
    }
}
