//! Plain configuration structs with defaults, so tests can build VMs without the CLI.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use crate::net::NetConfig;

/// Guest memory when `--memory` is not given.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// vCPUs when `--cpus` is not given.
pub const DEFAULT_CPUS: u8 = 1;
/// Upper bound on vCPUs (the guest kernel is built with NR_CPUS=8 and the MP table is sized for it).
pub const MAX_CPUS: u8 = 8;

/// Everything needed to build and run one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest kernel (vmlinux ELF or bzImage).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended after ours.
    pub cmdline_extra: Option<String>,
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
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline_extra: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            drives: Vec::new(),
            nets: Vec::new(),
            command: Vec::new(),
            timeout: None,
        }
    }
}

/// One virtio block device backed by a regular file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    /// Backing file.
    pub path: PathBuf,
    /// Expose the drive read-only (`VIRTIO_BLK_F_RO`) and open the file read-only.
    pub read_only: bool,
    /// This drive is the root filesystem (`root=/dev/vda`).
    pub is_root: bool,
}

/// Error parsing `PATH[,ro]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveParseError {
    /// Empty path.
    #[error("drive path is empty")]
    EmptyPath,
    /// An option other than `ro`/`rw`.
    #[error("unknown drive option '{0}' (expected 'ro' or 'rw')")]
    UnknownOption(String),
}

impl FromStr for DriveConfig {
    type Err = DriveParseError;

    /// `PATH[,ro|,rw]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DriveParseError::EmptyPath);
        }
        let mut read_only = false;
        for opt in parts {
            match opt {
                "ro" => read_only = true,
                "rw" => read_only = false,
                other => return Err(DriveParseError::UnknownOption(other.to_string())),
            }
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
            is_root: false,
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
        assert!(!"/x".parse::<DriveConfig>().unwrap().read_only);
        assert_eq!("".parse::<DriveConfig>(), Err(DriveParseError::EmptyPath));
        assert_eq!(
            "/x,foo".parse::<DriveConfig>(),
            Err(DriveParseError::UnknownOption("foo".into()))
        );
    }
}
