//! Emulated devices and the bus that routes guest accesses to them.

pub mod bus;
pub mod legacy;
pub mod rtc;
pub mod serial;
pub mod virtio;
