//! The JSON bodies of the API and the config file, with Firecracker's field
//! names, and their mapping to and from [`VmConfig`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{CacheType, DriveConfig, IoEngine, VmConfig};
use crate::net::{MacAddr, NetConfig};
use crate::rate_limit::RateLimitConfig;
use crate::snapshot::SnapshotPaths;

/// `PUT /machine-config`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpu_count: u64,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: only `false` (one thread per core).
    #[serde(default)]
    pub smt: bool,
    /// KVM logs the pages the guest writes, so snapshots can be diffs.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// CPU template: only absent or "None".
    #[serde(default)]
    pub cpu_template: Option<String>,
    /// Huge pages: only absent or "None".
    #[serde(default)]
    pub huge_pages: Option<String>,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Guest kernel.
    pub kernel_image_path: String,
    /// Initramfs.
    #[serde(default)]
    pub initrd_path: Option<String>,
    /// Kernel command line, replacing microvm's defaults.
    #[serde(default)]
    pub boot_args: Option<String>,
}

/// `cache_type` of a drive.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum CacheTypeJson {
    /// No flush feature.
    Unsafe,
    /// Flushes are `fdatasync`.
    Writeback,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The id; must match the path.
    pub drive_id: String,
    /// Backing file.
    pub path_on_host: String,
    /// Attach as /dev/vda and boot from it.
    pub is_root_device: bool,
    /// Read-only to the guest.
    #[serde(default)]
    pub is_read_only: bool,
    /// Flush behaviour (Firecracker's default: Unsafe).
    #[serde(default)]
    pub cache_type: Option<CacheTypeJson>,
    /// Root by partition UUID: not supported (must be absent or null).
    #[serde(default)]
    pub partuuid: Option<String>,
    /// I/O engine: only "Sync".
    #[serde(default)]
    pub io_engine: Option<String>,
    /// The guest's I/O limits; absent, `null` or `{}`: unlimited.
    #[serde(default)]
    pub rate_limiter: Option<RateLimitConfig>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The id; must match the path.
    pub drive_id: String,
    /// New backing file.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// New limits (buckets full again); absent: unchanged.
    #[serde(default)]
    pub rate_limiter: Option<RateLimitConfig>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The id; must match the path.
    pub iface_id: String,
    /// An existing TAP device.
    pub host_dev_name: String,
    /// Guest MAC; random when absent.
    #[serde(default)]
    pub guest_mac: Option<String>,
    /// Limits on frames to the guest; absent, `null` or `{}`: unlimited.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimitConfig>,
    /// Limits on frames from the guest.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimitConfig>,
}

/// `PATCH /network-interfaces/{iface_id}`: new limits (buckets full again).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The id; must match the path.
    pub iface_id: String,
    /// New rx limits; absent: unchanged.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimitConfig>,
    /// New tx limits; absent: unchanged.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimitConfig>,
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Limits on the bytes and requests the guest gets; absent, `null` or
    /// `{}`: unlimited.
    #[serde(default)]
    pub rate_limiter: Option<RateLimitConfig>,
}

impl EntropyDevice {
    /// The limits it asks for.
    pub fn rate_limit(&self) -> RateLimitConfig {
        self.rate_limiter.unwrap_or_default()
    }
}

/// `PUT /vsock` (Firecracker's hybrid vsock: host side on a Unix socket).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockDevice {
    /// The guest's context id.
    pub guest_cid: u32,
    /// The host's Unix socket.
    pub uds_path: String,
    /// Deprecated by Firecracker, accepted and ignored (there is one device).
    #[serde(default)]
    pub vsock_id: Option<String>,
}

impl VsockDevice {
    /// The device it asks for, its shape checked (the path's directory is
    /// the VMM's to check: API threads touch no files).
    pub fn to_config(&self) -> Result<crate::config::VsockConfig, String> {
        if self.guest_cid < 3 {
            return Err(format!(
                "guest_cid {} is reserved: use 3 or more",
                self.guest_cid
            ));
        }
        if self.uds_path.is_empty() {
            return Err("uds_path is empty".into());
        }
        Ok(crate::config::VsockConfig {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone().into(),
        })
    }

    fn json(v: &crate::config::VsockConfig) -> Value {
        serde_json::json!({ "guest_cid": v.guest_cid, "uds_path": v.uds_path })
    }
}

/// `PUT /logger` and the config file's `logger`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// A file or FIFO (stderr when absent).
    #[serde(default)]
    pub log_path: Option<String>,
    /// Error, Warning, Info, Debug, Trace or Off.
    #[serde(default)]
    pub level: Option<String>,
    /// Accepted: the level is always shown.
    #[serde(default)]
    pub show_level: Option<bool>,
    /// Show each line's module.
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Only this module's lines.
    #[serde(default)]
    pub module: Option<String>,
}

impl Logger {
    /// The settings it asks for.
    pub fn settings(&self) -> Result<crate::logger::LogSettings, String> {
        Ok(crate::logger::LogSettings {
            path: self.log_path.as_ref().map(Into::into),
            level: self.level.as_deref().map(str::parse).transpose()?,
            module: self.module.clone(),
            origin: self.show_log_origin.unwrap_or(false),
        })
    }
}

/// `PUT /metrics` and the config file's `metrics`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// A file or FIFO.
    pub metrics_path: String,
}

impl Metrics {
    /// The path, checked for shape.
    pub fn path(&self) -> Result<std::path::PathBuf, String> {
        if self.metrics_path.is_empty() {
            return Err("metrics_path is empty".into());
        }
        Ok(self.metrics_path.clone().into())
    }
}

/// `PUT /actions`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// What to do.
    pub action_type: ActionType,
}

/// The actions microvm implements.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
    /// Accepted and ignored (no metrics sink).
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    /// "Paused" or "Resumed".
    pub state: VmStateValue,
}

/// `PUT /snapshot/create`: Firecracker's fields, or microvm's short form
/// `snapshot_dir` (writes `DIR/state` and `DIR/memory`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// "Full" (the default) or "Diff" (the pages written since the last
    /// snapshot; needs `track_dirty_pages`).
    #[serde(default)]
    pub snapshot_type: Option<String>,
    /// Where the state goes.
    #[serde(default)]
    pub snapshot_path: Option<PathBuf>,
    /// Where guest memory goes.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// microvm: both files in this directory.
    #[serde(default)]
    pub snapshot_dir: Option<PathBuf>,
    /// Firecracker's deprecated target version: ignored.
    #[serde(default)]
    pub version: Option<String>,
}

fn snapshot_files(
    dir: &Option<PathBuf>,
    state: &Option<PathBuf>,
    memory: Option<PathBuf>,
) -> Result<SnapshotPaths, String> {
    match (dir, state, memory) {
        (Some(d), None, None) => Ok(SnapshotPaths::in_dir(d)),
        (None, Some(s), Some(m)) => Ok(SnapshotPaths {
            state: s.clone(),
            memory: m,
        }),
        (Some(_), _, _) => Err("give either snapshot_dir or the two file paths, not both".into()),
        (None, None, _) => Err("snapshot_path is missing".into()),
        (None, Some(_), None) => Err("the memory file path is missing".into()),
    }
}

impl SnapshotCreate {
    /// Whether the snapshot is a diff.
    pub fn is_diff(&self) -> Result<bool, String> {
        match self.snapshot_type.as_deref() {
            None | Some("Full") => Ok(false),
            Some("Diff") => Ok(true),
            Some(t) => Err(format!("snapshot_type '{t}' is not one of Full or Diff")),
        }
    }

    /// The state and memory file paths.
    pub fn files(&self) -> Result<SnapshotPaths, String> {
        snapshot_files(
            &self.snapshot_dir,
            &self.snapshot_path,
            self.mem_file_path.clone(),
        )
    }
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// Only "File".
    pub backend_type: String,
    /// The memory file.
    pub backend_path: PathBuf,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The state file.
    #[serde(default)]
    pub snapshot_path: Option<PathBuf>,
    /// The memory file (Firecracker's older field).
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// The memory file (Firecracker's newer field).
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// microvm: `DIR/state` and `DIR/memory`.
    #[serde(default)]
    pub snapshot_dir: Option<PathBuf>,
    /// Run the VM at once (default: stay paused, as in Firecracker).
    #[serde(default)]
    pub resume_vm: bool,
    /// The restored VM logs dirty pages (Firecracker's older name of
    /// `track_dirty_pages`).
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// The restored VM logs dirty pages, for its diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// NICs to attach to other host devices than the saved ones.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Move the guest's clock on to the host's wall clock: what microvm
    /// always does, so `true` and `false` are both taken (`false` does not
    /// keep the saved time; see docs/API.md).
    #[serde(default)]
    pub clock_realtime: bool,
}

/// One entry of `network_overrides`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The saved NIC.
    pub iface_id: String,
    /// The TAP it uses from now on.
    pub host_dev_name: String,
}

impl SnapshotLoad {
    /// `network_overrides` as (iface_id, host_dev_name) pairs.
    pub fn overrides(&self) -> Vec<(String, String)> {
        self.network_overrides
            .iter()
            .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
            .collect()
    }

    /// The state and memory file paths.
    pub fn files(&self) -> Result<SnapshotPaths, String> {
        let memory = match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => return Err("give mem_file_path or mem_backend, not both".into()),
            (Some(p), None) => Some(p.clone()),
            (None, Some(b)) if b.backend_type == "File" => Some(b.backend_path.clone()),
            (None, Some(b)) => {
                return Err(format!(
                    "mem_backend type '{}' is not supported; only File",
                    b.backend_type
                ))
            }
            (None, None) => None,
        };
        snapshot_files(&self.snapshot_dir, &self.snapshot_path, memory)
    }
}

/// Requested run state.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum VmStateValue {
    /// Park the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// `--config-file`: the resources of one VM in one object.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Kernel, initrd, command line.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// Block devices in order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// NICs in order.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// An entropy device.
    #[serde(default)]
    pub entropy: Option<EntropyDevice>,
    /// A vsock device.
    #[serde(default)]
    pub vsock: Option<VsockDevice>,
    /// The logger (applied when the file is loaded).
    #[serde(default)]
    pub logger: Option<Logger>,
    /// The metrics file (opened when the file is loaded).
    #[serde(default)]
    pub metrics: Option<Metrics>,
}

/// A request that is well-formed JSON but asks for what microvm cannot do.
fn unsupported(what: &str) -> String {
    format!("{what} is not supported by microvm")
}

fn none_or(value: &Option<String>, allowed: &str, what: &str) -> Result<(), String> {
    match value.as_deref() {
        None => Ok(()),
        Some(v) if v == allowed => Ok(()),
        Some(v) => Err(unsupported(&format!("{what} '{v}'"))),
    }
}

/// A limiter as `GET` answers show it: `null` when it limits nothing.
fn limit_json(l: &RateLimitConfig) -> Value {
    if l.limits() {
        l.json()
    } else {
        Value::Null
    }
}

impl MachineConfig {
    /// vCPUs and MiB, after refusing what microvm does not do. Their range
    /// is the VMM's to check ([`VmConfig::set_machine`]): it reads the
    /// host's memory size, which the API's threads may not.
    pub fn settings(&self) -> Result<(u64, u64), String> {
        if self.smt {
            return Err(unsupported("smt: true"));
        }
        none_or(&self.cpu_template, "None", "cpu_template")?;
        none_or(&self.huge_pages, "None", "huge_pages")?;
        Ok((self.vcpu_count, self.mem_size_mib))
    }

    /// What `GET /machine-config` shows.
    pub fn json(cfg: &VmConfig) -> Value {
        serde_json::json!({
            "vcpu_count": cfg.cpus,
            "mem_size_mib": cfg.memory_mib,
            "smt": false,
            "track_dirty_pages": cfg.track_dirty_pages,
            "huge_pages": "None",
        })
    }
}

impl BootSource {
    /// The boot source as the VMM takes it. The files are checked when
    /// the VM starts.
    pub fn to_boot_source(&self) -> crate::rpc::BootSource {
        crate::rpc::BootSource {
            kernel: PathBuf::from(&self.kernel_image_path),
            initrd: self.initrd_path.as_ref().map(PathBuf::from),
            boot_args: self.boot_args.clone(),
        }
    }

    fn json(cfg: &VmConfig) -> Value {
        serde_json::json!({
            "kernel_image_path": cfg.kernel.display().to_string(),
            "initrd_path": cfg.initrd.as_ref().map(|p| p.display().to_string()),
            "boot_args": cfg.boot_args,
        })
    }
}

impl Drive {
    /// The drive as microvm configures it.
    pub fn to_config(&self) -> Result<DriveConfig, String> {
        if self.partuuid.is_some() {
            return Err(unsupported("partuuid"));
        }
        let io_engine = match self.io_engine.as_deref() {
            None | Some("Sync") => IoEngine::Sync,
            Some("Async") => IoEngine::Async,
            Some(other) => return Err(format!("io_engine '{other}' is not one of Sync and Async")),
        };
        if self.path_on_host.is_empty() {
            return Err("path_on_host is empty".into());
        }
        Ok(DriveConfig {
            id: self.drive_id.clone(),
            path: PathBuf::from(&self.path_on_host),
            read_only: self.is_read_only,
            is_root: self.is_root_device,
            cache: match self.cache_type {
                None | Some(CacheTypeJson::Unsafe) => CacheType::Unsafe,
                Some(CacheTypeJson::Writeback) => CacheType::Writeback,
            },
            rate_limit: self.rate_limiter.unwrap_or_default(),
            io_engine,
        })
    }

    fn json(d: &DriveConfig) -> Value {
        serde_json::json!({
            "drive_id": d.id,
            "path_on_host": d.path.display().to_string(),
            "is_root_device": d.is_root,
            "is_read_only": d.read_only,
            "cache_type": match d.cache {
                CacheType::Unsafe => "Unsafe",
                CacheType::Writeback => "Writeback",
            },
            // Serialized by its variant's name: "Sync" or "Async".
            "io_engine": d.io_engine,
            "partuuid": null,
            "rate_limiter": limit_json(&d.rate_limit),
        })
    }
}

impl PartialDrive {
    /// The new path, if any.
    pub fn new_path(&self) -> Option<PathBuf> {
        self.path_on_host.as_ref().map(PathBuf::from)
    }
}

impl NetworkInterface {
    /// The NIC as microvm configures it (an existing TAP).
    pub fn to_config(&self) -> Result<NetConfig, String> {
        let mut n: NetConfig = format!("tap={}", self.host_dev_name)
            .parse()
            .map_err(|e: crate::net::NetConfigError| e.to_string())?;
        if let Some(mac) = &self.guest_mac {
            n.mac = Some(mac.parse::<MacAddr>().map_err(|e| e.to_string())?);
        }
        n.id = self.iface_id.clone();
        n.rx_rate_limit = self.rx_rate_limiter.unwrap_or_default();
        n.tx_rate_limit = self.tx_rate_limiter.unwrap_or_default();
        Ok(n)
    }

    fn json(n: &NetConfig) -> Value {
        let host_dev_name = match &n.backend {
            crate::net::NetBackend::Tap { name } => Some(name.clone()),
            crate::net::NetBackend::Managed { tap, .. } => tap.clone(),
            crate::net::NetBackend::User { .. } => None,
        };
        serde_json::json!({
            "iface_id": n.id,
            "host_dev_name": host_dev_name,
            "guest_mac": n.mac.map(|m| m.to_string()),
            "rx_rate_limiter": limit_json(&n.rx_rate_limit),
            "tx_rate_limiter": limit_json(&n.tx_rate_limit),
        })
    }
}

impl ConfigFile {
    /// The VM the file describes (validated when it boots).
    pub fn to_config(&self) -> Result<VmConfig, String> {
        let mut cfg = VmConfig::new("");
        let b = self.boot_source.to_boot_source();
        cfg.set_boot_source(b.kernel, b.initrd, b.boot_args);
        if let Some(m) = &self.machine_config {
            let (cpus, memory_mib) = m.settings()?;
            cfg.set_machine(cpus, memory_mib)
                .map_err(|e| e.to_string())?;
            cfg.track_dirty_pages = m.track_dirty_pages;
        }
        for d in &self.drives {
            cfg.put_drive(d.to_config()?);
        }
        for n in &self.network_interfaces {
            cfg.put_net(n.to_config()?);
        }
        if let Some(e) = &self.entropy {
            cfg.entropy = true;
            cfg.entropy_rate_limit = e.rate_limit();
        }
        if let Some(v) = &self.vsock {
            cfg.vsock = Some(v.to_config()?);
        }
        Ok(cfg)
    }
}

/// `GET /vm/config`: the whole configuration, in the config file's shape.
pub fn full_config_json(cfg: &VmConfig) -> Value {
    serde_json::json!({
        "boot-source": BootSource::json(cfg),
        "machine-config": MachineConfig::json(cfg),
        "drives": cfg.drives.iter().map(Drive::json).collect::<Vec<_>>(),
        "network-interfaces": cfg.nets.iter().map(NetworkInterface::json).collect::<Vec<_>>(),
        "entropy": cfg.entropy.then(|| {
            serde_json::json!({ "rate_limiter": limit_json(&cfg.entropy_rate_limit) })
        }),
        "vsock": cfg.vsock.as_ref().map(VsockDevice::json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_round_trips_through_vm_config() {
        let text = r#"{
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
            "drives": [
                {"drive_id": "data", "path_on_host": "/d.img", "is_root_device": false},
                {"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true,
                 "is_read_only": true, "cache_type": "Writeback"}
            ],
            "network-interfaces": [
                {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01"}
            ]
        }"#;
        let file: ConfigFile = serde_json::from_str(text).unwrap();
        let cfg = file.to_config().unwrap();
        assert_eq!((cfg.cpus, cfg.memory_mib), (2, 256));
        assert_eq!(cfg.drives[0].id, "rootfs", "root drive first");
        assert!(cfg.drives[0].read_only && cfg.drives[0].cache == CacheType::Writeback);
        assert_eq!(cfg.drives[1].cache, CacheType::Unsafe);
        assert_eq!(cfg.boot_args.as_deref(), Some("console=ttyS0"));
        assert_eq!(cfg.nets[0].id, "eth0");
        let back = full_config_json(&cfg);
        assert_eq!(back["drives"][0]["path_on_host"], "/r.ext4");
        assert_eq!(
            back["network-interfaces"][0]["guest_mac"],
            "02:00:00:00:00:01"
        );
        assert_eq!(back["machine-config"]["vcpu_count"], 2);
    }

    #[test]
    fn unsupported_values_are_refused_with_a_reason() {
        let m = |j: &str| serde_json::from_str::<MachineConfig>(j).unwrap();
        let e = m(r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#)
            .settings()
            .unwrap_err();
        assert_eq!(e, "smt: true is not supported by microvm");
        let (cpus, mem) = m(r#"{"vcpu_count": 0, "mem_size_mib": 128}"#)
            .settings()
            .unwrap();
        let e = VmConfig::new("")
            .set_machine(cpus, mem)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "vCPU count must be between 1 and 32, got 0");
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 1}"#).is_err());
        // A bucket needs its size and refill time, as in Firecracker.
        assert!(serde_json::from_str::<Drive>(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,"rate_limiter":{"bandwidth":{}}}"#,
        )
        .is_err());
        let d: Drive = serde_json::from_str(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":false,
                "rate_limiter":{"bandwidth":{"size":1048576,"refill_time":100},"ops":null}}"#,
        )
        .unwrap();
        let c = d.to_config().unwrap();
        assert!(c.rate_limit.limits());
        assert_eq!(
            Drive::json(&c)["rate_limiter"]["bandwidth"]["size"],
            1048576
        );
        // Unlimited, the way clients say it.
        for unlimited in ["null", "{}", r#"{"bandwidth": null, "ops": null}"#] {
            let d: Drive = serde_json::from_str(&format!(
                r#"{{"drive_id":"a","path_on_host":"/x","is_root_device":false,"rate_limiter":{unlimited}}}"#
            ))
            .unwrap();
            let c = d.to_config().unwrap();
            assert!(!c.rate_limit.limits(), "{unlimited}");
            assert_eq!(Drive::json(&c)["rate_limiter"], Value::Null);
        }
        let n: NetworkInterface = serde_json::from_str(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"01:00:00:00:00:01"}"#,
        )
        .unwrap();
        assert!(n.to_config().unwrap_err().contains("multicast"));
    }
}
