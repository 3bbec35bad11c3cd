//! Building and running a VM.
//!
//! [`Vmm::build`] (boot) and [`Vmm::restore`] build the VM as one list of
//! named steps ([`builder`]); [`Vmm::run`] starts the vCPU threads and
//! serves the event loop (vCPU stops, device activation, signals, the
//! timeout, API requests) until the VM ends, returned as an [`Outcome`].

mod builder;
mod controller;
pub mod device_manager;
pub mod event_loop;
mod snapshot;
pub mod terminal;
mod vm_state;

pub use controller::{Preboot, PrebootStep};
pub use snapshot::{RestoreError, RestoredPart, SnapshotStats};

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use crate::boot::{mptable, BootError};
use crate::config::{ConfigError, DeviceId, VmConfig};
use crate::devices::legacy::{ExitStatus, I8042};
use crate::devices::rtc::Cmos;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::console::ConsoleInput;
use crate::memory::{GuestMemoryMmap, MemoryError};
use crate::rpc::RunState;
use crate::snapshot::SnapshotError;
use crate::vcpu::regs::RegsError;
use crate::vcpu::thread::{VcpuControl, VcpuHandle, Wanted};
use crate::vcpu::{ExitCounters, Vcpu, VcpuStop};
use builder::host_err;
use device_manager::{DeviceManager, DeviceManagerError};
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
    /// The vsock device's host socket.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::MuxerError),
    /// Kernel command line too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Reading or writing a snapshot's files.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A restored VM could not take on its saved state.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The build was handed a configuration that was not resolved.
    #[error("{0} has no MAC address: the configuration was not resolved")]
    Unresolved(DeviceId),
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
                // The only part of it that varies is the user's (what
                // microvm adds is bounded): too long is the user's input.
                | VmmError::Cmdline(_)
        ) || matches!(self, VmmError::Net(e) if e.is_usage_error())
            || matches!(self, VmmError::Snapshot(e) if e.is_usage_error())
    }
}

/// How a snapshot is restored, besides its files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Run at once (else the VM starts paused, as Firecracker's default).
    pub resume: bool,
    /// Bounds the restored VM's run.
    pub timeout: Option<Duration>,
    /// NICs attached to other host devices: (iface_id, host_dev_name).
    pub net_overrides: Vec<(String, String)>,
    /// Log dirty pages from now on, for a diff snapshot of the restored VM.
    pub track_dirty_pages: bool,
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
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
    /// A NIC's backend process (passt) exited while the VM ran.
    BackendExited(String),
}

/// What the platform devices share with the VMM.
pub(crate) struct Platform {
    serial: Arc<Mutex<SerialDevice<crate::devices::stdout::StdoutSink>>>,
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
    /// Built from a snapshot: the guest's agent is told (clock, entropy).
    restored: bool,
}

/// How long a restored VM's agent gets to answer the resume notice.
const RESUME_NOTICE_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Takes host stdin bytes, says how many fit (see `serial::forward_stdin`).
type StdinSink = Box<dyn FnMut(&[u8]) -> usize + Send>;

/// The device host stdin feeds.
pub(crate) enum StdinTarget {
    /// The 16550 (`console=ttyS0`, also when `boot_args` ask for it).
    Serial,
    /// virtio-console's receive queue.
    Virtio(ConsoleInput),
    /// No console to type into.
    Nothing,
}

impl Vmm {
    /// Start the vCPU threads and serve the event loop until the VM ends.
    /// Every vCPU thread is joined before this returns.
    pub fn run(mut self) -> Result<Outcome, VmmError> {
        self.spawn_stdin()?;
        if self.restored {
            self.spawn_resume_notice()?;
        }

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
        self.flush_metrics();
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

    /// A restored guest runs on the clock and random state of the moment it
    /// was saved: tell its agent (vsock port 52, docs/AGENT.md) the host's
    /// time and give it host entropy, from a thread of its own so that the
    /// restore does not wait. It tries for [`RESUME_NOTICE_FOR`] (the agent
    /// answers once the vCPUs run); a guest without an agent only costs a
    /// log line.
    fn spawn_resume_notice(&self) -> Result<(), VmmError> {
        let Some(v) = &self.config.vsock else {
            return Ok(());
        };
        let target = crate::agent::Target::Vsock {
            path: v.uds_path.clone(),
            port: microvm_init::agent_proto::AGENT_PORT,
        };
        std::thread::Builder::new()
            .name("agent-resume".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::AgentNotice) {
                    log::error!("agent-resume: {}", crate::error_chain(&e));
                    return;
                }
                let end = Instant::now() + RESUME_NOTICE_FOR;
                loop {
                    match crate::agent::resumed(&target) {
                        Ok(()) => {
                            log::info!("agent: the guest's clock and entropy were refreshed");
                            return;
                        }
                        Err(e) if Instant::now() >= end => {
                            log::info!("agent: no resume notice ({})", crate::error_chain(&e));
                            return;
                        }
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
                    }
                }
            })
            .map_err(host_err("agent resume thread"))?;
        Ok(())
    }

    /// One metrics line (when a metrics file is set): the vCPUs' exits and
    /// every device's counters.
    pub(crate) fn flush_metrics(&self) {
        if !crate::metrics::configured() {
            return;
        }
        let mut sample = vec![("vcpu".to_string(), self.counters.metrics())];
        sample.extend(self.devices.metrics());
        crate::metrics::flush(&sample);
    }

    /// The event loop proper.
    fn serve(&mut self, vcpus: &[VcpuHandle]) -> Result<Outcome, VmmError> {
        let deadline = self.config.timeout.map(|t| Instant::now() + t);
        let metrics_every = crate::metrics::configured().then_some(crate::metrics::FLUSH_INTERVAL);
        let mut metrics_due = metrics_every.map(|i| Instant::now() + i);
        let mut state = if self.start_paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        loop {
            let wake = match (deadline, metrics_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            for ready in self.events.wait(wake)? {
                let event = match ready {
                    Ready::Timeout if deadline.is_some_and(|d| Instant::now() >= d) => {
                        return Ok(Outcome::Timeout(self.config.timeout.unwrap_or_default()))
                    }
                    Ready::Timeout => {
                        self.flush_metrics();
                        metrics_due = metrics_every.map(|i| Instant::now() + i);
                        continue;
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
                    VmEvent::Api(action, reply) => {
                        let resp = self.handle_action(&action, vcpus, &mut state);
                        // The client may have gone; nothing to do then.
                        let _ = reply.send(resp);
                    }
                }
            }
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
    // The thread says it runs (its name is set by then), so the API, which
    // is answered only after every vCPU is spawned, never reports Running
    // while /proc still shows an unnamed thread (Kata reads the names then).
    let (started, has_started) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        // Firecracker's name: Kata finds vCPU threads (for its cgroups) by
        // the `fc_vcpu` prefix.
        .name(format!("fc_vcpu {index}"))
        .spawn(move || {
            let _ = started.send(());
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
    if has_started.recv_timeout(Duration::from_secs(5)).is_err() {
        log::warn!("vcpu{index}: its thread did not start within 5 s");
    }
    Ok(VcpuHandle::new(index, control, thread, saved))
}
