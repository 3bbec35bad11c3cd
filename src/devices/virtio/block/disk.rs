//! The file engine behind a virtio-blk device.
//!
//! The backing file is opened read-write or read-only and `flock`ed
//! (exclusive for read-write, shared for read-only) so that two VMMs cannot
//! write one image at once. Data moves with one `preadv`/`pwritev` per
//! request straight between the file and guest memory, without a bounce
//! buffer. All methods take `&self`: positioned I/O needs no seek state, so
//! the worker thread and the VMM's final flush can share one [`Disk`].

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::request::{Limits, Request, RequestKind};
use super::{ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, SIZE_MAX};
use crate::memory::GuestMemoryMmap;

/// Errors opening the backing file or serving a request.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The backing file cannot be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// Backing file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Someone else holds a conflicting lock on the image.
    #[error("{path} is locked by another process (is another microvm using it?)")]
    Locked {
        /// Backing file.
        path: PathBuf,
    },
    /// flock failed for another reason.
    #[error("cannot lock disk image {path}")]
    Lock {
        /// Backing file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The size or identity of the backing file cannot be read.
    #[error("cannot inspect disk image {path}")]
    Inspect {
        /// Backing file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A write or flush-with-data on a read-only drive.
    #[error("write to a read-only drive")]
    ReadOnly,
    /// A request type we do not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Guest memory vanished between parsing and I/O (should not happen: we
    /// never unmap guest RAM), or a short transfer.
    #[error("cannot access guest memory for the transfer")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// The file read or write failed.
    #[error("I/O error at disk offset {offset:#x}")]
    Io {
        /// Byte offset in the file.
        offset: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// fdatasync failed.
    #[error("cannot flush the disk image")]
    Flush(#[source] io::Error),
    /// The io_uring engine cannot be set up.
    #[error("io_engine Async: cannot set up an io_uring on this host")]
    Uring(#[source] io::Error),
    /// The device has no backing file to swap.
    #[error("this device has no backing file")]
    NoBackingFile,
}

/// An open, locked backing file.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    /// What the guest did with the drive (kept across file swaps).
    stats: Arc<DiskStats>,
}

/// Requests served, for the metrics (Firecracker's `block` counters).
#[derive(Debug, Default)]
pub struct DiskStats {
    /// Reads and the bytes they returned.
    pub read_count: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Writes.
    pub write_count: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flushes.
    pub flush_count: AtomicU64,
}

impl DiskStats {
    /// The counters under Firecracker's names.
    pub fn metrics(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("read_count", g(&self.read_count)),
            ("read_bytes", g(&self.read_bytes)),
            ("write_count", g(&self.write_count)),
            ("write_bytes", g(&self.write_bytes)),
            ("flush_count", g(&self.flush_count)),
        ]
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Disk {
    /// Open and lock `path`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        lock(&file, path, read_only)?;
        Self::from_locked(file, path, read_only)
    }

    /// The disk at `path` in place of this one (a drive's new backing file):
    /// opened and locked anew, unless `path` is this disk's own file (the
    /// caller grew it), which is then sized again through the descriptor
    /// that already holds its lock: opening it a second time would meet
    /// that lock.
    pub fn reopen(&self, path: &Path) -> Result<Self, DiskError> {
        let same = std::fs::metadata(path)
            .ok()
            .zip(self.file.metadata().ok())
            .is_some_and(|(new, old)| new.dev() == old.dev() && new.ino() == old.ino());
        if !same {
            return Self::open(path, self.read_only).map(|d| self.keep_stats(d));
        }
        let file = self.file.try_clone().map_err(|source| DiskError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_locked(file, path, self.read_only).map(|d| self.keep_stats(d))
    }

    fn keep_stats(&self, mut d: Self) -> Self {
        d.stats = self.stats.clone();
        d
    }

    /// What the guest did with the drive.
    pub fn stats(&self) -> &DiskStats {
        &self.stats
    }

    /// A disk on `file`, already opened and locked.
    fn from_locked(mut file: File, path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let inspect = |source| DiskError::Inspect {
            path: path.to_owned(),
            source,
        };
        // Seeking to the end also sizes host block devices, whose metadata says 0.
        let size = file.seek(SeekFrom::End(0)).map_err(inspect)?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "virtio-blk: {} is {size} bytes, not a multiple of {SECTOR_SIZE}: \
                 the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let meta = file.metadata().map_err(inspect)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            read_only,
            capacity_sectors: size >> SECTOR_SHIFT,
            id: serial(meta.dev(), meta.ino()),
            stats: Arc::default(),
        })
    }

    /// Size in 512-byte sectors (the file size rounded down).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether the drive refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The serial returned by `VIRTIO_BLK_T_GET_ID` (NUL-padded).
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The limits for a driver that acked `acked_features`: seg_max and
    /// size_max bind only a driver that accepted them.
    pub fn negotiated_limits(&self, acked_features: u64) -> Limits {
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX};
        let mut limits = self.limits();
        if acked_features & (1 << VIRTIO_BLK_F_SEG_MAX) == 0 {
            limits.seg_max = u32::MAX;
        }
        if acked_features & (1 << VIRTIO_BLK_F_SIZE_MAX) == 0 {
            limits.size_max = u32::MAX;
        }
        limits
    }

    /// What requests are checked against when the driver accepted
    /// `VIRTIO_BLK_F_SEG_MAX` and `VIRTIO_BLK_F_SIZE_MAX`.
    pub fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.capacity_sectors,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
        }
    }

    /// The backing file's descriptor (the io_uring engine registers it).
    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Count one served request of `kind` that moved `bytes`.
    pub(super) fn count_done(&self, kind: RequestKind, bytes: u64) {
        let (count, total) = match kind {
            RequestKind::In => (&self.stats.read_count, Some(&self.stats.read_bytes)),
            RequestKind::Out => (&self.stats.write_count, Some(&self.stats.write_bytes)),
            RequestKind::Flush => (&self.stats.flush_count, None),
            RequestKind::GetId | RequestKind::Unsupported(_) => return,
        };
        bump(count, 1);
        if let Some(total) = total {
            bump(total, bytes);
        }
    }

    /// Make written data durable (fdatasync).
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(DiskError::Flush)
    }

    /// Serve a parsed request. Returns the number of bytes written into guest
    /// memory, the status byte not included.
    pub fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> Result<u32, DiskError> {
        match req.kind {
            RequestKind::In => {
                self.transfer(mem, req)?;
                self.count_done(req.kind, req.data_len());
                // Bounded by the chain length, itself below 2^32 (virtio-queue checks).
                Ok(u32::try_from(req.data_len()).unwrap_or(u32::MAX))
            }
            RequestKind::Out => {
                if self.read_only {
                    return Err(DiskError::ReadOnly);
                }
                self.transfer(mem, req)?;
                self.count_done(req.kind, req.data_len());
                Ok(0)
            }
            RequestKind::Flush => {
                self.count_done(req.kind, 0);
                if self.read_only {
                    Ok(0)
                } else {
                    self.flush().map(|()| 0)
                }
            }
            RequestKind::GetId => {
                let mut id: &[u8] = &self.id;
                let mut written = 0u32;
                for d in &req.data {
                    // Counted in u32, as the used length is: the id is 20
                    // bytes, so the conversion never saturates.
                    let n = d.len.min(u32::try_from(id.len()).unwrap_or(u32::MAX));
                    let (head, rest) = id.split_at(n as usize);
                    mem.write_slice(head, d.addr)
                        .map_err(DiskError::GuestMemory)?;
                    id = rest;
                    written += n;
                }
                Ok(written)
            }
            RequestKind::Unsupported(t) => Err(DiskError::Unsupported(t)),
        }
    }

    /// Move a read's or write's data between the file and guest memory:
    /// one `preadv`/`pwritev` for the whole request (more only when the
    /// kernel moves less than asked), at the request's offset, never
    /// touching the shared file position.
    fn transfer(&self, mem: &GuestMemoryMmap, req: &Request) -> Result<(), DiskError> {
        let write = req.kind == RequestKind::Out;
        let mut iov = guest_iovecs(mem, req)?;
        let mut offset = req.sector << SECTOR_SHIFT;
        let mut first = 0;
        while first < iov.len() {
            let io = |source| DiskError::Io { offset, source };
            let at = libc::off_t::try_from(offset)
                .map_err(|_| io(io::Error::from(io::ErrorKind::InvalidInput)))?;
            let rest = &iov[first..];
            // At most IOV_MAX (1024) at a time; a request has at most 2 x
            // 256 (a buffer split where two memory regions meet).
            let count = libc::c_int::try_from(rest.len().min(1024)).unwrap_or(1024);
            // SAFETY: the iovecs name guest memory that `mem` keeps mapped
            // for the call (checked by `guest_iovecs`), writable for a read;
            // the kernel reads the iovec array itself, which outlives the
            // call, and the fd belongs to `self.file`.
            let n = unsafe {
                if write {
                    libc::pwritev(self.file.as_raw_fd(), rest.as_ptr(), count, at)
                } else {
                    libc::preadv(self.file.as_raw_fd(), rest.as_ptr(), count, at)
                }
            };
            let n = match usize::try_from(n) {
                Ok(0) => {
                    return Err(io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file ends before the request does",
                    )))
                }
                Ok(n) => n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(io(e));
                }
            };
            offset += n as u64;
            first += advance(&mut iov[first..], n);
        }
        Ok(())
    }
}

/// Drop the first `n` bytes from `iov`: returns how many iovecs are done
/// (the next one is shortened to what is left of it).
fn advance(iov: &mut [libc::iovec], mut n: usize) -> usize {
    let mut done = 0;
    for v in iov.iter_mut() {
        if n < v.iov_len {
            // SAFETY: n is less than the buffer's length, so the pointer
            // stays inside the buffer the iovec names.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        done += 1;
        if n == 0 {
            break;
        }
    }
    done
}

/// The iovecs of a read's or write's data buffers (checked by the parser
/// to lie in guest RAM): one per buffer, two where a buffer crosses from one
/// guest memory region to the next. A read's buffers are marked dirty for a
/// diff snapshot here, since the kernel, not vm-memory, writes them.
pub(super) fn guest_iovecs(
    mem: &GuestMemoryMmap,
    req: &Request,
) -> Result<Vec<libc::iovec>, DiskError> {
    let perm = if req.kind == RequestKind::In {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut out = Vec::with_capacity(req.data.len());
    for d in &req.data {
        for slice in mem
            .get_slices(d.addr, d.len as usize, perm)
            .map_err(DiskError::GuestMemory)?
        {
            let slice = slice.map_err(DiskError::GuestMemory)?;
            if req.kind == RequestKind::In {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(out)
}

/// flock the image: exclusive for read-write, shared for read-only, never waiting.
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), DiskError> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    // SAFETY: flock only reads its two integer arguments; the fd is owned by
    // `file` and open for the duration of the call.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(DiskError::Locked {
            path: path.to_owned(),
        })
    } else {
        Err(DiskError::Lock {
            path: path.to_owned(),
            source,
        })
    }
}

/// A stable serial for the image: its host device and inode, in hex, cut to
/// 20 bytes and NUL-padded.
fn serial(dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let s = format!("{ino:x}-{dev:x}");
    let mut id = [0u8; ID_BYTES];
    let n = s.len().min(ID_BYTES);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

/// The disk a device serves, shared with its worker; replaced whole when
/// the backing file is swapped (the worker picks the new one up at its next
/// batch, and the old file is closed when the last batch using it ends).
pub type SharedDisk = Arc<Mutex<Arc<Disk>>>;

/// The disk `disk` holds now.
pub fn current(disk: &SharedDisk) -> Arc<Disk> {
    disk.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::super::test_utils::TempImage;
    use super::*;
    use crate::devices::virtio::block::request::DataDesc;

    fn mem() -> GuestMemoryMmap {
        // Two regions, so one transfer can span a region boundary.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((i * 7 + 3) % 256).unwrap())
            .collect()
    }

    fn req(kind: RequestKind, sector: u64, data: &[(u64, u32)]) -> Request {
        Request {
            kind,
            sector,
            data: data
                .iter()
                .map(|&(a, len)| DataDesc {
                    addr: GuestAddress(a),
                    len,
                })
                .collect(),
            status: GuestAddress(0),
        }
    }

    #[test]
    fn capacity_rounds_down() {
        let img = TempImage::new(&[0u8; 4 * 512 + 100]);
        let disk = Disk::open(img.path(), true).unwrap();
        assert_eq!(disk.capacity_sectors(), 4);
        assert!(disk.read_only());
    }

    #[test]
    fn read_and_write_through_guest_memory() {
        let contents = pattern(8 * 512);
        let img = TempImage::new(&contents);
        let disk = Disk::open(img.path(), false).unwrap();
        let m = mem();

        // Read sectors 1..4 into two buffers, one straddling the region boundary.
        let n = disk
            .execute(
                &m,
                &req(RequestKind::In, 1, &[(0x100, 512), (0xff00, 1024)]),
            )
            .unwrap();
        assert_eq!(n, 1536);
        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(got, contents[512..1024]);
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0xff00)).unwrap();
        assert_eq!(got, contents[1024..2048]);
        let st = disk.stats();
        assert_eq!(st.read_count.load(Ordering::Relaxed), 1);
        assert_eq!(st.read_bytes.load(Ordering::Relaxed), 1536);
        // Another file in its place keeps counting on.
        let other = TempImage::new(&contents);
        let swapped = disk.reopen(other.path()).unwrap();
        swapped
            .execute(&m, &req(RequestKind::In, 0, &[(0x100, 512)]))
            .unwrap();
        assert_eq!(disk.stats().read_count.load(Ordering::Relaxed), 2);

        // Write two sectors at sector 6.
        m.write_slice(&[0xab; 1024], GuestAddress(0x8000)).unwrap();
        let n = disk
            .execute(&m, &req(RequestKind::Out, 6, &[(0x8000, 1024)]))
            .unwrap();
        assert_eq!(n, 0);
        disk.execute(&m, &req(RequestKind::Flush, 0, &[])).unwrap();
        let on_disk = std::fs::read(img.path()).unwrap();
        assert_eq!(on_disk[..6 * 512], contents[..6 * 512]);
        assert!(on_disk[6 * 512..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn read_only_refuses_writes() {
        let img = TempImage::new(&[0u8; 1024]);
        let disk = Disk::open(img.path(), true).unwrap();
        let m = mem();
        assert!(matches!(
            disk.execute(&m, &req(RequestKind::Out, 0, &[(0, 512)])),
            Err(DiskError::ReadOnly)
        ));
        assert!(disk.execute(&m, &req(RequestKind::Flush, 0, &[])).is_ok());
        assert!(disk
            .execute(&m, &req(RequestKind::In, 0, &[(0, 512)]))
            .is_ok());
    }

    #[test]
    fn get_id_truncates_to_the_buffer() {
        let img = TempImage::new(&[0u8; 512]);
        let disk = Disk::open(img.path(), false).unwrap();
        let m = mem();
        let n = disk
            .execute(&m, &req(RequestKind::GetId, 0, &[(0x200, 8), (0x300, 40)]))
            .unwrap();
        assert_eq!(n as usize, ID_BYTES);
        let mut a = [0u8; 8];
        let mut b = [0u8; 12];
        m.read_slice(&mut a, GuestAddress(0x200)).unwrap();
        m.read_slice(&mut b, GuestAddress(0x300)).unwrap();
        assert_eq!([&a[..], &b[..]].concat(), disk.id());
        let meta = std::fs::metadata(img.path()).unwrap();
        let expect = format!("{:x}-{:x}", meta.ino(), meta.dev());
        assert!(disk
            .id()
            .starts_with(&expect.as_bytes()[..expect.len().min(ID_BYTES)]));
    }

    #[test]
    fn serial_is_truncated_and_padded() {
        assert_eq!(&serial(0x803, 0x1234)[..11], b"1234-803\0\0\0");
        let long = serial(u64::MAX, u64::MAX);
        assert_eq!(&long, b"ffffffffffffffff-fff");
    }

    #[test]
    fn images_are_locked() {
        let img = TempImage::new(&[0u8; 512]);
        let rw = Disk::open(img.path(), false).unwrap();
        for ro in [false, true] {
            let e = Disk::open(img.path(), ro).unwrap_err();
            assert!(matches!(e, DiskError::Locked { .. }));
            assert!(e
                .to_string()
                .ends_with("is locked by another process (is another microvm using it?)"));
        }
        drop(rw);
        // Read-only opens share the lock, and keep writers out.
        let ro1 = Disk::open(img.path(), true).unwrap();
        let _ro2 = Disk::open(img.path(), true).unwrap();
        assert!(matches!(
            Disk::open(img.path(), false),
            Err(DiskError::Locked { .. })
        ));
        drop(ro1);
    }

    #[test]
    fn missing_file() {
        let e = Disk::open(Path::new("/nonexistent/microvm.img"), false).unwrap_err();
        assert!(matches!(e, DiskError::Open { .. }));
    }

    #[test]
    fn read_past_a_shrunk_file_is_an_error() {
        let img = TempImage::new(&[0u8; 2048]);
        let disk = Disk::open(img.path(), false).unwrap();
        // Someone truncates the image behind our back.
        std::fs::OpenOptions::new()
            .write(true)
            .open(img.path())
            .unwrap()
            .set_len(512)
            .unwrap();
        let m = mem();
        assert!(matches!(
            disk.execute(&m, &req(RequestKind::In, 2, &[(0, 512)])),
            Err(DiskError::Io { offset: 1024, .. })
        ));
    }
}
