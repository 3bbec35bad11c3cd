//! `microvm exec ...` and `microvm cp ...`: the command lines of the agent
//! client, run by `src/main.rs` before (and instead of) the VM's own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser};

use super::exec::ExecOptions;
use super::{AgentError, Conn, Target, AGENT_PORT};

/// Bad usage.
const EXIT_USAGE: u8 = 2;
/// The agent could not be reached or failed (docker exec's 125 too).
const EXIT_FAILURE: u8 = 125;

/// Where the agent is: one of `--vsock` and `--unix`.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct Where {
    /// The VM's hybrid vsock socket (`--vsock cid=N,uds=PATH` of the VM).
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// An agent on a Unix socket (`microvm-init agent --unix PATH`): no
    /// CONNECT handshake. For tests and debugging.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
}

impl Where {
    fn target(&self, port: u32) -> Target {
        match (&self.vsock, &self.unix) {
            (Some(path), _) => Target::Vsock {
                path: path.clone(),
                port,
            },
            (None, Some(path)) => Target::Unix(path.clone()),
            // clap's group makes one of them required.
            (None, None) => Target::Unix(PathBuf::new()),
        }
    }
}

/// Run a command in a running VM through its agent.
#[derive(Parser, Debug)]
#[command(name = "microvm exec", bin_name = "microvm exec")]
struct ExecCli {
    #[command(flatten)]
    at: Where,
    /// The agent's vsock port.
    #[arg(long, default_value_t = AGENT_PORT, value_name = "N")]
    port: u32,
    /// Give the command a terminal; the local one goes to raw mode.
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the guest [default: /].
    #[arg(short = 'w', long, value_name = "DIR")]
    cwd: Option<String>,
    /// Run as this user: numeric UID, or UID:GID (GID defaults to UID).
    #[arg(short, long, value_name = "UID[:GID]", value_parser = parse_user)]
    user: Option<(u32, u32)>,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Copy files into or out of a running VM: `microvm cp SRC VM:DST` or
/// `microvm cp VM:SRC DST` (a directory goes as a tar stream).
#[derive(Parser, Debug)]
#[command(name = "microvm cp", bin_name = "microvm cp")]
struct CpCli {
    #[command(flatten)]
    at: Where,
    /// The agent's vsock port.
    #[arg(long, default_value_t = AGENT_PORT, value_name = "N")]
    port: u32,
    /// Keep owners (uid/gid) as they are at the source.
    #[arg(short, long)]
    archive: bool,
    /// Source: a host path, or VM:PATH.
    src: String,
    /// Destination: VM:PATH, or a host path.
    dst: String,
}

fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("'{v}': a numeric UID or UID:GID"))
    };
    match s.split_once(':') {
        None => num(s).map(|u| (u, u)),
        Some((u, g)) => Ok((num(u)?, num(g)?)),
    }
}

/// Which way a copy goes.
#[derive(Debug, PartialEq, Eq)]
enum Direction {
    /// Host path -> guest path.
    Put(PathBuf, String),
    /// Guest path -> host path.
    Get(String, PathBuf),
}

fn direction(src: &str, dst: &str) -> Result<Direction, String> {
    let guest = |s: &str| s.strip_prefix("VM:").map(str::to_string);
    match (guest(src), guest(dst)) {
        (None, Some(d)) if !d.is_empty() => Ok(Direction::Put(PathBuf::from(src), d)),
        (Some(s), None) if !s.is_empty() => Ok(Direction::Get(s, PathBuf::from(dst))),
        (Some(_), Some(_)) => Err("only one of SRC and DST can be VM:PATH".into()),
        (None, None) => Err("one of SRC and DST must be VM:PATH".into()),
        _ => Err("VM: needs a path".into()),
    }
}

fn parse<T: Parser>(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<T, ExitCode> {
    T::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 })
    })
}

fn failed(e: &AgentError) -> ExitCode {
    crate::say!("microvm: error: {}", crate::error_chain(e));
    ExitCode::from(EXIT_FAILURE)
}

/// Run `microvm exec ARGS...` (`args` starts with "exec"): the command's
/// status, 128+N if a signal killed it, 125 if the agent failed.
pub fn exec_main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli: ExecCli = match parse(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(bad) = cli.env.iter().find(|kv| !kv.contains('=')) {
        crate::say!("microvm: error: --env '{bad}': expected KEY=VALUE");
        return ExitCode::from(EXIT_USAGE);
    }
    let opts = ExecOptions {
        argv: cli.command,
        env: cli.env,
        cwd: cli.cwd.unwrap_or_default(),
        user: cli.user,
        tty: cli.tty,
    };
    match Conn::open(&cli.at.target(cli.port)).and_then(|c| super::exec::run(c, &opts)) {
        Ok(status) => ExitCode::from(status.shell_code()),
        Err(e) => failed(&e),
    }
}

/// Run `microvm cp ARGS...` (`args` starts with "cp").
pub fn cp_main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli: CpCli = match parse(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = match direction(&cli.src, &cli.dst) {
        Ok(d) => d,
        Err(e) => {
            crate::say!("microvm: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let done = Conn::open(&cli.at.target(cli.port)).and_then(|c| match &dir {
        Direction::Put(src, dst) => super::copy::put(c, src, dst, cli.archive),
        Direction::Get(src, dst) => super::copy::get(c, src, dst, cli.archive),
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        assert_eq!(parse_user("1000"), Ok((1000, 1000)));
        assert_eq!(parse_user("1000:100"), Ok((1000, 100)));
        assert!(parse_user("alice").is_err());
        assert!(parse_user("1:x").is_err());
    }

    #[test]
    fn copy_directions() {
        assert_eq!(
            direction("a", "VM:/b"),
            Ok(Direction::Put("a".into(), "/b".into()))
        );
        assert_eq!(
            direction("VM:/b", "."),
            Ok(Direction::Get("/b".into(), ".".into()))
        );
        assert!(direction("a", "b").is_err());
        assert!(direction("VM:/a", "VM:/b").is_err());
        assert!(direction("a", "VM:").is_err());
    }

    #[test]
    fn exec_command_line() {
        let c = ExecCli::try_parse_from([
            "exec", "--unix", "/s", "-t", "-e", "A=1", "--user", "5:6", "--", "ls", "-l",
        ])
        .unwrap();
        assert!(c.tty);
        assert_eq!(c.user, Some((5, 6)));
        assert_eq!(c.command, ["ls", "-l"]);
        assert!(matches!(c.at.target(c.port), Target::Unix(_)));
        let c = ExecCli::try_parse_from(["exec", "--vsock", "/v", "--", "true"]).unwrap();
        assert!(matches!(
            c.at.target(c.port),
            Target::Vsock { port: 52, .. }
        ));
        // Exactly one of --vsock and --unix.
        assert!(ExecCli::try_parse_from(["exec", "--", "true"]).is_err());
        assert!(
            ExecCli::try_parse_from(["exec", "--vsock", "/v", "--unix", "/u", "--", "true"])
                .is_err()
        );
    }
}
