//! The host end of a NIC as the virtio-net device sees it: something that
//! takes and gives Ethernet frames and has an fd to wait on.
//!
//! Two backends: a TAP ([`super::Tap`]), whose frames carry a
//! `virtio_net_hdr_v1` and which takes checksum and segmentation offloads,
//! and `passt` ([`super::passt::Passt`]), plain frames and no offloads. The
//! device always works with the header in front; for a backend without one,
//! [`send_with_vnet_hdr`] strips it and [`recv_with_vnet_hdr`] builds an
//! empty one (no offload flags: the guest checks its checksums itself).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::tap::{Tap, TapError, VNET_HDR_LEN};

/// A frame backend. Methods take `&self`: the device programs offloads while
/// its worker thread moves frames, so a backend with state locks it itself.
pub trait FrameBackend: Send + Sync + fmt::Debug {
    /// What it is, for log lines ("TAP mvtap0", "passt pid 42").
    fn describe(&self) -> String;

    /// The fd that becomes readable when frames arrive (watched edge-triggered:
    /// [`recv_frame`](Self::recv_frame) returns `WouldBlock` only once it is drained).
    fn poll_fd(&self) -> RawFd;

    /// Whether frames carry a 12-byte `virtio_net_hdr_v1` in front.
    fn has_vnet_hdr(&self) -> bool;

    /// The `TUN_F_*` offloads it can take (0 for none; only with a vnet header).
    fn offloads(&self) -> u32;

    /// Hand us only frames using `flags` (`TUN_F_*`, a subset of [`offloads`](Self::offloads)).
    fn set_offloads(&self, flags: u32) -> Result<(), BackendError>;

    /// Send one frame (vnet header first when [`has_vnet_hdr`](Self::has_vnet_hdr)).
    fn send_frame(&self, frame: &[u8]) -> io::Result<()>;

    /// Receive one frame into `buf` (header first when it has one), or
    /// `WouldBlock` when none is waiting.
    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Errors programming a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The TAP refused.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The backend takes no offloads.
    #[error("{0} takes no offloads (asked for {1:#x})")]
    NoOffloads(String, u32),
}

/// Send `frame` (vnet header + Ethernet frame, as the device builds it) to
/// `backend`, without the header if the backend has none.
pub fn send_with_vnet_hdr(backend: &dyn FrameBackend, frame: &[u8]) -> io::Result<()> {
    if backend.has_vnet_hdr() {
        return backend.send_frame(frame);
    }
    let eth = frame.get(VNET_HDR_LEN..).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame shorter than the vnet header",
        )
    })?;
    backend.send_frame(eth)
}

/// Receive a frame from `backend` into `buf` with a vnet header in front,
/// building an empty header if the backend has none.
pub fn recv_with_vnet_hdr(backend: &dyn FrameBackend, buf: &mut [u8]) -> io::Result<usize> {
    if backend.has_vnet_hdr() {
        return backend.recv_frame(buf);
    }
    let Some(eth) = buf.get_mut(VNET_HDR_LEN..) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "buffer shorter than the vnet header",
        ));
    };
    let n = backend.recv_frame(eth)?;
    buf[..VNET_HDR_LEN].fill(0);
    Ok(VNET_HDR_LEN + n)
}

impl FrameBackend for Tap {
    fn describe(&self) -> String {
        format!("TAP {}", self.name())
    }

    fn poll_fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn has_vnet_hdr(&self) -> bool {
        true
    }

    fn offloads(&self) -> u32 {
        self.probe_offloads()
    }

    fn set_offloads(&self, flags: u32) -> Result<(), BackendError> {
        Ok(self.set_offload(flags)?)
    }

    fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        let n = self.write_frame(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short TAP write: {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_frame(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// A headerless backend that records what it is sent.
    #[derive(Debug, Default)]
    struct Plain {
        sent: Mutex<Vec<Vec<u8>>>,
        queued: Mutex<VecDeque<Vec<u8>>>,
    }

    impl FrameBackend for Plain {
        fn describe(&self) -> String {
            "plain".into()
        }
        fn poll_fd(&self) -> RawFd {
            -1
        }
        fn has_vnet_hdr(&self) -> bool {
            false
        }
        fn offloads(&self) -> u32 {
            0
        }
        fn set_offloads(&self, flags: u32) -> Result<(), BackendError> {
            Err(BackendError::NoOffloads(self.describe(), flags))
        }
        fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
            let f = self
                .queued
                .lock()
                .unwrap()
                .pop_front()
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }
    }

    #[test]
    fn header_stripped_and_built_for_a_plain_backend() {
        let b = Plain::default();
        let mut framed = vec![0u8; VNET_HDR_LEN];
        framed.extend_from_slice(&[7u8; 60]);
        send_with_vnet_hdr(&b, &framed).unwrap();
        assert_eq!(b.sent.lock().unwrap()[0], vec![7u8; 60]);
        assert!(send_with_vnet_hdr(&b, &[0u8; 5]).is_err());

        b.queued.lock().unwrap().push_back(vec![9u8; 42]);
        let mut buf = vec![0xffu8; 100];
        let n = recv_with_vnet_hdr(&b, &mut buf).unwrap();
        assert_eq!(n, VNET_HDR_LEN + 42);
        assert_eq!(&buf[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
        assert_eq!(&buf[VNET_HDR_LEN..n], &[9u8; 42][..]);
        let e = recv_with_vnet_hdr(&b, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(recv_with_vnet_hdr(&b, &mut [0u8; 4]).is_err());
    }
}
