//! `microvm snapshot rebase`: lay a diff snapshot's memory file over its
//! base, as Firecracker's `rebase-snap` does (the same flags), so the base
//! file with the diff's state file restores the VM the diff was taken of.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Work with snapshot files.
#[derive(Parser, Debug)]
#[command(name = "microvm snapshot")]
struct SnapshotCli {
    #[command(subcommand)]
    cmd: SnapshotCmd,
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Copy the pages of a Diff snapshot's memory file onto the memory file
    /// it was taken after (the last Full snapshot's, already rebased with
    /// every diff in between). The base is written in place.
    Rebase {
        /// The base memory file (written).
        #[arg(long, value_name = "FILE")]
        base_file: PathBuf,
        /// The Diff snapshot's memory file (read).
        #[arg(long, value_name = "FILE")]
        diff_file: PathBuf,
    },
}

/// Run `microvm snapshot ARGS...` (`args` starts with "snapshot").
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = match SnapshotCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let SnapshotCmd::Rebase {
        base_file,
        diff_file,
    } = cli.cmd;
    match super::rebase(&base_file, &diff_file) {
        Ok(n) => {
            crate::say!(
                "microvm: {} MiB of {} laid over {}",
                n >> 20,
                diff_file.display(),
                base_file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::say!("microvm: error: {}", crate::error_chain(&e));
            ExitCode::from(if e.is_usage_error() { 2 } else { 1 })
        }
    }
}
