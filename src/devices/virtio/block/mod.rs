//! virtio-blk: a block device backed by a regular file (or host block device).
//!
//! - [`request`]: a descriptor chain parsed into a typed [`request::Request`],
//!   checked against the disk size (pure, no I/O);
//! - [`disk`]: the file engine (open + lock, pread/pwrite straight into guest
//!   memory, fdatasync, serial);
//! - [`queue`]: the queue loop that ties both together, usable without KVM;
//! - `uring`: the io_uring engine of an `Async` drive (requests in flight
//!   while the worker serves on);
//! - [`device`]: the [`crate::devices::virtio::VirtioDevice`] (features, config
//!   space, activation, the backing file);
//! - `worker`: what the worker thread owns and does on each kick of the
//!   queue's ioeventfd.

pub mod device;
pub mod disk;
pub mod queue;
pub mod request;
mod uring;
mod worker;

pub use device::Block;
pub use disk::{Disk, DiskError};
pub use queue::{process_queue, process_queue_async_once, process_queue_limited};

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// log2 of the virtio-blk sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// virtio-blk sectors are always 512 bytes, whatever the block size.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (`seg_max`): a request uses a header and
/// a status descriptor besides its data, and must fit the queue.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment (`size_max`): bounds the work of one descriptor.
/// 64 KiB is Linux's own default segment size, so its requests (1.25 MiB
/// at most unless raised) lose nothing.
pub const SIZE_MAX: u32 = 64 << 10;
/// Most bytes one read or write may move, whatever the driver negotiated:
/// what `seg_max` segments of `size_max` hold (16,646,144 bytes). A
/// driver that did not accept the two features is bound by this alone.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Bytes one pass of the worker moves before it looks at its control
/// events again (pause, reset, stop): the Sync engine ends a pass after the
/// request that reaches it, the Async engine keeps at most this much in
/// flight. With [`MAX_REQUEST_BYTES`] a pass is under 48 MiB of copying,
/// milliseconds from the page cache, however many requests a kick brings.
pub const PASS_BYTES: u64 = 32 << 20;
/// Bytes in a `VIRTIO_BLK_T_GET_ID` answer.
pub const ID_BYTES: usize = 20;

/// Test helpers shared by the block tests and the device manager tests.
#[cfg(test)]
pub(crate) mod test_utils {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A file in the temp directory, removed on drop.
    pub struct TempImage {
        path: PathBuf,
    }

    impl TempImage {
        /// A new file holding `contents`.
        pub fn new(contents: &[u8]) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = std::env::temp_dir().join(format!(
                "microvm-blk-test-{}-{}-{nanos}.img",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(contents).unwrap();
            Self { path }
        }

        /// Where the file is.
        pub fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
