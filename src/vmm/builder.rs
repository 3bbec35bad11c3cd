//! Building a VM: one list of steps for a boot and for a restore.
//!
//! Both start from a resolved [`VmConfig`] (taken by reference) and walk
//! the same steps; a restore replaces the boot-only ones (kernel, command
//! line, boot registers) with saved state:
//!
//! 1. open KVM; guest RAM (new, or the memory file mapped copy-on-write);
//!    the VM with its irqchip and PIT; RAM registered as memory slots;
//! 2. boot: load the kernel and initrd;
//! 3. the platform devices (UART, i8042, CMOS, exit port, boot timer), in
//!    their saved state on a restore;
//! 4. the virtio devices, walking [`VmConfig::virtio_devices`]: the one
//!    ordered list, so a device has the same window and IRQ at boot and at
//!    restore, and a snapshot names each by kind and id;
//! 5. boot: the command line, MP table, page tables, `boot_params`;
//!    restore: interrupt controllers and PIT, then each vCPU's state, then
//!    each transport's registers and queues (a device that was serving
//!    starts its worker, and may interrupt at once, after 3 and 4 so no
//!    interrupt is overwritten), then the KVM clock, moved on by the time
//!    the VM spent saved;
//! 6. vCPUs: boot registers or saved state, sharing [`VcpuParts`].

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::loader::Cmdline;
use vmm_sys_util::eventfd::EventFd;

use super::device_manager::{block_device, BusKind, DeviceManager};
use super::event_loop::{EventLoop, EventSender, VmEvent};
use super::snapshot::{check_disks, check_xsave_size, restore_part, RestoreError, RestoredPart};
use super::{vm_state, Platform, RestoreOptions, StdinTarget, Vmm, VmmError};
use crate::boot::{self, cmdline, mptable, LoadedKernel};
use crate::config::{ConsoleMode, DeviceId, DeviceKind, VmConfig};
use crate::devices::legacy::{BootTimer, ExitDevice, ExitStatus, I8042};
use crate::devices::rtc::Cmos;
use crate::devices::serial::{ConsoleOutput, SerialDevice};
use crate::devices::virtio::console::{Console, ConsoleInput};
use crate::devices::virtio::VirtioDevice;
use crate::layout;
use crate::memory::{self, GuestMemoryMmap};
use crate::snapshot::{self, PlatformState, Snapshot, SnapshotPaths};
use crate::vcpu::{cpuid, regs, ExitCounters, Vcpu};

pub(super) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

pub(super) fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

fn cmdline_err(e: linux_loader::cmdline::Error) -> VmmError {
    VmmError::Cmdline(e)
}

/// What the first steps make, for a boot and a restore alike.
struct Machine {
    kvm: Kvm,
    emulated_kvm: bool,
    vm: VmFd,
    mem: GuestMemoryMmap,
    devices: DeviceManager,
    platform: Platform,
    build_start: Instant,
}

impl Machine {
    /// Steps 1 and 3: KVM, the VM on `mem` (made by `memory`, once KVM is
    /// known to be there), the platform devices (in their `saved` state).
    fn new(
        memory: impl FnOnce() -> Result<GuestMemoryMmap, VmmError>,
        events: &EventLoop,
        process_start: Instant,
        saved: Option<&PlatformState>,
        track_dirty: bool,
    ) -> Result<Self, VmmError> {
        let build_start = Instant::now();
        let (kvm, emulated_kvm) = open_kvm()?;
        let mem = memory()?;
        let vm = create_vm(&kvm)?;
        memory::register_with_kvm(&vm, &mem, track_dirty)?;
        let mut devices = DeviceManager::with_activate_evt(
            events
                .activate_evt()
                .map_err(host_err("activate eventfd"))?,
        );
        let platform = attach_platform_devices(
            &vm,
            &mut devices,
            events.sender(),
            (process_start, build_start),
            saved,
        )?;
        Ok(Self {
            kvm,
            emulated_kvm,
            vm,
            mem,
            devices,
            platform,
            build_start,
        })
    }

    /// Step 4: every virtio device of `config`, in the list's order, each
    /// appending its `virtio_mmio.device=` to `cl`. Returns the virtio
    /// console's input, if there is one.
    fn attach_virtio_devices(
        &mut self,
        config: &VmConfig,
        cl: &mut Cmdline,
        events: &EventSender,
    ) -> Result<Option<ConsoleInput>, VmmError> {
        let mut console_input = None;
        for id in config.virtio_devices() {
            let device = match id.kind {
                DeviceKind::Block => block_device(config.drive(&id.id)?)?,
                DeviceKind::Net => net_device(config, &id, events)?,
                DeviceKind::Console => {
                    let (device, input) = console_device(&self.platform)?;
                    console_input = Some(input);
                    device
                }
                DeviceKind::Rng => Box::new(crate::devices::virtio::rng::Rng::with_rate_limit(
                    config.entropy_rate_limit,
                )),
                DeviceKind::Vsock => vsock_device(config)?,
            };
            self.devices
                .attach_virtio(&self.vm, &self.mem, id, device, cl)?;
        }
        Ok(console_input)
    }

    /// The built VM, its vCPUs configured.
    fn into_vmm(self, parts: VmmParts) -> Vmm {
        Vmm {
            config: parts.config,
            id: parts.id,
            _kvm: self.kvm,
            vm: self.vm,
            mem: self.mem,
            vcpus: parts.vcpus,
            platform: self.platform,
            devices: self.devices,
            events: parts.events,
            counters: parts.counters,
            process_start: parts.process_start,
            start_paused: parts.start_paused,
            cmdline: parts.cmdline,
            stdin_to: parts.stdin_to,
            restored: parts.restored,
        }
    }
}

/// What a build adds to a [`Machine`] to make a [`Vmm`].
struct VmmParts {
    config: VmConfig,
    id: String,
    vcpus: Vec<Vcpu>,
    events: Rc<EventLoop>,
    counters: Arc<ExitCounters>,
    process_start: Instant,
    start_paused: bool,
    cmdline: String,
    stdin_to: StdinTarget,
    restored: bool,
}

/// virtio-net for the NIC `id` of `config` (`ethN`, N its position), on the
/// backend its configuration names; a backend that exits ends the VM.
fn net_device(
    config: &VmConfig,
    id: &DeviceId,
    events: &EventSender,
) -> Result<Box<dyn VirtioDevice>, VmmError> {
    let (index, net) = config.net(&id.id)?;
    let mac = net.mac.ok_or_else(|| VmmError::Unresolved(id.clone()))?;
    let exit_events = events.clone();
    let backend = crate::net::open_backend(
        net,
        index,
        mac,
        Box::new(move |msg| exit_events.send(VmEvent::BackendExited(msg))),
    )?;
    Ok(crate::devices::virtio::net::net_device(
        index,
        backend,
        mac,
        [net.rx_rate_limit, net.tx_rate_limit],
    ))
}

/// virtio-vsock, its host socket listening from now on (before any vCPU runs).
fn vsock_device(config: &VmConfig) -> Result<Box<dyn VirtioDevice>, VmmError> {
    use crate::devices::virtio::vsock::{Listener, Vsock};
    let v = config
        .vsock
        .as_ref()
        .ok_or_else(|| crate::config::ConfigError::NoSuchDevice {
            what: "vsock device",
            id: crate::config::VSOCK_ID.into(),
        })?;
    let listener = Listener::bind(&v.uds_path)?;
    Ok(Box::new(Vsock::new(v.guest_cid, listener)))
}

/// The virtio-console: guest output to stdout, scanned for a kernel panic
/// like the UART's; its input is for host stdin.
fn console_device(platform: &Platform) -> Result<(Box<dyn VirtioDevice>, ConsoleInput), VmmError> {
    let input = ConsoleInput::new().map_err(host_err("console input eventfd"))?;
    let out = ConsoleOutput::new(
        crate::devices::stdout::sink(),
        platform.guest_panicked.clone(),
    );
    Ok((Box::new(Console::new(Box::new(out), input.clone())), input))
}

impl Vmm {
    /// Build the VM `config` describes, for a boot. `process_start` anchors
    /// the boot timer.
    pub fn new(config: &VmConfig, process_start: Instant) -> Result<Self, VmmError> {
        Self::build(
            config,
            process_start,
            Rc::new(EventLoop::new()?),
            String::new(),
        )
    }

    /// Build the VM `config` describes for a boot, serving `events` (which
    /// may already carry an API) as the VM named `id`.
    pub fn build(
        config: &VmConfig,
        process_start: Instant,
        events: Rc<EventLoop>,
        id: String,
    ) -> Result<Self, VmmError> {
        let config = config.resolved()?;
        let mut m = Machine::new(
            || Ok(memory::create_guest_memory(config.memory_mib)?),
            &events,
            process_start,
            None,
            config.track_dirty_pages,
        )?;
        let kernel = boot::load_kernel(&m.mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(p) => Some(boot::load_initrd(&m.mem, p)?),
            None => None,
        };
        let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(cmdline_err)?;
        cl.insert_str(config_base_cmdline(&config, m.emulated_kvm))
            .map_err(cmdline_err)?;
        let console_input = m.attach_virtio_devices(&config, &mut cl, &events.sender())?;
        let vcpu_fds = create_vcpu_fds(&m.vm, config.cpus)?;
        finish_cmdline(&config, m.emulated_kvm, &vcpu_fds, &mut cl)?;
        mptable::setup(&m.mem, config.cpus)?;
        regs::write_boot_tables(&m.mem)?;
        boot::configure_system(&m.mem, &kernel, &cl, initrd)?;
        let counters = Arc::new(ExitCounters::default());
        let vcpus = configure_vcpus(&m, vcpu_fds, &kernel, &counters)?;
        let cmdline = cl
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stdin_to = stdin_target(&config, &cmdline, console_input);
        log::debug!("VM built in {:?}", m.build_start.elapsed());
        Ok(m.into_vmm(VmmParts {
            config,
            id,
            vcpus,
            events,
            counters,
            process_start,
            start_paused: false,
            cmdline,
            stdin_to,
            restored: false,
        }))
    }

    /// Build the VM saved in `paths`, serving `events` as the VM named `id`;
    /// it starts running when [`Vmm::run`] is called, or parked unless
    /// `opts.resume`.
    pub fn restore(
        paths: &SnapshotPaths,
        opts: &RestoreOptions,
        process_start: Instant,
        events: Rc<EventLoop>,
        id: String,
    ) -> Result<Self, VmmError> {
        let resume = opts.resume;
        let snap = Snapshot::read(&paths.state)?;
        check_disks(&snap)?;
        let Snapshot {
            mut config,
            cmdline: saved_cmdline,
            memory: regions,
            vm: vm_state,
            mut vcpus,
            platform: saved_platform,
            virtio,
            ..
        } = snap;
        config.timeout = opts.timeout;
        // As in Firecracker: the restored VM logs dirty pages (for its
        // next diff snapshot) when the load asks, whatever the saved one did.
        config.track_dirty_pages = opts.track_dirty_pages;
        for (iface, dev) in &opts.net_overrides {
            config.override_net(iface, dev)?;
        }
        let mut m = Machine::new(
            || Ok(snapshot::map_memory(&paths.memory, &regions)?),
            &events,
            process_start,
            Some(&saved_platform),
            config.track_dirty_pages,
        )?;
        check_xsave_size(&m.vm).map_err(restore_part(RestoredPart::Vcpus))?;
        // The guest read its command line at boot; the entries the devices
        // add are not used again.
        let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(cmdline_err)?;
        let console_input = m.attach_virtio_devices(&config, &mut cl, &events.sender())?;
        let stdin_to = stdin_target(&config, &saved_cmdline, console_input);

        vm_state::write_devices(&m.vm, &vm_state)?;
        let vcpu_fds = create_vcpu_fds(&m.vm, config.cpus)?;
        let counters = Arc::new(ExitCounters::default());
        let parts = VcpuParts::new(&m, &counters);
        let mut restored = Vec::with_capacity(vcpu_fds.len());
        for ((index, fd), state) in (0u8..).zip(vcpu_fds).zip(&mut vcpus) {
            // From when the vCPU parked: its TSC kept counting while the
            // VM stayed paused before the snapshot, as the KVM clock did.
            state.advance_tsc(crate::host::unix_now_ns().saturating_sub(state.read_at_unix_ns));
            state
                .write(&fd, index)
                .map_err(|source| RestoreError::Vcpu { index, source })?;
            restored.push(parts.vcpu(fd, index));
        }
        // The snapshot's list was checked against the configuration's when
        // it was read: the same devices in the same order.
        for (d, saved) in m.devices.devices().iter().zip(&virtio) {
            d.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(&saved.transport)
                .map_err(restore_part(RestoredPart::Virtio(d.id.clone())))?;
        }
        let elapsed = vm_state::write_clock(&m.vm, &vm_state)?;
        for v in &restored {
            // Tells a guest using kvmclock that it was stopped, so that its
            // soft-lockup watchdog does not count the time saved; EINVAL
            // when the guest has no kvmclock page, which is fine.
            if let Err(e) = v.fd().kvmclock_ctrl() {
                log::debug!("vcpu{}: KVM_KVMCLOCK_CTRL: {e}", v.index());
            }
        }
        if !resume {
            m.devices.pause_all();
        }
        log::info!(
            "restored {} in {:?} ({} s after it was saved)",
            paths.state.display(),
            m.build_start.elapsed(),
            elapsed / 1_000_000_000
        );
        Ok(m.into_vmm(VmmParts {
            config,
            id,
            vcpus: restored,
            events,
            counters,
            process_start,
            start_paused: !resume,
            cmdline: saved_cmdline,
            stdin_to,
            restored: true,
        }))
    }
}

/// KVM, and whether this host's KVM interprets guest kernel code.
fn open_kvm() -> Result<(Kvm, bool), VmmError> {
    let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
    let emulated_kvm = crate::host::kvm_is_emulated();
    if emulated_kvm {
        log::warn!(
            "this host's KVM interprets guest kernel code (kvm_pvm native mode): \
             boot takes minutes; adding guest workarounds"
        );
    }
    Ok((kvm, emulated_kvm))
}

/// The VM with its TSS, identity map, in-kernel interrupt controllers and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("set the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    Ok(vm)
}

/// An eventfd registered as the irqfd of `irq`.
fn irqfd(vm: &VmFd, irq: u32, what: &'static str) -> Result<EventFd, VmmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err(what))?;
    vm.register_irqfd(&evt, irq)
        .map_err(kvm_err("register an irqfd"))?;
    Ok(evt)
}

/// UART, i8042, CMOS RTC, exit port and boot timer; in the state `saved`
/// describes when restoring a snapshot.
fn attach_platform_devices(
    vm: &VmFd,
    devices: &mut DeviceManager,
    events: EventSender,
    (process_start, build_start): (Instant, Instant),
    saved: Option<&PlatformState>,
) -> Result<Platform, VmmError> {
    let guest_panicked = Arc::new(AtomicBool::new(false));
    let serial_irq = irqfd(vm, layout::SERIAL_IRQ, "serial irqfd")?;
    let out = ConsoleOutput::new(crate::devices::stdout::sink(), guest_panicked.clone());
    let serial = Arc::new(Mutex::new(match saved {
        None => SerialDevice::new(serial_irq, out),
        Some(s) => SerialDevice::from_snapshot(serial_irq, out, &s.serial)
            .map_err(restore_part(RestoredPart::Serial))?,
    }));
    devices.attach_platform(
        BusKind::Pio,
        "the serial port",
        serial.clone(),
        layout::SERIAL_PORT_BASE,
        layout::SERIAL_PORT_SIZE,
    )?;
    let mut kbd = I8042::new(move || events.send(VmEvent::Reset)).with_kbd_irq(irqfd(
        vm,
        layout::KEYBOARD_IRQ,
        "i8042 irqfd",
    )?);
    let cmos = match saved {
        None => Cmos::new(),
        Some(s) => {
            kbd.restore(&s.i8042)
                .map_err(restore_part(RestoredPart::I8042))?;
            Cmos::from_snapshot(&s.cmos).map_err(restore_part(RestoredPart::Cmos))?
        }
    };
    let i8042 = Arc::new(Mutex::new(kbd));
    let cmos = Arc::new(Mutex::new(cmos));
    devices.attach_platform(
        BusKind::Pio,
        "the i8042",
        i8042.clone(),
        layout::I8042_PORT_BASE,
        layout::I8042_PORT_SIZE,
    )?;
    devices.attach_platform(
        BusKind::Pio,
        "the RTC",
        cmos.clone(),
        layout::RTC_PORT_BASE,
        layout::RTC_PORT_SIZE,
    )?;
    let exit_status: ExitStatus = Arc::new(AtomicI32::new(saved.map_or(-1, |s| s.exit_status)));
    devices.attach_platform(
        BusKind::Pio,
        "the exit port",
        Arc::new(Mutex::new(ExitDevice::new(exit_status.clone()))),
        layout::EXIT_PORT,
        layout::EXIT_PORT_SIZE,
    )?;
    devices.attach_platform(
        BusKind::Mmio,
        "the boot timer",
        Arc::new(Mutex::new(BootTimer::new(process_start, build_start))),
        layout::BOOT_TIMER_ADDR,
        layout::BOOT_TIMER_SIZE,
    )?;
    Ok(Platform {
        serial,
        i8042,
        cmos,
        exit_status,
        guest_panicked,
    })
}

/// Where the command line starts: microvm's defaults, or the user's
/// `boot_args` in their place; then this host's workarounds.
fn config_base_cmdline(config: &VmConfig, emulated_kvm: bool) -> String {
    match &config.boot_args {
        None => cmdline::base(emulated_kvm, config.console),
        Some(args) if emulated_kvm => format!("{args} {}", cmdline::EMULATED_KVM_CMDLINE),
        Some(args) => args.clone(),
    }
}

/// Where host stdin goes: the device of the last `console=`; without one
/// the kernel's own default, ttyS0 (`boot_args` without `console=`), unless
/// `--console none` left the guest no console at all.
fn stdin_target(config: &VmConfig, line: &str, input: Option<ConsoleInput>) -> StdinTarget {
    match (cmdline::last_console(line), input) {
        (Some(c), Some(input)) if c.starts_with("hvc") => StdinTarget::Virtio(input),
        (Some(c), None) if c.starts_with("hvc") => StdinTarget::Nothing,
        (None, _) if config.boot_args.is_none() && config.console == ConsoleMode::None => {
            StdinTarget::Nothing
        }
        _ => StdinTarget::Serial,
    }
}

/// One vCPU file descriptor per vCPU (configured in [`configure_vcpus`]).
fn create_vcpu_fds(vm: &VmFd, cpus: u8) -> Result<Vec<VcpuFd>, VmmError> {
    (0..cpus)
        .map(|i| {
            vm.create_vcpu(u64::from(i))
                .map_err(kvm_err("create a vCPU"))
        })
        .collect()
}

/// The rest of the command line: the TSC frequency on an interpreting KVM
/// (the guest cannot calibrate it against the PIT there: the interpreter
/// skews every loop), `ip=`, root, the guest command, then the user's own.
fn finish_cmdline(
    config: &VmConfig,
    emulated_kvm: bool,
    vcpu_fds: &[VcpuFd],
    cl: &mut Cmdline,
) -> Result<(), VmmError> {
    if emulated_kvm {
        match vcpu_fds.first().map(|fd| fd.get_tsc_khz()) {
            Some(Ok(khz)) if khz > 0 => cl
                .insert_str(cmdline::tsc_param(khz))
                .map_err(cmdline_err)?,
            other => log::warn!("cannot read the TSC frequency from KVM: {other:?}"),
        }
    }
    if let Some(ip) = crate::net::kernel_ip_arg(&config.nets) {
        cl.insert_str(ip).map_err(cmdline_err)?;
    }
    if let Some(root) = config.root_drive() {
        cl.insert_str(cmdline::root_param(root.read_only))
            .map_err(cmdline_err)?;
    }
    if !config.command.is_empty() {
        cl.insert_str("quiet").map_err(cmdline_err)?;
        cl.insert_str(cmdline::command_param(&config.command))
            .map_err(cmdline_err)?;
    }
    if let Some(extra) = &config.cmdline_extra {
        cl.insert_str(extra).map_err(cmdline_err)?;
    }
    if let Ok(c) = cl.as_cstring() {
        log::debug!("kernel command line: {}", c.to_string_lossy());
    }
    Ok(())
}

/// CPUID with per-vCPU APIC IDs, MSRs, FPU, LAPIC; registers of the boot vCPU.
fn configure_vcpus(
    m: &Machine,
    vcpu_fds: Vec<VcpuFd>,
    kernel: &LoadedKernel,
    counters: &Arc<ExitCounters>,
) -> Result<Vec<Vcpu>, VmmError> {
    let cpus = u8::try_from(vcpu_fds.len()).unwrap_or(u8::MAX);
    let parts = VcpuParts::new(m, counters);
    let supported = m
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read supported CPUID"))?;
    let mut vcpus = Vec::with_capacity(vcpu_fds.len());
    for (index, fd) in (0..cpus).zip(vcpu_fds) {
        let mut c = supported.clone();
        cpuid::filter(&mut c, index, cpus);
        fd.set_cpuid2(&c).map_err(kvm_err("set CPUID"))?;
        regs::setup_common(&fd)?;
        if index == 0 {
            regs::setup_boot_vcpu(&fd, kernel.entry.0)?;
        }
        vcpus.push(parts.vcpu(fd, index));
    }
    Ok(vcpus)
}

/// What every vCPU of a VM shares: the buses, guest memory, the exit
/// counters and what it records of itself when it parks.
struct VcpuParts {
    pio_bus: Arc<crate::devices::bus::Bus>,
    mmio_bus: Arc<crate::devices::bus::Bus>,
    mem: GuestMemoryMmap,
    emulated_kvm: bool,
    counters: Arc<ExitCounters>,
    saving: crate::vcpu::StateSaving,
}

impl VcpuParts {
    fn new(m: &Machine, counters: &Arc<ExitCounters>) -> Self {
        Self {
            pio_bus: m.devices.pio_bus(),
            mmio_bus: m.devices.mmio_bus(),
            mem: m.mem.clone(),
            emulated_kvm: m.emulated_kvm,
            counters: counters.clone(),
            saving: state_saving(&m.kvm),
        }
    }

    /// vCPU `index` on `fd`.
    fn vcpu(&self, fd: VcpuFd, index: u8) -> Vcpu {
        Vcpu::new(
            fd,
            index,
            self.pio_bus.clone(),
            self.mmio_bus.clone(),
            self.mem.clone(),
            self.emulated_kvm,
            self.counters.clone(),
        )
        .with_state_saving(self.saving.clone())
    }
}

/// What a parked vCPU reads of itself for a snapshot on this host.
fn state_saving(kvm: &Kvm) -> crate::vcpu::StateSaving {
    let msr_list = match kvm.get_msr_index_list() {
        Ok(l) => l.as_slice().to_vec(),
        Err(e) => {
            log::warn!("cannot read KVM's MSR list; snapshots will miss MSRs: {e}");
            Vec::new()
        }
    };
    crate::vcpu::StateSaving {
        msr_list: Arc::new(msr_list),
        xcrs: kvm.check_extension(kvm_ioctls::Cap::Xcrs),
    }
}
