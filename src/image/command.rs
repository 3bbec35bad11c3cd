//! `microvm image ...`: the command line of the image subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Work with container images.
#[derive(Parser, Debug)]
#[command(name = "microvm image")]
pub struct ImageCli {
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Turn an OCI image layout, OCI archive or docker-save tarball into an
    /// ext4 root filesystem for `microvm --rootfs`. Its Entrypoint, Cmd, Env,
    /// WorkingDir and User apply as under `docker run`; `microvm ... -- CMD`
    /// replaces Cmd.
    Build {
        /// OCI layout directory, OCI archive (tar) or `docker save` tarball.
        source: PathBuf,
        /// The ext4 image to write (replaced only when the build succeeds).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Image size in MiB (default: contents + 25% + 64 MiB).
        #[arg(long, value_name = "MiB")]
        size: Option<u64>,
        /// The static microvm-init binary to put in the image (built by
        /// init/build.sh) [default: $MICROVM_INIT, else
        /// $MICROVM_CACHE/init/microvm-init].
        #[arg(long, value_name = "PATH")]
        init: Option<PathBuf>,
        /// No progress lines on stderr.
        #[arg(short, long)]
        quiet: bool,
    },
}

/// Where init/build.sh leaves the latest init.
fn default_init() -> PathBuf {
    if let Some(p) = std::env::var_os("MICROVM_INIT") {
        return PathBuf::from(p);
    }
    std::env::var_os("MICROVM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/microvm"))
        .join("init/microvm-init")
}

/// Run `microvm image ARGS...` (`args` starts with "image").
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = match ImageCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let ImageCmd::Build {
        source,
        output,
        size,
        init,
        quiet,
    } = cli.cmd;
    if size == Some(0) {
        crate::say!("microvm: error: --size must be at least 1 MiB");
        return ExitCode::from(2);
    }
    let opts = super::BuildOptions {
        source,
        output,
        size_mib: size,
        init: init.unwrap_or_else(default_init),
        progress: !quiet,
    };
    match super::build(&opts) {
        Ok(b) => {
            if !quiet {
                crate::say!(
                    "microvm: {} layer(s) -> {} ({} MiB); runs {:?}",
                    b.layers,
                    opts.output.display(),
                    b.size_mib,
                    b.config.argv(None)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::say!("microvm: error: {}", crate::error_chain(&e));
            ExitCode::from(if e.is_usage_error() { 2 } else { 1 })
        }
    }
}
