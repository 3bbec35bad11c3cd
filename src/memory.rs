//! Guest RAM: regions laid out around the 32-bit MMIO gap, and their KVM slots.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START, RAM_START};

/// The guest memory type used throughout the VMM. Each region carries a
/// bitmap of the pages the VMM itself wrote (device buffers, used rings):
/// KVM's dirty log sees only the guest's writes, and a diff snapshot needs
/// both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Granule of the dirty bitmaps (KVM's and ours).
pub const DIRTY_PAGE: usize = 4096;

/// Errors while creating or registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        /// Requested size.
        mib: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM cannot say which pages the guest wrote.
    #[error("cannot read KVM's dirty page log of memory slot {slot}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused a memory slot.
    #[error("cannot register guest memory slot {slot} with KVM")]
    SetSlot {
        /// Slot number.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The (start, size) pairs of guest RAM for `size` bytes, split around the MMIO gap.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let below_gap = MMIO_GAP_START - RAM_START;
    if size <= below_gap {
        vec![(GuestAddress(RAM_START), size as usize)]
    } else {
        vec![
            (GuestAddress(RAM_START), below_gap as usize),
            (GuestAddress(MMIO_GAP_END), (size - below_gap) as usize),
        ]
    }
}

/// Allocate `mib` MiB of anonymous guest RAM.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ram_regions(mib << 20);
    GuestMemoryMmap::from_ranges(&regions).map_err(|source| MemoryError::Allocate { mib, source })
}

/// Register every RAM region as a KVM memory slot; with `track_dirty`,
/// KVM logs the pages the guest writes ([`take_dirty_pages`]).
pub fn register_with_kvm(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    track_dirty: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = mem
            .get_host_address(region.start_addr())
            .expect("region start is inside guest memory") as u64;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: if track_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VMM keeps
        // alive for as long as the VM exists, and slots never overlap.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::SetSlot { slot, source })?;
    }
    Ok(())
}

/// Each region's pages written since the last call (or since the slots
/// were registered with tracking), one bit per [`DIRTY_PAGE`] in 64-bit
/// words: KVM's log of the guest's writes ORed with the VMM's own bitmap.
/// Both are cleared. Call with every vCPU and device worker parked.
pub fn take_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, MemoryError> {
    let mut out = take_vmm_dirty_pages(mem);
    for (slot, (region, bits)) in mem.iter().zip(out.iter_mut()).enumerate() {
        let slot = slot as u32;
        let kvm = vm
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        for (w, k) in bits.iter_mut().zip(kvm) {
            *w |= k;
        }
    }
    Ok(out)
}

/// [`take_dirty_pages`] of the VMM's own writes alone (what a device put in
/// guest memory through `vm-memory`), and the bitmaps cleared.
pub fn take_vmm_dirty_pages(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|region| {
            let pages = (region.len() as usize).div_ceil(DIRTY_PAGE);
            let ours: &AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
            let mut bits = vec![0u64; pages.div_ceil(64)];
            for page in (0..pages).filter(|&p| ours.is_bit_set(p)) {
                bits[page / 64] |= 1 << (page % 64);
            }
            ours.reset();
            bits
        })
        .collect()
}

/// Mark `dirty` (as [`take_dirty_pages`] gave it) dirty again in the VMM's
/// bitmaps: a diff snapshot that failed must not lose them for the next.
pub fn restore_dirty_pages(mem: &GuestMemoryMmap, dirty: &[Vec<u64>]) {
    use vm_memory::bitmap::Bitmap;
    for (region, bits) in mem.iter().zip(dirty) {
        for (w, word) in bits.iter().enumerate() {
            for b in (0..64).filter(|b| word & (1 << b) != 0) {
                vm_memory::MmapRegion::bitmap(region)
                    .mark_dirty((w * 64 + b) * DIRTY_PAGE, DIRTY_PAGE);
            }
        }
    }
}

/// Last address (exclusive) of guest RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region() {
        let r = ram_regions(128 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn guest_memory_allocates_and_reports_low_end() {
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(low_ram_end(&mem), 16 << 20);
    }
}
