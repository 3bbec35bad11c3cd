//! The control plane: Firecracker's REST API over a Unix socket, and the
//! `--config-file` that describes the same resources in one JSON object.
//!
//! - [`http`]: the bounded HTTP/1.1 reader and writer;
//! - [`models`]: the JSON bodies (Firecracker's field names) and how they map
//!   onto [`VmConfig`];
//! - [`server`]: the socket and its threads; each request is parsed into an
//!   [`ApiRequest`] there and handed to the main thread's event loop, which
//!   answers it: [`Preboot`] before the VM starts, the VMM after.
//!
//! docs/API.md lists every endpoint and how it differs from Firecracker's.

pub mod http;
pub mod models;
pub mod server;

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::config::VmConfig;
pub use http::Response as ApiResponse;
use models::{
    Action, ActionType, BootSource, ConfigFile, Drive, MachineConfig, NetworkInterface,
    PartialDrive, VmStateRequest,
};

/// What the application calls itself in `GET /`.
pub const APP_NAME: &str = "microvm";

/// A request the API understood, checked for shape but not yet for meaning.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmStateRequest),
    /// `PUT /snapshot/create`: state and memory file.
    CreateSnapshot(models::SnapshotFiles),
    /// `PUT /snapshot/load`: state and memory file, and whether to resume.
    LoadSnapshot(models::SnapshotFiles, bool),
}

/// Message for a pre-boot-only request after the VM started (Firecracker's wording).
pub const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

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
/// JSON object with no unknown field. The error is the `fault_message`.
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, String> {
    let path = path.trim_end_matches('/');
    let (first, rest) = match path.trim_start_matches('/').split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (path.trim_start_matches('/'), None),
    };
    let req = match (method, first, rest) {
        ("GET", "", None) => ApiRequest::GetInstanceInfo,
        ("GET", "version", None) => ApiRequest::GetVersion,
        ("GET", "machine-config", None) => ApiRequest::GetMachineConfig,
        ("GET", "vm", Some("config")) => ApiRequest::GetVmConfig,
        ("PUT", "machine-config", None) => ApiRequest::PutMachineConfig(json_body(body)?),
        ("PUT", "boot-source", None) => ApiRequest::PutBootSource(json_body(body)?),
        ("PUT", "drives", Some(id)) => {
            let d: Drive = json_body(body)?;
            id_matches(id, &d.drive_id, "drive_id")?;
            ApiRequest::PutDrive(d)
        }
        ("PATCH", "drives", Some(id)) => {
            let d: PartialDrive = json_body(body)?;
            id_matches(id, &d.drive_id, "drive_id")?;
            ApiRequest::PatchDrive(d)
        }
        ("PUT", "network-interfaces", Some(id)) => {
            let n: NetworkInterface = json_body(body)?;
            id_matches(id, &n.iface_id, "iface_id")?;
            ApiRequest::PutNetworkInterface(n)
        }
        ("PUT", "actions", None) => ApiRequest::Action(json_body::<Action>(body)?.action_type),
        ("PATCH", "vm", None) => ApiRequest::PatchVm(json_body(body)?),
        ("PUT", "snapshot", Some("create")) => {
            ApiRequest::CreateSnapshot(json_body::<models::SnapshotCreate>(body)?.files()?)
        }
        ("PUT", "snapshot", Some("load")) => {
            let l: models::SnapshotLoad = json_body(body)?;
            ApiRequest::LoadSnapshot(l.files()?, l.resume_vm)
        }
        _ => {
            return Err(format!(
                "Invalid request method and/or path: {method} {path}"
            ))
        }
    };
    Ok(req)
}

/// `GET /`.
pub fn instance_info(id: &str, state: &str) -> ApiResponse {
    ApiResponse::json(&serde_json::json!({
        "id": id,
        "state": state,
        "vmm_version": env!("CARGO_PKG_VERSION"),
        "app_name": APP_NAME,
    }))
}

/// `GET /version`.
pub fn version() -> ApiResponse {
    ApiResponse::json(&serde_json::json!({ "firecracker_version": env!("CARGO_PKG_VERSION") }))
}

/// A `400` with `message`.
pub fn fault(message: &str) -> ApiResponse {
    ApiResponse::fault(400, message)
}

/// The answers that are the same before and after boot.
pub fn answer_query(
    req: &ApiRequest,
    config: &VmConfig,
    id: &str,
    state: &str,
) -> Option<ApiResponse> {
    Some(match req {
        ApiRequest::GetInstanceInfo => instance_info(id, state),
        ApiRequest::GetVersion => version(),
        ApiRequest::GetMachineConfig => ApiResponse::json(&MachineConfig::json(config)),
        ApiRequest::GetVmConfig => ApiResponse::json(&models::full_config_json(config)),
        _ => return None,
    })
}

/// The VM as the API builds it before `InstanceStart`.
pub struct Preboot {
    /// The configuration so far.
    pub config: VmConfig,
    /// The instance id.
    pub id: String,
}

/// What a pre-boot request leads to.
pub enum PrebootStep {
    /// Answer and keep configuring.
    Answer(ApiResponse),
    /// `InstanceStart` with a valid configuration: build the VM, then answer.
    Start,
    /// `PUT /snapshot/load`: build the VM from a snapshot, then answer.
    Restore(models::SnapshotFiles, bool),
}

impl Preboot {
    /// Configuration from the command line (possibly without a kernel yet).
    pub fn new(config: VmConfig, id: String) -> Self {
        Self { config, id }
    }

    /// Apply one request.
    pub fn handle(&mut self, req: ApiRequest) -> PrebootStep {
        if let Some(resp) = answer_query(&req, &self.config, &self.id, "Not started") {
            return PrebootStep::Answer(resp);
        }
        let result = match req {
            ApiRequest::PutMachineConfig(m) => m.apply(&mut self.config),
            ApiRequest::PutBootSource(b) => {
                b.apply(&mut self.config);
                Ok(())
            }
            ApiRequest::PutDrive(d) => d.apply(&mut self.config),
            ApiRequest::PatchDrive(p) => self.patch_drive(&p),
            ApiRequest::PutNetworkInterface(n) => n.apply(&mut self.config),
            ApiRequest::Action(ActionType::InstanceStart) => match self.config.validate() {
                Ok(()) => return PrebootStep::Start,
                Err(e) => Err(format!("cannot start the microVM: {e}")),
            },
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                Err("the microVM is not running: SendCtrlAltDel needs a started VM".into())
            }
            ApiRequest::Action(ActionType::FlushMetrics) => Ok(()),
            ApiRequest::PatchVm(_) => {
                Err("the microVM is not started: nothing to pause or resume".into())
            }
            ApiRequest::CreateSnapshot(_) => {
                Err("the microVM is not started: nothing to snapshot".into())
            }
            ApiRequest::LoadSnapshot(files, resume) => return PrebootStep::Restore(files, resume),
            ApiRequest::GetInstanceInfo
            | ApiRequest::GetVersion
            | ApiRequest::GetMachineConfig
            | ApiRequest::GetVmConfig => Ok(()),
        };
        PrebootStep::Answer(match result {
            Ok(()) => ApiResponse::no_content(),
            Err(e) => fault(&e),
        })
    }

    fn patch_drive(&mut self, p: &PartialDrive) -> Result<(), String> {
        let new_path = p.new_path()?;
        let d = self.config.drive_mut(&p.drive_id)?;
        if let Some(path) = new_path {
            d.path = path;
        }
        Ok(())
    }
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
    file.to_config().map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_method_and_path() {
        assert_eq!(
            parse_request("GET", "/", b""),
            Ok(ApiRequest::GetInstanceInfo)
        );
        assert_eq!(
            parse_request("GET", "/version", b""),
            Ok(ApiRequest::GetVersion)
        );
        assert_eq!(
            parse_request("GET", "/vm/config", b""),
            Ok(ApiRequest::GetVmConfig)
        );
        assert_eq!(
            parse_request("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#),
            Ok(ApiRequest::Action(ActionType::InstanceStart))
        );
        assert!(matches!(
            parse_request("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Ok(ApiRequest::PatchVm(_))
        ));
        let d = br#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}"#;
        assert!(matches!(
            parse_request("PUT", "/drives/rootfs", d),
            Ok(ApiRequest::PutDrive(_))
        ));
        assert!(parse_request("PUT", "/drives/other", d)
            .unwrap_err()
            .contains("differs"));
        assert!(parse_request("PUT", "/drives/", d)
            .unwrap_err()
            .starts_with("Invalid request"));
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
        use std::path::PathBuf;
        let files = |s: &str, m: &str| (PathBuf::from(s), PathBuf::from(m));
        assert_eq!(
            parse_request(
                "PUT",
                "/snapshot/create",
                br#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            Ok(ApiRequest::CreateSnapshot(files("/s", "/m")))
        );
        assert_eq!(
            parse_request("PUT", "/snapshot/create", br#"{"snapshot_dir": "/d"}"#),
            Ok(ApiRequest::CreateSnapshot(files("/d/state", "/d/memory")))
        );
        assert_eq!(
            parse_request(
                "PUT",
                "/snapshot/load",
                br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#
            ),
            Ok(ApiRequest::LoadSnapshot(files("/s", "/m"), true))
        );
        assert_eq!(
            parse_request(
                "PUT",
                "/snapshot/load",
                br#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#
            ),
            Ok(ApiRequest::LoadSnapshot(files("/s", "/m"), false))
        );
        let e = |path: &str, body: &[u8]| parse_request("PUT", path, body).unwrap_err();
        assert!(e(
            "/snapshot/create",
            br#"{"snapshot_type": "Diff", "snapshot_dir": "/d"}"#
        )
        .contains("only Full"));
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
        assert!(e(
            "/snapshot/load",
            br#"{"snapshot_dir": "/d", "enable_diff_snapshots": true}"#
        )
        .contains("not supported"));
        assert!(
            e("/snapshot/load", br#"{"snapshot_dir": "/d", "bogus": 1}"#).contains("unknown field")
        );
    }

    #[test]
    fn preboot_configures_then_starts() {
        let mut p = Preboot::new(VmConfig::new(""), "vm1".into());
        let answer = |p: &mut Preboot, m: &str, path: &str, b: &str| match p
            .handle(parse_request(m, path, b.as_bytes()).unwrap())
        {
            PrebootStep::Answer(r) => r,
            PrebootStep::Start => ApiResponse::json(&serde_json::json!("start")),
            PrebootStep::Restore(..) => ApiResponse::json(&serde_json::json!("restore")),
        };
        let r = answer(&mut p, "GET", "/", "");
        assert!(r.body.unwrap().contains(r#""state":"Not started""#));
        let r = answer(
            &mut p,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        );
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap().contains("no kernel image"));
        let exe = std::env::current_exe().unwrap().display().to_string();
        let r = answer(
            &mut p,
            "PUT",
            "/boot-source",
            &format!(r#"{{"kernel_image_path": "{exe}"}}"#),
        );
        assert_eq!(r.status, 204);
        let r = answer(
            &mut p,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
        );
        assert_eq!(r.status, 204);
        assert_eq!((p.config.cpus, p.config.memory_mib), (2, 64));
        let r = answer(&mut p, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert_eq!(r.status, 400);
        let r = answer(
            &mut p,
            "PATCH",
            "/drives/x",
            r#"{"drive_id": "x", "path_on_host": "/y"}"#,
        );
        assert!(r.body.unwrap().contains("no drive with id 'x'"));
        assert!(matches!(
            p.handle(ApiRequest::Action(ActionType::InstanceStart)),
            PrebootStep::Start
        ));
    }
}
