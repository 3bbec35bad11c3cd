//! Host networking: TAP devices and the `--net` option.

/// One `--net` interface (filled in by the virtio-net work).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Existing TAP device name to attach to.
    pub tap: String,
}
