//! What the fuzz targets share: a guest whose RAM and queue come from the
//! fuzzer's bytes.
//!
//! An input starts with a 4-byte [`QueueSetup`] header; the rest is copied
//! to guest address 0 of a small guest RAM, so descriptors, rings and
//! buffers are all the fuzzer's. The rings are packed right after each other
//! from address 0 (descriptor table, available ring, used ring), which puts
//! the interesting bytes early in an input.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub use microvm::memory::GuestMemoryMmap;

/// Guest RAM of every target: large enough for indirect tables longer than
/// any queue (4096 entries), small enough to map per input.
pub const MEM_SIZE: usize = 0x1_0000;

/// The input header: queue size and where the device's indices start.
#[derive(Clone, Copy, Debug)]
pub struct QueueSetup {
    /// 1 to 256, a power of two.
    pub size: u16,
    /// The device's next available (and next used) index.
    pub start_index: u16,
    /// A byte the target interprets (features, budget, ...).
    pub flags: u8,
}

impl QueueSetup {
    /// Bytes of the header.
    pub const LEN: usize = 4;

    /// Split `data` into the header and the guest RAM image.
    pub fn parse(data: &[u8]) -> Option<(Self, &[u8])> {
        let (head, image) = data.split_at_checked(Self::LEN)?;
        let setup = Self {
            size: 1 << (head[0] % 9),
            start_index: u16::from_le_bytes([head[1], head[2]]),
            flags: head[3],
        };
        Some((setup, image))
    }

    /// Descriptor table, available ring and used ring addresses.
    pub fn rings(&self) -> (u64, u64, u64) {
        let size = u64::from(self.size);
        let desc = 0;
        let avail = desc + 16 * size;
        // flags, idx, ring, used_event; the used ring is 4-byte aligned.
        let used = (avail + 6 + 2 * size + 3) & !3;
        (desc, avail, used)
    }

    /// A ready queue on those rings, as the transport would hand it over.
    pub fn queue(&self) -> Queue {
        let (desc, avail, used) = self.rings();
        let mut q = Queue::new(256).expect("256 is a valid queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_next_avail(self.start_index);
        q.set_next_used(self.start_index);
        q.set_ready(true);
        q
    }
}

/// Guest RAM of [`MEM_SIZE`] bytes holding `image` from address 0.
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("mapping the fuzz guest RAM");
    let n = image.len().min(MEM_SIZE);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("the image fits guest RAM");
    mem
}
