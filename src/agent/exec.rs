//! `microvm exec`: run a command through the agent with this process's
//! stdio, and return how it ended.
//!
//! Threads: the caller's reads the agent's frames (output, stdin credit,
//! exit); a stdin thread sends what it reads from our stdin, never more
//! than the agent has room for (`STDIN_WINDOW`, given back by StdinAck); a
//! signal thread turns SIGINT, SIGTERM, SIGHUP and SIGQUIT into Signal
//! frames and SIGWINCH into Resize. The last two are left running when the
//! command ends: the process exits right after.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use microvm_init::agent_proto::{ExecRequest, ExitStatus, Frame, CHUNK, STDIN_WINDOW};

use super::terminal::RawMode;
use super::{send, AgentError, Conn};

/// Signals passed on to the command.
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Working directory in the guest (empty: `/`).
    pub cwd: String,
    /// User and group in the guest.
    pub user: Option<(u32, u32)>,
    /// A pseudo-terminal, and the local terminal in raw mode.
    pub tty: bool,
}

/// Stdin bytes the agent still has room for.
struct Credit {
    room: Mutex<usize>,
    more: Condvar,
}

impl Credit {
    fn take(&self, n: usize) {
        let mut room = self.room.lock().unwrap_or_else(|e| e.into_inner());
        while *room < n {
            room = self.more.wait(room).unwrap_or_else(|e| e.into_inner());
        }
        *room -= n;
    }
    fn give(&self, n: usize) {
        let mut room = self.room.lock().unwrap_or_else(|e| e.into_inner());
        *room = room.saturating_add(n).min(STDIN_WINDOW);
        self.more.notify_all();
    }
}

/// The size of the terminal on stdin (or stdout), if either is one.
fn window_size() -> Option<(u16, u16)> {
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        // SAFETY: winsize is plain data; TIOCGWINSZ fills it on success.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// Block the signals the signal thread waits for, in this thread (and so
/// in every thread it starts from now on).
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; pthread_sigmask only reads it.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::sigaddset(&mut set, libc::SIGWINCH);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

fn forward_signals(set: libc::sigset_t, wr: &Mutex<UnixStream>, tty: bool) {
    loop {
        let mut sig = 0;
        // SAFETY: a valid, blocked set and a place for the number.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        let frame = if sig == libc::SIGWINCH {
            match window_size() {
                Some((rows, cols)) if tty => Frame::Resize { rows, cols },
                _ => continue,
            }
        } else {
            Frame::Signal(sig)
        };
        if send(wr, &frame).is_err() {
            return;
        }
    }
}

fn pump_stdin(wr: &Mutex<UnixStream>, credit: &Credit) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = send(wr, &Frame::StdinClose);
                return;
            }
            Ok(n) => n,
        };
        credit.take(n);
        if send(wr, &Frame::Stdin(buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Run the command with our stdin, stdout and stderr; its exit status.
/// Blocks SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGWINCH in the calling
/// thread (they go to the command instead).
pub fn run(mut conn: Conn, opts: &ExecOptions) -> Result<ExitStatus, AgentError> {
    let (rows, cols) = window_size().unwrap_or((24, 80));
    conn.send(&Frame::Exec(ExecRequest {
        argv: opts.argv.clone(),
        env: opts.env.clone(),
        cwd: opts.cwd.clone(),
        user: opts.user,
        tty: opts.tty,
        rows,
        cols,
    }))?;
    // Restored when this returns, on every path (and on a panic's unwind).
    let _raw = if opts.tty { RawMode::enter() } else { None };
    let set = block_signals();
    let credit = Arc::new(Credit {
        room: Mutex::new(STDIN_WINDOW),
        more: Condvar::new(),
    });
    {
        let wr = conn.wr.clone();
        let tty = opts.tty;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || forward_signals(set, &wr, tty))
            .map_err(|e| AgentError::local("cannot start a thread", e))?;
    }
    {
        let (wr, credit) = (conn.wr.clone(), credit.clone());
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || pump_stdin(&wr, &credit))
            .map_err(|e| AgentError::local("cannot start a thread", e))?;
    }
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    loop {
        match conn.recv()? {
            // A stdout nobody reads any more (`| head`) drops the rest, as
            // the command's own writes would fail.
            Frame::Stdout(d) => {
                let _ = out.write_all(&d).and_then(|()| out.flush());
            }
            Frame::Stderr(d) => {
                let _ = err.write_all(&d);
            }
            Frame::StdinAck(n) => credit.give(usize::try_from(n).unwrap_or(usize::MAX)),
            Frame::Exit(st) => return Ok(st),
            Frame::Error(m) => return Err(AgentError::Agent(m)),
            f => return Err(AgentError::Unexpected(f.name())),
        }
    }
}
