//! Command-line interface: clap definitions and all input validation (no KVM here).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use microvm::config::{DriveConfig, NetConfig, VmConfig, MAX_CPUS};
use microvm::vmm::host::host_memory_mib;

const AFTER_HELP: &str = "\
EXAMPLES:
  Boot the Flask VM on its root filesystem (the app listens on port 80):
    microvm --kernel vmlinux --rootfs app.ext4 --net host=172.30.0.1/30,guest=172.30.0.2

  Run a command in a throw-away VM and get its exit status:
    microvm --kernel vmlinux --rootfs app.ext4 --timeout 600 -- python3 -c 'print(6*7)'

  Turn a container image (OCI layout or archive, docker save) into a root filesystem:
    microvm image build app-image.tar -o app.ext4     (see microvm image build --help)

  Boot a kernel with an initramfs only:
    microvm --kernel vmlinux --initrd initramfs.cpio.gz --cpus 2

EXIT STATUS:
  0..=255  the guest command's exit status (128+N if it died of signal N);
           0 when no command was given and the guest shut down cleanly
  2        bad usage: invalid option, missing or unreadable kernel/drive file
  124      --timeout elapsed; the VM was stopped
  125      microvm failed (KVM or host error) or the guest crashed
           (kernel panic, triple fault, an instruction nobody could emulate)
  130/143  stopped by SIGINT/SIGTERM (Ctrl-C)

GUEST PROTOCOL:
  The guest reports its command's exit status by writing one byte to I/O port
  0xf4 (the microvm exit device), then rebooting (i8042 reset, reboot=k).
  Writing 123 to the byte at guest-physical 0xC0000000 logs the boot time.

The console is the guest's serial port: guest output goes to stdout, stdin to the
guest. Set RUST_LOG=info to see boot-time and exit-count lines.";

/// A lightweight KVM virtual machine monitor: boots a Linux kernel with virtio
/// block and network devices, on a serial console.
#[derive(Parser, Debug)]
#[command(name = "microvm", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Guest kernel: an uncompressed vmlinux (ELF) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Extra kernel command line, appended after microvm's own parameters.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Guest memory in MiB.
    #[arg(long, short = 'm', value_name = "MiB", default_value_t = microvm::config::DEFAULT_MEMORY_MIB)]
    pub memory: u64,

    /// Number of vCPUs.
    #[arg(long, short = 'c', value_name = "N", default_value_t = microvm::config::DEFAULT_CPUS)]
    pub cpus: u8,

    /// Root filesystem image (ext4): attached as /dev/vda with root=/dev/vda.
    /// Append ",ro" for read-only.
    #[arg(long, value_name = "PATH[,ro]")]
    pub rootfs: Option<String>,

    /// Attach the root filesystem read-only (same as a ",ro" suffix).
    #[arg(long)]
    pub rootfs_ro: bool,

    /// Extra virtio block device (/dev/vdb, /dev/vdc, ... in order). Repeatable.
    #[arg(long, value_name = "PATH[,ro]")]
    pub drive: Vec<String>,

    /// virtio-net interface (eth0, eth1, ...). Repeatable. Either
    /// "tap=NAME[,mac=MAC]" to attach an existing TAP device, or
    /// "host=IP/PREFIX,guest=IP[,tap=NAME][,mac=MAC]" to create a TAP with the
    /// host address and configure the guest with the kernel's ip= option.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,

    /// Stop the VM and exit 124 after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,

    /// Command to run in the guest instead of its default service; microvm exits
    /// with its status. Needs a root filesystem whose init supports it.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Invalid input, reported on one line with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A file the user named cannot be used.
    #[error("{what} '{path}': {reason}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// The path.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// An option value out of range.
    #[error("{0}")]
    Invalid(String),
}

fn check_file(what: &'static str, path: &std::path::Path) -> Result<(), CliError> {
    let err = |reason: String| CliError::File {
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

impl Cli {
    /// Validate everything that can be checked without KVM and build the config.
    pub fn into_config(self) -> Result<VmConfig, CliError> {
        check_file("kernel", &self.kernel)?;
        let mut cfg = VmConfig::new(self.kernel);
        if let Some(initrd) = self.initrd {
            check_file("initrd", &initrd)?;
            cfg.initrd = Some(initrd);
        }
        if self.memory == 0 {
            return Err(CliError::Invalid("--memory must be at least 1 MiB".into()));
        }
        if self.memory < 16 {
            return Err(CliError::Invalid(format!(
                "--memory {} MiB is too small to boot Linux; use at least 16",
                self.memory
            )));
        }
        if let Some(host) = host_memory_mib() {
            if self.memory > host {
                return Err(CliError::Invalid(format!(
                    "--memory {} MiB is more than this host has ({host} MiB)",
                    self.memory
                )));
            }
        }
        cfg.memory_mib = self.memory;
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(CliError::Invalid(format!(
                "--cpus must be between 1 and {MAX_CPUS}, got {}",
                self.cpus
            )));
        }
        cfg.cpus = self.cpus;
        cfg.cmdline_extra = self.cmdline;

        if let Some(spec) = self.rootfs {
            let mut d: DriveConfig = spec
                .parse()
                .map_err(|e| CliError::Invalid(format!("--rootfs {spec}: {e}")))?;
            d.read_only |= self.rootfs_ro;
            d.is_root = true;
            check_file("root filesystem", &d.path)?;
            cfg.drives.push(d);
        } else if self.rootfs_ro {
            return Err(CliError::Invalid("--rootfs-ro needs --rootfs".into()));
        }
        for spec in self.drive {
            let d: DriveConfig = spec
                .parse()
                .map_err(|e| CliError::Invalid(format!("--drive {spec}: {e}")))?;
            check_file("drive", &d.path)?;
            cfg.drives.push(d);
        }
        for spec in self.net {
            let n: NetConfig = spec
                .parse()
                .map_err(|e| CliError::Invalid(format!("--net {spec}: {e}")))?;
            cfg.nets.push(n);
        }
        if let Some(t) = self.timeout {
            if !(t > 0.0 && t.is_finite()) {
                return Err(CliError::Invalid(format!(
                    "--timeout must be a positive number of seconds, got {t}"
                )));
            }
            cfg.timeout = Some(Duration::from_secs_f64(t));
        }
        if !self.command.is_empty() && cfg.drives.iter().all(|d| !d.is_root) {
            return Err(CliError::Invalid(
                "a guest command needs --rootfs (the root filesystem's init runs it)".into(),
            ));
        }
        cfg.command = self.command;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmConfig, String> {
        let mut v = vec!["microvm"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .into_config()
            .map_err(|e| e.to_string())
    }

    fn some_file() -> String {
        // Any readable regular file will do for path validation.
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn defaults() {
        let k = some_file();
        let c = parse(&["--kernel", &k]).unwrap();
        assert_eq!(c.memory_mib, 128);
        assert_eq!(c.cpus, 1);
        assert!(c.drives.is_empty() && c.command.is_empty() && c.timeout.is_none());
    }

    #[test]
    fn rejects_bad_values() {
        let k = some_file();
        assert!(parse(&["--kernel", "/nonexistent/vmlinux"])
            .unwrap_err()
            .contains("kernel '/nonexistent/vmlinux'"));
        assert!(parse(&["--kernel", "/tmp"])
            .unwrap_err()
            .contains("not a regular file"));
        assert!(parse(&["--kernel", &k, "--memory", "0"]).is_err());
        assert!(parse(&["--kernel", &k, "--memory", "99999999"])
            .unwrap_err()
            .contains("more than this host has"));
        assert!(parse(&["--kernel", &k, "--cpus", "0"]).is_err());
        assert!(parse(&["--kernel", &k, "--cpus", "64"]).is_err());
        assert!(parse(&["--kernel", &k, "--timeout", "0"]).is_err());
        assert!(parse(&["--kernel", &k, "--timeout", "-3"]).is_err());
        assert!(parse(&["--kernel", &k, "--rootfs-ro"]).is_err());
        assert!(parse(&["--kernel", &k, "--", "true"])
            .unwrap_err()
            .contains("needs --rootfs"));
        assert!(parse(&["--kernel", &k, "--drive", "/nonexistent.img"]).is_err());
        assert!(parse(&["--kernel", &k, "--drive", &format!("{k},bogus")]).is_err());
    }

    #[test]
    fn drives_and_command() {
        let k = some_file();
        let c = parse(&[
            "--kernel",
            &k,
            "--rootfs",
            &format!("{k},ro"),
            "--drive",
            &k,
            "--timeout",
            "1.5",
            "--",
            "sh",
            "-c",
            "exit 42",
        ])
        .unwrap();
        assert_eq!(c.drives.len(), 2);
        assert!(c.drives[0].is_root && c.drives[0].read_only);
        assert!(!c.drives[1].is_root && !c.drives[1].read_only);
        assert_eq!(c.command, vec!["sh", "-c", "exit 42"]);
        assert_eq!(c.timeout, Some(Duration::from_millis(1500)));
        let c = parse(&["--kernel", &k, "--rootfs", &k, "--rootfs-ro"]).unwrap();
        assert!(c.drives[0].read_only);
    }
}
