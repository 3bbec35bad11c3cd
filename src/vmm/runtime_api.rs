//! API requests while the VM runs: queries, pause and resume, Ctrl-Alt-Del,
//! and swapping a drive's backing file; pre-boot-only requests are refused.

use super::{RunState, Vmm};
use crate::api::models::{ActionType, PartialDrive, VmStateValue};
use crate::api::{self, ApiRequest, ApiResponse};
use crate::vcpu::thread::VcpuHandle;

impl RunState {
    /// Firecracker's name for the state.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "Running",
            RunState::Paused => "Paused",
        }
    }
}

impl Vmm {
    /// Answer one API request; `state` tracks pause/resume.
    pub(super) fn handle_api(
        &mut self,
        req: ApiRequest,
        vcpus: &[VcpuHandle],
        state: &mut RunState,
    ) -> ApiResponse {
        if let Some(resp) = api::answer_query(&req, &self.config, &self.id, state.name()) {
            return resp;
        }
        let result = match req {
            ApiRequest::PatchVm(r) => self.set_state(r.state, vcpus, state),
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                self.platform
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .press_ctrl_alt_del();
                Ok(())
            }
            ApiRequest::Action(ActionType::FlushMetrics) => Ok(()),
            ApiRequest::Action(ActionType::InstanceStart) => {
                Err("the microVM is already running".to_string())
            }
            ApiRequest::PatchDrive(p) => self.patch_drive(&p),
            ApiRequest::CreateSnapshot((state_file, memory_file)) => self
                .snapshot(
                    vcpus,
                    *state,
                    &crate::snapshot::SnapshotPaths {
                        state: state_file,
                        memory: memory_file,
                    },
                )
                .map(|_| ())
                .map_err(|e| crate::error_chain(&e)),
            ApiRequest::PutMachineConfig(_)
            | ApiRequest::PutBootSource(_)
            | ApiRequest::PutDrive(_)
            | ApiRequest::PutNetworkInterface(_)
            | ApiRequest::LoadSnapshot(..) => Err(api::NOT_AFTER_START.to_string()),
            ApiRequest::GetInstanceInfo
            | ApiRequest::GetVersion
            | ApiRequest::GetMachineConfig
            | ApiRequest::GetVmConfig => Ok(()),
        };
        match result {
            Ok(()) => ApiResponse::no_content(),
            Err(e) => api::fault(&e),
        }
    }

    fn set_state(
        &mut self,
        want: VmStateValue,
        vcpus: &[VcpuHandle],
        state: &mut RunState,
    ) -> Result<(), String> {
        match want {
            VmStateValue::Paused => {
                Self::pause_vcpus(vcpus)?;
                // With the vCPUs parked the guest queues nothing new; the
                // workers finish their batch and park too.
                if !self.devices.pause_all() {
                    return Err("a device worker did not stop in time".into());
                }
                *state = RunState::Paused;
                log::info!("VM paused");
            }
            VmStateValue::Resumed => {
                self.devices.resume_all();
                Self::resume_vcpus(vcpus);
                *state = RunState::Running;
                log::info!("VM resumed");
            }
        }
        Ok(())
    }

    fn patch_drive(&mut self, p: &PartialDrive) -> Result<(), String> {
        let Some(path) = p.new_path()? else {
            return Ok(());
        };
        let drive = self.config.drive_mut(&p.drive_id)?;
        crate::config::check_file("drive", &path).map_err(|e| e.to_string())?;
        self.devices
            .swap_drive_file(&p.drive_id, &path)
            .map_err(|e| crate::error_chain(&e))?;
        drive.path = path;
        Ok(())
    }
}
