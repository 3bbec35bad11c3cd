//! The VMM's side of the API contract ([`crate::rpc`]): typed actions in,
//! typed answers out, before the VM exists ([`Preboot`]: it builds up a
//! [`VmConfig`]) and while it runs ([`Vmm::handle_action`]). Which action
//! may run in which state is [`RunState::check`]'s, asked once here.

use super::{RestoreOptions, Vmm};
use crate::config::{check_file, VmConfig};
use crate::rate_limit::RateLimitConfig;
use crate::rpc::{ActionError, ActionResult, RunState, VmmAction, VmmData};
use crate::snapshot::SnapshotPaths;
use crate::vcpu::thread::{VcpuHandle, Wanted};

/// The answers that are the same before and after boot.
fn query(action: &VmmAction, config: &VmConfig, id: &str, state: RunState) -> Option<VmmData> {
    Some(match action {
        VmmAction::GetInstanceInfo => VmmData::InstanceInfo {
            id: id.to_string(),
            state,
        },
        VmmAction::GetVersion => VmmData::Version,
        VmmAction::GetMachineConfig | VmmAction::GetVmConfig => {
            VmmData::Config(Box::new(config.clone()))
        }
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

/// What a pre-boot action leads to.
pub enum PrebootStep {
    /// Answer and keep configuring.
    Answer(ActionResult),
    /// `InstanceStart` with a valid configuration: build the VM, then answer.
    Start,
    /// `PUT /snapshot/load`: build the VM from a snapshot, then answer.
    Restore(SnapshotPaths, RestoreOptions),
}

impl Preboot {
    /// Configuration from the command line (possibly without a kernel yet).
    pub fn new(config: VmConfig, id: String) -> Self {
        Self { config, id }
    }

    /// Apply one action.
    pub fn handle(&mut self, action: VmmAction) -> PrebootStep {
        let state = RunState::NotStarted;
        if let Err(e) = state.check(&action) {
            return PrebootStep::Answer(Err(e));
        }
        if let Some(data) = query(&action, &self.config, &self.id, state) {
            return PrebootStep::Answer(Ok(data));
        }
        let c = &mut self.config;
        let result = match action {
            VmmAction::PutMachineConfig {
                cpus,
                memory_mib,
                track_dirty_pages,
            } => c
                .set_machine(cpus, memory_mib)
                .map(|()| c.track_dirty_pages = track_dirty_pages)
                .map_err(|e| e.to_string()),
            // Files are checked as they are named, as Firecracker does (and
            // again when the VM starts).
            VmmAction::PutBootSource(b) => check_file("kernel", &b.kernel)
                .and_then(|()| {
                    b.initrd
                        .as_deref()
                        .map_or(Ok(()), |i| check_file("initrd", i))
                })
                .map(|()| c.set_boot_source(b.kernel, b.initrd, b.boot_args))
                .map_err(|e| e.to_string()),
            VmmAction::PutDrive(d) => {
                let what = if d.is_root {
                    "root filesystem"
                } else {
                    "drive"
                };
                check_file(what, &d.path)
                    .map(|()| c.put_drive(d))
                    .map_err(|e| e.to_string())
            }
            VmmAction::PatchDrive {
                id,
                path,
                rate_limit,
            } => c.drive_mut(&id).and_then(|d| {
                if let Some(path) = path {
                    check_file("drive", &path).map_err(|e| e.to_string())?;
                    d.path = path;
                }
                if let Some(l) = rate_limit {
                    d.rate_limit = l;
                }
                Ok(())
            }),
            VmmAction::PatchNetworkInterface { id, rx, tx } => c.net_mut(&id).map(|n| {
                if let Some(l) = rx {
                    n.rx_rate_limit = l;
                }
                if let Some(l) = tx {
                    n.tx_rate_limit = l;
                }
            }),
            VmmAction::PutNetworkInterface(n) => {
                c.put_net(n);
                Ok(())
            }
            VmmAction::PutEntropy(limit) => {
                c.entropy = true;
                c.entropy_rate_limit = limit;
                Ok(())
            }
            VmmAction::PutLogger(s) => {
                crate::logger::configure(&s).map_err(|e| format!("logger: {e}"))
            }
            VmmAction::PutMetrics(p) => {
                crate::metrics::configure(&p).map_err(|e| crate::error_chain(&e))
            }
            VmmAction::PutVsock(v) => v
                .validate()
                .map(|()| c.vsock = Some(v))
                .map_err(|e| e.to_string()),
            VmmAction::InstanceStart => match c.validate() {
                Ok(()) => return PrebootStep::Start,
                Err(e) => return PrebootStep::Answer(Err(ActionError::Start(e.to_string()))),
            },
            VmmAction::LoadSnapshot {
                paths,
                resume,
                net_overrides,
                track_dirty_pages,
            } => {
                return PrebootStep::Restore(
                    paths,
                    RestoreOptions {
                        resume,
                        timeout: c.timeout,
                        net_overrides,
                        track_dirty_pages,
                    },
                )
            }
            // Nothing runs yet: a line with the time alone.
            VmmAction::FlushMetrics => {
                crate::metrics::flush(&Vec::new());
                Ok(())
            }
            // Refused by the state check above, or answered by the query.
            _ => Ok(()),
        };
        PrebootStep::Answer(result.map(|()| VmmData::Empty).map_err(ActionError::Config))
    }
}

impl Vmm {
    /// Answer one action on the started VM; `state` is where it stands and
    /// moves as the action says once it succeeded.
    pub(super) fn handle_action(
        &mut self,
        action: &VmmAction,
        vcpus: &[VcpuHandle],
        state: &mut RunState,
    ) -> ActionResult {
        state.check(action)?;
        if let Some(data) = query(action, &self.config, &self.id, *state) {
            return Ok(data);
        }
        match action {
            VmmAction::Pause => self.pause(vcpus)?,
            VmmAction::Resume => {
                self.devices.resume_all();
                for h in vcpus {
                    h.request(Wanted::Run);
                }
                log::info!("VM resumed");
            }
            VmmAction::SendCtrlAltDel => self
                .platform
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .press_ctrl_alt_del(),
            VmmAction::PatchDrive {
                id,
                path,
                rate_limit,
            } => self.patch_drive(id, path.as_deref(), *rate_limit)?,
            VmmAction::PatchNetworkInterface { id, rx, tx } => self.patch_net(id, *rx, *tx)?,
            VmmAction::CreateSnapshot { paths, diff } => {
                self.snapshot(vcpus, *state, paths, *diff)
                    .map_err(|e| ActionError::Failed(crate::error_chain(&e)))?;
            }
            VmmAction::FlushMetrics => self.flush_metrics(),
            // Refused by the state check, or answered by the query.
            _ => {}
        }
        *state = state.after(action);
        Ok(VmmData::Empty)
    }

    /// Park every vCPU (and wait until each is parked), then every device
    /// worker: with the vCPUs parked the guest queues nothing new, and the
    /// workers finish their batch and park too.
    fn pause(&self, vcpus: &[VcpuHandle]) -> Result<(), ActionError> {
        for h in vcpus {
            h.request(Wanted::Pause);
        }
        for h in vcpus {
            if !h.wait_parked() {
                return Err(ActionError::Failed(format!(
                    "vcpu{} did not stop in time",
                    h.index()
                )));
            }
        }
        if !self.devices.pause_all() {
            return Err(ActionError::Failed(
                "a device worker did not stop in time".into(),
            ));
        }
        log::info!("VM paused");
        Ok(())
    }

    fn patch_drive(
        &mut self,
        id: &str,
        path: Option<&std::path::Path>,
        rate_limit: Option<RateLimitConfig>,
    ) -> Result<(), ActionError> {
        let drive = self.config.drive_mut(id).map_err(ActionError::Config)?;
        if let Some(path) = path {
            check_file("drive", path).map_err(|e| ActionError::Config(e.to_string()))?;
        }
        if let Some(path) = path {
            self.devices.swap_drive_file(id, path).map_err(failed)?;
            drive.path = path.to_path_buf();
        }
        if let Some(l) = rate_limit {
            self.devices.drive_rate_limit(id).map_err(failed)?.update(l);
            drive.rate_limit = l;
        }
        Ok(())
    }

    fn patch_net(
        &mut self,
        id: &str,
        rx: Option<RateLimitConfig>,
        tx: Option<RateLimitConfig>,
    ) -> Result<(), ActionError> {
        let net = self.config.net_mut(id).map_err(ActionError::Config)?;
        let [rx_limit, tx_limit] = self.devices.net_rate_limits(id).map_err(failed)?;
        if let Some(l) = rx {
            rx_limit.update(l);
            net.rx_rate_limit = l;
        }
        if let Some(l) = tx {
            tx_limit.update(l);
            net.tx_rate_limit = l;
        }
        Ok(())
    }
}

fn failed(e: super::device_manager::DeviceManagerError) -> ActionError {
    ActionError::Failed(crate::error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_request;

    #[test]
    fn preboot_configures_then_starts() {
        let mut p = Preboot::new(VmConfig::new(""), "vm1".into());
        let answer = |p: &mut Preboot, m: &str, path: &str, b: &str| match p
            .handle(parse_request(m, path, b.as_bytes()).unwrap())
        {
            PrebootStep::Answer(r) => r.map_err(|e| e.to_string()),
            PrebootStep::Start => Err("start".into()),
            PrebootStep::Restore(..) => Err("restore".into()),
        };
        let r = answer(&mut p, "GET", "/", "");
        assert!(matches!(
            r,
            Ok(VmmData::InstanceInfo {
                state: RunState::NotStarted,
                ..
            })
        ));
        let r = answer(
            &mut p,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        );
        assert!(r.unwrap_err().contains("no kernel image"));
        let exe = std::env::current_exe().unwrap().display().to_string();
        let r = answer(
            &mut p,
            "PUT",
            "/boot-source",
            &format!(r#"{{"kernel_image_path": "{exe}"}}"#),
        );
        assert!(matches!(r, Ok(VmmData::Empty)));
        let r = answer(
            &mut p,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
        );
        assert!(matches!(r, Ok(VmmData::Empty)));
        assert_eq!((p.config.cpus, p.config.memory_mib), (2, 64));
        let r = answer(&mut p, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert!(r.unwrap_err().contains("not started"));
        let r = answer(
            &mut p,
            "PATCH",
            "/drives/x",
            r#"{"drive_id": "x", "path_on_host": "/y"}"#,
        );
        assert!(r.unwrap_err().contains("no drive with id 'x'"));
        let r = answer(
            &mut p,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        );
        assert_eq!(r.unwrap_err(), "start");
    }
}
