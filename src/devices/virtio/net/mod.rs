//! virtio-net: a NIC on a host frame backend (a TAP or passt, see
//! [`crate::net::backend`]).
//!
//! - [`device`]: features, config space, activation ([`Net`]);
//! - [`rxtx`]: the frame paths between guest queues and the backend, pure and
//!   unit-tested with mock rings;
//! - `worker`: the `virtio-net-N` thread that waits on the backend and the
//!   queue eventfds and runs the frame paths.
//!
//! The VMM sets up the host side of each `--net` with
//! [`crate::net::open_backend`], builds the device with [`net_device`] and
//! appends [`crate::net::kernel_ip_arg`] to the guest command line.

pub mod device;
pub mod rxtx;
mod worker;

pub use device::{Net, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET};
pub use rxtx::{NetStats, NetStatsSnapshot};

use std::sync::Arc;

use super::VirtioDevice;
use crate::net::{FrameBackend, MacAddr};
use crate::rate_limit::RateLimitConfig;

/// The device for the `index`-th NIC (`eth<index>` in the guest) with MAC
/// `mac`, on the `backend` set up for it, its rx and tx limited so.
pub fn net_device(
    index: usize,
    backend: Arc<dyn FrameBackend>,
    mac: MacAddr,
    [rx, tx]: [RateLimitConfig; 2],
) -> Box<dyn VirtioDevice> {
    let net = Net::new(index, backend, mac);
    net.rate_limits()[0].update(rx);
    net.rate_limits()[1].update(tx);
    Box::new(net)
}
