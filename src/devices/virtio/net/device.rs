//! The virtio-net device: features, config space, activation.
//!
//! Two queues (RX = 0, TX = 1) of 256 entries, on a [`FrameBackend`] the
//! host-networking module set up (a TAP or passt). Features offered:
//! - always: `VERSION_1`, `MAC`, `STATUS` (link always up), `MRG_RXBUF`
//!   (the guest posts page-sized buffers and big frames span several),
//!   `RING_F_INDIRECT_DESC`;
//! - for a backend with a vnet header (a TAP): the guest-to-host offloads
//!   `CSUM`, `HOST_TSO4`, `HOST_TSO6`, which a vnet-header TAP always
//!   accepts, and, when the TAP accepts the matching `TUNSETOFFLOAD` flag,
//!   `GUEST_CSUM`, `GUEST_TSO4`, `GUEST_TSO6` (host-to-guest offloads);
//! - for a backend without one (passt): no offloads, so every frame is
//!   plain and whole, and the header is dropped or built empty in software.
//!
//! The backend's offloads are set to exactly what the driver acked, so it never
//! hands the guest a partial checksum or a GSO frame it did not ask for.
//! UFO/USO and `EVENT_IDX` are not offered.

use std::sync::Arc;

use log::{info, warn};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::rxtx::{NetStats, NetStatsSnapshot, RxPath, TxPath};
use super::worker::Worker;
use crate::devices::virtio::throttle::ThrottleHandle;
use crate::devices::virtio::{
    read_config_bytes, take_queues, ActivateError, Interrupt, VirtioCommon, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;
use crate::narrow;
use crate::net::{FrameBackend, MacAddr};
use crate::rate_limit::RateLimitConfig;

/// virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features offered whatever the backend.
pub const PLAIN_FEATURES: u64 = VIRTIO_F_VERSION_1
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_INDIRECT_DESC);

/// Features offered for a backend with a vnet header, whatever its offloads.
pub const BASE_FEATURES: u64 = PLAIN_FEATURES
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6);

/// Size of the config space: `mac[6]`, `status: le16`.
pub const CONFIG_SPACE_LEN: usize = 8;

/// Features to offer for `backend`.
pub fn backend_features(backend: &dyn FrameBackend) -> u64 {
    if backend.has_vnet_hdr() {
        avail_features(backend.offloads())
    } else {
        PLAIN_FEATURES
    }
}

/// Features to offer when the TAP accepts `tap_offloads` (`TUN_F_*`).
pub fn avail_features(tap_offloads: u32) -> u64 {
    let mut features = BASE_FEATURES;
    // virtio requires GUEST_CSUM for GUEST_TSO*, as the TAP requires TUN_F_CSUM for TSO.
    if tap_offloads & libc::TUN_F_CSUM != 0 {
        features |= bit(VIRTIO_NET_F_GUEST_CSUM);
        if tap_offloads & libc::TUN_F_TSO4 != 0 {
            features |= bit(VIRTIO_NET_F_GUEST_TSO4);
        }
        if tap_offloads & libc::TUN_F_TSO6 != 0 {
            features |= bit(VIRTIO_NET_F_GUEST_TSO6);
        }
    }
    features
}

/// `TUNSETOFFLOAD` flags matching the driver's acked features.
pub fn tap_offloads_for(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= libc::TUN_F_CSUM;
        if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

/// The device config space for `mac`, link up.
pub fn config_space(mac: MacAddr) -> [u8; CONFIG_SPACE_LEN] {
    let mut cfg = [0u8; CONFIG_SPACE_LEN];
    cfg[..6].copy_from_slice(&mac.bytes());
    cfg[6..].copy_from_slice(&narrow::u16_of(VIRTIO_NET_S_LINK_UP).to_le_bytes());
    cfg
}

/// A virtio-net device on a frame backend.
pub struct Net {
    common: VirtioCommon,
    index: usize,
    backend: Arc<dyn FrameBackend>,
    mac: MacAddr,
    stats: Arc<NetStats>,
    /// Rate limiters: frames to the guest, frames from it.
    limits: [ThrottleHandle; 2],
}

impl Net {
    /// The `index`-th NIC (`eth<index>` in the guest) on `backend`.
    pub fn new(index: usize, backend: Arc<dyn FrameBackend>, mac: MacAddr) -> Self {
        let label = format!("virtio-net-{index}");
        let avail_features = backend_features(backend.as_ref());
        info!(
            "{label}: {} mac {mac}, features {avail_features:#x}",
            backend.describe()
        );
        Self {
            common: VirtioCommon::new(VIRTIO_ID_NET, label, avail_features, &QUEUE_SIZES),
            index,
            backend,
            mac,
            stats: Arc::new(NetStats::default()),
            limits: [
                ThrottleHandle::new(RateLimitConfig::default()),
                ThrottleHandle::new(RateLimitConfig::default()),
            ],
        }
    }

    /// The rx and tx rate limiters (change them with [`ThrottleHandle::update`]).
    pub fn rate_limits(&self) -> &[ThrottleHandle; 2] {
        &self.limits
    }

    /// Guest MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The host side, as log lines name it.
    pub fn backend_name(&self) -> String {
        self.backend.describe()
    }

    /// Counters so far (kept across resets).
    pub fn stats(&self) -> NetStatsSnapshot {
        self.stats.snapshot()
    }

    /// Shared counters, readable while the device runs.
    pub fn stats_handle(&self) -> Arc<NetStats> {
        Arc::clone(&self.stats)
    }

    fn label(&self) -> &str {
        self.common.label()
    }

    fn program_tap_offloads(&self) {
        let flags = tap_offloads_for(self.common.acked_features());
        if let Err(e) = self.backend.set_offloads(flags) {
            // Fewer offloads is safe: the guest just gets plain frames.
            warn!("{}: {e}", self.label());
            if let Err(e) = self.backend.set_offloads(0) {
                warn!("{}: {e}", self.label());
            }
        }
    }
}

impl VirtioDevice for Net {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn set_acked_features(&mut self, features: u64) {
        self.common.ack_features(features);
        self.program_tap_offloads();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR, so
        // writes take the provided method's way: ignored.
        read_config_bytes(&config_space(self.mac), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let ([rx_queue, tx_queue], [rx_evt, tx_evt]) = take_queues::<2>(queues, queue_evts)?;
        self.common.stop_worker();
        self.program_tap_offloads();

        let acked = self.common.acked_features();
        let mrg_rxbuf = self.common.acked(VIRTIO_NET_F_MRG_RXBUF);
        let guest_csum = self.common.acked(VIRTIO_NET_F_GUEST_CSUM);
        let label = self.label().to_string();
        let worker = Worker {
            label: label.clone(),
            mem,
            interrupt,
            rx_queue,
            tx_queue,
            rx_evt,
            tx_evt,
            backend: Arc::clone(&self.backend),
            rx: RxPath::new(label.clone(), mrg_rxbuf, guest_csum),
            tx: TxPath::new(label.clone()),
            stats: Arc::clone(&self.stats),
            rx_more: false,
            tx_more: false,
            rx_throttle: self.limits[0].worker().map_err(ActivateError::Worker)?,
            tx_throttle: self.limits[1].worker().map_err(ActivateError::Worker)?,
        };
        self.common.start_worker(worker)?;
        info!(
            "{label}: activated (features {acked:#x}, backend offloads {:#x})",
            tap_offloads_for(acked)
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.common.reset();
        self.program_tap_offloads();
        true
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats.snapshot();
        vec![
            ("rx_packets_count", s.rx_frames),
            ("rx_bytes_count", s.rx_bytes),
            ("tx_packets_count", s.tx_frames),
            ("tx_bytes_count", s.tx_bytes),
            (
                "rx_fails",
                s.rx_bad_chains + s.rx_dropped_too_big + s.rx_dropped_malformed,
            ),
            ("tx_fails", s.tx_bad_chains + s.tx_errors),
            ("rx_rate_limiter_throttled", self.limits[0].throttled()),
            ("tx_rate_limiter_throttled", self.limits[1].throttled()),
        ]
    }

    fn flush(&mut self) {
        info!(
            "{} (eth{}, {}): {}",
            self.label(),
            self.index,
            self.backend.describe(),
            self.stats.snapshot()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::rxtx::tests::{memory, Driver, BUF_BASE};
    use super::super::rxtx::VNET_HDR_LEN;
    use super::*;
    use crate::net::tap::test_support::in_new_netns;
    use crate::net::{NetConfig, Tap};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn features_follow_tap_offloads() {
        let none = avail_features(0);
        assert_eq!(none, BASE_FEATURES);
        assert_ne!(none & VIRTIO_F_VERSION_1, 0);
        assert_eq!(none & bit(VIRTIO_NET_F_GUEST_CSUM), 0);
        let all = avail_features(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
        for f in [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
        ] {
            assert_ne!(all & bit(f), 0, "feature {f}");
        }
        // TSO without checksum offload is not offered.
        assert_eq!(avail_features(libc::TUN_F_TSO4), BASE_FEATURES);
    }

    #[derive(Debug)]
    struct Headerless;
    impl FrameBackend for Headerless {
        fn describe(&self) -> String {
            "headerless".into()
        }
        fn poll_fd(&self) -> std::os::fd::RawFd {
            -1
        }
        fn has_vnet_hdr(&self) -> bool {
            false
        }
        fn offloads(&self) -> u32 {
            libc::TUN_F_CSUM
        }
        fn set_offloads(&self, flags: u32) -> Result<(), crate::net::BackendError> {
            assert_eq!(flags, 0, "offloads programmed into a headerless backend");
            Ok(())
        }
        fn send_frame(&self, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn recv_frame(&self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }

    #[test]
    fn headerless_backend_gets_no_offload_features() {
        let mut dev = Net::new(0, Arc::new(Headerless), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(dev.avail_features(), PLAIN_FEATURES);
        for f in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
        ] {
            assert_eq!(dev.avail_features() & bit(f), 0, "feature {f}");
        }
        // A driver acking everything still programs no offloads.
        dev.set_acked_features(u64::MAX);
        assert!(dev.reset());
    }

    #[test]
    fn tap_offloads_match_acked_features() {
        assert_eq!(tap_offloads_for(BASE_FEATURES), 0);
        let all = avail_features(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
        assert_eq!(
            tap_offloads_for(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        assert_eq!(
            tap_offloads_for(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6)),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
        );
        // A driver acking TSO without GUEST_CSUM gets no TSO from the TAP.
        assert_eq!(tap_offloads_for(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    }

    #[test]
    fn config_space_layout() {
        let cfg = config_space(MacAddr([2, 1, 2, 3, 4, 5]));
        assert_eq!(cfg, [2, 1, 2, 3, 4, 5, 1, 0]);
    }

    fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x06]); // ARP
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&src_ip);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target_ip);
        f
    }

    /// The whole device against a real TAP, inside a network namespace this
    /// test creates: the "guest" asks for the host's MAC with ARP through the
    /// TX queue and the host kernel's reply must arrive on the RX queue.
    #[test]
    fn arp_round_trip_through_real_tap() {
        in_new_netns("arp_round_trip_through_real_tap", || {
            let cfg: NetConfig = "host=10.0.2.1/24,guest=10.0.2.2,mac=02:00:00:00:00:02"
                .parse()
                .unwrap();
            let backend = crate::net::open_backend(&cfg, 0, cfg.mac.unwrap(), Box::new(|_| {}))
                .expect("host side");
            let mut dev = Net::new(0, backend, cfg.mac.unwrap());
            assert_eq!(dev.device_type(), VIRTIO_ID_NET);
            assert_eq!(dev.queue_max_sizes(), &[256, 256]);
            let mut mac = [0u8; 6];
            dev.read_config(0, &mut mac);
            assert_eq!(mac, [2, 0, 0, 0, 0, 2]);
            let mut status = [0u8; 4];
            dev.read_config(6, &mut status);
            assert_eq!(status, [1, 0, 0, 0], "link up, then zeros past the end");
            let features = dev.avail_features();
            assert_ne!(features & bit(VIRTIO_NET_F_GUEST_CSUM), 0);
            dev.set_acked_features(features);

            let mem = memory();
            let mut rx = Driver::new(&mem, 0, QUEUE_SIZE);
            let mut tx = Driver::new(&mem, 0x8000, QUEUE_SIZE);
            let request = arp_request([2, 0, 0, 0, 0, 2], [10, 0, 2, 2], [10, 0, 2, 1]);
            let tx_addr = BUF_BASE + 0x10_0000;
            mem.write_slice(&request, GuestAddress(tx_addr)).unwrap();
            let tx_head = tx.add_chain(&[(tx_addr, u32::try_from(request.len()).unwrap(), false)]);

            let status_reg = Arc::new(AtomicU32::new(0));
            let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
            let interrupt = Interrupt::new(Arc::clone(&status_reg), irqfd.try_clone().unwrap());
            let rx_evt = EventFd::new(EFD_NONBLOCK).unwrap();
            let tx_evt = EventFd::new(EFD_NONBLOCK).unwrap();
            let tx_kick = tx_evt.try_clone().unwrap();
            let rx_kick = rx_evt.try_clone().unwrap();
            dev.activate(
                mem.clone(),
                interrupt,
                vec![rx.queue(), tx.queue()],
                vec![rx_evt, tx_evt],
            )
            .expect("activate");
            tx_kick.write(1).unwrap();

            // No RX buffers posted yet: the reply must wait, not be lost.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut tx_used = Vec::new();
            while tx_used.is_empty() && Instant::now() < deadline {
                tx_used.extend(tx.take_used());
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(tx_used, vec![(tx_head, 0)]);
            std::thread::sleep(Duration::from_millis(200));
            assert!(rx.take_used().is_empty());
            assert!(dev.stats().rx_deferred >= 1, "{:?}", dev.stats());

            let rx_bufs: Vec<(u16, u64)> = (0..32)
                .map(|i| {
                    let addr = BUF_BASE + i * 0x1000;
                    (rx.add_chain(&[(addr, 2048, true)]), addr)
                })
                .collect();
            rx_kick.write(1).unwrap();
            let mut reply = None;
            while reply.is_none() && Instant::now() < deadline {
                tx_used.extend(tx.take_used());
                for (head, len) in rx.take_used() {
                    let addr = rx_bufs.iter().find(|b| b.0 == head).unwrap().1;
                    let mut frame = vec![0u8; usize::try_from(len).unwrap()];
                    mem.read_slice(&mut frame, GuestAddress(addr)).unwrap();
                    let eth = &frame[VNET_HDR_LEN..];
                    // ARP reply (opcode 2) from 10.0.2.1 to our MAC.
                    if eth.len() >= 42
                        && eth[12..14] == [0x08, 0x06]
                        && eth[20..22] == [0, 2]
                        && eth[28..32] == [10, 0, 2, 1]
                    {
                        assert_eq!(&eth[..6], &[2, 0, 0, 0, 0, 2]);
                        assert_eq!(u16::from_le_bytes([frame[10], frame[11]]), 1);
                        reply = Some(eth[22..28].to_vec());
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            tx_used.extend(tx.take_used());
            assert!(reply.is_some(), "no ARP reply; stats: {}", dev.stats());
            assert_eq!(tx_used, vec![(tx_head, 0)]);
            assert_ne!(
                status_reg.load(Ordering::SeqCst) & 1,
                0,
                "no used-ring interrupt"
            );
            assert!(irqfd.read().unwrap() >= 1);

            let stats = dev.stats();
            assert_eq!(stats.tx_frames, 1);
            assert!(stats.rx_frames >= 1);
            assert_eq!(
                stats.tx_errors + stats.tx_bad_chains + stats.rx_bad_chains,
                0
            );

            // Reset stops the worker; the device can be activated again.
            assert!(dev.reset());
            let tap_name = dev.backend_name().trim_start_matches("TAP ").to_string();
            dev.flush();
            drop(dev);
            assert!(!crate::net::tap::interface_exists(&tap_name));
        });
    }

    /// Activate a NIC (worker thread `virtio-net-<index>`) on `rx`/`tx`,
    /// kick both queues, check that its worker does not spin, and return
    /// whether it asked for a reset.
    fn worker_does_not_spin(
        index: usize,
        mem: &crate::memory::GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
    ) -> bool {
        // A sleeping worker uses next to nothing; a spinning one most of the window.
        const WINDOW: Duration = Duration::from_millis(500);
        const LIMIT: Duration = Duration::from_millis(50);
        use crate::devices::virtio::test_utils::named_thread_cpu_time;
        use std::sync::atomic::AtomicBool;
        let tap = Tap::create(None).unwrap();
        let mut dev = Net::new(index, Arc::new(tap), MacAddr([2, 0, 0, 0, 0, 9]));
        let needs_reset = Arc::new(AtomicBool::new(false));
        let interrupt = Interrupt::with_needs_reset(
            Arc::new(AtomicU32::new(0)),
            Arc::clone(&needs_reset),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        let evts = [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let kicks: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        dev.activate(mem.clone(), interrupt, vec![rx, tx], evts.into())
            .expect("activate");
        for k in &kicks {
            k.write(1).unwrap();
        }
        let name = format!("virtio-net-{index}");
        // The thread names itself once it runs.
        let deadline = Instant::now() + Duration::from_secs(5);
        let before = loop {
            if let Some(t) = named_thread_cpu_time(&name) {
                break t;
            }
            assert!(Instant::now() < deadline, "no thread {name}");
            std::thread::sleep(Duration::from_millis(1));
        };
        std::thread::sleep(WINDOW);
        let used = named_thread_cpu_time(&name).expect("worker thread") - before;
        assert!(dev.reset());
        assert!(used < LIMIT, "worker used {used:?} of {WINDOW:?}");
        needs_reset.load(Ordering::SeqCst)
    }

    #[test]
    fn tx_avail_index_past_queue_size_does_not_spin() {
        in_new_netns("tx_avail_index_past_queue_size_does_not_spin", || {
            let mem = memory();
            let rx = Driver::new(&mem, 0x4_0000, QUEUE_SIZE);
            let tx = Driver::new(&mem, 0x8_0000, QUEUE_SIZE);
            // 261 chains claimed on a 256-entry ring.
            mem.write_obj(261u16, tx.vq.avail_addr().unchecked_add(2))
                .unwrap();
            assert!(worker_does_not_spin(50, &mem, rx.queue(), tx.queue()));
        });
    }

    #[test]
    fn tx_avail_ring_at_zero_does_not_spin() {
        in_new_netns("tx_avail_ring_at_zero_does_not_spin", || {
            let mem = memory();
            let rx = Driver::new(&mem, 0x4_0000, QUEUE_SIZE);
            let tx = Driver::new(&mem, 0x8_0000, QUEUE_SIZE);
            let mut txq = tx.queue();
            txq.try_set_avail_ring_address(GuestAddress(0)).unwrap();
            // The "avail index" of a ring at 0.
            mem.write_obj(3u16, GuestAddress(2)).unwrap();
            assert!(worker_does_not_spin(51, &mem, rx.queue(), txq));
        });
    }

    #[test]
    fn unready_tx_queue_is_left_alone() {
        in_new_netns("unready_tx_queue_is_left_alone", || {
            let mem = memory();
            let rx = Driver::new(&mem, 0x4_0000, QUEUE_SIZE);
            // TX never set up: not ready, every ring address 0.
            let txq = <Queue as virtio_queue::QueueT>::new(QUEUE_SIZE).unwrap();
            mem.write_slice(&[0xaa, 0xaa, 3, 0], GuestAddress(0))
                .unwrap();
            // An unused queue is no fault of the driver's: no reset asked.
            assert!(!worker_does_not_spin(52, &mem, rx.queue(), txq));
            // Nothing was written where the unready queue's rings would be.
            let mut low = [0u8; 4];
            mem.read_slice(&mut low, GuestAddress(0)).unwrap();
            assert_eq!(low, [0xaa, 0xaa, 3, 0]);
        });
    }

    #[test]
    fn activate_rejects_wrong_queue_count() {
        in_new_netns("activate_rejects_wrong_queue_count", || {
            let tap = Tap::create(None).unwrap();
            let mut dev = Net::new(3, Arc::new(tap), MacAddr([2, 0, 0, 0, 0, 3]));
            let mem = memory();
            let rx = Driver::new(&mem, 0, QUEUE_SIZE);
            let interrupt = Interrupt::new(
                Arc::new(AtomicU32::new(0)),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            );
            let err = dev
                .activate(
                    mem.clone(),
                    interrupt,
                    vec![rx.queue()],
                    vec![EventFd::new(EFD_NONBLOCK).unwrap()],
                )
                .unwrap_err();
            assert!(matches!(err, ActivateError::QueueCount { want: 2, got: 1 }));
        });
    }
}
