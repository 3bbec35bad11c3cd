//! `microvm`: parse the command line, build the VM, run it, map the outcome
//! to an exit code. Every failure is a [`Fatal`], printed and mapped to its
//! exit code in one place ([`Fatal::exit_code`]).

mod cli;

use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;

use microvm::api::server::{ApiServer, ServerError};
use microvm::rpc::ActionError;
use microvm::snapshot::SnapshotPaths;
use microvm::vmm::event_loop::{EventLoop, EventLoopError, Ready, VmEvent};
use microvm::vmm::{terminal, Outcome, Preboot, PrebootStep, RestoreOptions, Vmm, VmmError};

/// Bad usage: invalid option or unusable input file.
const EXIT_USAGE: u8 = 2;
/// `--timeout` elapsed.
const EXIT_TIMEOUT: u8 = 124;
/// microvm itself failed, or the guest crashed.
const EXIT_VMM_FAILURE: u8 = 125;

/// Why microvm stops before or instead of running a VM to its end.
#[derive(Debug, thiserror::Error)]
enum Fatal {
    /// The command line or the config file.
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    /// The log file or FIFO cannot be opened.
    #[error("--log-path '{path}'")]
    LogPath {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// SIGINT/SIGTERM/SIGHUP could not be blocked.
    #[error("cannot block signals")]
    Signals(#[source] std::io::Error),
    /// The SIGSYS reporter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] microvm::seccomp::SeccompError),
    /// The event loop could not be set up or failed.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The API socket.
    #[error(transparent)]
    Api(#[from] ServerError),
    /// Building or running the VM.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A stop signal before the VM was built.
    #[error("stopped by signal {0}")]
    Signal(i32),
}

impl Fatal {
    /// The exit code: 2 for the user's input, 128+N for a signal, 125 for
    /// anything else.
    fn exit_code(&self) -> u8 {
        match self {
            Fatal::Cli(_) | Fatal::LogPath { .. } => EXIT_USAGE,
            Fatal::Api(ServerError::Exists(_) | ServerError::InUse(_)) => EXIT_USAGE,
            Fatal::Vmm(e) if e.is_usage_error() => EXIT_USAGE,
            Fatal::Signal(sig) => signal_exit(*sig),
            Fatal::Signals(_)
            | Fatal::Seccomp(_)
            | Fatal::EventLoop(_)
            | Fatal::Api(ServerError::Create { .. })
            | Fatal::Vmm(_) => EXIT_VMM_FAILURE,
        }
    }
}

fn signal_exit(sig: i32) -> u8 {
    u8::try_from(sig).map_or(u8::MAX, |s| 128u8.saturating_add(s))
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    // Block SIGINT/SIGTERM/SIGHUP before anything else: one that arrives while the VM
    // is being built stays pending until the signal thread in `Vmm::run` takes
    // it, so an early SIGTERM still ends with 143 instead of killing us.
    let blocked = microvm::host::block_stop_signals();
    if std::env::args_os().nth(1).is_some_and(|a| a == "image") {
        let _ = init_logger(&microvm::logger::LogSettings::default());
        return microvm::image::command::main(std::env::args_os().skip(1));
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "snapshot") {
        let _ = init_logger(&microvm::logger::LogSettings::default());
        return microvm::snapshot::command::main(std::env::args_os().skip(1));
    }
    // The agent's client: a running VM's guest, not a VM of our own.
    match std::env::args_os().nth(1) {
        Some(a) if a == "exec" => {
            let _ = init_logger(&microvm::logger::LogSettings::default());
            return microvm::agent::command::exec_main(std::env::args_os().skip(1));
        }
        Some(a) if a == "cp" => {
            let _ = init_logger(&microvm::logger::LogSettings::default());
            return microvm::agent::command::cp_main(std::env::args_os().skip(1));
        }
        _ => {}
    }
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print and exit 0; real errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let code = match blocked
        .map_err(Fatal::Signals)
        .and_then(|_| init_logger(&cli.log_settings()))
        .and_then(|()| run(cli, process_start))
    {
        Ok(code) => code,
        Err(Fatal::Signal(sig)) => {
            microvm::say!("microvm: stopped by signal {sig}");
            signal_exit(sig)
        }
        Err(e) => {
            microvm::say!("microvm: error: {}", microvm::error_chain(&e));
            e.exit_code()
        }
    };
    // What the guest printed last (its command's output, a panic) is still
    // on its way to stdout; a stdout that takes nothing is not waited for.
    microvm::devices::stdout::drain(EXIT_DRAIN);
    ExitCode::from(code)
}

/// How long the exit waits for guest console output to reach stdout.
const EXIT_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The logger the command line asks for.
fn init_logger(s: &microvm::logger::LogSettings) -> Result<(), Fatal> {
    microvm::logger::configure(s).map_err(|source| Fatal::LogPath {
        path: s
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        source,
    })
}

/// Build the VM the command line asks for, run it, and say how it ended.
fn run(cli: cli::Cli, process_start: Instant) -> Result<u8, Fatal> {
    let launch = cli.into_launch()?;
    microvm::host::install_panic_hook(terminal::restore);
    microvm::seccomp::set_enabled(launch.seccomp);
    microvm::seccomp::limit_malloc_arenas();
    if launch.seccomp {
        microvm::seccomp::install_sigsys_handler()?;
    }
    let events = Rc::new(EventLoop::new()?);
    // Dropped at the end: the socket file goes with it.
    let _api = match &launch.api_sock {
        None => None,
        Some(path) => Some(ApiServer::start(
            path,
            Arc::new(events.sender()),
            launch.api_max_payload,
        )?),
    };
    let vmm = if let Some(dir) = &launch.restore {
        let opts = RestoreOptions {
            resume: true,
            timeout: launch.config.timeout,
            net_overrides: Vec::new(),
            track_dirty_pages: launch.config.track_dirty_pages,
        };
        Vmm::restore(
            &SnapshotPaths::in_dir(dir),
            &opts,
            process_start,
            events,
            launch.id,
        )?
    } else if launch.boot_now {
        Vmm::build(&launch.config, process_start, events, launch.id)?
    } else {
        build_from_api(
            Preboot::new(launch.config, launch.id),
            &events,
            process_start,
        )?
    };
    terminal::enter_raw_mode();
    let outcome = vmm.run();
    terminal::restore();
    Ok(outcome_exit_code(outcome?))
}

/// How a VM that ran ended, as an exit code (said on stderr unless the
/// guest reported its own status).
fn outcome_exit_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::GuestExit(status) => status,
        Outcome::NoExitStatus => {
            microvm::say!(
                "microvm: error: the guest stopped without reporting the command's exit status"
            );
            EXIT_VMM_FAILURE
        }
        Outcome::BackendExited(why) => {
            microvm::say!("microvm: error: {why}; VM stopped");
            EXIT_VMM_FAILURE
        }
        Outcome::GuestCrash(why) => {
            microvm::say!("microvm: error: {why}");
            EXIT_VMM_FAILURE
        }
        Outcome::Timeout(t) => {
            microvm::say!(
                "microvm: error: timed out after {:.1} s; VM stopped",
                t.as_secs_f64()
            );
            EXIT_TIMEOUT
        }
        Outcome::Signal(sig) => {
            microvm::say!("microvm: stopped by signal {sig}");
            signal_exit(sig)
        }
    }
}

/// Serve the API until an InstanceStart (or a snapshot load) builds the
/// VM. A build that fails is answered with the reason, and the client may
/// fix the configuration and try again.
fn build_from_api(
    mut preboot: Preboot,
    events: &Rc<EventLoop>,
    process_start: Instant,
) -> Result<Vmm, Fatal> {
    loop {
        for r in events.wait(None)? {
            let (action, reply) = match r {
                Ready::Signal(sig) => return Err(Fatal::Signal(sig)),
                Ready::Event(VmEvent::Api(action, reply)) => (*action, reply),
                // Nothing else exists before the VM does.
                Ready::Event(_) | Ready::Activate | Ready::Timeout => continue,
            };
            let built = match preboot.handle(action) {
                PrebootStep::Answer(result) => {
                    let _ = reply.send(result);
                    continue;
                }
                PrebootStep::Restore(paths, opts) => Vmm::restore(
                    &paths,
                    &opts,
                    process_start,
                    events.clone(),
                    preboot.id.clone(),
                )
                .map_err(|e| ActionError::Load(microvm::error_chain(&e))),
                PrebootStep::Start => Vmm::build(
                    &preboot.config,
                    process_start,
                    events.clone(),
                    preboot.id.clone(),
                )
                .map_err(|e| ActionError::Start(microvm::error_chain(&e))),
            };
            match built {
                Ok(vmm) => {
                    let _ = reply.send(Ok(microvm::rpc::VmmData::Empty));
                    return Ok(vmm);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }
}
