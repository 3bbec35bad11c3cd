//! The state KVM keeps for the VM as a whole (interrupt controllers, PIT,
//! KVM clock): read from a paused VM for a snapshot, written into a new VM
//! on restore. The file format of [`VmState`] is the snapshot module's; the
//! ioctls are here, beside the VM that owns them.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::builder::kvm_err;
use super::snapshot::{RestoreError, RestoredPart};
use super::VmmError;
use crate::host::unix_now_ns;
use crate::snapshot::VmState;

/// Read the state of the paused VM `vm`.
pub fn read(vm: &VmFd) -> Result<VmState, VmmError> {
    let chip = |id| -> Result<kvm_irqchip, VmmError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(kvm_err("read the interrupt controllers"))?;
        Ok(c)
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("read the PIT"))?,
        clock: vm.get_clock().map_err(kvm_err("read the KVM clock"))?,
        read_at_unix_ns: unix_now_ns(),
    })
}

/// Write the interrupt controllers and the PIT of `state` into the new VM `vm`.
pub fn write_devices(vm: &VmFd, state: &VmState) -> Result<(), VmmError> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(RestoreError::Part {
                part: RestoredPart::InterruptControllers,
                reason: format!("chip {} where chip {id} belongs", chip.chip_id),
            }
            .into());
        }
        vm.set_irqchip(chip)
            .map_err(kvm_err("set the interrupt controllers"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm_err("set the PIT"))
}

/// Set the KVM clock as far past the saved one as the wall clock moved
/// since it was read: the guest's clocks go on as if it had been paused
/// all along. Returns that time in ns.
pub fn write_clock(vm: &VmFd, state: &VmState) -> Result<u64, VmmError> {
    let elapsed_ns = unix_now_ns().saturating_sub(state.read_at_unix_ns);
    let clock = kvm_clock_data {
        clock: state.clock.clock.wrapping_add(elapsed_ns),
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("set the KVM clock"))?;
    Ok(elapsed_ns)
}
