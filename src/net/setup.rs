//! Setting up the host side of one NIC: attach to or create a TAP (and give
//! it its host address), or start passt. The virtio-net device gets the
//! result as a [`FrameBackend`] and never touches host networking itself.

use std::net::Ipv4Addr;
use std::sync::Arc;

use log::{info, warn};

use super::backend::FrameBackend;
use super::passt::{ExitNotify, Passt, PasstError};
use super::tap::{Tap, TapError};
use super::{MacAddr, NetBackend, NetConfig};

/// Errors setting up the host side of a NIC.
#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    /// The TAP could not be opened or created.
    #[error("network interface eth{index}: cannot set up the host TAP")]
    Tap {
        /// NIC index.
        index: usize,
        /// Cause.
        #[source]
        source: TapError,
    },
    /// The TAP could not get its host address.
    #[error("network interface eth{index}: cannot give TAP '{tap}' the host address {addr}/{prefix_len}")]
    HostAddress {
        /// NIC index.
        index: usize,
        /// TAP name.
        tap: String,
        /// Host address.
        addr: Ipv4Addr,
        /// Prefix length.
        prefix_len: u8,
        /// Cause.
        #[source]
        source: TapError,
    },
    /// User-mode networking could not start.
    #[error("network interface eth{index}: cannot start user-mode networking")]
    User {
        /// NIC index.
        index: usize,
        /// Cause.
        #[source]
        source: PasstError,
    },
}

impl HostNetError {
    /// True when the user can fix it by changing the command line (a
    /// published port that is taken or not this host's).
    pub fn is_usage_error(&self) -> bool {
        matches!(
            self,
            HostNetError::User {
                source: PasstError::Publish(..),
                ..
            }
        )
    }
}

/// Set up the host side of `cfg`, the `index`-th NIC (`eth<index>`), whose
/// guest MAC is `mac`. `on_exit` is called if a backend process (passt)
/// exits while in use.
pub fn open_backend(
    cfg: &NetConfig,
    index: usize,
    mac: MacAddr,
    on_exit: ExitNotify,
) -> Result<Arc<dyn FrameBackend>, HostNetError> {
    let tap_err = |source| HostNetError::Tap { index, source };
    Ok(match &cfg.backend {
        NetBackend::Tap { name } => {
            let tap = Tap::attach(name).map_err(tap_err)?;
            match tap.is_up() {
                Ok(true) => {}
                Ok(false) => warn!(
                    "TAP '{name}' is down: the guest will not reach the host until `ip link set {name} up`"
                ),
                Err(e) => warn!("{e}"),
            }
            Arc::new(tap)
        }
        NetBackend::Managed {
            tap: name,
            host,
            guest,
            prefix_len,
        } => {
            let tap = Tap::create(name.as_deref()).map_err(tap_err)?;
            tap.configure_host_ipv4(*host, *prefix_len)
                .map_err(|source| HostNetError::HostAddress {
                    index,
                    tap: tap.name().to_string(),
                    addr: *host,
                    prefix_len: *prefix_len,
                    source,
                })?;
            info!(
                "created TAP {} with host address {host}/{prefix_len}; guest eth{index} is {guest}",
                tap.name()
            );
            Arc::new(tap)
        }
        NetBackend::User { publish } => Arc::new(
            Passt::start(&format!("eth{index}"), mac, publish, on_exit)
                .map_err(|source| HostNetError::User { index, source })?,
        ),
    })
}
