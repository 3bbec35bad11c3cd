//! 64-bit entry state for the boot vCPU: identity page tables, GDT, segment
//! registers, control registers, general registers, FPU, MSRs and LAPIC LINTs.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

/// Errors while setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("cannot set {what}")]
    Kvm {
        /// Which register set.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Page tables or GDT did not fit in guest memory.
    #[error("cannot write {0} to guest memory")]
    GuestWrite(&'static str),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted only {0} of the boot MSRs")]
    Msrs(usize),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from flags, base and limit, in the CPU's scattered layout.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM view of the segment described by GDT entry `entry` at index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let flag = |shift: u32, bits: u64| ((entry >> shift) & bits) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            // Granularity bit: limit counts 4 KiB pages.
            if flag(55, 1) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: u16::from(index) * 8,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g: flag(55, 1),
        avl: flag(52, 1),
        unusable: u8::from(flag(47, 1) == 0),
        padding: 0,
    }
}

/// GDT used at entry: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Write GDT, IDT and identity page tables for the first 4 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|_| RegsError::GuestWrite("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::GuestWrite("IDT"))?;

    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories; each PD maps 1 GiB.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(|_| RegsError::GuestWrite("PML4"))?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + gib * 8))
            .map_err(|_| RegsError::GuestWrite("PDPT"))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))
                .map_err(|_| RegsError::GuestWrite("page directory"))?;
        }
    }
    Ok(())
}

/// Special registers for 64-bit entry, on top of what KVM reports.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Set every register the Linux 64-bit boot protocol expects.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    vcpu.set_sregs(&boot_sregs(sregs))
        .map_err(kvm("special registers"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("registers"))?;
    Ok(())
}

/// FPU in its reset state, MSRs the kernel expects, LAPIC LINT0=ExtINT, LINT1=NMI.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs(0))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if n != entries.len() {
        return Err(RegsError::Msrs(n));
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("LAPIC"))?;
    set_lint_modes(&mut lapic.regs);
    vcpu.set_lapic(&lapic).map_err(kvm("LAPIC"))?;
    Ok(())
}

fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    // MTRRs enabled, default type write-back.
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Program LVT LINT0 as ExtINT and LINT1 as NMI in a raw LAPIC register page.
pub fn set_lint_modes(regs: &mut [std::os::raw::c_char; 1024]) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let update = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    };
    update(regs, APIC_LVT0, APIC_MODE_EXTINT);
    update(regs, APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_decode() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!(tss.type_, 0xb);
        assert_eq!(tss.s, 0);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = create_guest_memory(16).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pdpt3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (4u64 << 30) - (2 << 20));
        assert_eq!(last & 0x83, 0x83);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.cr3, PML4_START);
    }

    #[test]
    fn lint_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x351] = 0x7f; // pre-existing mode bits are replaced
        set_lint_modes(&mut regs);
        assert_eq!(regs[0x351] as u8 & 0x7, 0x7);
        assert_eq!(regs[0x361] as u8 & 0x7, 0x4);
    }
}
