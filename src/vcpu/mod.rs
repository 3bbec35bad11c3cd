//! vCPU threads and the run loop.
//!
//! The loop is a small state machine: run the vCPU, hand each PIO/MMIO exit
//! to the bus, finish instructions an interpreting KVM cannot (only on such
//! hosts), and return a [`VcpuStop`] value when the vCPU cannot continue.
//! It never names a device address.

pub mod cpuid;
pub mod emulate;
pub mod regs;
pub mod state;
pub mod thread;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::Bus;
use crate::memory::GuestMemoryMmap;
use emulate::Fixup;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The guest asked for a system reset or shutdown through KVM.
    SystemEvent(u32),
    /// KVM could not emulate an instruction and neither could we.
    EmulationFailure(String),
    /// KVM reported an internal error other than emulation failure.
    InternalError(u32),
    /// VM entry failed (bad guest state).
    FailEntry(u64),
    /// KVM_RUN returned an error.
    RunError(String),
    /// The VMM asked the vCPU to stop.
    Requested,
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuStop::TripleFault => write!(f, "guest triple fault (the vCPU shut down)"),
            VcpuStop::SystemEvent(t) => write!(f, "guest system event {t}"),
            VcpuStop::EmulationFailure(s) => write!(f, "KVM emulation failure: {s}"),
            VcpuStop::InternalError(s) => write!(f, "KVM internal error, suberror {s}"),
            VcpuStop::FailEntry(r) => write!(f, "VM entry failed, hardware reason {r:#x}"),
            VcpuStop::RunError(e) => write!(f, "KVM_RUN failed: {e}"),
            VcpuStop::Requested => write!(f, "stopped by the VMM"),
        }
    }
}

/// Counts of `KVM_RUN` returns by reason, shared by all vCPUs.
#[derive(Default, Debug)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Instructions finished by the VMM.
    pub emulated: AtomicU64,
    /// Interrupted by a signal.
    pub intr: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
    /// Port-I/O and MMIO exits by (kind, address), for [`Self::by_address`].
    addresses: AddressCounts,
}

/// Distinct (kind, address) pairs [`AddressCounts`] tells apart; a VM
/// uses a few dozen. Exits at further ones are counted together.
const ADDRESS_SLOTS: usize = 128;

/// Exit counts by (kind, address), lock-free: a fixed open-addressing table
/// of atomics. It is updated on every exit, where a mutex and a map lookup
/// cost more than the byte of serial output the exit carries (measured:
/// under TCG that showed in the serial console's boot time).
#[derive(Debug)]
struct AddressCounts {
    /// Each slot: the pair's key (0: free) and its count.
    slots: Box<[(AtomicU64, AtomicU64)]>,
    /// Exits at pairs that found no free slot.
    overflow: AtomicU64,
}

impl Default for AddressCounts {
    fn default() -> Self {
        Self {
            slots: (0..ADDRESS_SLOTS)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            overflow: AtomicU64::new(0),
        }
    }
}

impl AddressCounts {
    /// Never 0; the kind in the low two bits. Addresses above 2^62 (none
    /// that KVM reports for port I/O or this VM's MMIO) share keys.
    fn key(kind: ExitKind, addr: u64) -> u64 {
        (addr << 2 | kind as u64).wrapping_add(1).max(1)
    }

    fn kind_addr(key: u64) -> (ExitKind, u64) {
        let k = key - 1;
        let kind = match k & 3 {
            0 => ExitKind::IoIn,
            1 => ExitKind::IoOut,
            2 => ExitKind::MmioRead,
            _ => ExitKind::MmioWrite,
        };
        (kind, k >> 2)
    }

    fn add(&self, kind: ExitKind, addr: u64) {
        let key = Self::key(kind, addr);
        // Fibonacci hashing onto the table.
        let start = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 57) as usize;
        for i in 0..ADDRESS_SLOTS {
            let (k, n) = &self.slots[(start + i) % ADDRESS_SLOTS];
            let mut cur = k.load(Ordering::Relaxed);
            if cur == 0 {
                cur = match k.compare_exchange(0, key, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => key,
                    Err(other) => other,
                };
            }
            if cur == key {
                n.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.overflow.fetch_add(1, Ordering::Relaxed);
    }

    /// (count, (kind, address)) of every pair seen.
    fn all(&self) -> Vec<(u64, (ExitKind, u64))> {
        self.slots
            .iter()
            .filter_map(|(k, n)| {
                let key = k.load(Ordering::Relaxed);
                (key != 0).then(|| (n.load(Ordering::Relaxed), Self::kind_addr(key)))
            })
            .collect()
    }
}

/// The kinds of exit [`ExitCounters::by_address`] tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitKind {
    /// `in`.
    IoIn,
    /// `out`.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
}

impl ExitCounters {
    /// Count one port-I/O or MMIO exit at `addr`.
    pub fn record(&self, kind: ExitKind, addr: u64) {
        let counter = match kind {
            ExitKind::IoIn => &self.io_in,
            ExitKind::IoOut => &self.io_out,
            ExitKind::MmioRead => &self.mmio_read,
            ExitKind::MmioWrite => &self.mmio_write,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.addresses.add(kind, addr);
    }

    /// The `top` addresses that cost the most exits, one line: what the
    /// benchmark's exit breakdown reads (`RUST_LOG=info`).
    pub fn by_address(&self, top: usize) -> String {
        let mut v = self.addresses.all();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let parts: Vec<String> = v
            .iter()
            .take(top)
            .map(|&(n, (kind, addr))| {
                let k = match kind {
                    ExitKind::IoIn => "in",
                    ExitKind::IoOut => "out",
                    ExitKind::MmioRead => "mmio_read",
                    ExitKind::MmioWrite => "mmio_write",
                };
                format!("{k}@{addr:#x}={n}")
            })
            .collect();
        let overflow = self.addresses.overflow.load(Ordering::Relaxed);
        let more = if overflow > 0 {
            format!(" (and {overflow} at further addresses)")
        } else {
            String::new()
        };
        format!("KVM exits by address: {}{more}", parts.join(" "))
    }

    /// The counters under Firecracker's `vcpu` metric names.
    pub fn metrics(&self) -> Vec<(&'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("exit_io_in", g(&self.io_in)),
            ("exit_io_out", g(&self.io_out)),
            ("exit_mmio_read", g(&self.mmio_read)),
            ("exit_mmio_write", g(&self.mmio_write)),
        ]
    }

    /// One line for logs and the benchmark.
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let total = g(&self.io_in)
            + g(&self.io_out)
            + g(&self.mmio_read)
            + g(&self.mmio_write)
            + g(&self.emulated)
            + g(&self.intr)
            + g(&self.other);
        format!(
            "KVM exits: total={total} io_in={} io_out={} mmio_read={} mmio_write={} vmm_emulated={} intr={} other={}",
            g(&self.io_in),
            g(&self.io_out),
            g(&self.mmio_read),
            g(&self.mmio_write),
            g(&self.emulated),
            g(&self.intr),
            g(&self.other)
        )
    }
}

/// What a parked vCPU recorded of itself, for a snapshot.
pub type SavedState = Arc<Mutex<Option<Result<state::VcpuState, String>>>>;

/// What a vCPU needs to record its state when it parks.
#[derive(Clone, Debug, Default)]
pub struct StateSaving {
    /// MSRs KVM lists for save and restore.
    pub msr_list: Arc<Vec<u32>>,
    /// The host has XCRs (XSAVE).
    pub xcrs: bool,
}

/// One vCPU with what its run loop needs.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    mem: GuestMemoryMmap,
    emulated_kvm: bool,
    counters: Arc<ExitCounters>,
    saving: StateSaving,
    saved: SavedState,
}

impl Vcpu {
    /// Wrap a configured vCPU.
    pub fn new(
        fd: VcpuFd,
        index: u8,
        pio_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        mem: GuestMemoryMmap,
        emulated_kvm: bool,
        counters: Arc<ExitCounters>,
    ) -> Self {
        Self {
            fd,
            index,
            pio_bus,
            mmio_bus,
            mem,
            emulated_kvm,
            counters,
            saving: StateSaving::default(),
            saved: SavedState::default(),
        }
    }

    /// Record the vCPU's state each time it parks for a pause, with what
    /// `saving` says to read.
    pub fn with_state_saving(mut self, saving: StateSaving) -> Self {
        self.saving = saving;
        self
    }

    /// Index of this vCPU (also its APIC ID).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Where the state recorded at the last pause goes.
    pub fn saved_state(&self) -> SavedState {
        self.saved.clone()
    }

    /// Park if asked to (recording the state first), false if asked to stop.
    fn may_run(&self, control: &thread::VcpuControl) -> bool {
        control.may_run_with(|| {
            let s = state::VcpuState::read(
                &self.fd,
                self.index,
                &self.saving.msr_list,
                self.saving.xcrs,
            )
            .map_err(|e| crate::error_chain(&e));
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        })
    }

    /// Run until the vCPU cannot continue or `control` asks it to stop;
    /// park while `control` asks for a pause. `process_start`, when given,
    /// is used to log the VMM's startup time at the first `KVM_RUN`.
    pub fn run(
        &mut self,
        control: &thread::VcpuControl,
        process_start: Option<std::time::Instant>,
    ) -> VcpuStop {
        thread::set_thread_kvm_run(self.fd.get_kvm_run());
        let stop = self.run_loop(control, process_start);
        thread::set_thread_kvm_run(std::ptr::null_mut());
        stop
    }

    fn run_loop(
        &mut self,
        control: &thread::VcpuControl,
        process_start: Option<std::time::Instant>,
    ) -> VcpuStop {
        let c = self.counters.clone();
        if !self.may_run(control) {
            return VcpuStop::Requested;
        }
        if let Some(t0) = process_start {
            log::info!(
                "VMM startup: {} us from process start to first KVM_RUN",
                t0.elapsed().as_micros()
            );
        }
        loop {
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        c.record(ExitKind::IoIn, u64::from(port));
                        if !self.pio_bus.read(u64::from(port), data) {
                            data.fill(0xff);
                            log::trace!("unhandled port read {port:#x}");
                        }
                    }
                    VcpuExit::IoOut(port, data) => {
                        c.record(ExitKind::IoOut, u64::from(port));
                        if !self.pio_bus.write(u64::from(port), data) {
                            log::trace!("unhandled port write {port:#x}");
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        c.record(ExitKind::MmioRead, addr);
                        if !self.mmio_bus.read(addr, data) {
                            data.fill(0xff);
                            log::debug!("unhandled MMIO read {addr:#x}");
                        }
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        c.record(ExitKind::MmioWrite, addr);
                        if !self.mmio_bus.write(addr, data) {
                            log::debug!("unhandled MMIO write {addr:#x}");
                        }
                    }
                    VcpuExit::Shutdown => return VcpuStop::TripleFault,
                    VcpuExit::SystemEvent(kind, _) => return VcpuStop::SystemEvent(kind),
                    VcpuExit::FailEntry(reason, _) => return VcpuStop::FailEntry(reason),
                    VcpuExit::InternalError => {
                        let run = self.fd.get_kvm_run();
                        // SAFETY: on KVM_EXIT_INTERNAL_ERROR the `internal` member of the
                        // kvm_run exit union is the one KVM filled; it is plain old data.
                        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                        if suberror != KVM_INTERNAL_ERROR_EMULATION || !self.emulated_kvm {
                            if suberror == KVM_INTERNAL_ERROR_EMULATION {
                                return VcpuStop::EmulationFailure(self.describe_rip());
                            }
                            return VcpuStop::InternalError(suberror);
                        }
                        c.emulated.fetch_add(1, Ordering::Relaxed);
                        if let Err(stop) = self.finish_instruction() {
                            return stop;
                        }
                    }
                    VcpuExit::Intr => {
                        c.intr.fetch_add(1, Ordering::Relaxed);
                        self.fd.set_kvm_immediate_exit(0);
                        if !self.may_run(control) {
                            return VcpuStop::Requested;
                        }
                    }
                    VcpuExit::Hlt => {
                        c.other.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        c.other.fetch_add(1, Ordering::Relaxed);
                        log::debug!("vcpu{}: ignoring exit {other:?}", self.index);
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    c.intr.fetch_add(1, Ordering::Relaxed);
                    // A kick: clear it first, so one that comes while we look
                    // at the request is not lost, then pause or stop if asked.
                    self.fd.set_kvm_immediate_exit(0);
                    if !self.may_run(control) {
                        return VcpuStop::Requested;
                    }
                }
                Err(e) => return VcpuStop::RunError(e.to_string()),
            }
        }
    }

    fn instruction_bytes(&self) -> Option<(u64, Vec<u8>)> {
        let regs = self.fd.get_regs().ok()?;
        let sregs = self.fd.get_sregs().ok()?;
        let mut buf = [0u8; 15];
        let n = emulate::fetch(
            &self.mem,
            &sregs,
            sregs.cs.base.wrapping_add(regs.rip),
            &mut buf,
        );
        Some((regs.rip, buf[..n].to_vec()))
    }

    fn describe_rip(&self) -> String {
        match self.instruction_bytes() {
            Some((rip, bytes)) => format!("at rip {rip:#x}, instruction bytes {bytes:02x?}"),
            None => "instruction unknown".to_string(),
        }
    }

    /// Finish the instruction at RIP that KVM's emulator refused.
    fn finish_instruction(&mut self) -> Result<(), VcpuStop> {
        let fail = |s: String| VcpuStop::EmulationFailure(s);
        let (rip, bytes) = self
            .instruction_bytes()
            .ok_or_else(|| fail("cannot read vCPU registers or instruction".into()))?;
        let Some(fix) = emulate::decode(&bytes) else {
            return Err(fail(format!(
                "at rip {rip:#x}, instruction bytes {bytes:02x?} (not one microvm can finish)"
            )));
        };
        fix.log_once();
        let kvm_err = |e: kvm_ioctls::Error| fail(format!("while finishing {}: {e}", fix.name()));
        let mut regs = self.fd.get_regs().map_err(kvm_err)?;
        regs.rip = regs.rip.wrapping_add(fix.length());
        match fix {
            Fixup::Fwait => {}
            Fixup::SetAc(on) => {
                const AC: u64 = 1 << 18;
                regs.rflags = if on {
                    regs.rflags | AC
                } else {
                    regs.rflags & !AC
                };
            }
            Fixup::Int3 | Fixup::IntN(_) => {
                let mut ev = self.fd.get_vcpu_events().map_err(kvm_err)?;
                let vector = match fix {
                    Fixup::IntN(n) => n,
                    _ => 3,
                };
                if vector < 32 {
                    ev.exception.injected = 1;
                    ev.exception.nr = vector;
                    ev.exception.has_error_code = 0;
                    ev.exception.error_code = 0;
                } else {
                    ev.interrupt.injected = 1;
                    ev.interrupt.nr = vector;
                    ev.interrupt.soft = 1;
                }
                self.fd.set_regs(&regs).map_err(kvm_err)?;
                return self.fd.set_vcpu_events(&ev).map_err(kvm_err);
            }
        }
        self.fd.set_regs(&regs).map_err(kvm_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_address_and_past_the_table_together() {
        let c = ExitCounters::default();
        for _ in 0..3 {
            c.record(ExitKind::IoOut, 0x3f8);
        }
        c.record(ExitKind::IoIn, 0x3f8);
        c.record(ExitKind::MmioWrite, 0xd000_0070);
        assert_eq!(
            c.by_address(2),
            "KVM exits by address: out@0x3f8=3 in@0x3f8=1"
        );
        assert!(c.by_address(16).ends_with("mmio_write@0xd0000070=1"));
        // More distinct addresses than slots: the rest in one figure.
        for port in 0..(ADDRESS_SLOTS as u64 + 10) {
            c.record(ExitKind::IoIn, 0x1000 + port);
        }
        assert!(c.by_address(1).ends_with("(and 13 at further addresses)"));
        assert_eq!(c.io_in.load(Ordering::Relaxed), ADDRESS_SLOTS as u64 + 11);
    }
}
