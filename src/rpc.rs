//! The contract between the control plane and the VMM (after Firecracker's
//! `rpc_interface.rs`): the API turns each HTTP request into a typed
//! [`VmmAction`], the VMM answers with [`VmmData`] or an [`ActionError`],
//! and only `src/api` knows HTTP and JSON. Neither side imports the other:
//! the API hands actions to an [`ActionSink`] (in `main`, the VMM's event
//! loop), and the VMM never renders an answer.
//!
//! [`RunState`] holds the one table of which action may run in which state
//! (not started, running, paused) and where each leads.

use std::path::PathBuf;
use std::sync::mpsc::Sender;

use crate::config::{DriveConfig, NetConfig, VmConfig};
use crate::snapshot::SnapshotPaths;

/// What the API asks of the VMM, checked for shape (and for what microvm
/// does not do at all) but not yet against the VM's state or the host. The
/// API's threads run under a seccomp filter that allows no file access:
/// checks that read the host (its memory size, a kernel file) are the
/// VMM's.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /machine-config`: vCPUs and MiB, their range not yet checked.
    PutMachineConfig {
        /// vCPUs.
        cpus: u64,
        /// Guest RAM in MiB.
        memory_mib: u64,
        /// Log dirty pages (for diff snapshots).
        track_dirty_pages: bool,
    },
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(DriveConfig),
    /// `PATCH /drives/{id}`: a new backing file, new limits, or both.
    PatchDrive {
        /// The drive.
        id: String,
        /// Its new backing file.
        path: Option<PathBuf>,
        /// Its new rate limiter.
        rate_limit: Option<crate::rate_limit::RateLimitConfig>,
    },
    /// `PATCH /network-interfaces/{id}`: new rate limiters.
    PatchNetworkInterface {
        /// The NIC.
        id: String,
        /// New limits on frames to the guest.
        rx: Option<crate::rate_limit::RateLimitConfig>,
        /// New limits on frames from it.
        tx: Option<crate::rate_limit::RateLimitConfig>,
    },
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetConfig),
    /// `PUT /entropy`: give the VM an entropy device, limited so.
    PutEntropy(crate::rate_limit::RateLimitConfig),
    /// `PUT /vsock`: give the VM a vsock device.
    PutVsock(crate::config::VsockConfig),
    /// `PUT /logger`: log as these settings say.
    PutLogger(crate::logger::LogSettings),
    /// `PUT /metrics`: write metrics lines to this file or FIFO.
    PutMetrics(std::path::PathBuf),
    /// `PUT /actions` InstanceStart.
    InstanceStart,
    /// `PUT /actions` SendCtrlAltDel.
    SendCtrlAltDel,
    /// `PUT /actions` FlushMetrics.
    FlushMetrics,
    /// `PATCH /vm` Paused.
    Pause,
    /// `PATCH /vm` Resumed.
    Resume,
    /// `PUT /snapshot/create`.
    CreateSnapshot {
        /// Where the two files go.
        paths: SnapshotPaths,
        /// Only the pages written since the last snapshot (`Diff`).
        diff: bool,
    },
    /// `PUT /snapshot/load`.
    LoadSnapshot {
        /// The snapshot's files.
        paths: SnapshotPaths,
        /// Run the VM once loaded (else it stays paused).
        resume: bool,
        /// NICs attached to other host devices: (iface_id, host_dev_name).
        net_overrides: Vec<(String, String)>,
        /// Log dirty pages in the restored VM (for its diff snapshots).
        track_dirty_pages: bool,
    },
}

/// The kernel, initrd and command line of `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSource {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line, replacing microvm's defaults.
    pub boot_args: Option<String>,
}

/// What the VMM answers.
#[derive(Clone, Debug)]
pub enum VmmData {
    /// Done; nothing to show (HTTP 204).
    Empty,
    /// `GET /`.
    InstanceInfo {
        /// The instance id.
        id: String,
        /// Where the VM stands.
        state: RunState,
    },
    /// `GET /version`: the VMM's version.
    Version,
    /// `GET /machine-config` and `GET /vm/config`: the configuration.
    Config(Box<VmConfig>),
}

/// Why an action was refused or failed; its message is the API's
/// `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// A pre-boot-only action after the VM started (Firecracker's wording).
    #[error("The requested operation is not supported after starting the microVM.")]
    NotAfterStart,
    /// `InstanceStart` on a started VM.
    #[error("the microVM is already running")]
    AlreadyRunning,
    /// Pause or resume before the VM exists.
    #[error("the microVM is not started: nothing to pause or resume")]
    NotStartedPause,
    /// A snapshot before the VM exists.
    #[error("the microVM is not started: nothing to snapshot")]
    NotStartedSnapshot,
    /// Ctrl-Alt-Del before the VM exists.
    #[error("the microVM is not running: SendCtrlAltDel needs a started VM")]
    NotStartedCtrlAltDel,
    /// A snapshot of a running VM.
    #[error("the microVM must be paused to create a snapshot")]
    NotPaused,
    /// The configuration the action would make is refused.
    #[error("{0}")]
    Config(String),
    /// `InstanceStart` failed; the VM can be configured again.
    #[error("cannot start the microVM: {0}")]
    Start(String),
    /// `PUT /snapshot/load` failed.
    #[error("cannot load the snapshot: {0}")]
    Load(String),
    /// The running VM could not do what was asked.
    #[error("{0}")]
    Failed(String),
}

/// An answer.
pub type ActionResult = Result<VmmData, ActionError>;

/// Where the API hands actions, with the channel for the answer. The API
/// waits a bounded time for it.
pub trait ActionSink: Send + Sync {
    /// Queue `action`; its answer goes to `reply`.
    fn submit(&self, action: VmmAction, reply: Sender<ActionResult>);
}

/// Where the VM stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Being configured: no VM yet.
    NotStarted,
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
}

impl RunState {
    /// Firecracker's name for the state (`GET /`).
    pub fn name(self) -> &'static str {
        match self {
            RunState::NotStarted => "Not started",
            RunState::Running => "Running",
            RunState::Paused => "Paused",
        }
    }

    /// Whether `action` may run now; the error says why not. The one
    /// table of the state machine.
    pub fn check(self, action: &VmmAction) -> Result<(), ActionError> {
        use RunState::{NotStarted, Paused, Running};
        use VmmAction as A;
        match (self, action) {
            (
                _,
                A::GetInstanceInfo
                | A::GetVersion
                | A::GetMachineConfig
                | A::GetVmConfig
                | A::FlushMetrics,
            ) => Ok(()),
            (
                NotStarted,
                A::PutMachineConfig { .. }
                | A::PutBootSource(_)
                | A::PutDrive(_)
                | A::PatchDrive { .. }
                | A::PatchNetworkInterface { .. }
                | A::PutNetworkInterface(_)
                | A::PutEntropy(_)
                | A::PutVsock(_)
                | A::PutLogger(_)
                | A::PutMetrics(_)
                | A::InstanceStart
                | A::LoadSnapshot { .. },
            ) => Ok(()),
            (NotStarted, A::Pause | A::Resume) => Err(ActionError::NotStartedPause),
            (NotStarted, A::CreateSnapshot { .. }) => Err(ActionError::NotStartedSnapshot),
            (NotStarted, A::SendCtrlAltDel) => Err(ActionError::NotStartedCtrlAltDel),
            (
                Running | Paused,
                A::PutMachineConfig { .. }
                | A::PutBootSource(_)
                | A::PutDrive(_)
                | A::PutNetworkInterface(_)
                | A::PutEntropy(_)
                | A::PutVsock(_)
                | A::PutLogger(_)
                | A::PutMetrics(_)
                | A::LoadSnapshot { .. },
            ) => Err(ActionError::NotAfterStart),
            (Running | Paused, A::InstanceStart) => Err(ActionError::AlreadyRunning),
            (
                Running | Paused,
                A::PatchDrive { .. }
                | A::PatchNetworkInterface { .. }
                | A::SendCtrlAltDel
                | A::Pause
                | A::Resume,
            ) => Ok(()),
            (Running, A::CreateSnapshot { .. }) => Err(ActionError::NotPaused),
            (Paused, A::CreateSnapshot { .. }) => Ok(()),
        }
    }

    /// Where a successful `action` leaves the VM.
    pub fn after(self, action: &VmmAction) -> RunState {
        match action {
            VmmAction::InstanceStart => RunState::Running,
            VmmAction::LoadSnapshot { resume: true, .. } => RunState::Running,
            VmmAction::LoadSnapshot { resume: false, .. } => RunState::Paused,
            VmmAction::Pause => RunState::Paused,
            VmmAction::Resume => RunState::Running,
            _ => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> SnapshotPaths {
        SnapshotPaths::in_dir(std::path::Path::new("/s"))
    }

    #[test]
    fn the_state_table_allows_and_refuses_as_firecracker() {
        use RunState::*;
        let snap = VmmAction::CreateSnapshot {
            paths: paths(),
            diff: false,
        };
        assert!(matches!(
            NotStarted.check(&VmmAction::Pause),
            Err(ActionError::NotStartedPause)
        ));
        assert!(matches!(Running.check(&snap), Err(ActionError::NotPaused)));
        assert!(Paused.check(&snap).is_ok());
        assert!(matches!(
            Running.check(&VmmAction::InstanceStart),
            Err(ActionError::AlreadyRunning)
        ));
        assert!(matches!(
            Paused.check(&VmmAction::PutDrive(DriveConfig::default())),
            Err(ActionError::NotAfterStart)
        ));
        for s in [NotStarted, Running, Paused] {
            assert!(s.check(&VmmAction::GetInstanceInfo).is_ok());
            assert!(s
                .check(&VmmAction::PatchDrive {
                    id: "a".into(),
                    path: None,
                    rate_limit: None,
                })
                .is_ok());
        }
        assert_eq!(Running.after(&VmmAction::Pause), Paused);
        assert_eq!(Paused.after(&VmmAction::Resume), Running);
        let load = |resume| VmmAction::LoadSnapshot {
            paths: paths(),
            resume,
            net_overrides: vec![],
            track_dirty_pages: false,
        };
        assert_eq!(NotStarted.after(&load(false)), Paused);
        assert_eq!(NotStarted.after(&load(true)), Running);
        assert_eq!(Running.after(&VmmAction::SendCtrlAltDel), Running);
        assert_eq!(
            ActionError::NotAfterStart.to_string(),
            "The requested operation is not supported after starting the microVM."
        );
    }
}
