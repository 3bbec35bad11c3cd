//! virtio-net: a NIC backed by a host TAP.
//!
//! - [`device`]: features, config space, activation ([`Net`]);
//! - [`rxtx`]: the frame paths between guest queues and the TAP, pure and
//!   unit-tested with mock rings;
//! - `worker`: the `virtio-net-N` thread that waits on the TAP and the queue
//!   eventfds and runs the frame paths.
//!
//! The VMM builds one device per `--net` with [`net_device`] and appends
//! [`crate::net::kernel_ip_arg`] to the guest command line.

pub mod device;
pub mod rxtx;
mod worker;

pub use device::{Net, NetDeviceError, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET};
pub use rxtx::{NetStats, NetStatsSnapshot};

use super::VirtioDevice;
use crate::net::NetConfig;

/// Set up the host side of `cfg` (attach to or create its TAP) and build the
/// device for the `index`-th NIC, `eth<index>` in the guest.
pub fn net_device(cfg: &NetConfig, index: usize) -> Result<Box<dyn VirtioDevice>, NetDeviceError> {
    Ok(Box::new(Net::from_config(cfg, index)?))
}
