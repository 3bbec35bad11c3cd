//! virtio-console: the guest's `hvc0`, one port.
//!
//! - [`queue`]: the transmit and receive queue logic, usable without KVM;
//! - [`device`]: the [`crate::devices::virtio::VirtioDevice`], host input
//!   ([`ConsoleInput`]) and the worker (the shared epoll helper) that waits
//!   on the two queue ioeventfds and the input eventfd.

pub mod device;
pub mod queue;

pub use device::{Console, ConsoleInput, ConsoleSink, VIRTIO_ID_CONSOLE};
