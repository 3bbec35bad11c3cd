//! Every guest-physical address, size and interrupt number the VMM uses.
//!
//! Low memory follows the conventions of the Linux x86 boot protocol; the
//! 32-bit MMIO gap below 4 GiB holds our own devices and the APICs.

/// Start of guest RAM.
pub const RAM_START: u64 = 0;

/// The 32-bit MMIO gap: RAM never lives here, devices do.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;

/// Firecracker-compatible boot timer: the guest writes 123 to this byte.
pub const BOOT_TIMER_ADDR: u64 = 0xC000_0000;
/// Size of the boot timer register window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;

/// First virtio-mmio device window; the next ones follow every `VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_START: u64 = 0xD000_0000;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// IOAPIC registers (fixed by the in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Local APIC registers (fixed by the in-kernel irqchip).
pub const APIC_START: u64 = 0xFEE0_0000;

/// KVM's three-page TSS region, placed just below the 4 GiB boundary area.
pub const KVM_TSS_ADDR: u64 = 0xFFFB_D000;
/// KVM's identity map page for real-mode emulation (the page after the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xFFFB_C000;

/// GDT used for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT used for the 64-bit entry.
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack pointer handed to the kernel.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The Linux "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables: PML4, PDPT and one PD page per GiB.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xA000;
/// First page directory (4 consecutive pages map the first 4 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xB000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the kernel command line (the 6.1 x86 kernel accepts 2048 bytes).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the usable low memory below the EBDA.
pub const EBDA_START: u64 = 0x9FC00;
/// The MP table lives at the start of the EBDA, where the kernel scans for it.
pub const MPTABLE_START: u64 = EBDA_START;
/// Where the kernel image is loaded (the Linux x86 "HIMEM" start).
pub const HIMEM_START: u64 = 0x10_0000;

/// Legacy serial port COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Size of the COM1 register window.
pub const SERIAL_PORT_SIZE: u64 = 0x8;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// IRQ of the i8042 keyboard (the Ctrl-Alt-Del the API sends).
pub const KEYBOARD_IRQ: u32 = 1;

/// i8042 controller; a 0xFE write to 0x64 resets (reboots) the machine.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Size of the i8042 window (0x60..=0x64).
pub const I8042_PORT_SIZE: u64 = 0x5;

/// CMOS RTC index/data ports.
pub const RTC_PORT_BASE: u64 = 0x70;
/// Size of the CMOS window (0x70..=0x71).
pub const RTC_PORT_SIZE: u64 = 0x2;

/// Our exit device: the guest writes its command's exit status (one byte) here.
pub const EXIT_PORT: u64 = 0xf4;
/// Size of the exit device window.
pub const EXIT_PORT_SIZE: u64 = 0x1;

/// First IRQ handed to virtio devices.
pub const IRQ_VIRTIO_START: u32 = 5;
/// Last IRQ usable on the in-kernel IOAPIC (24 pins).
pub const IRQ_MAX: u32 = 23;
