//! A vCPU's architectural state for snapshots: what KVM holds for it,
//! read while the vCPU is parked and written back before its first
//! `KVM_RUN` in a restored VM.
//!
//! Reads happen on the vCPU's own thread as it parks (after a `KVM_RUN`
//! with `immediate_exit` set, so port and MMIO reads the guest was waiting
//! for are complete). The order of writes follows what KVM needs: CPUID
//! before anything that depends on it, special registers (APIC base) before
//! the LAPIC, the LAPIC before the MSRs (the TSC deadline timer only exists
//! in TSC-deadline mode), the TSC before the TSC deadline, and the pending
//! events last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_IA32_TSC_DEADLINE`: written after the TSC and the LAPIC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Most MSRs one vCPU state may carry (KVM reports about a hundred).
pub const MAX_MSRS: usize = 1024;

/// Errors reading or writing vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM: cannot {what} of vcpu{index}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The vCPU.
        index: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A list is longer than KVM takes.
    #[error("vcpu{index}: {what} has {len} entries, more than KVM takes")]
    TooLong {
        /// The list.
        what: &'static str,
        /// The vCPU.
        index: u8,
        /// Its length.
        len: usize,
    },
    /// KVM took only part of the MSRs.
    #[error("vcpu{index}: KVM accepted {set} of {len} MSRs; MSR {msr:#x} was refused")]
    Msrs {
        /// The vCPU.
        index: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        len: usize,
        /// The first one refused.
        msr: u32,
    },
}

/// Everything KVM keeps for one vCPU.
#[derive(Default, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lists for save and restore that it could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87, SSE and extended state.
    pub xsave: kvm_xsave,
    /// Extended control registers (`None` where the host has no XSAVE).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency in kHz.
    pub tsc_khz: u32,
    /// Wall-clock time the state was read (ns since the Unix epoch): the
    /// TSC went on counting after it while the VM stayed paused.
    pub read_at_unix_ns: u64,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        Self {
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            regs: self.regs,
            sregs: self.sregs,
            // The legacy 4 KiB area is all there is (no trailing XSAVE2 data).
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            debug_regs: self.debug_regs,
            lapic: self.lapic,
            mp_state: self.mp_state,
            events: self.events,
            tsc_khz: self.tsc_khz,
            read_at_unix_ns: self.read_at_unix_ns,
        }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

/// Read every MSR in `list` that KVM can read: one batch, and on a refusal
/// (KVM stops at the first MSR it cannot read) skip that one and go on.
fn read_msrs(fd: &VcpuFd, index: u8, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooLong {
            what: "the MSR list",
            index,
            len: entries.len(),
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Kvm {
                what: "read the MSRs",
                index,
                source,
            })?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
        if n >= rest.len() {
            break;
        }
        log::debug!("vcpu{index}: MSR {:#x} cannot be read; not saved", rest[n]);
        rest = &rest[n + 1..];
    }
    Ok(out)
}

impl VcpuState {
    /// Read the state of the parked vCPU `fd`; `msr_list` is what KVM
    /// reports for save and restore, `xcrs` whether the host has them.
    pub fn read(
        fd: &VcpuFd,
        index: u8,
        msr_list: &[u32],
        xcrs: bool,
    ) -> Result<Self, VcpuStateError> {
        let kvm = |what| {
            move |source| VcpuStateError::Kvm {
                what,
                index,
                source,
            }
        };
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("read the CPUID"))?
            .as_slice()
            .to_vec();
        // The MP state first: reading it makes KVM settle pending APIC events.
        let mp_state = fd.get_mp_state().map_err(kvm("read the MP state"))?;
        Ok(Self {
            cpuid,
            msrs: read_msrs(fd, index, msr_list)?,
            regs: fd.get_regs().map_err(kvm("read the registers"))?,
            sregs: fd.get_sregs().map_err(kvm("read the special registers"))?,
            xsave: fd.get_xsave().map_err(kvm("read the XSAVE area"))?,
            xcrs: if xcrs {
                Some(fd.get_xcrs().map_err(kvm("read the XCRs"))?)
            } else {
                None
            },
            debug_regs: fd
                .get_debug_regs()
                .map_err(kvm("read the debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm("read the LAPIC"))?,
            mp_state,
            events: fd
                .get_vcpu_events()
                .map_err(kvm("read the pending events"))?,
            tsc_khz: fd.get_tsc_khz().map_err(kvm("read the TSC frequency"))?,
            read_at_unix_ns: crate::host::unix_now_ns(),
        })
    }

    /// Move the guest's TSC `elapsed_ns` forward, as if it had kept
    /// counting while the VM was saved (its clocks then agree with the host's).
    pub fn advance_tsc(&mut self, elapsed_ns: u64) {
        let ticks = u128::from(elapsed_ns) * u128::from(self.tsc_khz) / 1_000_000;
        let ticks = u64::try_from(ticks).unwrap_or(u64::MAX);
        for m in &mut self.msrs {
            if m.index == MSR_IA32_TSC {
                m.data = m.data.wrapping_add(ticks);
            }
        }
    }

    /// The MSRs in the order KVM must see them: the TSC deadline after the TSC.
    fn msrs_in_order(&self) -> Vec<kvm_msr_entry> {
        let mut v: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .filter(|m| m.index != MSR_IA32_TSC_DEADLINE)
            .copied()
            .collect();
        v.extend(
            self.msrs
                .iter()
                .filter(|m| m.index == MSR_IA32_TSC_DEADLINE),
        );
        v
    }

    /// Write this state into the vCPU `fd`, which has not run yet.
    pub fn write(&self, fd: &VcpuFd, index: u8) -> Result<(), VcpuStateError> {
        let kvm = |what| {
            move |source| VcpuStateError::Kvm {
                what,
                index,
                source,
            }
        };
        let too_long = |what, len| VcpuStateError::TooLong { what, index, len };
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| too_long("the CPUID", self.cpuid.len()))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
        if self.tsc_khz != 0 {
            match fd.get_tsc_khz() {
                Ok(now) if now == self.tsc_khz => {}
                _ => fd
                    .set_tsc_khz(self.tsc_khz)
                    .map_err(kvm("set the saved TSC frequency"))?,
            }
        }
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm("set the registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set the special registers"))?;
        // SAFETY: `self.xsave` is a plain 4 KiB kvm_xsave; KVM_SET_XSAVE reads
        // exactly that much, no more (the size KVM_GET_XSAVE wrote).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set the XSAVE area"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm("set the XCRs"))?;
        }
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("set the debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("set the LAPIC"))?;
        let entries = self.msrs_in_order();
        if entries.len() > MAX_MSRS {
            return Err(too_long("the MSR list", entries.len()));
        }
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| too_long("the MSR list", entries.len()))?;
        let set = fd.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if set != entries.len() {
            return Err(VcpuStateError::Msrs {
                index,
                set,
                len: entries.len(),
                msr: entries.get(set).map_or(0, |m| m.index),
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("set the pending events"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    fn state_with(msrs: Vec<kvm_msr_entry>, tsc_khz: u32) -> VcpuState {
        VcpuState {
            cpuid: Vec::new(),
            msrs,
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: None,
            debug_regs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
            tsc_khz,
            read_at_unix_ns: 0,
        }
    }

    #[test]
    fn tsc_deadline_goes_after_the_tsc() {
        let s = state_with(
            vec![
                msr(MSR_IA32_TSC_DEADLINE, 5),
                msr(0x1b, 1),
                msr(MSR_IA32_TSC, 9),
            ],
            1,
        );
        let order: Vec<u32> = s.msrs_in_order().iter().map(|m| m.index).collect();
        assert_eq!(order, vec![0x1b, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]);
    }

    #[test]
    fn advancing_moves_only_the_tsc_by_the_frequency() {
        let mut s = state_with(vec![msr(MSR_IA32_TSC, 1000), msr(0x1b, 7)], 2_000_000);
        // 1.5 s at 2 GHz.
        s.advance_tsc(1_500_000_000);
        assert_eq!(s.msrs[0].data, 1000 + 3_000_000_000);
        assert_eq!(s.msrs[1].data, 7);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = state_with(vec![msr(MSR_IA32_TSC, 42)], 3_000_000);
        s.regs.rip = 0xffff_ffff_8100_0000;
        s.lapic.regs[0x20] = 7;
        let text = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.regs.rip, s.regs.rip);
        assert_eq!(back.lapic.regs[0x20], 7);
        assert_eq!(back.msrs[0].data, 42);
    }
}
