//! Loading the guest kernel and initrd, and filling the Linux boot protocol
//! structures: `boot_params` ("zero page"), the e820 map and the command line.

// Guest-facing code: every narrowing or sign-changing `as` is a finding.
// Values from the guest go through `TryFrom` with an error path, widening
// through `From`; see src/narrow.rs for constants.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

pub mod cmdline;
pub mod mptable;

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile};

use crate::layout::{CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START};
use crate::memory::{low_ram_end, GuestMemoryMmap};
use crate::narrow;

/// Errors while loading the kernel and writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// Path given by the user.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a loadable x86_64 kernel (expected an ELF vmlinux or a bzImage): {elf}; {bzimage}")]
    NotAKernel {
        /// Path given by the user.
        path: String,
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: linux_loader::loader::Error,
    },
    /// Initrd file could not be read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// Path given by the user.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Initrd larger than the space left in guest RAM.
    #[error("initrd ({size} bytes) does not fit in guest memory; give the VM more --memory")]
    InitrdTooBig {
        /// Size of the initrd.
        size: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
    },
    /// More memory regions than the zero page's e820 table holds.
    #[error("guest memory map has {entries} entries; the boot protocol holds at most {max}")]
    E820Table {
        /// Entries in the map.
        entries: usize,
        /// Room in `boot_params.e820_table`.
        max: usize,
    },
    /// Command line could not be written.
    #[error("kernel command line")]
    Cmdline(#[source] linux_loader::loader::Error),
    /// boot_params could not be written.
    #[error("cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// E820 memory type for usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 memory type for reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// Where the loaded kernel starts executing and what the bzImage header said.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point (guest-physical).
    pub entry: GuestAddress,
    /// Setup header from a bzImage, to be copied into boot_params.
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Load a vmlinux (ELF) or bzImage into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::OpenKernel {
            path: path.display().to_string(),
            source,
        })
    };
    let mut file = open()?;
    let elf_err = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load,
                setup_header: None,
            })
        }
        Err(e) => e,
    };
    let mut file = open()?;
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.unchecked_add(0x200),
            setup_header: r.setup_header,
        }),
        Err(bz_err) => Err(BootError::NotAKernel {
            path: path.display().to_string(),
            elf: elf_err,
            bzimage: bz_err,
        }),
    }
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible in
/// low RAM (the kernel decompresses itself upwards from 16 MiB).
pub fn initrd_address(low_ram_end: u64, kernel_end_hint: u64, size: u64) -> Option<u64> {
    let top = low_ram_end.checked_sub(size)? & !0xfff;
    (top >= kernel_end_hint).then_some(top)
}

/// Copy the initrd file into guest memory.
pub fn load_initrd(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedInitrd, BootError> {
    let err = |source| BootError::ReadInitrd {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    // Keep the first 32 MiB for the kernel image and its decompression.
    let addr =
        initrd_address(low_ram_end(mem), 32 << 20, size).ok_or(BootError::InitrdTooBig { size })?;
    let mut slice = mem
        .get_slice(
            GuestAddress(addr),
            usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size })?,
        )
        .map_err(|_| BootError::InitrdTooBig { size })?;
    file.read_exact_volatile(&mut slice)
        .map_err(|_| BootError::GuestWrite { what: "initrd" })?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

/// The e820 map for guest RAM as (start, size, type).
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start < HIMEM_START {
            // Below 1 MiB: usable RAM up to the EBDA, where the MP table lives.
            map.push((start, EBDA_START.min(end) - start, E820_RAM));
            if end > HIMEM_START {
                map.push((HIMEM_START, end - HIMEM_START, E820_RAM));
            }
        } else {
            map.push((start, end - start, E820_RAM));
        }
    }
    // The MMIO gap holds devices; say so, so the kernel never uses it as RAM.
    map.push((
        MMIO_GAP_START,
        0x1_0000_0000 - MMIO_GAP_START,
        E820_RESERVED,
    ));
    map
}

/// Fill and write boot_params at [`ZERO_PAGE_START`], plus the command line.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(BootError::Cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|_| BootError::Cmdline(linux_loader::loader::Error::InvalidCommandLine))?
        .as_bytes()
        .len();

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = const { narrow::u32_of(CMDLINE_START) };
    params.hdr.cmdline_size = u32::try_from(cmdline_len)
        .map_err(|_| BootError::Cmdline(linux_loader::loader::Error::CommandLineOverflow))?;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        // The boot protocol's fields are 32-bit: the initrd lives below 4 GiB.
        let too_big = |_| BootError::InitrdTooBig { size: initrd.size };
        params.hdr.ramdisk_image = u32::try_from(initrd.addr.raw_value()).map_err(too_big)?;
        params.hdr.ramdisk_size = u32::try_from(initrd.size).map_err(too_big)?;
    }
    let map = e820_map(mem);
    let max = params.e820_table.len();
    params.e820_entries = u8::try_from(map.len())
        .ok()
        .filter(|&n| usize::from(n) <= max)
        .ok_or(BootError::E820Table {
            entries: map.len(),
            max,
        })?;
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }

    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn e820_small_guest() {
        let mem = create_guest_memory(128).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(map[2].2, E820_RESERVED);
        // No RAM entry overlaps the EBDA or the MMIO gap.
        for (a, s, t) in &map {
            if *t == E820_RAM {
                assert!(a + s <= EBDA_START || *a >= HIMEM_START);
                assert!(a + s <= MMIO_GAP_START || *a >= 0x1_0000_0000);
            }
        }
    }

    #[test]
    fn e820_guest_above_gap() {
        let mem = create_guest_memory(4096).unwrap();
        let map = e820_map(&mem);
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // All RAM but the hole between the EBDA and 1 MiB is usable.
        assert_eq!(ram, (4096 << 20) - (HIMEM_START - EBDA_START));
        assert!(map.iter().any(|e| e.0 == 0x1_0000_0000 && e.2 == E820_RAM));
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(
            initrd_address(128 << 20, 32 << 20, 0x1800),
            Some((128 << 20) - 0x2000)
        );
        assert_eq!(initrd_address(64 << 20, 32 << 20, 40 << 20), None);
        assert_eq!(initrd_address(1 << 20, 0, 2 << 20), None);
    }

    #[test]
    fn rejects_non_kernel() {
        let mem = create_guest_memory(32).unwrap();
        let dir = std::env::temp_dir().join(format!("microvm-notkernel-{}", std::process::id()));
        std::fs::write(&dir, b"definitely not a kernel").unwrap();
        let err = load_kernel(&mem, &dir).unwrap_err();
        std::fs::remove_file(&dir).ok();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
    }

    #[test]
    fn boot_params_written() {
        let mem = create_guest_memory(64).unwrap();
        let mut cl = Cmdline::new(256).unwrap();
        cl.insert_str("console=ttyS0").unwrap();
        let k = LoadedKernel {
            entry: GuestAddress(0x100_0000),
            setup_header: None,
        };
        configure_system(&mem, &k, &cl, None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!(u64::from(p.hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ p.hdr.cmdline_size }, 13);
        assert_eq!(p.e820_entries, 3);
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }
}
