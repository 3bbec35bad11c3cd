//! `microvm`: parse the command line, build the VM, run it, map the outcome
//! to an exit code.

mod cli;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

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
    if let Err(e) = microvm::vmm::host::block_stop_signals() {
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
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("microvm: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };

    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        terminal::restore();
        default_hook(info);
    }));

    let vmm = match Vmm::new(config, process_start) {
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
