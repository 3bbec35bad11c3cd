//! virtio-rng, the entropy device (virtio id 4): the guest's `/dev/hwrng`,
//! fed from the host's `getrandom`. Firecracker's `PUT /entropy`.
//!
//! - [`queue`]: the request queue logic, usable without KVM;
//! - [`device`]: the [`crate::devices::virtio::VirtioDevice`];
//! - `worker`: what the worker thread does on each kick.

pub mod device;
pub mod queue;
mod worker;

pub use device::Rng;
pub use queue::{process_queue, RngStats};

/// virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Entries of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most random bytes one request gets, whatever its buffers hold: one kick
/// costs at most a queue of these (1 MiB of `getrandom`, a few ms). Linux
/// asks for far less at a time (its hwrng buffer is a few cache lines).
pub const MAX_BYTES_PER_CHAIN: u32 = 4096;
