//! virtio-vsock (virtio id 19): stream sockets between the guest and the
//! host without a network, in Firecracker's hybrid form, where host
//! programs reach the guest through a Unix socket (`PUT /vsock`).
//!
//! - [`packet`]: the packet header;
//! - [`muxer`]: the host side, guest connections as Unix sockets;
//! - [`queue`]: the rx, tx and event queue logic, usable without KVM;
//! - [`device`]: the [`crate::devices::virtio::VirtioDevice`];
//! - `worker`: what the worker thread does when a queue or a host socket
//!   is ready.

pub mod device;
pub mod muxer;
pub mod packet;
pub mod queue;
mod worker;

pub use device::Vsock;
pub use muxer::{Listener, Muxer, MuxerError, VsockStats};

/// virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Entries of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
/// The event a restored guest gets: its connections are gone.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
