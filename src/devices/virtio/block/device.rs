//! The virtio-blk device: features, configuration space, activation and
//! the backing file.
//!
//! One queue of [`QUEUE_SIZE`] entries. On activation a worker thread named
//! `virtio-blk-N` serves it ([`super::worker`]). Reset and drop stop the
//! thread and join it (the embedded [`VirtioCommon`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::disk::{current, Disk, DiskError, SharedDisk};
#[cfg(test)]
use super::request::Limits;
use super::uring::Uring;
use super::worker::BlockWorker;
use super::{QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, SIZE_MAX, VIRTIO_ID_BLOCK};
use crate::config::{CacheType, DriveConfig, IoEngine};
use crate::devices::virtio::throttle::ThrottleHandle;
use crate::devices::virtio::{
    read_config_bytes, take_queues, ActivateError, GuestLog, Interrupt, VirtioCommon, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::narrow;
use crate::rate_limit::RateLimitConfig;

/// Size of the part of `struct virtio_blk_config` we fill: capacity,
/// size_max, seg_max, geometry (unused, zero) and blk_size.
const CONFIG_LEN: usize = 24;

/// Names worker threads `virtio-blk-0`, `-1`, ... in creation order.
static NEXT_INDEX: AtomicUsize = AtomicUsize::new(0);

/// A virtio block device.
pub struct Block {
    common: VirtioCommon,
    disk: SharedDisk,
    limit: ThrottleHandle,
    io_engine: IoEngine,
    config: [u8; CONFIG_LEN],
}

impl Block {
    /// Open (and lock) the drive's backing file.
    pub fn new(cfg: &DriveConfig) -> Result<Self, DiskError> {
        let mut b = Self::with_disk(Disk::open(&cfg.path, cfg.read_only)?);
        b.limit.update(cfg.rate_limit);
        if cfg.io_engine == IoEngine::Async {
            // Found out now, not when the guest activates the drive.
            Uring::new(b.disk()).map_err(DiskError::Uring)?;
            b.io_engine = IoEngine::Async;
        }
        if cfg.cache == CacheType::Unsafe {
            let f = b.common.avail_features() & !(1 << VIRTIO_BLK_F_FLUSH);
            b.common.set_avail_features(f);
        }
        Ok(b)
    }

    /// A device serving an already open disk.
    pub fn with_disk(disk: Disk) -> Self {
        let mut avail_features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if disk.read_only() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.capacity_sectors().to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20: geometry, not offered.
        config[20..24].copy_from_slice(&narrow::u32_of(SECTOR_SIZE).to_le_bytes());
        let label = format!("virtio-blk-{}", NEXT_INDEX.fetch_add(1, Ordering::Relaxed));
        Self {
            common: VirtioCommon::new(VIRTIO_ID_BLOCK, label, avail_features, &[QUEUE_SIZE]),
            disk: Arc::new(Mutex::new(Arc::new(disk))),
            limit: ThrottleHandle::new(RateLimitConfig::default()),
            io_engine: IoEngine::Sync,
            config,
        }
    }

    /// The drive's rate limiter (change it with [`ThrottleHandle::update`]).
    pub fn rate_limit(&self) -> &ThrottleHandle {
        &self.limit
    }

    /// The backing file engine.
    pub fn disk(&self) -> Arc<Disk> {
        current(&self.disk)
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.common.acked_features()
    }

    /// Whether a worker thread is serving the queue.
    pub fn is_active(&self) -> bool {
        self.common.is_active()
    }

    /// Request limits: seg_max and size_max bind only a driver that accepted them.
    #[cfg(test)]
    fn limits(&self) -> Limits {
        self.disk().negotiated_limits(self.acked_features())
    }

    /// Serve a new backing file from now on (or the same file, grown); the
    /// caller then tells the driver that the configuration (the capacity)
    /// changed. The new file is opened and locked before the old one is
    /// let go, so a failure leaves the device as it was.
    pub fn swap_backing_file(&mut self, path: &std::path::Path) -> Result<(), DiskError> {
        let old = self.disk();
        let new = old.reopen(path)?;
        // What the guest wrote to the old file is on it before we let go.
        if let Err(e) = old.flush() {
            log::warn!(
                "{}: flushing the old backing file: {e}",
                self.common.label()
            );
        }
        self.config[0..8].copy_from_slice(&new.capacity_sectors().to_le_bytes());
        log::info!(
            "{}: backing file now {} ({} sectors)",
            self.common.label(),
            path.display(),
            new.capacity_sectors()
        );
        *self.disk.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let ([queue], [queue_evt]) = take_queues::<1>(queues, queue_evts)?;
        let uring = match self.io_engine {
            IoEngine::Sync => None,
            IoEngine::Async => Some(Uring::new(self.disk()).map_err(ActivateError::Worker)?),
        };
        let handler = BlockWorker {
            uring,
            mem,
            queue,
            queue_evt,
            interrupt,
            disk: self.disk.clone(),
            acked_features: self.common.acked_features(),
            errors: GuestLog::default(),
            throttle: self.limit.worker().map_err(ActivateError::Worker)?,
        };
        self.common.start_worker(handler)
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let mut m = self.disk().stats().metrics();
        m.push(("rate_limiter_throttled_events", self.limit.throttled()));
        m
    }

    fn flush(&mut self) {
        let disk = self.disk();
        if let Err(e) = disk.flush() {
            log::error!(
                "{}: {}: {}",
                self.common.label(),
                disk.path().display(),
                crate::error_chain(&e)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::TempImage;
    use super::super::MAX_REQUEST_BYTES;
    use super::*;
    use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn block(contents: &[u8], read_only: bool) -> (TempImage, Block) {
        let img = TempImage::new(contents);
        let cfg = DriveConfig {
            path: img.path().to_owned(),
            read_only,
            ..Default::default()
        };
        let b = Block::new(&cfg).unwrap();
        (img, b)
    }

    fn config(b: &Block) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        b.read_config(0, &mut c);
        c
    }

    #[test]
    fn features_and_config_space() {
        let (_img, b) = block(&[0u8; 10 * 512 + 7], false);
        assert_eq!(b.device_type(), 2);
        assert_eq!(b.queue_max_sizes(), &[256]);
        let f = b.avail_features();
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_SIZE_MAX), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let c = config(&b);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 10);
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), SIZE_MAX);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);

        // Partial and out-of-range config reads.
        let mut four = [0xffu8; 4];
        b.read_config(0, &mut four);
        assert_eq!(four, [10, 0, 0, 0]);
        let mut tail = [0xffu8; 8];
        b.read_config(20, &mut tail);
        assert_eq!(tail, [0, 2, 0, 0, 0, 0, 0, 0]);
        b.read_config(24, &mut tail);
        assert_eq!(tail, [0; 8]);
        b.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 8]);

        let (_img2, ro) = block(&[0u8; 512], true);
        assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn limits_bind_only_when_negotiated() {
        let (_img, mut b) = block(&[0u8; 2048], false);
        assert_eq!(b.limits().seg_max, u32::MAX);
        assert_eq!(b.limits().size_max, u32::MAX);
        assert_eq!(b.limits().capacity_sectors, 4);
        b.set_acked_features(
            VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_SIZE_MAX,
        );
        assert_eq!(b.limits(), b.disk().limits());
        // Unoffered bits are dropped.
        b.set_acked_features(1 << 40);
        assert_eq!(b.acked_features(), 0);
    }

    #[test]
    fn activate_needs_exactly_one_queue() {
        let (_img, mut b) = block(&[0u8; 512], false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let interrupt = || {
            Interrupt::new(
                Arc::new(AtomicU32::new(0)),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            )
        };
        let r = b.activate(mem.clone(), interrupt(), vec![], vec![]);
        assert!(matches!(
            r,
            Err(ActivateError::QueueCount { want: 1, got: 0 })
        ));
        let q = || <Queue as virtio_queue::QueueT>::new(256).unwrap();
        let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
        let r = b.activate(mem.clone(), interrupt(), vec![q(), q()], vec![evt(), evt()]);
        assert!(matches!(
            r,
            Err(ActivateError::QueueCount { want: 1, got: 2 })
        ));
        let r = b.activate(mem, interrupt(), vec![q()], vec![]);
        assert!(r.is_err());
        assert!(!b.is_active());
    }

    /// Activate the device, kick its queue from "the guest", and wait for the
    /// worker thread to complete the request and raise the interrupt.
    #[test]
    fn worker_serves_kicks_and_stops_on_reset() {
        let contents: Vec<u8> = (0..4 * 512u32)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        let (_img, mut b) = block(&contents, false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let queue: Queue = vq.create_queue().unwrap();

        let status = Arc::new(AtomicU32::new(0));
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        b.activate(
            mem.clone(),
            Interrupt::new(status.clone(), irqfd.try_clone().unwrap()),
            vec![queue],
            vec![kick.try_clone().unwrap()],
        )
        .unwrap();
        assert!(b.is_active());

        let (hdr, data, st) = (0x1_0000u64, 0x2_0000u64, 0x3_0000u64);
        mem.write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(hdr))
            .unwrap();
        mem.write_obj(1u64.to_le(), GuestAddress(hdr + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        let (n, w) = (
            narrow::u16_of(VRING_DESC_F_NEXT),
            narrow::u16_of(VRING_DESC_F_WRITE),
        );
        vq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(hdr, 16, n, 1)),
                RawDescriptor::from(Descriptor::new(data, 1024, n | w, 2)),
                RawDescriptor::from(Descriptor::new(st, 1, w, 0)),
            ],
            0,
        )
        .unwrap();
        kick.write(1).unwrap();

        let deadline = Instant::now() + Duration::from_secs(10);
        while irqfd.read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt from the worker");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(status.load(Ordering::SeqCst), VIRTIO_MMIO_INT_VRING);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 1025);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
            narrow::u8_of(VIRTIO_BLK_S_OK)
        );
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(data)).unwrap();
        assert_eq!(got, contents[512..1536]);

        assert!(b.reset());
        assert!(!b.is_active());
        // After reset the thread is gone: further kicks are not served.
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(irqfd.read().is_err());
        b.flush();
    }

    /// Issue 25's first hostile-guest finding: one kick of a full queue of
    /// the largest reads the device takes (256 x 254 x 64 KiB, 4 GiB of
    /// copying). Pause (what a snapshot starts with) and reset (what a vCPU
    /// thread waits for) are answered after the worker's current pass, not
    /// after the kick: both within tens of milliseconds.
    #[test]
    fn pause_and_reset_are_answered_within_a_pass_of_a_huge_kick() {
        use crate::devices::virtio::test_utils::{full_queue_of_one_chain, used_idx};
        const HDR: u64 = 0x4_0000;
        const STATUS: u64 = 0x4_1000;
        const DATA: u64 = 0x5_0000;
        const USED: GuestAddress = GuestAddress(0x3_0000);
        let w = narrow::u16_of(VRING_DESC_F_WRITE);
        let mut descs = vec![(HDR, 16, 0)];
        descs.extend((0..SEG_MAX).map(|_| (DATA, SIZE_MAX, w)));
        descs.push((STATUS, 1, w));
        let bound = Duration::from_millis(250);
        for engine in [IoEngine::Sync, IoEngine::Async] {
            let img = TempImage::new(&[]);
            std::fs::OpenOptions::new()
                .write(true)
                .open(img.path())
                .unwrap()
                .set_len(MAX_REQUEST_BYTES)
                .unwrap();
            let cfg = DriveConfig {
                path: img.path().to_owned(),
                io_engine: engine,
                ..Default::default()
            };
            let mut b = Block::new(&cfg).unwrap();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let vq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
            // Header all zero: a read of sector 0, all of the disk.
            let queue = full_queue_of_one_chain(&vq, &mem, QUEUE_SIZE, &descs, None, USED);
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let interrupt = Interrupt::new(
                Arc::new(AtomicU32::new(0)),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            );
            b.activate(
                mem.clone(),
                interrupt,
                vec![queue],
                vec![kick.try_clone().unwrap()],
            )
            .unwrap();
            let wait_used = |above: u16| {
                let deadline = Instant::now() + Duration::from_secs(60);
                while used_idx(&mem, USED) <= above {
                    assert!(
                        Instant::now() < deadline,
                        "{engine:?}: the kick is not served: used {}",
                        used_idx(&mem, USED)
                    );
                    std::thread::yield_now();
                }
            };

            let start = Instant::now();
            kick.write(1).unwrap();
            wait_used(0);
            let t = Instant::now();
            assert!(b.pause());
            let paused = t.elapsed();
            let at = used_idx(&mem, USED);
            b.resume();
            wait_used(QUEUE_SIZE - 1);
            let kick_took = start.elapsed();

            // A second kick of the same 256 requests, reset in the middle.
            vq.avail().idx().store(2 * QUEUE_SIZE);
            kick.write(1).unwrap();
            wait_used(QUEUE_SIZE);
            let t = Instant::now();
            assert!(b.reset());
            let reset = t.elapsed();
            eprintln!(
                "virtio-blk ({engine:?}): a kick of 256 x {MAX_REQUEST_BYTES}-byte reads took {kick_took:?}; \
                 pause answered in {paused:?} (at request {at} of 256), reset in {reset:?}"
            );
            assert!(
                at < QUEUE_SIZE,
                "{engine:?}: the pause came after the whole kick"
            );
            assert!(paused < bound, "{engine:?}: pause took {paused:?}");
            assert!(reset < bound, "{engine:?}: reset took {reset:?}");
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
                narrow::u8_of(VIRTIO_BLK_S_OK)
            );
        }
    }

    #[test]
    fn the_same_file_grown_or_another_file_can_be_swapped_in() {
        let (img, mut b) = block(&[0u8; 4 * 512], false);
        // The caller grew the file and names it again: no lock conflict
        // with our own lock, and the new capacity.
        std::fs::OpenOptions::new()
            .write(true)
            .open(img.path())
            .unwrap()
            .set_len(12 * 512)
            .unwrap();
        b.swap_backing_file(img.path()).unwrap();
        assert_eq!(config(&b)[0..8], 12u64.to_le_bytes());
        // The lock is still held: a second device cannot open it.
        let cfg = DriveConfig {
            path: img.path().to_owned(),
            ..Default::default()
        };
        assert!(Block::new(&cfg).is_err());
        // Another file is opened and locked; the old one is let go.
        let other = TempImage::new(&[0u8; 2 * 512]);
        b.swap_backing_file(other.path()).unwrap();
        assert_eq!(config(&b)[0..8], 2u64.to_le_bytes());
        assert!(Block::new(&cfg).is_ok(), "the old file's lock was released");
    }

    #[test]
    fn drop_joins_the_worker() {
        let (_img, mut b) = block(&[0u8; 512], false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        b.activate(
            mem.clone(),
            Interrupt::new(
                Arc::new(AtomicU32::new(0)),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            ),
            vec![vq.create_queue().unwrap()],
            vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        )
        .unwrap();
        drop(b);
    }
}
