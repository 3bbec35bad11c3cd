//! virtio-console: the guest's `hvc0`, one port.
//!
//! - [`queue`]: the transmit and receive queue logic, usable without KVM;
//! - [`device`]: the [`crate::devices::virtio::VirtioDevice`];
//! - [`input`]: host input ([`ConsoleInput`]) and the output sink;
//! - `worker`: the queues once activated, and what the worker thread does
//!   when the two queue ioeventfds or the input eventfd fire.

pub mod device;
pub mod input;
pub mod queue;
mod worker;

pub use device::{Console, VIRTIO_ID_CONSOLE};
pub use input::{ConsoleInput, ConsoleSink, INPUT_MAX};
