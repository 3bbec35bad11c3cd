//! The control plane: Firecracker's REST API over a Unix socket, and the
//! `--config-file` that describes the same resources in one JSON object.
//! The only module that knows HTTP and JSON.
//!
//! - [`http`]: the bounded HTTP/1.1 reader and writer;
//! - [`models`]: the JSON bodies (Firecracker's field names) and how they map
//!   onto [`VmConfig`];
//! - [`server`]: the socket and its threads; each request is parsed into a
//!   typed [`VmmAction`] ([`parse_request`]), handed to an [`ActionSink`]
//!   (the VMM's event loop), and its typed answer rendered ([`render`]).
//!
//! docs/API.md lists every endpoint and how it differs from Firecracker's.

pub mod http;
pub mod models;
pub mod server;

/// The Firecracker API release whose endpoints and fields microvm follows
/// (docs/API.md lists what differs).
pub const FIRECRACKER_API: &str = "1.17.0";

/// What `--version` (after "microvm "), `GET /version` and `GET /` say:
/// `v<Firecracker API>-microvm.<our version>`, a semver whose release part
/// is the API a client may expect (clients such as Kata compare it with the
/// Firecracker release they need) and whose pre-release tag is microvm's
/// own version, so it never reads as Firecracker itself.
pub const VERSION: &str = concat!("v1.17.0-microvm.", env!("CARGO_PKG_VERSION"));

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::config::VmConfig;
use crate::rpc::{ActionResult, VmmAction, VmmData};
pub use http::Response as ApiResponse;
use models::{
    Action, ActionType, BootSource, ConfigFile, Drive, MachineConfig, NetworkInterface,
    PartialDrive, VmStateRequest, VmStateValue,
};

/// What the application calls itself in `GET /`.
pub const APP_NAME: &str = "microvm";

fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if body.is_empty() {
        return Err("the request needs a JSON body".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// The `{id}` of `/prefix/{id}`, checked against the body's own id field.
fn id_matches(path_id: &str, body_id: &str, field: &str) -> Result<(), String> {
    if path_id.is_empty() {
        return Err(format!("missing {field} in the path"));
    }
    if path_id != body_id {
        return Err(format!(
            "the {field} in the path ('{path_id}') differs from the body's ('{body_id}')"
        ));
    }
    Ok(())
}

/// Route a request: method and path pick the endpoint, the body must be its
/// JSON object with no unknown field and values microvm takes. The error is
/// the `fault_message`.
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<VmmAction, String> {
    let path = path.trim_end_matches('/');
    let (first, rest) = match path.trim_start_matches('/').split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (path.trim_start_matches('/'), None),
    };
    let action = match (method, first, rest) {
        ("GET", "", None) => VmmAction::GetInstanceInfo,
        ("GET", "version", None) => VmmAction::GetVersion,
        ("GET", "machine-config", None) => VmmAction::GetMachineConfig,
        ("GET", "vm", Some("config")) => VmmAction::GetVmConfig,
        ("PUT", "machine-config", None) => {
            let m = json_body::<MachineConfig>(body)?;
            let (cpus, memory_mib) = m.settings()?;
            VmmAction::PutMachineConfig {
                cpus,
                memory_mib,
                track_dirty_pages: m.track_dirty_pages,
            }
        }
        ("PUT", "boot-source", None) => {
            VmmAction::PutBootSource(json_body::<BootSource>(body)?.to_boot_source())
        }
        ("PUT", "drives", Some(id)) => {
            let d: Drive = json_body(body)?;
            id_matches(id, &d.drive_id, "drive_id")?;
            VmmAction::PutDrive(d.to_config()?)
        }
        ("PATCH", "drives", Some(id)) => {
            let d: PartialDrive = json_body(body)?;
            id_matches(id, &d.drive_id, "drive_id")?;
            VmmAction::PatchDrive {
                path: d.new_path(),
                rate_limit: d.rate_limiter,
                id: d.drive_id,
            }
        }
        ("PUT", "network-interfaces", Some(id)) => {
            let n: NetworkInterface = json_body(body)?;
            id_matches(id, &n.iface_id, "iface_id")?;
            VmmAction::PutNetworkInterface(n.to_config()?)
        }
        ("PATCH", "network-interfaces", Some(id)) => {
            let n: models::PartialNetworkInterface = json_body(body)?;
            id_matches(id, &n.iface_id, "iface_id")?;
            VmmAction::PatchNetworkInterface {
                id: n.iface_id,
                rx: n.rx_rate_limiter,
                tx: n.tx_rate_limiter,
            }
        }
        ("PUT", "entropy", None) => {
            VmmAction::PutEntropy(json_body::<models::EntropyDevice>(body)?.rate_limit())
        }
        ("PUT", "logger", None) => {
            VmmAction::PutLogger(json_body::<models::Logger>(body)?.settings()?)
        }
        ("PUT", "metrics", None) => {
            VmmAction::PutMetrics(json_body::<models::Metrics>(body)?.path()?)
        }
        ("PUT", "vsock", None) => {
            VmmAction::PutVsock(json_body::<models::VsockDevice>(body)?.to_config()?)
        }
        ("PUT", "actions", None) => match json_body::<Action>(body)?.action_type {
            ActionType::InstanceStart => VmmAction::InstanceStart,
            ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
            ActionType::FlushMetrics => VmmAction::FlushMetrics,
        },
        ("PATCH", "vm", None) => match json_body::<VmStateRequest>(body)?.state {
            VmStateValue::Paused => VmmAction::Pause,
            VmStateValue::Resumed => VmmAction::Resume,
        },
        ("PUT", "snapshot", Some("create")) => {
            let c: models::SnapshotCreate = json_body(body)?;
            VmmAction::CreateSnapshot {
                paths: c.files()?,
                diff: c.is_diff()?,
            }
        }
        ("PUT", "snapshot", Some("load")) => {
            let l: models::SnapshotLoad = json_body(body)?;
            VmmAction::LoadSnapshot {
                paths: l.files()?,
                resume: l.resume_vm,
                net_overrides: l.overrides(),
                track_dirty_pages: l.enable_diff_snapshots || l.track_dirty_pages,
            }
        }
        _ => {
            return Err(format!(
                "Invalid request method and/or path: {method} {path}"
            ))
        }
    };
    Ok(action)
}

/// The HTTP answer to `result`, for the request that asked `action`:
/// errors are `400` with the error's message (Firecracker's shape).
pub fn render(action: &VmmAction, result: &ActionResult) -> ApiResponse {
    match result {
        Err(e) => fault(&e.to_string()),
        Ok(VmmData::Empty) => ApiResponse::no_content(),
        Ok(VmmData::InstanceInfo { id, state }) => ApiResponse::json(&serde_json::json!({
            "id": id,
            "state": state.name(),
            "vmm_version": VERSION.trim_start_matches('v'),
            "app_name": APP_NAME,
        })),
        Ok(VmmData::Version) => ApiResponse::json(
            &serde_json::json!({ "firecracker_version": VERSION.trim_start_matches('v') }),
        ),
        Ok(VmmData::Config(config)) => match action {
            VmmAction::GetMachineConfig => ApiResponse::json(&MachineConfig::json(config)),
            _ => ApiResponse::json(&models::full_config_json(config)),
        },
    }
}

/// A `400` with `message`.
pub fn fault(message: &str) -> ApiResponse {
    ApiResponse::fault(400, message)
}

/// Errors reading `--config-file`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read.
    #[error("config file '{path}'")]
    Read {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the expected JSON.
    #[error("config file '{path}': {reason}")]
    Invalid {
        /// The path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The VM a `--config-file` describes (checked with [`VmConfig::validate`]
/// before it boots).
pub fn load_config_file(path: &Path) -> Result<VmConfig, ConfigFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| ConfigFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let invalid = |reason: String| ConfigFileError::Invalid {
        path: shown.clone(),
        reason,
    };
    let file: ConfigFile =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("invalid JSON: {e}")))?;
    let config = file.to_config().map_err(invalid)?;
    // Opened here, before the VM exists: the same as `PUT /logger` and
    // `PUT /metrics` before boot.
    if let Some(l) = &file.logger {
        let s = l.settings().map_err(invalid)?;
        crate::logger::configure(&s).map_err(|e| invalid(format!("logger: {e}")))?;
    }
    if let Some(m) = &file.metrics {
        let p = m.path().map_err(invalid)?;
        crate::metrics::configure(&p).map_err(|e| invalid(crate::error_chain(&e)))?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IoEngine;

    #[test]
    fn the_version_names_the_api_first() {
        assert!(VERSION.starts_with(&format!("v{FIRECRACKER_API}-microvm.")));
    }

    #[test]
    fn routes_by_method_and_path() {
        assert_eq!(
            parse_request("GET", "/", b""),
            Ok(VmmAction::GetInstanceInfo)
        );
        assert_eq!(
            parse_request("GET", "/version", b""),
            Ok(VmmAction::GetVersion)
        );
        assert_eq!(
            parse_request("GET", "/vm/config", b""),
            Ok(VmmAction::GetVmConfig)
        );
        assert_eq!(
            parse_request("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#),
            Ok(VmmAction::InstanceStart)
        );
        assert_eq!(
            parse_request("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Ok(VmmAction::Pause)
        );
        let d = br#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}"#;
        assert!(matches!(
            parse_request("PUT", "/drives/rootfs", d),
            Ok(VmmAction::PutDrive(_))
        ));
        assert!(parse_request("PUT", "/drives/other", d)
            .unwrap_err()
            .contains("differs"));
        assert!(parse_request("PUT", "/drives/", d)
            .unwrap_err()
            .starts_with("Invalid request"));
        // io_engine: Sync (the default) or Async, nothing else.
        for (engine, want) in [("Sync", IoEngine::Sync), ("Async", IoEngine::Async)] {
            let body = format!(
                r#"{{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "io_engine": "{engine}"}}"#
            );
            match parse_request("PUT", "/drives/rootfs", body.as_bytes()) {
                Ok(VmmAction::PutDrive(c)) => assert_eq!(c.io_engine, want),
                other => panic!("{engine}: {other:?}"),
            }
        }
        let body = br#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "io_engine": "Uring"}"#;
        assert!(parse_request("PUT", "/drives/rootfs", body)
            .unwrap_err()
            .contains("io_engine 'Uring'"));
        // Rate limiters: PATCH a NIC's, PUT the entropy device's.
        let b = br#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#;
        match parse_request("PATCH", "/network-interfaces/eth0", b) {
            Ok(VmmAction::PatchNetworkInterface { id, rx, tx }) => {
                assert_eq!((id.as_str(), rx), ("eth0", None));
                assert_eq!(tx.and_then(|t| t.ops).map(|o| o.size), Some(100));
            }
            other => panic!("{other:?}"),
        }
        let b = br#"{"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100, "one_time_burst": 8192}}}"#;
        match parse_request("PUT", "/entropy", b) {
            Ok(VmmAction::PutEntropy(l)) => assert!(l.limits()),
            other => panic!("{other:?}"),
        }
        assert!(parse_request(
            "PUT",
            "/entropy",
            br#"{"rate_limiter": {"bandwidth": {"size": 1}}}"#
        )
        .is_err());
    }

    #[test]
    fn refuses_bad_bodies_and_unknown_paths() {
        let e = |m: &str, p: &str, b: &[u8]| parse_request(m, p, b).unwrap_err();
        assert!(e("PUT", "/boot-source", b"{not json").starts_with("invalid JSON body"));
        assert!(e(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k", "bogus": 1}"#
        )
        .contains("unknown field `bogus`"));
        assert!(e("PUT", "/boot-source", br#"{}"#).contains("missing field `kernel_image_path`"));
        assert!(e("PUT", "/boot-source", b"").contains("needs a JSON body"));
        assert!(e("PUT", "/actions", br#"{"action_type": "Reboot"}"#).contains("unknown variant"));
        assert!(e("PATCH", "/vm", br#"{"state": "Stopped"}"#).contains("unknown variant"));
        assert!(e("GET", "/nope", b"").starts_with("Invalid request method and/or path"));
        assert!(e("DELETE", "/", b"").starts_with("Invalid request method and/or path"));
        assert!(e("GET", "/vm/config/x", b"").starts_with("Invalid request"));
    }

    #[test]
    fn snapshot_requests_take_firecracker_fields_or_a_directory() {
        use crate::snapshot::SnapshotPaths;
        let files = |s: &str, m: &str| SnapshotPaths {
            state: s.into(),
            memory: m.into(),
        };
        assert_eq!(
            parse_request(
                "PUT",
                "/snapshot/create",
                br#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            Ok(VmmAction::CreateSnapshot {
                paths: files("/s", "/m"),
                diff: false
            })
        );
        assert_eq!(
            parse_request("PUT", "/snapshot/create", br#"{"snapshot_dir": "/d"}"#),
            Ok(VmmAction::CreateSnapshot {
                paths: files("/d/state", "/d/memory"),
                diff: false
            })
        );
        assert_eq!(
            parse_request(
                "PUT",
                "/snapshot/load",
                br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#
            ),
            Ok(VmmAction::LoadSnapshot {
                paths: files("/s", "/m"),
                resume: true,
                net_overrides: vec![],
                track_dirty_pages: false,
            })
        );
        assert_eq!(
            parse_request(
                "PUT",
                "/snapshot/load",
                br#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            Ok(VmmAction::LoadSnapshot {
                paths: files("/s", "/m"),
                resume: false,
                net_overrides: vec![],
                track_dirty_pages: false,
            })
        );
        // What Firecracker clients send on load: overrides and clock_realtime.
        assert_eq!(
            parse_request(
                "PUT",
                "/snapshot/load",
                br#"{"snapshot_path": "/s", "mem_file_path": "/m", "clock_realtime": true,
                     "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}"#
            ),
            Ok(VmmAction::LoadSnapshot {
                paths: files("/s", "/m"),
                resume: false,
                net_overrides: vec![("eth0".into(), "tap9".into())],
                track_dirty_pages: false,
            })
        );
        let e = |path: &str, body: &[u8]| parse_request("PUT", path, body).unwrap_err();
        // Diff snapshots, and a load that tracks dirty pages from then on.
        assert_eq!(
            parse_request(
                "PUT",
                "/snapshot/create",
                br#"{"snapshot_type": "Diff", "snapshot_dir": "/d"}"#
            ),
            Ok(VmmAction::CreateSnapshot {
                paths: files("/d/state", "/d/memory"),
                diff: true
            })
        );
        for field in ["enable_diff_snapshots", "track_dirty_pages"] {
            let body = format!(r#"{{"snapshot_dir": "/d", "{field}": true}}"#);
            assert!(matches!(
                parse_request("PUT", "/snapshot/load", body.as_bytes()),
                Ok(VmmAction::LoadSnapshot {
                    track_dirty_pages: true,
                    ..
                })
            ));
        }
        assert!(e(
            "/snapshot/create",
            br#"{"snapshot_type": "Partial", "snapshot_dir": "/d"}"#
        )
        .contains("Full or Diff"));
        assert!(e("/snapshot/create", br#"{"snapshot_path": "/s"}"#).contains("memory file"));
        assert!(e(
            "/snapshot/create",
            br#"{"snapshot_dir": "/d", "snapshot_path": "/s"}"#
        )
        .contains("not both"));
        assert!(e(
            "/snapshot/load",
            br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#
        )
        .contains("only File"));
        assert!(
            e("/snapshot/load", br#"{"snapshot_dir": "/d", "bogus": 1}"#).contains("unknown field")
        );
    }
}
