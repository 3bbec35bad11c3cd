//! Intel MultiProcessor Specification 1.4 table, so the guest finds every vCPU,
//! the IOAPIC and the legacy IRQ routing without ACPI.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, IOAPIC_START, IRQ_MAX, MPTABLE_START};
use crate::memory::GuestMemoryMmap;
use crate::narrow;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// No CPUs, or more than the APIC ID space we hand out.
    #[error("cannot describe {0} CPUs in the MP table")]
    CpuCount(u8),
    /// The table does not fit in guest memory.
    #[error("MP table does not fit in guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MPC_CPU_SIZE: usize = 20;
const MPC_BUS_SIZE: usize = 8;
const MPC_IOAPIC_SIZE: usize = 8;
const MPC_INTSRC_SIZE: usize = 8;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;
/// Largest number of vCPUs whose APIC IDs fit below the IOAPIC's ID.
pub const MAX_SUPPORTED_CPUS: u8 = 254;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Build the MP floating pointer followed by the configuration table, as bytes
/// to be placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_SUPPORTED_CPUS {
        return Err(MpTableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let mut e = [0u8; MPC_CPU_SIZE];
        e[0] = MP_PROCESSOR;
        e[1] = cpu; // APIC ID, as set in CPUID by the vCPU setup
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        // CPU signature (family 6) and feature flags (FPU, APIC): informational.
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes());
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }

    let mut bus = [0u8; MPC_BUS_SIZE];
    bus[0] = MP_BUS;
    bus[1] = 0;
    bus[2..8].copy_from_slice(b"ISA   ");
    entries.extend_from_slice(&bus);
    count += 1;

    let mut ioapic = [0u8; MPC_IOAPIC_SIZE];
    ioapic[0] = MP_IOAPIC;
    ioapic[1] = ioapic_id;
    ioapic[2] = IOAPIC_VERSION;
    ioapic[3] = 1; // enabled
    ioapic[4..8].copy_from_slice(&const { narrow::u32_of(IOAPIC_START) }.to_le_bytes());
    entries.extend_from_slice(&ioapic);
    count += 1;

    // ISA IRQ n is wired to IOAPIC pin n, for every pin.
    for irq in 0..=const { narrow::u8_of(IRQ_MAX) } {
        let mut e = [0u8; MPC_INTSRC_SIZE];
        e[0] = MP_INTSRC;
        e[1] = MP_IRQ_SRC_INT;
        // irqflag 0: conforming polarity and trigger mode (ISA default: edge, active high)
        e[4] = 0; // source bus
        e[5] = irq;
        e[6] = ioapic_id;
        e[7] = irq;
        entries.extend_from_slice(&e);
        count += 1;
    }

    // LINT0 is ExtINT (the PIC), LINT1 is NMI, on every local APIC (dest 0xff).
    for (kind, lint) in [(MP_IRQ_SRC_EXTINT, 0u8), (MP_IRQ_SRC_NMI, 1u8)] {
        let mut e = [0u8; MPC_INTSRC_SIZE];
        e[0] = MP_LINTSRC;
        e[1] = kind;
        e[4] = 0;
        e[5] = 0;
        e[6] = 0xff;
        e[7] = lint;
        entries.extend_from_slice(&e);
        count += 1;
    }

    let table_len = MPC_HEADER_SIZE + entries.len();
    let mut table = vec![0u8; MPC_HEADER_SIZE];
    table[0..4].copy_from_slice(b"PCMP");
    // At most 254 CPUs, so a few KiB: refused like a CPU count it cannot hold.
    let table_len = u16::try_from(table_len).map_err(|_| MpTableError::CpuCount(num_cpus))?;
    table[4..6].copy_from_slice(&table_len.to_le_bytes());
    table[6] = 4; // spec revision 1.4
    table[8..16].copy_from_slice(b"MICROVM ");
    table[16..28].copy_from_slice(b"000000000000");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&const { narrow::u32_of(APIC_START) }.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = [0u8; MPF_SIZE];
    mpf[0..4].copy_from_slice(b"_MP_");
    let table_addr = base + MPF_SIZE as u64;
    // The floating pointer holds a 32-bit physical address.
    let table_addr32 = u32::try_from(table_addr).map_err(|_| {
        MpTableError::Write(vm_memory::GuestMemoryError::InvalidGuestAddress(
            GuestAddress(table_addr),
        ))
    })?;
    mpf[4..8].copy_from_slice(&table_addr32.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = 4; // spec revision 1.4
    mpf[10] = checksum(&mpf);

    let mut out = mpf.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

/// Write the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 8, 32] {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, cpus as usize + 1 + 1 + 24 + 2);
            // Walk the entries: processors first, exactly `cpus` of them, BSP first.
            let procs: Vec<&[u8]> = table[44..44 + cpus as usize * 20].chunks(20).collect();
            assert!(procs.iter().all(|p| p[0] == MP_PROCESSOR));
            assert_eq!(procs[0][3], CPU_ENABLED | CPU_BOOTPROCESSOR);
            assert!(procs[1..].iter().all(|p| p[3] == CPU_ENABLED));
            let pointer = u64::from(u32::from_le_bytes([t[4], t[5], t[6], t[7]]));
            assert_eq!(pointer, MPTABLE_START + 16);
        }
    }

    #[test]
    fn rejects_zero_cpus() {
        assert!(matches!(build(0, 0), Err(MpTableError::CpuCount(0))));
        assert!(build(255, 0).is_err());
    }

    #[test]
    fn fits_below_ram_end() {
        let mem = crate::memory::create_guest_memory(1).unwrap();
        let max = crate::config::MAX_CPUS;
        setup(&mem, max).unwrap();
        let t = build(max, MPTABLE_START).unwrap();
        assert!(
            MPTABLE_START + t.len() as u64 <= 0xA0000,
            "{} bytes",
            t.len()
        );
    }
}
