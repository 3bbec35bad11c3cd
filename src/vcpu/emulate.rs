//! Finishing instructions that an interpreting KVM cannot execute.
//!
//! On hosts whose KVM runs guest kernel mode through its instruction emulator
//! (see docs/ARCHITECTURE.md), a few instructions stop the vCPU with an
//! emulation failure. The vCPU state is consistent at that point, so the VMM
//! completes them itself: `int3`/`int n` by advancing RIP and injecting the
//! event, `fwait` by skipping it, `clac`/`stac` by editing RFLAGS.AC.
//! Nothing here runs on normal KVM.

// Guest-facing code: every narrowing or sign-changing `as` is a finding.
// Values from the guest go through `TryFrom` with an error path, widening
// through `From`; see src/narrow.rs for constants.
#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// What to do with the instruction at RIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixup {
    /// `int3`: advance RIP by 1 and inject #BP.
    Int3,
    /// `int n`: advance RIP by 2 and deliver vector n.
    IntN(u8),
    /// `fwait`: advance RIP by 1 (we never leave x87 exceptions pending).
    Fwait,
    /// `clac` (false) or `stac` (true): set RFLAGS.AC, advance RIP by 3.
    SetAc(bool),
}

impl Fixup {
    /// Instruction length.
    pub fn length(self) -> u64 {
        match self {
            Fixup::Int3 | Fixup::Fwait => 1,
            Fixup::IntN(_) => 2,
            Fixup::SetAc(_) => 3,
        }
    }

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Fixup::Int3 => "int3",
            Fixup::IntN(_) => "int n",
            Fixup::Fwait => "fwait",
            Fixup::SetAc(false) => "clac",
            Fixup::SetAc(true) => "stac",
        }
    }

    /// Log the first time each kind is finished by the VMM.
    pub fn log_once(self) {
        static SEEN: [AtomicBool; 5] = [
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
        ];
        let i = match self {
            Fixup::Int3 => 0,
            Fixup::IntN(_) => 1,
            Fixup::Fwait => 2,
            Fixup::SetAc(false) => 3,
            Fixup::SetAc(true) => 4,
        };
        if !SEEN[i].swap(true, Ordering::Relaxed) {
            log::info!(
                "KVM could not emulate `{}`; microvm finished it (logged once per kind)",
                self.name()
            );
        }
    }
}

/// Decode the instruction bytes at RIP.
pub fn decode(bytes: &[u8]) -> Option<Fixup> {
    match bytes {
        [0xcc, ..] => Some(Fixup::Int3),
        [0xcd, 3, ..] => Some(Fixup::Int3),
        [0xcd, n, ..] => Some(Fixup::IntN(*n)),
        [0x9b, ..] => Some(Fixup::Fwait),
        [0x0f, 0x01, 0xca, ..] => Some(Fixup::SetAc(false)),
        [0x0f, 0x01, 0xcb, ..] => Some(Fixup::SetAc(true)),
        _ => None,
    }
}

const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Translate a guest-virtual address with the guest's own page tables
/// (4- or 5-level long mode; identity when paging is off). Every table read
/// goes through guest memory bounds checks: a hostile CR3 yields `None`.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, gva: u64) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(gva);
    }
    if sregs.efer & EFER_LMA == 0 || sregs.cr4 & CR4_PAE == 0 {
        // 32-bit paging is never used by a 64-bit Linux kernel after entry.
        return None;
    }
    let levels: u32 = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let mut table = sregs.cr3 & ADDR_MASK;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let idx = (gva >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + idx * 8)).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        if (2..=3).contains(&level) && entry & PTE_LARGE != 0 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    Some(table | (gva & 0xfff))
}

/// Read up to `buf.len()` instruction bytes at `rip`, page by page.
pub fn fetch(mem: &GuestMemoryMmap, sregs: &kvm_sregs, rip: u64, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let va = rip.wrapping_add(n as u64);
        let Some(pa) = translate(mem, sregs, va) else {
            break;
        };
        let in_page = 0x1000 - (va & 0xfff) as usize;
        let want = in_page.min(buf.len() - n);
        if mem
            .read_slice(&mut buf[n..n + want], GuestAddress(pa))
            .is_err()
        {
            break;
        }
        n += want;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn decodes_known_instructions() {
        assert_eq!(decode(&[0xcc, 0x90]), Some(Fixup::Int3));
        assert_eq!(decode(&[0xcd, 0x80]), Some(Fixup::IntN(0x80)));
        assert_eq!(decode(&[0x9b]), Some(Fixup::Fwait));
        assert_eq!(decode(&[0x0f, 0x01, 0xca]), Some(Fixup::SetAc(false)));
        assert_eq!(decode(&[0x0f, 0x01, 0xcb]), Some(Fixup::SetAc(true)));
        assert_eq!(decode(&[0x0f, 0x01]), None);
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0xf3, 0x0f, 0xb8]), None); // popcnt: not ours to finish
        assert_eq!(Fixup::SetAc(true).length(), 3);
    }

    fn long_mode_sregs(cr3: u64) -> kvm_sregs {
        kvm_sregs {
            cr0: CR0_PG | 1,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            cr3,
            ..Default::default()
        }
    }

    #[test]
    fn walks_4k_and_2m_pages() {
        let mem = create_guest_memory(8).unwrap();
        // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000.
        let va: u64 = 0xffff_ffff_8100_0123;
        let i4 = (va >> 39) & 0x1ff;
        let i3 = (va >> 30) & 0x1ff;
        let i2 = (va >> 21) & 0x1ff;
        let i1 = (va >> 12) & 0x1ff;
        mem.write_obj(0x2003u64, GuestAddress(0x1000 + i4 * 8))
            .unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000 + i3 * 8))
            .unwrap();
        mem.write_obj(0x4003u64, GuestAddress(0x3000 + i2 * 8))
            .unwrap();
        mem.write_obj(0x5003u64, GuestAddress(0x4000 + i1 * 8))
            .unwrap();
        let s = long_mode_sregs(0x1000);
        assert_eq!(translate(&mem, &s, va), Some(0x5123));
        // Same walk, but a 2 MiB page at the PD level.
        mem.write_obj(0x60_0083u64, GuestAddress(0x3000 + i2 * 8))
            .unwrap();
        assert_eq!(translate(&mem, &s, va), Some(0x60_0123));
        // Not present.
        assert_eq!(translate(&mem, &s, va ^ (1 << 39)), None);
        // Hostile CR3 outside RAM.
        assert_eq!(
            translate(&mem, &long_mode_sregs(0xffff_0000_0000), va),
            None
        );
        // Paging off: identity.
        assert_eq!(translate(&mem, &kvm_sregs::default(), 0x1234), Some(0x1234));
    }

    #[test]
    fn fetch_stops_at_ram_end() {
        let mem = create_guest_memory(1).unwrap();
        mem.write_slice(&[0xcc], GuestAddress(0xf_ffff)).unwrap();
        let mut buf = [0u8; 4];
        let n = fetch(&mem, &kvm_sregs::default(), 0xf_ffff, &mut buf);
        assert_eq!(n, 1);
        assert_eq!(buf[0], 0xcc);
    }
}
