//! Building and running a VM.
//!
//! [`Vmm::new`] builds the VM as a list of named steps, each a small
//! function with its own error variant; [`Vmm::run`] starts the vCPU threads
//! and serves the event loop (vCPU stops, device activation, signals, the
//! timeout, API requests) until the VM ends, returned as an [`Outcome`].

pub mod device_manager;
pub mod event_loop;
mod runtime_api;
mod snapshot;

pub use snapshot::{SnapshotPaths, SnapshotStats};
pub mod terminal;

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::loader::Cmdline;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::LoadedKernel;
use crate::boot::{self, cmdline, mptable, BootError};
use crate::config::{ConfigError, ConsoleMode, VmConfig};
use crate::devices::legacy::{BootTimer, ExitDevice, ExitStatus, I8042};
use crate::devices::rtc::Cmos;
use crate::devices::serial::{ConsoleOutput, SerialDevice};
use crate::devices::virtio::console::{Console, ConsoleInput};
use crate::layout;
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::snapshot::{PlatformState, SnapshotError};
use crate::vcpu::regs::{self, RegsError};
use crate::vcpu::thread::{VcpuControl, VcpuHandle, Wanted};
use crate::vcpu::{cpuid, ExitCounters, Vcpu, VcpuStop};
use device_manager::{BusKind, DeviceManager, DeviceManagerError};
use event_loop::{EventLoop, EventLoopError, EventSender, Ready, VmEvent};

/// Errors while building or starting the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration breaks a rule.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The event loop.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// /dev/kvm missing or not accessible.
    #[error("cannot open /dev/kvm (is KVM enabled and do you have access to it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM VM-level ioctl failed.
    #[error("KVM: cannot {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or boot parameters.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// vCPU registers.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// virtio devices.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// virtio-net (TAP) setup.
    #[error(transparent)]
    Net(#[from] crate::net::HostNetError),
    /// Kernel command line too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Saving or restoring a snapshot.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(Box<crate::seccomp::SeccompError>),
    /// A host resource (eventfd, thread) could not be created.
    #[error("cannot create {what}")]
    Host {
        /// What was being created.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    /// True when the error is the user's input (bad kernel file, missing drive),
    /// not a failure of the VMM or the host.
    pub fn is_usage_error(&self) -> bool {
        matches!(
            self,
            VmmError::Config(_)
                | VmmError::Boot(
                    BootError::OpenKernel { .. }
                        | BootError::NotAKernel { .. }
                        | BootError::ReadInitrd { .. }
                        | BootError::InitrdTooBig { .. },
                )
                | VmmError::Devices(DeviceManagerError::Block { .. })
        ) || matches!(self, VmmError::Net(e) if e.is_usage_error())
            || matches!(self, VmmError::Snapshot(e) if e.is_usage_error())
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

/// `what` could not take on its saved state, for `reason`.
fn restore_err(what: impl Into<String>) -> impl FnOnce(String) -> VmmError {
    let what = what.into();
    move |reason| VmmError::Snapshot(SnapshotError::Restore { what, reason })
}

fn cmdline_err(e: linux_loader::cmdline::Error) -> VmmError {
    VmmError::Cmdline(e)
}

/// How the VM ended; `main` turns it into an exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest shut down cleanly; carries the status it reported through the
    /// exit device, or 0 when it reported none.
    GuestExit(u8),
    /// A command was asked for but the guest stopped without reporting its status.
    NoExitStatus,
    /// The guest crashed: kernel panic, triple fault, an instruction nobody could run.
    GuestCrash(String),
    /// `--timeout` elapsed.
    Timeout(Duration),
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// A NIC's backend process (passt) exited while the VM ran.
    BackendExited(String),
}

/// Whether the guest runs (for the API's instance info).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
}

/// What the platform devices share with the VMM.
struct Platform {
    serial: Arc<Mutex<SerialDevice<std::io::Stdout>>>,
    i8042: Arc<Mutex<I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    exit_status: ExitStatus,
    guest_panicked: Arc<AtomicBool>,
}

/// A built VM, ready to run.
pub struct Vmm {
    config: VmConfig,
    id: String,
    _kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    platform: Platform,
    devices: DeviceManager,
    events: Rc<EventLoop>,
    counters: Arc<ExitCounters>,
    process_start: Instant,
    /// Start with the vCPUs parked (a snapshot loaded with `resume_vm` false).
    start_paused: bool,
    /// The kernel command line the guest booted with (kept in snapshots).
    cmdline: String,
    /// Where host stdin goes: the guest's /dev/console.
    stdin_to: StdinTarget,
}

/// Takes host stdin bytes, says how many fit (see `serial::forward_stdin`).
type StdinSink = Box<dyn FnMut(&[u8]) -> usize + Send>;

/// The device host stdin feeds.
enum StdinTarget {
    /// The 16550 (`console=ttyS0`, also when `boot_args` ask for it).
    Serial,
    /// virtio-console's receive queue.
    Virtio(ConsoleInput),
    /// No console to type into.
    Nothing,
}

impl Vmm {
    /// Build the VM described by `config`. `process_start` anchors the boot timer.
    pub fn new(config: VmConfig, process_start: Instant) -> Result<Self, VmmError> {
        Self::build(
            config,
            process_start,
            Rc::new(EventLoop::new()?),
            String::new(),
        )
    }

    /// Build the VM, serving `events` (which may already carry an API) as
    /// the VM named `id`. Each step is a function below, in this order.
    pub fn build(
        mut config: VmConfig,
        process_start: Instant,
        events: Rc<EventLoop>,
        id: String,
    ) -> Result<Self, VmmError> {
        let build_start = Instant::now();
        config.validate()?;
        let (kvm, emulated_kvm) = open_kvm()?;
        let mem = memory::create_guest_memory(config.memory_mib)?;
        let vm = create_vm(&kvm)?;
        memory::register_with_kvm(&vm, &mem)?;
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(p) => Some(boot::load_initrd(&mem, p)?),
            None => None,
        };
        let (mut devices, platform) =
            new_devices(&vm, &events, (process_start, build_start), None)?;
        let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(cmdline_err)?;
        cl.insert_str(config_base_cmdline(&config, emulated_kvm))
            .map_err(cmdline_err)?;
        let console_input = attach_virtio_devices(
            &vm,
            &mem,
            &mut devices,
            &mut config,
            &platform,
            &mut cl,
            events.sender(),
        )?;
        let vcpu_fds = create_vcpu_fds(&vm, config.cpus)?;
        finish_cmdline(&config, emulated_kvm, &vcpu_fds, &mut cl)?;
        mptable::setup(&mem, config.cpus)?;
        regs::write_boot_tables(&mem)?;
        boot::configure_system(&mem, &kernel, &cl, initrd)?;
        let counters = Arc::new(ExitCounters::default());
        let vcpus = configure_vcpus(
            &kvm,
            vcpu_fds,
            &kernel,
            &devices,
            &mem,
            emulated_kvm,
            &counters,
        )?;
        let cmdline = cl
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stdin_to = stdin_target(&config, &cmdline, console_input);
        log::debug!("VM built in {:?}", build_start.elapsed());
        Ok(Self {
            config,
            id,
            _kvm: kvm,
            vm,
            mem,
            vcpus,
            platform,
            devices,
            events,
            counters,
            process_start,
            start_paused: false,
            cmdline,
            stdin_to,
        })
    }

    /// Start the vCPU threads and serve the event loop until the VM ends.
    /// Every vCPU thread is joined before this returns.
    pub fn run(mut self) -> Result<Outcome, VmmError> {
        self.spawn_stdin()?;

        crate::vcpu::thread::install_kick_handler().map_err(host_err("vCPU kick handler"))?;
        let mut handles = Vec::with_capacity(self.vcpus.len());
        let mut result = Ok(());
        for vcpu in self.vcpus.drain(..) {
            match spawn_vcpu(
                vcpu,
                self.events.sender(),
                self.process_start,
                self.start_paused,
            ) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // The main thread's own filter, once every thread it starts up front
        // runs (each installed its own): what is left is the event loop.
        let result = result.and_then(|()| {
            crate::seccomp::install(crate::seccomp::ThreadKind::Main)
                .map_err(|e| VmmError::Seccomp(Box::new(e)))
        });
        let outcome = match result {
            Ok(()) => self.serve(&handles),
            Err(e) => Err(e),
        };
        for h in handles {
            h.stop();
        }
        // Whatever ended the VM, what the guest wrote must reach the disk images.
        self.devices.flush_all();
        log::info!("{}", self.counters.summary());
        log::info!("{}", self.counters.by_address(16));
        outcome
    }

    /// Copy host stdin to the guest's console on a thread of its own: a
    /// blocking read of the host's stdin; the only thread not joined
    /// (nothing can interrupt the read), and it holds nothing that must be
    /// released.
    fn spawn_stdin(&self) -> Result<(), VmmError> {
        let mut enqueue: StdinSink = match &self.stdin_to {
            StdinTarget::Serial => Box::new(crate::devices::serial::uart_input(
                self.platform.serial.clone(),
            )),
            StdinTarget::Virtio(input) => {
                let input = input.clone();
                Box::new(move |b: &[u8]| input.enqueue(b))
            }
            StdinTarget::Nothing => return Ok(()),
        };
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Stdin) {
                    log::error!("stdin: {}", crate::error_chain(&e));
                    return;
                }
                crate::devices::serial::forward_stdin(&mut *enqueue)
            })
            .map_err(host_err("stdin thread"))?;
        Ok(())
    }

    /// The event loop proper.
    fn serve(&mut self, vcpus: &[VcpuHandle]) -> Result<Outcome, VmmError> {
        let deadline = self.config.timeout.map(|t| Instant::now() + t);
        let mut state = if self.start_paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        loop {
            for ready in self.events.wait(deadline)? {
                let event = match ready {
                    Ready::Timeout => {
                        return Ok(Outcome::Timeout(self.config.timeout.unwrap_or_default()))
                    }
                    Ready::Signal(s) => return Ok(Outcome::Signal(s)),
                    Ready::Activate => {
                        self.devices.activate_pending();
                        continue;
                    }
                    Ready::Event(e) => e,
                };
                match event {
                    VmEvent::Reset | VmEvent::VcpuStopped(_, VcpuStop::SystemEvent(_)) => {
                        return Ok(self.clean_stop_outcome())
                    }
                    VmEvent::VcpuStopped(_, VcpuStop::Requested) => {}
                    VmEvent::VcpuStopped(i, stop) => return Ok(self.crash_outcome(i, &stop)),
                    VmEvent::BackendExited(msg) => return Ok(Outcome::BackendExited(msg)),
                    VmEvent::Api(req, reply) => {
                        let resp = self.handle_api(req, vcpus, &mut state);
                        // The client may have gone; nothing to do then.
                        let _ = reply.send(resp);
                    }
                }
            }
        }
    }

    /// Park every vCPU (and wait until each is parked).
    fn pause_vcpus(vcpus: &[VcpuHandle]) -> Result<(), String> {
        for h in vcpus {
            h.request(Wanted::Pause);
        }
        for h in vcpus {
            if !h.wait_parked() {
                return Err(format!("vcpu{} did not stop in time", h.index()));
            }
        }
        Ok(())
    }

    /// Let every vCPU run again.
    fn resume_vcpus(vcpus: &[VcpuHandle]) {
        for h in vcpus {
            h.request(Wanted::Run);
        }
    }

    fn crash_outcome(&self, i: u8, stop: &VcpuStop) -> Outcome {
        if self.platform.guest_panicked.load(Ordering::SeqCst) {
            Outcome::GuestCrash(format!("guest kernel panicked, then vcpu{i}: {stop}"))
        } else {
            Outcome::GuestCrash(format!("vcpu{i}: {stop}"))
        }
    }

    fn clean_stop_outcome(&self) -> Outcome {
        if self.platform.guest_panicked.load(Ordering::SeqCst) {
            return Outcome::GuestCrash(
                "guest kernel panicked (see the console output above)".into(),
            );
        }
        let st = self.platform.exit_status.load(Ordering::SeqCst);
        match (st, self.config.command.is_empty()) {
            (s, _) if s >= 0 => Outcome::GuestExit(s as u8),
            (_, true) => Outcome::GuestExit(0),
            (_, false) => Outcome::NoExitStatus,
        }
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

/// A device manager whose transports activate through `events`, with the
/// platform devices attached (in their saved state when restoring).
fn new_devices(
    vm: &VmFd,
    events: &EventLoop,
    times: (Instant, Instant),
    saved: Option<&PlatformState>,
) -> Result<(DeviceManager, Platform), VmmError> {
    let mut devices = DeviceManager::with_activate_evt(
        events
            .activate_evt()
            .map_err(host_err("activate eventfd"))?,
    );
    let platform = attach_platform_devices(vm, &mut devices, events.sender(), times, saved)?;
    Ok((devices, platform))
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
    let out = ConsoleOutput::new(std::io::stdout(), guest_panicked.clone());
    let serial = Arc::new(Mutex::new(match saved {
        None => SerialDevice::new(serial_irq, out),
        Some(s) => SerialDevice::from_snapshot(serial_irq, out, &s.serial)
            .map_err(restore_err("the serial port"))?,
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
            kbd.restore(&s.i8042).map_err(restore_err("the i8042"))?;
            Cmos::from_snapshot(&s.cmos).map_err(restore_err("the CMOS"))?
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

/// Every virtio device, in the order a restore relies on: block devices
/// first (so the first drive is /dev/vda), then NICs, each appending its own
/// `virtio_mmio.device=` entry, then `ip=`, then the console. Returns the
/// virtio console's input, if there is one.
fn attach_virtio_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    devices: &mut DeviceManager,
    config: &mut VmConfig,
    platform: &Platform,
    cl: &mut Cmdline,
    events: EventSender,
) -> Result<Option<ConsoleInput>, VmmError> {
    devices.attach_drives(vm, mem, &config.drives, cl)?;
    for (index, net) in config.nets.iter_mut().enumerate() {
        let exit_events = events.clone();
        // Kept in the configuration: a snapshot restores the same address.
        let mac = *net
            .mac
            .get_or_insert_with(crate::net::MacAddr::random_local);
        let backend = crate::net::open_backend(
            net,
            index,
            mac,
            Box::new(move |msg| exit_events.send(VmEvent::BackendExited(msg))),
        )?;
        let dev = crate::devices::virtio::net::net_device(index, backend, mac);
        devices.attach_virtio(vm, mem, dev, cl)?;
    }
    if let Some(ip) = crate::net::kernel_ip_arg(&config.nets) {
        cl.insert_str(ip).map_err(cmdline_err)?;
    }
    attach_console(vm, mem, devices, config, platform, cl)
}

/// With `--console virtio`, the virtio-console (after every drive and NIC,
/// so their windows and IRQs do not move): guest output to stdout, scanned
/// for a kernel panic like the UART's; returns its input for host stdin.
fn attach_console(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    devices: &mut DeviceManager,
    config: &VmConfig,
    platform: &Platform,
    cl: &mut Cmdline,
) -> Result<Option<ConsoleInput>, VmmError> {
    if config.console != ConsoleMode::Virtio {
        return Ok(None);
    }
    let input = ConsoleInput::new().map_err(host_err("console input eventfd"))?;
    let out = ConsoleOutput::new(std::io::stdout(), platform.guest_panicked.clone());
    let dev = Console::new(Box::new(out), input.clone());
    devices.attach_virtio(vm, mem, Box::new(dev), cl)?;
    Ok(Some(input))
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
/// skews every loop), root, the guest command, then the user's own.
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
    kvm: &Kvm,
    vcpu_fds: Vec<VcpuFd>,
    kernel: &LoadedKernel,
    devices: &DeviceManager,
    mem: &GuestMemoryMmap,
    emulated_kvm: bool,
    counters: &Arc<ExitCounters>,
) -> Result<Vec<Vcpu>, VmmError> {
    let cpus = u8::try_from(vcpu_fds.len()).unwrap_or(u8::MAX);
    let parts = VcpuParts::new(kvm, devices, mem, emulated_kvm, counters);
    let supported = kvm
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
    fn new(
        kvm: &Kvm,
        devices: &DeviceManager,
        mem: &GuestMemoryMmap,
        emulated_kvm: bool,
        counters: &Arc<ExitCounters>,
    ) -> Self {
        Self {
            pio_bus: devices.pio_bus(),
            mmio_bus: devices.mmio_bus(),
            mem: mem.clone(),
            emulated_kvm,
            counters: counters.clone(),
            saving: state_saving(kvm),
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

/// Start the thread of one vCPU; it reports on `events` if it stops on its own.
fn spawn_vcpu(
    mut vcpu: Vcpu,
    events: EventSender,
    process_start: Instant,
    paused: bool,
) -> Result<VcpuHandle, VmmError> {
    let index = vcpu.index();
    let saved = vcpu.saved_state();
    let control = Arc::new(VcpuControl::default());
    if paused {
        control.request(Wanted::Pause);
    }
    let c = control.clone();
    let t0 = (index == 0).then_some(process_start);
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            // Before the first KVM_RUN: from then on the guest drives this thread.
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                c.set_gone();
                events.send(VmEvent::VcpuStopped(
                    index,
                    VcpuStop::RunError(crate::error_chain(&e)),
                ));
                return;
            }
            let stop = vcpu.run(&c, t0);
            c.set_gone();
            events.send(VmEvent::VcpuStopped(index, stop));
        })
        .map_err(host_err("vCPU thread"))?;
    Ok(VcpuHandle::new(index, control, thread, saved))
}
