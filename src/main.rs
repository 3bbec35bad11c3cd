//! `microvm`: parse the command line, build the VM, run it, map the outcome
//! to an exit code.

mod cli;

use std::process::ExitCode;
use std::rc::Rc;
use std::time::Instant;

use clap::Parser;

use microvm::api::server::{ApiServer, ServerError};
use microvm::api::{fault, ApiResponse, Preboot, PrebootStep};
use microvm::vmm::event_loop::{EventLoop, Ready, VmEvent};
use microvm::vmm::{terminal, Outcome, Vmm};

/// Bad usage: invalid option or unusable input file.
const EXIT_USAGE: u8 = 2;
/// `--timeout` elapsed.
const EXIT_TIMEOUT: u8 = 124;
/// microvm itself failed, or the guest crashed.
const EXIT_VMM_FAILURE: u8 = 125;

fn main() -> ExitCode {
    let process_start = Instant::now();
    // Block SIGINT/SIGTERM before anything else: one that arrives while the VM
    // is being built stays pending until the signal thread in `Vmm::run` takes
    // it, so an early SIGTERM still ends with 143 instead of killing us.
    if let Err(e) = microvm::host::block_stop_signals() {
        eprintln!("microvm: error: cannot block signals: {e}");
        return ExitCode::from(EXIT_VMM_FAILURE);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_target(false)
        .init();
    if std::env::args_os().nth(1).is_some_and(|a| a == "image") {
        return microvm::image::command::main(std::env::args_os().skip(1));
    }

    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print and exit 0; real errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let launch = match cli.into_launch() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("microvm: error: {}", microvm::error_chain(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };

    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        terminal::restore();
        default_hook(info);
    }));

    microvm::seccomp::set_enabled(launch.seccomp);
    microvm::seccomp::limit_malloc_arenas();
    if launch.seccomp {
        if let Err(e) = microvm::seccomp::install_sigsys_handler() {
            eprintln!("microvm: error: {}", microvm::error_chain(&e));
            return ExitCode::from(EXIT_VMM_FAILURE);
        }
    }
    let events = match EventLoop::new() {
        Ok(e) => Rc::new(e),
        Err(e) => {
            eprintln!("microvm: error: {}", microvm::error_chain(&e));
            return ExitCode::from(EXIT_VMM_FAILURE);
        }
    };
    // Dropped at the end of main: the socket file goes with it.
    let _api = match &launch.api_sock {
        None => None,
        Some(path) => match ApiServer::start(path, events.sender()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("microvm: error: {}", microvm::error_chain(&e));
                return ExitCode::from(match e {
                    ServerError::Exists(_) | ServerError::InUse(_) => EXIT_USAGE,
                    ServerError::Create { .. } => EXIT_VMM_FAILURE,
                });
            }
        },
    };

    let built = if let Some(dir) = &launch.restore {
        let paths = microvm::snapshot::SnapshotPaths::in_dir(dir);
        Vmm::restore(
            &paths,
            true,
            launch.config.timeout,
            process_start,
            events,
            launch.id,
        )
    } else if launch.boot_now {
        Vmm::build(&launch.config, process_start, events, launch.id)
    } else {
        let mut preboot = Preboot::new(launch.config, launch.id);
        match build_from_api(&mut preboot, &events, process_start) {
            Ok(v) => Ok(v),
            Err(code) => return ExitCode::from(code),
        }
    };
    let vmm = match built {
        Ok(v) => v,
        Err(e) => {
            eprintln!("microvm: error: {}", microvm::error_chain(&e));
            return ExitCode::from(if e.is_usage_error() {
                EXIT_USAGE
            } else {
                EXIT_VMM_FAILURE
            });
        }
    };
    terminal::enter_raw_mode();
    let outcome = vmm.run();
    terminal::restore();

    let code = match outcome {
        Ok(Outcome::GuestExit(status)) => status,
        Ok(Outcome::NoExitStatus) => {
            eprintln!(
                "microvm: error: the guest stopped without reporting the command's exit status"
            );
            EXIT_VMM_FAILURE
        }
        Ok(Outcome::BackendExited(why)) => {
            eprintln!("microvm: error: {why}; VM stopped");
            EXIT_VMM_FAILURE
        }
        Ok(Outcome::GuestCrash(why)) => {
            eprintln!("microvm: error: {why}");
            EXIT_VMM_FAILURE
        }
        Ok(Outcome::Timeout(t)) => {
            eprintln!(
                "microvm: error: timed out after {:.1} s; VM stopped",
                t.as_secs_f64()
            );
            EXIT_TIMEOUT
        }
        Ok(Outcome::Signal(sig)) => {
            eprintln!("microvm: stopped by signal {sig}");
            128u8.saturating_add(sig as u8)
        }
        Err(e) => {
            eprintln!("microvm: error: {}", microvm::error_chain(&e));
            EXIT_VMM_FAILURE
        }
    };
    ExitCode::from(code)
}

/// Serve the API until an InstanceStart builds the VM; on a signal, the
/// exit code. A start that fails is answered with the reason, and the
/// client may fix the configuration and try again.
fn build_from_api(
    preboot: &mut Preboot,
    events: &Rc<EventLoop>,
    process_start: Instant,
) -> Result<Vmm, u8> {
    loop {
        let ready = events.wait(None).map_err(|e| {
            eprintln!("microvm: error: {}", microvm::error_chain(&e));
            EXIT_VMM_FAILURE
        })?;
        for r in ready {
            let (req, reply) = match r {
                Ready::Signal(sig) => {
                    eprintln!("microvm: stopped by signal {sig}");
                    return Err(128u8.saturating_add(sig as u8));
                }
                Ready::Event(VmEvent::Api(req, reply)) => (req, reply),
                // Nothing else exists before the VM does.
                Ready::Event(_) | Ready::Activate | Ready::Timeout => continue,
            };
            let (built, failed) = match preboot.handle(req) {
                PrebootStep::Answer(resp) => {
                    let _ = reply.send(resp);
                    continue;
                }
                PrebootStep::Restore((state, memory), resume) => (
                    Vmm::restore(
                        &microvm::snapshot::SnapshotPaths { state, memory },
                        resume,
                        preboot.config.timeout,
                        process_start,
                        events.clone(),
                        preboot.id.clone(),
                    ),
                    "cannot load the snapshot",
                ),
                PrebootStep::Start => (
                    Vmm::build(
                        &preboot.config,
                        process_start,
                        events.clone(),
                        preboot.id.clone(),
                    ),
                    "cannot start the microVM",
                ),
            };
            let resp = match built {
                Ok(vmm) => {
                    let _ = reply.send(ApiResponse::no_content());
                    return Ok(vmm);
                }
                Err(e) => fault(&format!("{failed}: {}", microvm::error_chain(&e))),
            };
            let _ = reply.send(resp);
        }
    }
}
