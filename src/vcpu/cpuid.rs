//! CPUID presented to each vCPU: what KVM supports, with per-vCPU topology.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const EDX_HTT: u32 = 1 << 28;

/// Adjust KVM's supported CPUID for vCPU `index` of `count`: APIC IDs, the
/// hypervisor bit, and a topology of `count` single-threaded cores.
pub fn filter(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ecx |= ECX_HYPERVISOR;
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(index) << EBX_APIC_ID_SHIFT)
                    | (u32::from(count) << EBX_LOGICAL_COUNT_SHIFT);
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. Keep cache sharing bits as KVM gave them.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((u32::from(count) - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                entry.edx = u32::from(index);
                match entry.index {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 0x100;
                    }
                    // Core level: `count` cores.
                    1 => {
                        entry.eax = bits_for(count);
                        entry.ebx = u32::from(count);
                        entry.ecx = 0x200 | 1;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Number of APIC-ID bits needed to number `count` CPUs.
fn bits_for(count: u8) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (u32::from(count) - 1).leading_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_beef,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_counts() {
        let mut c =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(4, 0)]).unwrap();
        filter(&mut c, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xbeef);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2);
        assert_eq!(e[3].eax >> 26, 3);
    }

    #[test]
    fn bit_widths() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(8), 3);
    }
}
