//! Command-line interface: clap definitions and all input validation (no KVM here).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use microvm::config::{ConfigError, DriveConfig, NetConfig, VmConfig};
use microvm::net::{NetBackend, PortForward};

const AFTER_HELP: &str = "\
EXAMPLES:
  Boot the Flask VM on its root filesystem (the app listens on port 80):
    microvm --kernel vmlinux --rootfs app.ext4 --net user --publish 8080:80
    curl http://127.0.0.1:8080/     (user-mode networking: no TAP, no root needed)

  The same on a TAP microvm creates (needs root or CAP_NET_ADMIN):
    microvm --kernel vmlinux --rootfs app.ext4 --net host=172.30.0.1/30,guest=172.30.0.2

  Run a command in a throw-away VM and get its exit status:
    microvm --kernel vmlinux --rootfs app.ext4 --timeout 600 -- python3 -c 'print(6*7)'

  Turn a container image (OCI layout or archive, docker save) into a root filesystem:
    microvm image build app-image.tar -o app.ext4     (see microvm image build --help)

  Lay a Diff snapshot's memory over its base (Firecracker's rebase-snap):
    microvm snapshot rebase --base-file full/memory --diff-file diff/memory

  Run a command in a running VM, copy files in and out (its guest agent, docs/AGENT.md):
    microvm exec --vsock /tmp/vm.vsock -- uname -a     (see microvm exec --help)
    microvm cp --vsock /tmp/vm.vsock ./site VM:/srv/site

  Boot a kernel with an initramfs only:
    microvm --kernel vmlinux --initrd initramfs.cpio.gz --cpus 2

EXIT STATUS:
  0..=255  the guest command's exit status (128+N if it died of signal N);
           0 when no command was given and the guest shut down cleanly
  2        bad usage: invalid option, missing or unreadable kernel/drive file
  124      --timeout elapsed; the VM was stopped
  125      microvm failed (KVM or host error, a --net user passt that exited)
           or the guest crashed (kernel panic, triple fault, an instruction
           nobody could emulate)
  129/130/143  stopped by SIGHUP/SIGINT/SIGTERM (Ctrl-C is SIGINT)

GUEST PROTOCOL:
  The guest reports its command's exit status by writing one byte to I/O port
  0xf4 (the microvm exit device), then rebooting (i8042 reset, reboot=k).
  Writing 123 to the byte at guest-physical 0xC0000000 logs the boot time.

The console (--console) is virtio-console by default (hvc0): guest output goes to
stdout, stdin to the guest. Set RUST_LOG=info to see boot-time and exit-count lines.";

/// A lightweight KVM virtual machine monitor: boots a Linux kernel with virtio
/// block and network devices and a virtio console.
#[derive(Parser, Debug)]
#[command(name = "microvm", version = microvm::api::VERSION, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Guest kernel: an uncompressed vmlinux (ELF) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["api_sock", "config_file", "restore"])]
    pub kernel: Option<PathBuf>,

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
    /// ",bw=RATE" limits its bytes a second (K, M, G: powers of 1024),
    /// ",iops=N" its requests a second; ",io=async" serves it through an
    /// io_uring (default ",io=sync").
    #[arg(long, value_name = "PATH[,ro][,bw=RATE][,iops=N][,io=sync|async]")]
    pub drive: Vec<String>,

    /// virtio-net interface (eth0, eth1, ...). Repeatable. One of
    /// "user[,mac=MAC]" for user-mode networking through passt (no TAP, no
    /// privileges; the guest is 10.0.2.15 and reaches the host's loopback at
    /// 10.0.2.2), "tap=NAME[,mac=MAC]" to attach an existing TAP device, or
    /// "host=IP/PREFIX,guest=IP[,tap=NAME][,mac=MAC]" to create a TAP with the
    /// host address and configure the guest with the kernel's ip= option.
    /// ",bw=RATE" limits each direction to RATE bytes a second.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,

    /// Forward a host port to the guest, like `docker run -p`: connections to
    /// HOST_IP:HOST_PORT (all host addresses without HOST_IP) reach the
    /// guest's GUEST_PORT. Repeatable; needs --net user (the first such NIC
    /// gets them). The host port must be free.
    #[arg(
        long,
        short = 'p',
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]"
    )]
    pub publish: Vec<String>,

    /// Stop the VM and exit 124 after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,

    /// Serve the Firecracker-compatible HTTP API on this Unix socket (see
    /// docs/API.md). Without a kernel or --config-file, the VM waits for
    /// an InstanceStart action.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// Boot the VM described by this JSON file (Firecracker's format: keys
    /// boot-source, drives, machine-config, network-interfaces) without
    /// waiting for the API.
    #[arg(long, value_name = "PATH", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "memory", "cpus", "rootfs", "rootfs_ro", "drive", "net"
    ])]
    pub config_file: Option<PathBuf>,

    /// Run the VM saved in DIR (DIR/state and DIR/memory, written by the
    /// API's PUT /snapshot/create): its drives, NICs and published ports
    /// come from the snapshot, the drives' files must be unchanged in size.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "memory", "cpus", "rootfs", "rootfs_ro", "drive", "net",
        "publish", "config_file", "command", "console", "entropy", "vsock"
    ])]
    pub restore: Option<PathBuf>,

    /// The guest's console: "virtio" (virtio-console, console=hvc0: output
    /// in batches, few VM exits), "serial" (the 16550 UART, console=ttyS0:
    /// two VM exits per character) or "none" (no console output; a guest
    /// command's exit status still arrives). Also for --config-file and
    /// the API, whose formats have no console setting; `boot_args` that
    /// name console=ttyS0 get the 16550, which is always present (also for
    /// earlycon).
    #[arg(long, value_name = "virtio|serial|none", default_value = "virtio")]
    pub console: microvm::config::ConsoleMode,

    /// Give the guest a virtio-rng entropy device (/dev/hwrng), fed from
    /// the host's getrandom (Firecracker's `entropy`).
    #[arg(long)]
    pub entropy: bool,

    /// Have KVM log the pages the guest writes, so PUT /snapshot/create can
    /// take a "Diff" snapshot (Firecracker's `track_dirty_pages`; also with
    /// --restore, for diffs of the restored VM).
    #[arg(long)]
    pub track_dirty_pages: bool,

    /// Give the guest a virtio-vsock device with context id N; host
    /// programs connect to the Unix socket PATH and write `CONNECT <port>`,
    /// guest connections to the host's port P reach `PATH_P`
    /// (Firecracker's `vsock`, see docs/API.md).
    #[arg(long, value_name = "cid=N,uds=PATH")]
    pub vsock: Option<microvm::config::VsockConfig>,

    /// Name of this VM, shown by the API's `GET /`.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_ID)]
    pub id: String,

    /// Run without seccomp filters (for debugging). By default every thread
    /// runs under a filter of the system calls its kind needs; any other call
    /// kills microvm with SIGSYS and a message naming it.
    #[arg(long)]
    pub no_seccomp: bool,

    /// With --config-file: serve no API (Firecracker's flag; microvm serves
    /// one only with --api-sock anyway).
    #[arg(long, conflicts_with = "api_sock", requires = "config_file")]
    pub no_api: bool,

    /// Write the log to this file or FIFO instead of stderr (opened
    /// without blocking: lines a full FIFO cannot take are dropped).
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,

    /// Log level: Error, Warning, Info, Debug, Trace or Off (Firecracker's
    /// names; default: RUST_LOG, else Warning).
    #[arg(long, value_name = "LEVEL")]
    pub level: Option<microvm::logger::LogLevel>,

    /// Show each line's level (always shown; Firecracker's flag).
    #[arg(long)]
    pub show_level: bool,

    /// Show the module each log line comes from.
    #[arg(long)]
    pub show_log_origin: bool,

    /// Log only lines from this module (e.g. `microvm::vmm`).
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,

    /// Write metrics to this file or FIFO: one JSON line a minute, on the
    /// API's FlushMetrics and at exit (Firecracker's format, see docs/API.md).
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,

    /// Firecracker's boot timer device: microvm always has one (at
    /// 0xC0000000, RUST_LOG=info shows its line); the flag changes nothing.
    #[arg(long)]
    pub boot_timer: bool,

    /// A custom seccomp filter file: refused (microvm installs its own
    /// per-thread filters; --no-seccomp runs without).
    #[arg(long, value_name = "PATH")]
    pub seccomp_filter: Option<PathBuf>,

    /// Process start time in µs given by a launcher (Firecracker's; logged).
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,

    /// Process CPU start time in µs given by a launcher (logged).
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,

    /// The launcher's own CPU time in µs (logged).
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,

    /// Largest API request body in bytes (Firecracker's default, 51200, is
    /// taken; microvm's own default and most is 65536).
    #[arg(long, value_name = "BYTES")]
    pub http_api_max_payload_size: Option<usize>,

    /// Firecracker's MMDS data limit: microvm has no MMDS; taken and unused.
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,

    /// Firecracker's PCI transport: microvm's devices stay on virtio-mmio
    /// (its guest kernel has no PCI); the flag is taken and changes nothing.
    #[arg(long)]
    pub enable_pci: bool,

    /// Command to run in the guest instead of its default service; microvm exits
    /// with its status. Needs a root filesystem whose init supports it.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Instance id when `--id` is not given (Firecracker's).
pub const DEFAULT_ID: &str = "anonymous-instance";

/// Invalid input, reported on one line with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration breaks a rule.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An option value out of range or malformed.
    #[error("{0}")]
    Invalid(String),
    /// The config file cannot be used.
    #[error(transparent)]
    ConfigFile(#[from] microvm::api::ConfigFileError),
}

/// Firecracker's log levels (`--level`), any case.
/// What to do, from the command line.
#[derive(Debug)]
pub struct Launch {
    /// The VM as far as the command line (or config file) describes it.
    pub config: VmConfig,
    /// Where to serve the API.
    pub api_sock: Option<PathBuf>,
    /// The instance id.
    pub id: String,
    /// Boot at once (a kernel or a config file was given) rather than wait
    /// for the API's InstanceStart.
    pub boot_now: bool,
    /// Install the per-thread seccomp filters.
    pub seccomp: bool,
    /// Restore the snapshot in this directory instead of booting.
    pub restore: Option<PathBuf>,
    /// Largest API request body.
    pub api_max_payload: usize,
}

impl Cli {
    /// Build the configuration and check it (no KVM here).
    pub fn into_launch(self) -> Result<Launch, CliError> {
        if let Some(p) = &self.metrics_path {
            microvm::metrics::configure(p).map_err(|e| {
                CliError::Invalid(format!("--metrics-path: {}", microvm::error_chain(&e)))
            })?;
        }
        if self.seccomp_filter.is_some() {
            return Err(CliError::Invalid(
                "--seccomp-filter: custom filters are not supported; microvm installs its own \
                 per-thread filters (--no-seccomp runs without any)"
                    .into(),
            ));
        }
        let max = microvm::api::http::MAX_BODY;
        let api_max_payload = match self.http_api_max_payload_size {
            None => max,
            Some(n) if n > 0 && n <= max => n,
            Some(n) => {
                return Err(CliError::Invalid(format!(
                    "--http-api-max-payload-size {n}: must be between 1 and {max}"
                )))
            }
        };
        if self.enable_pci {
            log::warn!(
                "--enable-pci: microvm's devices stay on virtio-mmio; the flag changes nothing"
            );
        }
        for (flag, v) in [
            ("--start-time-us", self.start_time_us),
            ("--start-time-cpu-us", self.start_time_cpu_us),
            ("--parent-cpu-time-us", self.parent_cpu_time_us),
        ] {
            if let Some(v) = v {
                log::debug!("{flag} {v}");
            }
        }
        let api_sock = self.api_sock.clone();
        let id = self.id.clone();
        let seccomp = !self.no_seccomp;
        let mut config = match &self.config_file {
            Some(path) => microvm::api::load_config_file(path)?,
            None => self.resources()?,
        };
        let restore = self.restore.clone();
        let boot_now = !config.kernel.as_os_str().is_empty() && restore.is_none();
        if let Some(t) = self.timeout {
            if !(t > 0.0 && t.is_finite()) {
                return Err(CliError::Invalid(format!(
                    "--timeout must be a positive number of seconds, got {t}"
                )));
            }
            config.timeout = Some(Duration::from_secs_f64(t));
        }
        config.command = self.command;
        config.console = self.console;
        config.entropy |= self.entropy;
        config.track_dirty_pages |= self.track_dirty_pages;
        if let Some(v) = self.vsock {
            config.vsock = Some(v);
        }
        // Without a kernel the API supplies the rest; InstanceStart validates.
        if boot_now {
            config.validate()?;
        }
        Ok(Launch {
            config,
            api_sock,
            id,
            boot_now,
            seccomp,
            restore,
            api_max_payload,
        })
    }

    /// The VM the resource flags describe (the kernel may still be missing
    /// when the API will supply it).
    fn resources(&self) -> Result<VmConfig, CliError> {
        let mut cfg = VmConfig::new(self.kernel.clone().unwrap_or_default());
        cfg.initrd = self.initrd.clone();
        cfg.memory_mib = self.memory;
        cfg.cpus = self.cpus;
        cfg.cmdline_extra = self.cmdline.clone();

        if let Some(spec) = &self.rootfs {
            let mut d: DriveConfig = spec
                .parse()
                .map_err(|e| CliError::Invalid(format!("--rootfs {spec}: {e}")))?;
            d.read_only |= self.rootfs_ro;
            d.is_root = true;
            d.id = "rootfs".into();
            cfg.drives.push(d);
        } else if self.rootfs_ro {
            return Err(CliError::Invalid("--rootfs-ro needs --rootfs".into()));
        }
        for spec in &self.drive {
            let mut d: DriveConfig = spec
                .parse()
                .map_err(|e| CliError::Invalid(format!("--drive {spec}: {e}")))?;
            d.id = format!("drive{}", cfg.drives.len());
            cfg.drives.push(d);
        }
        for spec in &self.net {
            let mut n: NetConfig = spec
                .parse()
                .map_err(|e| CliError::Invalid(format!("--net {spec}: {e}")))?;
            n.id = format!("eth{}", cfg.nets.len());
            cfg.nets.push(n);
        }
        let mut publish = Vec::new();
        for spec in &self.publish {
            let p: PortForward = spec
                .parse()
                .map_err(|e| CliError::Invalid(format!("--publish {spec}: {e}")))?;
            publish.push(p);
        }
        if !publish.is_empty() {
            let user = cfg.nets.iter_mut().find_map(|n| match &mut n.backend {
                NetBackend::User { publish } => Some(publish),
                _ => None,
            });
            let Some(ports) = user else {
                return Err(CliError::Invalid(
                    "--publish needs --net user (ports are forwarded by user-mode networking)"
                        .into(),
                ));
            };
            *ports = publish;
        }
        Ok(cfg)
    }

    /// Where and what to log.
    pub fn log_settings(&self) -> microvm::logger::LogSettings {
        microvm::logger::LogSettings {
            path: self.log_path.clone(),
            level: self.level,
            module: self.module.clone(),
            origin: self.show_log_origin,
        }
    }

    /// The checked configuration (command-line form only; tests).
    #[cfg(test)]
    pub fn into_config(self) -> Result<VmConfig, CliError> {
        self.into_launch().map(|l| l.config)
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

    fn launch(args: &[&str]) -> Result<Launch, String> {
        let mut v = vec!["microvm"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .into_launch()
            .map_err(|e| microvm::error_chain(&e))
    }

    #[test]
    fn api_and_config_file_modes() {
        let l = launch(&["--api-sock", "/tmp/x.sock", "--id", "vm7"]).unwrap();
        assert!(!l.boot_now && l.id == "vm7");
        assert_eq!(
            l.api_sock.as_deref(),
            Some(std::path::Path::new("/tmp/x.sock"))
        );
        assert_eq!(
            launch(&["--api-sock", "/tmp/x.sock"]).unwrap().id,
            DEFAULT_ID
        );
        assert!(
            launch(&[]).is_err(),
            "a kernel, an API or a config file is required"
        );
        assert!(launch(&["--config-file", "/x.json", "--kernel", "/k"])
            .unwrap_err()
            .contains("cannot be used with"));
        assert!(launch(&["--config-file", "/nonexistent.json"])
            .unwrap_err()
            .starts_with("config file '/nonexistent.json'"));

        let dir = std::env::temp_dir().join(format!("microvm-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.json");
        let k = some_file();
        std::fs::write(
            &file,
            format!(r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64}}}}"#),
        )
        .unwrap();
        let l = launch(&["--config-file", file.to_str().unwrap(), "--timeout", "5"]).unwrap();
        assert!(l.boot_now);
        assert_eq!((l.config.cpus, l.config.memory_mib), (2, 64));
        assert_eq!(l.config.timeout, Some(Duration::from_secs(5)));
        std::fs::write(
            &file,
            r#"{"boot-source": {"kernel_image_path": "/k"}, "balloon": {}}"#,
        )
        .unwrap();
        assert!(launch(&["--config-file", file.to_str().unwrap()])
            .unwrap_err()
            .contains("unknown field `balloon`"));
        std::fs::write(
            &file,
            r#"{"boot-source": {"kernel_image_path": "/nonexistent/k"}}"#,
        )
        .unwrap();
        assert!(launch(&["--config-file", file.to_str().unwrap()])
            .unwrap_err()
            .starts_with("kernel '/nonexistent/k'"));
        std::fs::remove_dir_all(&dir).unwrap();
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
            .contains("needs a root filesystem drive (--rootfs)"));
        assert!(parse(&["--kernel", &k, "--drive", "/nonexistent.img"]).is_err());
        assert!(parse(&["--kernel", &k, "--drive", &format!("{k},bogus")]).is_err());
    }

    #[test]
    fn user_net_and_publish() {
        let k = some_file();
        let c = parse(&[
            "--kernel",
            &k,
            "--net",
            "user",
            "--publish",
            "8080:80",
            "-p",
            "127.0.0.1:5353:53/udp",
        ])
        .unwrap();
        let NetBackend::User { publish } = &c.nets[0].backend else {
            panic!("{:?}", c.nets[0]);
        };
        assert_eq!(publish.len(), 2);
        assert_eq!(publish[1].to_string(), "127.0.0.1:5353:53/udp");
        assert!(parse(&["--kernel", &k, "--publish", "8080:80"])
            .unwrap_err()
            .contains("needs --net user"));
        assert!(parse(&["--kernel", &k, "--net", "tap=t0", "-p", "8080:80"])
            .unwrap_err()
            .contains("needs --net user"));
        assert!(parse(&["--kernel", &k, "--net", "user", "-p", "80"])
            .unwrap_err()
            .contains("--publish 80:"));
        let c = parse(&["--kernel", &k, "--net", "tap=t0", "--net", "user"]).unwrap();
        assert_eq!(c.nets.len(), 2);
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
