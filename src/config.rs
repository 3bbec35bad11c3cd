//! Plain configuration structs with defaults, so tests can build VMs without
//! the CLI, and the one set of rules every source of configuration (command
//! line, `--config-file`, API) is checked against: [`VmConfig::validate`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use crate::net::NetConfig;

/// Guest memory when `--memory` is not given.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// vCPUs when `--cpus` is not given.
pub const DEFAULT_CPUS: u8 = 1;
/// Upper bound on vCPUs, Firecracker's: the guest kernel is built with
/// NR_CPUS=32, and the MP table for 32 (924 bytes) fits the 1 KiB below
/// 0xA0000 where it lives.
pub const MAX_CPUS: u8 = 32;

/// Smallest guest that boots Linux.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Everything needed to build and run one VM.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Guest kernel (vmlinux ELF or bzImage); empty until one is given.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended after ours.
    pub cmdline_extra: Option<String>,
    /// A command line that replaces microvm's defaults (the API's
    /// `boot_args`); the device, root and host-workaround entries are still
    /// added (see docs/API.md).
    pub boot_args: Option<String>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Block devices in order: the first becomes /dev/vda.
    pub drives: Vec<DriveConfig>,
    /// Network interfaces in order: eth0, eth1, ...
    pub nets: Vec<NetConfig>,
    /// Command to run in the guest instead of its default service (empty: none).
    pub command: Vec<String>,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
    /// Which device is the guest's console.
    pub console: ConsoleMode,
    /// A virtio-rng entropy device (`--entropy`, `PUT /entropy`).
    #[serde(default)]
    pub entropy: bool,
    /// The entropy device's rate limiter (bytes and requests).
    #[serde(default)]
    pub entropy_rate_limit: crate::rate_limit::RateLimitConfig,
    /// A virtio-vsock device (`--vsock`, `PUT /vsock`).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// KVM logs the pages the guest writes, so a snapshot can be a diff
    /// (Firecracker's `track_dirty_pages`).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// The guest's vsock device and its host side (Firecracker's hybrid form:
/// host connections arrive on a Unix socket).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more: 0-2 are reserved).
    pub guest_cid: u32,
    /// The Unix socket host clients connect to; guest connections to host
    /// port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// Longest `uds_path`: `_<port>` (up to 11 bytes) must still fit in a Unix
/// socket address (108 bytes with its NUL).
pub const MAX_VSOCK_PATH: usize = 107 - 11;

/// Which device is the guest's console (`--console`). The 16550 is on the
/// port-I/O bus in every mode, for `earlycon` or a `console=ttyS0` the
/// user asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsoleMode {
    /// virtio-console, `console=hvc0`: output in batches on a virtqueue.
    #[default]
    Virtio,
    /// The 16550 UART, `console=ttyS0`: two port-I/O exits per character.
    Serial,
    /// No console: no output; the exit status still arrives on port 0xf4.
    None,
}

impl FromStr for ConsoleMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "virtio" => Ok(Self::Virtio),
            "serial" => Ok(Self::Serial),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "unknown console '{s}': expected virtio, serial or none"
            )),
        }
    }
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline_extra: None,
            boot_args: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            drives: Vec::new(),
            nets: Vec::new(),
            command: Vec::new(),
            timeout: None,
            console: ConsoleMode::default(),
            entropy: false,
            entropy_rate_limit: Default::default(),
            vsock: None,
            track_dirty_pages: false,
        }
    }
}

/// Invalid configuration, whichever way it was given. Messages name the
/// setting, not a command-line flag, so the CLI and the API can share them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file the configuration names cannot be used.
    #[error("{what} '{path}': {reason}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// No kernel was given.
    #[error("no kernel image: a kernel path is required to boot")]
    NoKernel,
    /// Guest memory out of range.
    #[error("memory size {got} MiB is too small to boot Linux; use at least {MIN_MEMORY_MIB}")]
    MemoryTooSmall {
        /// Requested MiB.
        got: u64,
    },
    /// More memory than the host has.
    #[error("memory size {got} MiB is more than this host has ({host} MiB)")]
    MemoryTooLarge {
        /// Requested MiB.
        got: u64,
        /// Host RAM in MiB.
        host: u64,
    },
    /// vCPU count out of range.
    #[error("vCPU count must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u64),
    /// Timeout not a positive duration.
    #[error("timeout must be a positive number of seconds")]
    Timeout,
    /// Two drives claim to be the root device.
    #[error("drives '{0}' and '{1}' are both the root device; only one can be")]
    TwoRoots(String, String),
    /// Two drives or NICs share an id.
    #[error("{what} id '{id}' is used twice")]
    DuplicateId {
        /// "drive" or "network interface".
        what: &'static str,
        /// The id.
        id: String,
    },
    /// No drive or NIC has this id.
    #[error("no {what} with id '{id}'")]
    NoSuchDevice {
        /// "drive" or "network interface".
        what: &'static str,
        /// The id.
        id: String,
    },
    /// The command line the user gave does not fit the kernel's.
    #[error("kernel command line: {got} bytes given, the kernel takes at most {max} in all")]
    CmdlineTooLong {
        /// Bytes of `cmdline_extra` and `boot_args`.
        got: usize,
        /// The kernel's limit (what microvm adds counts too).
        max: usize,
    },
    /// A `network_overrides` entry that cannot apply.
    #[error("network override for '{id}': {reason}")]
    NetOverride {
        /// The interface.
        id: String,
        /// Why not.
        reason: String,
    },
    /// A root filesystem of 0 bytes.
    #[error("root filesystem '{0}' is empty: an empty file cannot hold a filesystem")]
    EmptyRoot(String),
    /// A guest command without a root filesystem to run it.
    #[error("a guest command needs a root filesystem drive (--rootfs): its init runs the command")]
    CommandWithoutRoot,
    /// A vsock setting that cannot work.
    #[error("vsock: {0}")]
    Vsock(String),
}

/// `cid=N,uds=PATH` (the `--vsock` flag), in either order.
impl FromStr for VsockConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) => {
                    cid =
                        Some(v.parse::<u32>().map_err(|_| {
                            format!("cid '{v}' is not a number from 3 to {}", u32::MAX)
                        })?)
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => return Err(format!("'{part}': expected cid=N and uds=PATH")),
            }
        }
        match (cid, uds) {
            (Some(guest_cid), Some(uds_path)) => Ok(Self {
                guest_cid,
                uds_path,
            }),
            _ => Err("expected cid=N,uds=PATH".into()),
        }
    }
}

impl VsockConfig {
    /// Whether the guest can have this context id and the host this socket.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 {
            return Err(ConfigError::Vsock(format!(
                "guest_cid {} is reserved (0-2 are the hypervisor, local and host addresses): use 3 or more",
                self.guest_cid
            )));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 {
            return Err(ConfigError::Vsock("uds_path is empty".into()));
        }
        if len > MAX_VSOCK_PATH {
            return Err(ConfigError::Vsock(format!(
                "uds_path is {len} bytes; a Unix socket path with its '_<port>' suffix must fit in 107, so at most {MAX_VSOCK_PATH}"
            )));
        }
        match self.uds_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                Err(ConfigError::Vsock(format!(
                    "uds_path {}: no directory {}",
                    self.uds_path.display(),
                    dir.display()
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Check that `path` is a regular file this process can open.
pub fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(())
}

impl VmConfig {
    /// Every rule that can be checked without KVM. The command line, the
    /// config file and the API all end here, so a rule and its message exist once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        Self::validate_machine(self.cpus.into(), self.memory_mib)?;
        if let Some(t) = self.timeout {
            if t.is_zero() {
                return Err(ConfigError::Timeout);
            }
        }
        let mut root: Option<&DriveConfig> = None;
        for (i, d) in self.drives.iter().enumerate() {
            check_file(
                if d.is_root {
                    "root filesystem"
                } else {
                    "drive"
                },
                &d.path,
            )?;
            if self.drives[..i]
                .iter()
                .any(|o| !d.id.is_empty() && o.id == d.id)
            {
                return Err(ConfigError::DuplicateId {
                    what: "drive",
                    id: d.id.clone(),
                });
            }
            if d.is_root {
                if let Some(r) = root {
                    return Err(ConfigError::TwoRoots(r.id.clone(), d.id.clone()));
                }
                root = Some(d);
            }
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        for (i, n) in self.nets.iter().enumerate() {
            if self.nets[..i]
                .iter()
                .any(|o| !n.id.is_empty() && o.id == n.id)
            {
                return Err(ConfigError::DuplicateId {
                    what: "network interface",
                    id: n.id.clone(),
                });
            }
        }
        if !self.command.is_empty() && root.is_none() {
            return Err(ConfigError::CommandWithoutRoot);
        }
        if let Some(r) = root {
            // A block device (its metadata says 0) is sized when opened.
            if std::fs::metadata(&r.path).is_ok_and(|m| m.is_file() && m.len() == 0) {
                return Err(ConfigError::EmptyRoot(r.path.display().to_string()));
            }
        }
        let given = self.cmdline_extra.as_ref().map_or(0, String::len)
            + self.boot_args.as_ref().map_or(0, String::len);
        if given >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong {
                got: given,
                max: crate::layout::CMDLINE_MAX_SIZE - 1,
            });
        }
        Ok(())
    }

    /// The machine-size rules alone (the API checks them when they are set).
    pub fn validate_machine(cpus: u64, memory_mib: u64) -> Result<(), ConfigError> {
        if cpus == 0 || cpus > u64::from(MAX_CPUS) {
            return Err(ConfigError::Cpus(cpus));
        }
        if memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall { got: memory_mib });
        }
        if let Some(host) = crate::host::host_memory_mib() {
            if memory_mib > host {
                return Err(ConfigError::MemoryTooLarge {
                    got: memory_mib,
                    host,
                });
            }
        }
        Ok(())
    }

    /// The configuration a build takes by reference: validated, with what
    /// was left to microvm filled in (a random locally administered MAC for
    /// a NIC without one, `driveN`/`ethN` for a device without an id). A
    /// snapshot keeps the resolved configuration, so a restore builds the
    /// same devices with the same addresses.
    pub fn resolved(&self) -> Result<Self, ConfigError> {
        let mut c = self.clone();
        for (i, d) in c.drives.iter_mut().enumerate() {
            if d.id.is_empty() {
                d.id = format!("drive{i}");
            }
        }
        for (i, n) in c.nets.iter_mut().enumerate() {
            if n.id.is_empty() {
                n.id = format!("eth{i}");
            }
            n.mac.get_or_insert_with(crate::net::MacAddr::random_local);
        }
        c.validate()?;
        Ok(c)
    }

    /// The VM's virtio devices, in the one order boot, snapshot and restore
    /// all follow: drives first (the root drive is first among them, so it
    /// is /dev/vda), then NICs (eth0, eth1, ...), then the virtio console
    /// (so the windows and IRQs of drives and NICs do not move with
    /// `--console`), then the kinds added since, each after the last (the
    /// entropy device). Device `n` of this list gets the `n`-th MMIO window
    /// and IRQ.
    pub fn virtio_devices(&self) -> Vec<DeviceId> {
        let drives = self
            .drives
            .iter()
            .map(|d| DeviceId::new(DeviceKind::Block, &d.id));
        let nets = self
            .nets
            .iter()
            .map(|n| DeviceId::new(DeviceKind::Net, &n.id));
        let console = (self.console == ConsoleMode::Virtio)
            .then(|| DeviceId::new(DeviceKind::Console, CONSOLE_ID));
        let rng = self
            .entropy
            .then(|| DeviceId::new(DeviceKind::Rng, ENTROPY_ID));
        let vsock = self
            .vsock
            .is_some()
            .then(|| DeviceId::new(DeviceKind::Vsock, VSOCK_ID));
        drives
            .chain(nets)
            .chain(console)
            .chain(rng)
            .chain(vsock)
            .collect()
    }

    /// Set the vCPU count and guest RAM, checked as [`Self::validate_machine`]
    /// says (it reads the host's memory size: not for a seccomp-filtered
    /// thread).
    pub fn set_machine(&mut self, cpus: u64, memory_mib: u64) -> Result<(), ConfigError> {
        Self::validate_machine(cpus, memory_mib)?;
        self.cpus = u8::try_from(cpus).map_err(|_| ConfigError::Cpus(cpus))?;
        self.memory_mib = memory_mib;
        Ok(())
    }

    /// Add `drive`, or replace the one with its id, keeping the root drive
    /// first (/dev/vda) and the others in the order they were first put.
    pub fn put_drive(&mut self, drive: DriveConfig) {
        match self.drives.iter_mut().find(|o| o.id == drive.id) {
            Some(old) => *old = drive,
            None => self.drives.push(drive),
        }
        // Stable: non-root drives keep their order.
        self.drives.sort_by_key(|d| !d.is_root);
    }

    /// Add `net`, or replace the one with its id.
    pub fn put_net(&mut self, net: NetConfig) {
        match self.nets.iter_mut().find(|o| o.id == net.id) {
            Some(old) => *old = net,
            None => self.nets.push(net),
        }
    }

    /// Boot `kernel` (with `initrd`), on `boot_args` in place of microvm's
    /// command line if given; drops any extra command line set before.
    pub fn set_boot_source(
        &mut self,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        boot_args: Option<String>,
    ) {
        self.kernel = kernel;
        self.initrd = initrd;
        self.boot_args = boot_args;
        self.cmdline_extra = None;
    }

    /// Attach the NIC `iface_id` to the host device `host_dev_name` from now
    /// on (a restore's `network_overrides`): a TAP NIC takes the other TAP,
    /// a NIC whose TAP microvm creates creates it under that name; a
    /// `--net user` NIC has no host device to replace.
    pub fn override_net(&mut self, iface_id: &str, host_dev_name: &str) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::NetOverride {
            id: iface_id.to_string(),
            reason,
        };
        if host_dev_name.is_empty() || host_dev_name.len() > crate::net::MAX_TAP_NAME_LEN {
            return Err(bad(format!(
                "host_dev_name '{host_dev_name}' is not a TAP name (1 to {} bytes)",
                crate::net::MAX_TAP_NAME_LEN
            )));
        }
        let n = self
            .nets
            .iter_mut()
            .find(|n| n.id == iface_id)
            .ok_or_else(|| bad("the snapshot has no such network interface".into()))?;
        match &mut n.backend {
            crate::net::NetBackend::Tap { name } => *name = host_dev_name.to_string(),
            crate::net::NetBackend::Managed { tap, .. } => *tap = Some(host_dev_name.to_string()),
            crate::net::NetBackend::User { .. } => {
                return Err(bad(
                    "it uses user-mode networking (passt), which has no host device".into(),
                ))
            }
        }
        Ok(())
    }

    /// The drive with id `id`.
    pub fn drive(&self, id: &str) -> Result<&DriveConfig, ConfigError> {
        self.drives
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| ConfigError::NoSuchDevice {
                what: "drive",
                id: id.to_string(),
            })
    }

    /// The NIC with id `id`, with its position (N of `ethN`).
    pub fn net(&self, id: &str) -> Result<(usize, &NetConfig), ConfigError> {
        self.nets
            .iter()
            .enumerate()
            .find(|(_, n)| n.id == id)
            .ok_or_else(|| ConfigError::NoSuchDevice {
                what: "network interface",
                id: id.to_string(),
            })
    }

    /// The drive with id `id`, to change it; the error names it.
    pub fn drive_mut(&mut self, id: &str) -> Result<&mut DriveConfig, String> {
        self.drives
            .iter_mut()
            .find(|d| d.id == id)
            .ok_or_else(|| format!("no drive with id '{id}'"))
    }

    /// The NIC with id `id`, to change it; the error names it.
    pub fn net_mut(&mut self, id: &str) -> Result<&mut NetConfig, String> {
        self.nets
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| format!("no network interface with id '{id}'"))
    }

    /// The root drive, if any.
    pub fn root_drive(&self) -> Option<&DriveConfig> {
        self.drives.iter().find(|d| d.is_root)
    }
}

/// What a virtio device is: each kind has its folder under
/// `src/devices/virtio/` and is built from its part of the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DeviceKind {
    /// virtio-blk, from a [`DriveConfig`].
    Block,
    /// virtio-net, from a [`NetConfig`].
    Net,
    /// virtio-console, from [`ConsoleMode::Virtio`].
    Console,
    /// virtio-rng, from [`VmConfig::entropy`].
    Rng,
    /// virtio-vsock, from [`VmConfig::vsock`].
    Vsock,
}

/// The id of the one virtio console.
pub const CONSOLE_ID: &str = "console";
/// The id of the one entropy device.
pub const ENTROPY_ID: &str = "entropy";
/// The id of the one vsock device.
pub const VSOCK_ID: &str = "vsock";

/// One virtio device of a VM, by kind and id (a drive's or a NIC's id, or
/// [`CONSOLE_ID`]): how snapshots name devices.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DeviceId {
    /// What the device is.
    pub kind: DeviceKind,
    /// Which one.
    pub id: String,
}

impl DeviceId {
    /// The device of `kind` named `id`.
    pub fn new(kind: DeviceKind, id: &str) -> Self {
        Self {
            kind,
            id: id.to_string(),
        }
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            DeviceKind::Block => "drive",
            DeviceKind::Net => "network interface",
            DeviceKind::Console => "virtio console",
            DeviceKind::Rng => "entropy device",
            DeviceKind::Vsock => "vsock device",
        };
        write!(f, "{kind} '{}'", self.id)
    }
}

/// How the guest's writes reach the backing file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CacheType {
    /// No flush feature offered: the guest never waits for `fdatasync`
    /// (Firecracker's default; microvm still syncs at exit).
    Unsafe,
    /// `VIRTIO_BLK_F_FLUSH` offered; a guest flush is an `fdatasync`.
    #[default]
    Writeback,
}

/// How a drive's requests reach its backing file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoEngine {
    /// The worker thread does each transfer itself (`preadv`/`pwritev`).
    #[default]
    Sync,
    /// The worker submits transfers to an io_uring and serves the queue on
    /// while the kernel does them (up to a queue of requests in flight).
    Async,
}

/// One virtio block device backed by a regular file.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DriveConfig {
    /// Name in the configuration (`drive_id` in the API); `rootfs`,
    /// `drive1`, ... for the command line.
    pub id: String,
    /// Flush behaviour.
    pub cache: CacheType,
    /// Backing file.
    pub path: PathBuf,
    /// Expose the drive read-only (`VIRTIO_BLK_F_RO`) and open the file read-only.
    pub read_only: bool,
    /// This drive is the root filesystem (`root=/dev/vda`).
    pub is_root: bool,
    /// The guest's I/O on it is limited so (unlimited by default).
    #[serde(default)]
    pub rate_limit: crate::rate_limit::RateLimitConfig,
    /// Sync (the default) or an io_uring.
    #[serde(default)]
    pub io_engine: IoEngine,
}

/// Error parsing `PATH[,ro]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveParseError {
    /// Empty path.
    #[error("drive path is empty")]
    EmptyPath,
    /// An option other than `ro`/`rw`/`bw=`/`iops=`/`io=`.
    #[error("unknown drive option '{0}' (expected ro, rw, bw=RATE, iops=N, io=sync or io=async)")]
    UnknownOption(String),
    /// A `bw=` or `iops=` that is not a rate.
    #[error("drive option {0}")]
    BadRate(String),
}

impl FromStr for DriveConfig {
    type Err = DriveParseError;

    /// `PATH[,ro|,rw][,bw=RATE][,iops=N][,io=sync|async]`: `bw` bytes a
    /// second (`K`, `M`, `G` suffixes), `iops` requests a second, `io` the
    /// engine.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DriveParseError::EmptyPath);
        }
        let mut read_only = false;
        let mut io_engine = IoEngine::Sync;
        let (mut bw, mut iops) = (None, None);
        for opt in parts {
            let rate = |v: &str| {
                crate::rate_limit::parse_rate(v)
                    .map(Some)
                    .map_err(|e| DriveParseError::BadRate(format!("{opt}: {e}")))
            };
            match opt.split_once('=') {
                None if opt == "ro" => read_only = true,
                None if opt == "rw" => read_only = false,
                Some(("bw", v)) => bw = rate(v)?,
                Some(("iops", v)) => iops = rate(v)?,
                Some(("io", "sync")) => io_engine = IoEngine::Sync,
                Some(("io", "async")) => io_engine = IoEngine::Async,
                _ => return Err(DriveParseError::UnknownOption(opt.to_string())),
            }
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
            rate_limit: crate::rate_limit::per_second(bw, iops),
            io_engine,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_parsing() {
        let d: DriveConfig = "/tmp/a.ext4,ro".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.ext4"));
        assert!(d.read_only);
        assert_eq!(d.io_engine, IoEngine::Sync);
        let d: DriveConfig = "/x,io=async,rw".parse().unwrap();
        assert_eq!(d.io_engine, IoEngine::Async);
        assert_eq!(
            "/x,io=uring".parse::<DriveConfig>(),
            Err(DriveParseError::UnknownOption("io=uring".into()))
        );
        assert!(!"/x".parse::<DriveConfig>().unwrap().read_only);
        assert_eq!("".parse::<DriveConfig>(), Err(DriveParseError::EmptyPath));
        assert_eq!(
            "/x,foo".parse::<DriveConfig>(),
            Err(DriveParseError::UnknownOption("foo".into()))
        );
    }

    fn some_file() -> PathBuf {
        std::env::current_exe().unwrap()
    }

    fn drive(id: &str, is_root: bool) -> DriveConfig {
        DriveConfig {
            id: id.into(),
            path: some_file(),
            is_root,
            ..Default::default()
        }
    }

    #[test]
    fn validate_rules_and_messages() {
        let ok = VmConfig::new(some_file());
        ok.validate().unwrap();
        let msg = |c: &VmConfig| c.validate().unwrap_err().to_string();

        assert_eq!(
            msg(&VmConfig::new("")),
            "no kernel image: a kernel path is required to boot"
        );
        assert!(msg(&VmConfig::new("/nonexistent/vmlinux"))
            .starts_with("kernel '/nonexistent/vmlinux': "));
        assert!(msg(&VmConfig::new("/tmp")).ends_with("not a regular file"));

        let mut c = ok.clone();
        c.initrd = Some("/nonexistent.cpio".into());
        assert!(msg(&c).starts_with("initrd '/nonexistent.cpio'"));

        let mut c = ok.clone();
        c.memory_mib = 8;
        assert!(msg(&c).contains("too small"));
        c.memory_mib = u64::MAX / 2;
        assert!(msg(&c).contains("more than this host has"));

        let mut c = ok.clone();
        c.cpus = 0;
        assert_eq!(msg(&c), "vCPU count must be between 1 and 32, got 0");
        c.cpus = MAX_CPUS + 1;
        assert!(c.validate().is_err());

        let mut c = ok.clone();
        c.timeout = Some(Duration::ZERO);
        assert!(msg(&c).contains("timeout"));

        let mut c = ok.clone();
        c.drives = vec![drive("a", true), drive("b", true)];
        assert_eq!(
            msg(&c),
            "drives 'a' and 'b' are both the root device; only one can be"
        );
        c.drives = vec![drive("a", true), drive("a", false)];
        assert_eq!(msg(&c), "drive id 'a' is used twice");
        c.drives = vec![drive("a", false)];
        c.command = vec!["true".into()];
        assert!(msg(&c).contains("needs a root filesystem"));
        c.drives[0].is_root = true;
        c.validate().unwrap();
        c.drives[0].path = "/nonexistent.img".into();
        assert!(msg(&c).starts_with("root filesystem '/nonexistent.img'"));

        let mut c = ok.clone();
        let mut n = NetConfig::tap("tap0");
        n.id = "eth0".into();
        c.nets = vec![n.clone(), n];
        assert_eq!(msg(&c), "network interface id 'eth0' is used twice");
    }

    #[test]
    fn network_overrides_replace_the_host_device() {
        let mut c = VmConfig::new("/k");
        let mut tap: NetConfig = "tap=old0".parse().unwrap();
        tap.id = "eth0".into();
        let mut user: NetConfig = "user".parse().unwrap();
        user.id = "eth1".into();
        c.nets = vec![tap, user];
        c.override_net("eth0", "new0").unwrap();
        assert!(
            matches!(&c.nets[0].backend, crate::net::NetBackend::Tap { name } if name == "new0")
        );
        let e = c.override_net("eth1", "x0").unwrap_err().to_string();
        assert!(e.contains("user-mode networking"), "{e}");
        let e = c.override_net("eth9", "x0").unwrap_err().to_string();
        assert!(e.contains("no such network interface"), "{e}");
        let e = c
            .override_net("eth0", &"x".repeat(16))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a TAP name"), "{e}");
    }

    #[test]
    fn the_device_list_is_drives_nets_console_then_entropy() {
        let mut c = VmConfig::new("/k");
        c.drives = vec![drive("data", false), drive("rootfs", true)];
        let mut n: NetConfig = "tap=t0".parse().unwrap();
        n.id = "eth0".into();
        c.nets = vec![n];
        c.entropy = true;
        let list: Vec<String> = c.virtio_devices().iter().map(ToString::to_string).collect();
        assert_eq!(
            list,
            [
                "drive 'data'",
                "drive 'rootfs'",
                "network interface 'eth0'",
                "virtio console 'console'",
                "entropy device 'entropy'"
            ]
        );
        c.console = ConsoleMode::Serial;
        c.entropy = false;
        assert_eq!(c.virtio_devices().len(), 3);
    }
}
