//! The virtio-rng device: no feature beyond `VERSION_1`, no config space,
//! one request queue served by a worker thread named `virtio-rng`.

use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::queue::RngStats;
use super::worker::RngWorker;
use super::{QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::devices::virtio::throttle::ThrottleHandle;
use crate::devices::virtio::{
    take_queues, ActivateError, GuestLog, Interrupt, VirtioCommon, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::rate_limit::RateLimitConfig;

/// An entropy device.
pub struct Rng {
    common: VirtioCommon,
    /// What the workers did, kept across resets for the final log line.
    stats: Arc<Mutex<RngStats>>,
    limit: ThrottleHandle,
}

impl Rng {
    /// The VM's entropy device.
    pub fn new() -> Self {
        Self {
            common: VirtioCommon::new(
                VIRTIO_ID_RNG,
                "virtio-rng".into(),
                VIRTIO_F_VERSION_1,
                &[QUEUE_SIZE],
            ),
            stats: Arc::default(),
            limit: ThrottleHandle::new(RateLimitConfig::default()),
        }
    }

    /// The device limited so.
    pub fn with_rate_limit(limit: RateLimitConfig) -> Self {
        let r = Self::new();
        r.limit.update(limit);
        r
    }

    /// Its rate limiter.
    pub fn rate_limit(&self) -> &ThrottleHandle {
        &self.limit
    }

    /// Whether a worker serves the queue.
    pub fn is_active(&self) -> bool {
        self.common.is_active()
    }

    /// Random bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let ([queue], [queue_evt]) = take_queues::<1>(queues, queue_evts)?;
        self.common.start_worker(RngWorker {
            mem,
            queue,
            queue_evt,
            interrupt,
            stats: self.stats.clone(),
            log: GuestLog::default(),
            throttle: self.limit.worker().map_err(ActivateError::Worker)?,
        })
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        vec![
            ("entropy_event_count", s.requests),
            ("entropy_bytes", s.bytes),
            ("entropy_event_fails", s.bad),
            ("entropy_rate_limiter_throttled", self.limit.throttled()),
        ]
    }

    fn flush(&mut self) {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        log::info!(
            "virtio-rng: {} bytes in {} requests, {} refused",
            s.bytes,
            s.requests,
            s.bad
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::devices::virtio::net::rxtx::tests::{Driver, BUF_BASE};
    use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;

    #[test]
    fn identity_and_no_config() {
        let dev = Rng::new();
        assert_eq!(dev.device_type(), 4);
        assert_eq!(dev.queue_max_sizes(), &[256]);
        assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
        let mut c = [0xffu8; 8];
        dev.read_config(0, &mut c);
        assert_eq!(c, [0; 8]);
    }

    /// Activate, post a buffer as the guest's driver would, kick, and see
    /// the worker fill it and raise the interrupt; reset stops the worker.
    #[test]
    fn worker_fills_requests_and_stops_on_reset() {
        let mem = crate::memory::create_guest_memory(32).unwrap();
        let mut dev = Rng::new();
        let mut d = Driver::new(&mem, 0, 16);
        let queue = d.queue();
        let status = Arc::new(AtomicU32::new(0));
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.activate(
            mem.clone(),
            Interrupt::new(status.clone(), irqfd.try_clone().unwrap()),
            vec![queue],
            vec![kick.try_clone().unwrap()],
        )
        .unwrap();
        assert!(dev.is_active());
        let head = d.add_chain(&[(BUF_BASE, 64, true)]);
        kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while irqfd.read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt from the worker");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(status.load(Ordering::SeqCst), VIRTIO_MMIO_INT_VRING);
        assert_eq!(d.take_used(), vec![(head, 64)]);
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(BUF_BASE)).unwrap();
        assert!(got.iter().any(|&b| b != 0), "random bytes written");
        assert_eq!(dev.bytes_served(), 64);
        assert!(dev.reset());
        assert!(!dev.is_active());
        dev.flush();
    }
}
