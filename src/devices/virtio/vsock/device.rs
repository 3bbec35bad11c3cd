//! The virtio-vsock device: `VERSION_1` only (stream sockets, the default
//! without feature bits), an 8-byte config space with the guest's CID, and
//! the rx, tx and event queues served by a worker thread named
//! `virtio-vsock`. The host's listening socket belongs to the device, not
//! the worker: it exists from the VM's build on, survives driver resets and
//! restores, and its file is removed when the device goes away.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Listener, Muxer, VsockStats};
use super::worker::{VsockWorker, SCRATCH_LEN};
use super::{QUEUE_SIZE, VIRTIO_ID_VSOCK};
use crate::devices::virtio::{
    read_config_bytes, take_queues, ActivateError, GuestLog, Interrupt, VirtioCommon, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// A vsock device.
pub struct Vsock {
    common: VirtioCommon,
    guest_cid: u64,
    listener: Listener,
    /// The next activation follows a restore: the guest is told its
    /// connections are gone.
    reset_owed: bool,
    stats: Arc<Mutex<VsockStats>>,
}

impl Vsock {
    /// The device of guest `guest_cid`, host clients arriving on `listener`.
    pub fn new(guest_cid: u32, listener: Listener) -> Self {
        Self {
            common: VirtioCommon::new(
                VIRTIO_ID_VSOCK,
                "virtio-vsock".into(),
                VIRTIO_F_VERSION_1,
                &[QUEUE_SIZE; 3],
            ),
            guest_cid: u64::from(guest_cid),
            listener,
            reset_owed: false,
            stats: Arc::default(),
        }
    }

    /// What the device did so far.
    pub fn stats(&self) -> VsockStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a worker serves the queues.
    pub fn is_active(&self) -> bool {
        self.common.is_active()
    }

    fn uds_path(&self) -> PathBuf {
        self.listener.path().to_path_buf()
    }
}

impl VirtioDevice for Vsock {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    /// `guest_cid`, le64.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let (queues, queue_evts) = take_queues::<3>(queues, queue_evts)?;
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let mut muxer =
            Muxer::new(self.guest_cid, self.uds_path(), listener).map_err(ActivateError::Worker)?;
        let reset_owed = std::mem::take(&mut self.reset_owed);
        if reset_owed {
            muxer.hold_clients();
        }
        self.common.start_worker(VsockWorker {
            mem,
            queues,
            queue_evts,
            interrupt,
            muxer,
            reset_owed,
            reset_delivered: false,
            held: None,
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
            stats: self.stats.clone(),
            log: GuestLog::default(),
        })
    }

    fn restoring(&mut self) {
        self.reset_owed = true;
    }

    fn metrics(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats();
        vec![
            ("rx_packets_count", s.rx_packets),
            ("rx_bytes_count", s.rx_bytes),
            ("tx_packets_count", s.tx_packets),
            ("tx_bytes_count", s.tx_bytes),
            ("conns_added", s.connections),
            ("conns_killed", s.resets),
            ("tx_fails", s.bad_packets),
        ]
    }

    fn flush(&mut self) {
        let s = self.stats();
        log::info!(
            "virtio-vsock: {} connections, {} resets; {} packets ({} bytes) from the guest, {} ({} bytes) to it, {} refused",
            s.connections,
            s.resets,
            s.tx_packets,
            s.tx_bytes,
            s.rx_packets,
            s.rx_bytes,
            s.bad_packets
        );
    }
}
