//! The io_uring engine of a drive (`io_engine: Async`): reads, writes and
//! flushes go to the kernel as `READV`/`WRITEV`/`FSYNC` entries whose
//! iovecs point straight into guest memory, and the worker serves the queue
//! on while they run; their completions come back on an eventfd.
//!
//! Bounds, whatever the guest does: at most [`QUEUE_SIZE`] requests and
//! [`PASS_BYTES`] of data (past the first request) are in flight (a full
//! engine leaves further chains on the available ring until one completes,
//! and a pause or stop waits for no more than that), each is a request
//! [`Request::parse`] accepted (the same checks as the Sync engine:
//! seg_max, size_max, the request cap, the disk's end, guest RAM), and its
//! iovecs are at most two per data descriptor (a buffer that crosses from
//! one guest memory region to the next).
//!
//! The ring can do nothing but this: it is created disabled, its one file
//! is the drive's (registered, and every entry must use it), and only
//! `READV`, `WRITEV` and `FSYNC` entries and the file-update registration
//! are allowed before it is enabled (`IORING_REGISTER_RESTRICTIONS`), so
//! the ring cannot open files or sockets behind the seccomp filter.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::register::Restriction;
use io_uring::types::{Fixed, FsyncFlags};
use io_uring::{opcode, squeue, IoUring};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{guest_iovecs, Disk, DiskError};
use super::request::{Request, RequestKind};
use super::{PASS_BYTES, QUEUE_SIZE, SECTOR_SHIFT};
use crate::memory::GuestMemoryMmap;

/// `IORING_REGISTER_FILES_UPDATE` (Linux uapi; the crate does not export
/// its `sys` constants): a PATCH of the drive's file swaps the registered one.
const REGISTER_FILES_UPDATE: u8 = 6;

/// One request the kernel is working on.
struct InFlight {
    /// The chain's head, for the used ring.
    head: u16,
    /// Where its status byte goes.
    status: GuestAddress,
    kind: RequestKind,
    /// Bytes it moves (0 for a flush).
    bytes: u64,
    /// Where in the file (for the error message).
    offset: u64,
    /// The kernel reads these until the entry completes.
    _iovecs: Iovecs,
}

/// The iovecs of one entry.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers are into guest memory, which the worker's
// `GuestMemoryMmap` keeps mapped for as long as the engine lives; the
// vector itself is only read by the kernel, never through these pointers
// by another thread of ours.
unsafe impl Send for Iovecs {}

/// A finished request: the head for the used ring, its status byte's
/// address, and the result (bytes written into guest memory, or why not).
pub(super) struct Completion {
    /// The chain's head index.
    pub(super) head: u16,
    /// Where the status byte goes.
    pub(super) status: GuestAddress,
    /// Bytes written into guest memory (the status byte not included).
    pub(super) result: Result<u32, DiskError>,
}

/// A drive's io_uring.
pub(super) struct Uring {
    ring: IoUring,
    /// Signalled by the kernel for each completion.
    done: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// The disk whose file is registered (index 0).
    disk: Arc<Disk>,
    /// Data bytes of the requests in flight (at most [`PASS_BYTES`] past
    /// the first): what a pause or stop waits for is bounded by it.
    bytes_in_flight: u64,
    /// The last pass left chains on the ring for want of room.
    held: bool,
}

impl Uring {
    /// A ring for `disk`: created, restricted and enabled (on the thread
    /// that activates the device; the worker only submits and reaps).
    pub(super) fn new(disk: Arc<Disk>) -> io::Result<Self> {
        let entries = u32::from(QUEUE_SIZE);
        let ring = IoUring::builder().setup_r_disabled().build(entries)?;
        let done = EventFd::new(EFD_NONBLOCK)?;
        let s = ring.submitter();
        s.register_files(&[disk.raw_fd()])?;
        s.register_eventfd(done.as_raw_fd())?;
        let flags = squeue::Flags::FIXED_FILE.bits() | squeue::Flags::IO_DRAIN.bits();
        s.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(flags),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
            Restriction::register_op(REGISTER_FILES_UPDATE),
        ])?;
        s.register_enable_rings()?;
        let n = usize::from(QUEUE_SIZE);
        Ok(Self {
            ring,
            done,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            disk,
            bytes_in_flight: 0,
            held: false,
        })
    }

    /// The eventfd that says completions are waiting.
    pub(super) fn done_fd(&self) -> RawFd {
        self.done.as_raw_fd()
    }

    /// Whether a request moving `bytes` may go in flight now: the first
    /// always, the others while the engine holds at most [`PASS_BYTES`]
    /// and fewer than [`QUEUE_SIZE`] requests. A refusal is remembered for
    /// [`Self::held_with_nothing_in_flight`] until [`Self::new_pass`].
    pub(super) fn has_room_for(&mut self, bytes: u64) -> bool {
        let room = !self.free.is_empty()
            && (self.bytes_in_flight == 0
                || self.bytes_in_flight.saturating_add(bytes) <= PASS_BYTES);
        self.held |= !room;
        room
    }

    /// A pass over the available ring begins.
    pub(super) fn new_pass(&mut self) {
        self.held = false;
    }

    /// The last pass left chains on the ring for want of room, and since
    /// then everything in flight completed (inside the submit, with no
    /// completion event left to wait for): the caller must pass again.
    pub(super) fn held_with_nothing_in_flight(&self) -> bool {
        self.held && self.in_flight() == 0
    }

    /// Requests the kernel still works on.
    pub(super) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether `req` is one this engine runs (reads and writes, and
    /// flushes, of a disk that takes them); the rest is the Sync engine's
    /// (an id, an unsupported type, a write to a read-only drive).
    pub(super) fn runs(&self, req: &Request) -> bool {
        match req.kind {
            RequestKind::In => true,
            RequestKind::Out | RequestKind::Flush => !self.disk.read_only(),
            RequestKind::GetId | RequestKind::Unsupported(_) => false,
        }
    }

    /// Queue `req` (of chain `head`); [`Self::submit`] hands it over.
    /// The caller checked [`Self::has_room_for`] and [`Self::runs`].
    pub(super) fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        req: &Request,
    ) -> Result<(), DiskError> {
        let Some(&slot) = self.free.last() else {
            return Err(DiskError::Io {
                offset: 0,
                source: io::Error::other("io_uring engine full"),
            });
        };
        let offset = req.sector << SECTOR_SHIFT;
        let iovecs = Iovecs(match req.kind {
            RequestKind::In | RequestKind::Out => guest_iovecs(mem, req)?,
            _ => Vec::new(),
        });
        let n = u32::try_from(iovecs.0.len()).map_err(|_| DiskError::Io {
            offset,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        let entry = match req.kind {
            RequestKind::In => opcode::Readv::new(Fixed(0), iovecs.0.as_ptr(), n)
                .offset(offset)
                .build(),
            RequestKind::Out => opcode::Writev::new(Fixed(0), iovecs.0.as_ptr(), n)
                .offset(offset)
                .build(),
            // After everything submitted before it, as the guest's flush asks.
            _ => opcode::Fsync::new(Fixed(0))
                .flags(FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(slot as u64);
        // SAFETY: the iovecs and the guest memory they name stay valid until
        // the entry completes: the iovecs are kept in the slot, reaped only
        // from its completion, and the engine never outlives guest memory
        // (the worker owns both and waits for the kernel before it drops
        // them, [`Self::wait_idle`]).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // At most QUEUE_SIZE in flight, on a ring of QUEUE_SIZE entries.
            return Err(DiskError::Io {
                offset,
                source: io::Error::other("io_uring submission queue full"),
            });
        }
        self.free.pop();
        self.bytes_in_flight += req.data_len();
        self.slots[slot] = Some(InFlight {
            head,
            status: req.status,
            kind: req.kind,
            bytes: req.data_len(),
            offset,
            _iovecs: iovecs,
        });
        Ok(())
    }

    /// Hand the queued entries to the kernel.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The requests the kernel finished.
    pub(super) fn reap(&mut self) -> Vec<Completion> {
        let _ = self.done.read();
        let mut out = Vec::new();
        for cqe in self.ring.completion() {
            let Ok(slot) = usize::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(f) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            self.bytes_in_flight -= f.bytes;
            let res = cqe.result();
            let result = if res < 0 {
                let source = io::Error::from_raw_os_error(-res);
                Err(match f.kind {
                    RequestKind::Flush => DiskError::Flush(source),
                    _ => DiskError::Io {
                        offset: f.offset,
                        source,
                    },
                })
            } else if u64::try_from(res).unwrap_or(0) != f.bytes {
                Err(DiskError::Io {
                    offset: f.offset,
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short transfer: {res} of {} bytes", f.bytes),
                    ),
                })
            } else {
                self.disk.count_done(f.kind, f.bytes);
                Ok(match f.kind {
                    // Bounded by the chain, itself below 2^32.
                    RequestKind::In => u32::try_from(f.bytes).unwrap_or(u32::MAX),
                    _ => 0,
                })
            };
            out.push(Completion {
                head: f.head,
                status: f.status,
                result,
            });
        }
        out
    }

    /// Wait until the kernel finished every request in flight, and return
    /// them all.
    pub(super) fn wait_idle(&mut self) -> Vec<Completion> {
        let mut out = Vec::new();
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Without io_uring_enter there is no waiting: the entries
                    // stay the kernel's, and so must the memory they name.
                    log::error!("virtio-blk: io_uring: cannot wait for completions: {e}");
                    break;
                }
            }
            out.extend(self.reap());
        }
        out
    }

    /// Serve `disk`'s file from now on (a PATCH swapped it). Call with
    /// nothing in flight ([`Self::wait_idle`]).
    pub(super) fn swap_disk(&mut self, disk: Arc<Disk>) -> io::Result<()> {
        if Arc::ptr_eq(&disk, &self.disk) {
            return Ok(());
        }
        self.ring
            .submitter()
            .register_files_update(0, &[disk.raw_fd()])?;
        self.disk = disk;
        Ok(())
    }

    /// The disk whose file the ring uses.
    pub(super) fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The kernel may still write into guest memory for what is in
        // flight; the caller's memory must outlive that.
        if self.in_flight() > 0 {
            let _ = self.wait_idle();
        }
    }
}
