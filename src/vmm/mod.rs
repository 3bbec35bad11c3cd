//! Building and running a VM.
//!
//! [`Vmm::new`] builds the VM as a list of numbered steps, each a small
//! function with its own error variant; [`Vmm::run`] starts the vCPUs and
//! waits for the first event that ends the VM, returned as an [`Outcome`].

pub mod device_manager;
pub mod host;
pub mod terminal;

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::loader::Cmdline;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, cmdline, mptable, BootError};
use crate::config::VmConfig;
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{BootTimer, ExitDevice, ExitStatus, I8042};
use crate::devices::serial::{ConsoleOutput, SerialDevice};
use crate::layout;
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::vcpu::regs::{self, RegsError};
use crate::vcpu::{cpuid, ExitCounters, Vcpu, VcpuStop};
use device_manager::{DeviceManager, DeviceManagerError};

/// Errors while building or starting the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
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
    Net(#[from] crate::devices::virtio::net::NetDeviceError),
    /// Bus layout.
    #[error("device layout")]
    Bus(#[from] BusError),
    /// Kernel command line too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
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
            VmmError::Boot(
                BootError::OpenKernel { .. }
                    | BootError::NotAKernel { .. }
                    | BootError::ReadInitrd { .. }
                    | BootError::InitrdTooBig { .. },
            ) | VmmError::Devices(DeviceManagerError::Block { .. })
        )
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

/// Something that ends the VM.
#[derive(Debug)]
enum VmEvent {
    /// The guest reset the machine through the i8042.
    Reset,
    /// A vCPU stopped.
    VcpuStopped(u8, VcpuStop),
    /// The process received a signal.
    Signal(i32),
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
}

/// A built VM, ready to run.
pub struct Vmm {
    config: VmConfig,
    _kvm: Kvm,
    _vm: VmFd,
    /// Guest RAM, mapped for as long as the VM exists.
    _mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice<std::io::Stdout>>>,
    devices: DeviceManager,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    exit_status: ExitStatus,
    guest_panicked: Arc<AtomicBool>,
    counters: Arc<ExitCounters>,
    process_start: Instant,
}

impl Vmm {
    /// Build the VM described by `config`. `process_start` anchors the boot timer.
    pub fn new(config: VmConfig, process_start: Instant) -> Result<Self, VmmError> {
        let build_start = Instant::now();

        // 1. KVM and the kind of host we are on.
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let emulated_kvm = host::kvm_is_emulated();
        if emulated_kvm {
            log::warn!(
                "this host's KVM interprets guest kernel code (kvm_pvm native mode): \
                 boot takes minutes; adding guest workarounds"
            );
        }

        // 2. Guest memory.
        let mem = memory::create_guest_memory(config.memory_mib)?;

        // 3. The VM with its in-kernel interrupt controllers and PIT.
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

        // 4. Memory slots.
        memory::register_with_kvm(&vm, &mem)?;

        // 5. Kernel and initrd.
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(p) => Some(boot::load_initrd(&mem, p)?),
            None => None,
        };

        // 6. Legacy devices.
        let (events_tx, events_rx) = mpsc::channel();
        let mut pio_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let guest_panicked = Arc::new(AtomicBool::new(false));
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("serial irqfd"))?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            ConsoleOutput::new(std::io::stdout(), guest_panicked.clone()),
        )));
        pio_bus.insert(
            serial.clone(),
            layout::SERIAL_PORT_BASE,
            layout::SERIAL_PORT_SIZE,
        )?;
        let reset_tx = events_tx.clone();
        pio_bus.insert(
            Arc::new(Mutex::new(I8042::new(move || {
                let _ = reset_tx.send(VmEvent::Reset);
            }))),
            layout::I8042_PORT_BASE,
            layout::I8042_PORT_SIZE,
        )?;
        pio_bus.insert(
            Arc::new(Mutex::new(crate::devices::rtc::Cmos::new())),
            layout::RTC_PORT_BASE,
            layout::RTC_PORT_SIZE,
        )?;
        let exit_status: ExitStatus = Arc::new(AtomicI32::new(-1));
        pio_bus.insert(
            Arc::new(Mutex::new(ExitDevice::new(exit_status.clone()))),
            layout::EXIT_PORT,
            layout::EXIT_PORT_SIZE,
        )?;
        mmio_bus.insert(
            Arc::new(Mutex::new(BootTimer::new(process_start, build_start))),
            layout::BOOT_TIMER_ADDR,
            layout::BOOT_TIMER_SIZE,
        )?;

        // 7. virtio devices; each adds its own `virtio_mmio.device=` entry.
        let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(VmmError::Cmdline)?;
        cl.insert_str(cmdline::base(emulated_kvm))
            .map_err(VmmError::Cmdline)?;
        let mut devices = DeviceManager::new();
        devices.attach_drives(&vm, &mut mmio_bus, &mem, &config.drives, &mut cl)?;
        for (index, net) in config.nets.iter().enumerate() {
            let dev = crate::devices::virtio::net::net_device(net, index)?;
            devices.attach_virtio(&vm, &mut mmio_bus, &mem, dev, &mut cl)?;
        }
        if let Some(ip) = crate::net::kernel_ip_arg(&config.nets) {
            cl.insert_str(ip).map_err(VmmError::Cmdline)?;
        }

        // 8. vCPU file descriptors (configured in step 10); on an interpreting
        // KVM the guest cannot calibrate its TSC against the PIT (the
        // interpreter skews every loop), so hand it the frequency KVM knows.
        let vcpu_fds = (0..config.cpus)
            .map(|i| {
                vm.create_vcpu(u64::from(i))
                    .map_err(kvm_err("create a vCPU"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if emulated_kvm {
            match vcpu_fds[0].get_tsc_khz() {
                Ok(khz) if khz > 0 => cl
                    .insert_str(cmdline::tsc_param(khz))
                    .map_err(VmmError::Cmdline)?,
                other => log::warn!("cannot read the TSC frequency from KVM: {other:?}"),
            }
        }

        // 9. The rest of the command line: root, command, then the user's own.
        if let Some(root) = config.drives.iter().find(|d| d.is_root) {
            cl.insert_str(cmdline::root_param(root.read_only))
                .map_err(VmmError::Cmdline)?;
        }
        if !config.command.is_empty() {
            cl.insert_str("quiet").map_err(VmmError::Cmdline)?;
            cl.insert_str(cmdline::command_param(&config.command))
                .map_err(VmmError::Cmdline)?;
        }
        if let Some(extra) = &config.cmdline_extra {
            cl.insert_str(extra).map_err(VmmError::Cmdline)?;
        }
        if let Ok(c) = cl.as_cstring() {
            log::debug!("kernel command line: {}", c.to_string_lossy());
        }

        // 10. Boot structures: MP table, page tables and GDT, boot_params.
        mptable::setup(&mem, config.cpus)?;
        regs::write_boot_tables(&mem)?;
        boot::configure_system(&mem, &kernel, &cl, initrd)?;

        // 11. vCPUs: CPUID, MSRs, FPU, LAPIC; registers of the boot vCPU.
        let pio_bus = Arc::new(pio_bus);
        let mmio_bus = Arc::new(mmio_bus);
        let counters = Arc::new(ExitCounters::default());
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for (index, fd) in (0..config.cpus).zip(vcpu_fds) {
            let mut c = supported.clone();
            cpuid::filter(&mut c, index, config.cpus);
            fd.set_cpuid2(&c).map_err(kvm_err("set CPUID"))?;
            regs::setup_common(&fd)?;
            if index == 0 {
                regs::setup_boot_vcpu(&fd, kernel.entry.0)?;
            }
            vcpus.push(Vcpu::new(
                fd,
                index,
                pio_bus.clone(),
                mmio_bus.clone(),
                mem.clone(),
                emulated_kvm,
                counters.clone(),
            ));
        }
        log::debug!("VM built in {:?}", build_start.elapsed());

        Ok(Self {
            config,
            _kvm: kvm,
            _vm: vm,
            _mem: mem,
            vcpus,
            serial,
            devices,
            events_tx,
            events_rx,
            exit_status,
            guest_panicked,
            counters,
            process_start,
        })
    }

    /// Start the vCPUs and wait until the VM ends.
    pub fn run(mut self) -> Result<Outcome, VmmError> {
        // Signals are taken by a dedicated thread with sigwait: block them here,
        // before any thread starts, so every thread inherits the mask.
        let signals = host::block_stop_signals().map_err(host_err("signal mask"))?;
        let sig_tx = self.events_tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = host::wait_signal(&signals) {
                    let _ = sig_tx.send(VmEvent::Signal(sig));
                }
            })
            .map_err(host_err("signal thread"))?;

        let serial = self.serial.clone();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || crate::devices::serial::forward_stdin(serial))
            .map_err(host_err("stdin thread"))?;

        for mut vcpu in self.vcpus.drain(..) {
            let tx = self.events_tx.clone();
            let index = vcpu.index();
            let t0 = (index == 0).then_some(self.process_start);
            std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let stop = vcpu.run(t0);
                    let _ = tx.send(VmEvent::VcpuStopped(index, stop));
                })
                .map_err(host_err("vCPU thread"))?;
        }

        let deadline = self.config.timeout.map(|t| (Instant::now() + t, t));
        let event = loop {
            let received = match deadline {
                Some((at, _)) => self
                    .events_rx
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
                None => self
                    .events_rx
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(ev) => break Some(ev),
                Err(RecvTimeoutError::Timeout) => break None,
                Err(RecvTimeoutError::Disconnected) => continue,
            }
        };
        let outcome = match event {
            None => Outcome::Timeout(deadline.map(|d| d.1).unwrap_or_default()),
            Some(VmEvent::Signal(s)) => Outcome::Signal(s),
            Some(VmEvent::Reset) | Some(VmEvent::VcpuStopped(_, VcpuStop::SystemEvent(_))) => {
                self.clean_stop_outcome()
            }
            Some(VmEvent::VcpuStopped(i, stop)) => {
                if self.guest_panicked.load(Ordering::SeqCst) {
                    Outcome::GuestCrash(format!("guest kernel panicked, then vcpu{i}: {stop}"))
                } else {
                    Outcome::GuestCrash(format!("vcpu{i}: {stop}"))
                }
            }
        };
        // Whatever ended the VM, what the guest wrote must reach the disk images.
        self.devices.flush_all();
        log::info!("{}", self.counters.summary());
        Ok(outcome)
    }

    fn clean_stop_outcome(&self) -> Outcome {
        if self.guest_panicked.load(Ordering::SeqCst) {
            return Outcome::GuestCrash(
                "guest kernel panicked (see the console output above)".into(),
            );
        }
        let st = self.exit_status.load(Ordering::SeqCst);
        match (st, self.config.command.is_empty()) {
            (s, _) if s >= 0 => Outcome::GuestExit(s as u8),
            (_, true) => Outcome::GuestExit(0),
            (_, false) => Outcome::NoExitStatus,
        }
    }
}
