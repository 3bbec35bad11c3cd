//! The state every virtio device shares, embedded in each device (after
//! Cloud Hypervisor's `VirtioCommon`): its type and name, the features it
//! offers and the driver acked, its queue sizes, and the worker thread that
//! serves it while it is activated. [`VirtioDevice`](super::VirtioDevice)'s
//! provided methods answer from here, so a device writes only its own
//! config space and activation.

use super::epoll_helper::{EpollHandler, QueuePosition, WorkerHandle};
use super::ActivateError;

/// Features, queues and the worker of one device.
pub struct VirtioCommon {
    device_type: u32,
    label: String,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    worker: Option<WorkerHandle>,
}

impl VirtioCommon {
    /// A device of virtio type `device_type`, named `label` in logs and in
    /// its worker thread's name, offering `avail_features` on queues of
    /// `queue_sizes` entries (their count is the device's queue count).
    pub fn new(device_type: u32, label: String, avail_features: u64, queue_sizes: &[u16]) -> Self {
        Self {
            device_type,
            label,
            avail_features,
            acked_features: 0,
            queue_sizes: queue_sizes.to_vec(),
            worker: None,
        }
    }

    /// Virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The device's name in logs (`virtio-blk-0`, ...), also its worker's.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Maximum size of each queue.
    pub fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// Features offered.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Offer `features` from now on (before the driver negotiates).
    pub fn set_avail_features(&mut self, features: u64) {
        self.avail_features = features;
    }

    /// Features the driver accepted (never more than were offered).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Record the driver's features, dropping any that were not offered.
    pub fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Whether the driver accepted feature bit `bit`.
    pub fn acked(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1u64 << bit) != 0
    }

    /// Serve the device with `handler` on a new worker thread (stopping the
    /// old one first, if a driver activates twice).
    pub fn start_worker(&mut self, handler: impl EpollHandler) -> Result<(), ActivateError> {
        self.stop_worker();
        let worker =
            WorkerHandle::spawn(self.label.clone(), handler).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    /// Stop and join the worker, if one runs.
    pub fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    /// Whether a worker serves the queues.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Driver reset: the worker stops and the features are forgotten.
    pub fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }

    /// Park the worker; true once it is parked (or when none runs).
    pub fn pause(&self) -> bool {
        self.worker.as_ref().is_none_or(WorkerHandle::pause)
    }

    /// Let a parked worker serve again.
    pub fn resume(&self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    /// Where the parked worker stands in each queue; `None` with no worker.
    pub fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.worker.as_ref().map(WorkerHandle::queue_positions)
    }
}

impl Drop for VirtioCommon {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
