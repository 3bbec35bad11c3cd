//! The host side of the guest agent (`microvm-init agent`, docs/AGENT.md):
//! connect to it through the VM's hybrid vsock socket (`CONNECT <port>`,
//! `OK <host_port>`) or straight to a Unix socket, greet it, then run one
//! session: an exec (`exec.rs`) or a copy (`copy.rs`). `command.rs` is the
//! command line of `microvm exec` and `microvm cp`.
//!
//! Uses only std and `microvm_init::agent_proto`; nothing of the VMM.

pub mod command;
pub mod copy;
pub mod exec;
mod terminal;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microvm_init::agent_proto::{
    connect_line, parse_ok_line, read_frame, write_frame, Frame, ProtoError, ENTROPY_MIN, VERSION,
};

pub use microvm_init::agent_proto::{ExitStatus, AGENT_PORT};

/// How long the vsock handshake and the hello may take: generous, since a
/// busy guest may take seconds to accept (20 execs at once where KVM
/// interprets guest kernel code took over 10 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `OK <port>` line we wait for.
const MAX_OK_LINE: usize = 64;

/// Where the agent is.
#[derive(Clone, Debug)]
pub enum Target {
    /// The VM's hybrid vsock socket (`--vsock uds=PATH`) and the agent's port.
    Vsock {
        /// The socket.
        path: PathBuf,
        /// The guest port (normally [`AGENT_PORT`]).
        port: u32,
    },
    /// An agent listening on a Unix socket itself (`microvm-init agent --unix`).
    Unix(PathBuf),
}

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket cannot be reached.
    #[error("cannot connect to '{path}'")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The hybrid vsock socket did not answer `OK`.
    #[error("vsock port {port}: {why}")]
    Vsock {
        /// The guest port.
        port: u32,
        /// What happened instead.
        why: String,
    },
    /// The stream failed or a frame did not parse.
    #[error("agent connection")]
    Proto(#[from] ProtoError),
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Agent(String),
    /// The agent closed the connection before the session ended.
    #[error("the agent closed the connection")]
    Closed,
    /// The agent sent a frame that has no place here.
    #[error("the agent sent an unexpected {0} frame")]
    Unexpected(&'static str),
    /// The agent speaks another protocol version.
    #[error("the agent speaks protocol version {0}, we speak {VERSION}")]
    Version(u16),
    /// A local file or terminal.
    #[error("{what}")]
    Local {
        /// The file, or what was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    fn local(what: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Local {
            what: what.to_string(),
            source,
        }
    }
}

/// One greeted connection to the agent: a reading half and a writing half
/// that several threads share (every frame is written under its lock).
pub struct Conn {
    rd: UnixStream,
    wr: Arc<Mutex<UnixStream>>,
}

impl Conn {
    /// Connect to the agent and exchange hellos.
    pub fn open(target: &Target) -> Result<Conn, AgentError> {
        let (path, port) = match target {
            Target::Vsock { path, port } => (path, Some(*port)),
            Target::Unix(path) => (path, None),
        };
        let mut s = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: path.clone(),
            source,
        })?;
        let timeout = |s: &UnixStream, t| {
            s.set_read_timeout(t)
                .map_err(|e| AgentError::local("socket timeout", e))
        };
        timeout(&s, Some(HANDSHAKE_TIMEOUT))?;
        if let Some(port) = port {
            vsock_connect(&mut s, port)?;
        }
        write_frame(&mut s, &Frame::Hello { version: VERSION })?;
        match read_frame(&mut s)? {
            Some(Frame::Hello { version }) if version == VERSION => {}
            Some(Frame::Hello { version }) => return Err(AgentError::Version(version)),
            Some(Frame::Error(m)) => return Err(AgentError::Agent(m)),
            Some(f) => return Err(AgentError::Unexpected(f.name())),
            None => return Err(AgentError::Closed),
        }
        timeout(&s, None)?;
        let wr = s.try_clone().map_err(|e| AgentError::local("socket", e))?;
        Ok(Conn {
            rd: s,
            wr: Arc::new(Mutex::new(wr)),
        })
    }

    /// Send one frame.
    fn send(&self, f: &Frame) -> Result<(), AgentError> {
        send(&self.wr, f)
    }

    /// The next frame; the end of the stream is [`AgentError::Closed`].
    fn recv(&mut self) -> Result<Frame, AgentError> {
        read_frame(&mut self.rd)?.ok_or(AgentError::Closed)
    }
}

fn send(wr: &Mutex<UnixStream>, f: &Frame) -> Result<(), AgentError> {
    let mut g = wr.lock().unwrap_or_else(|e| e.into_inner());
    write_frame(&mut *g, f)?;
    Ok(())
}

/// Firecracker's host-initiated connection: `CONNECT <port>\n`, answered by
/// `OK <host_port>\n` once the guest accepts, or by a close. The answer is
/// read a byte at a time so that nothing of the agent's stream after it is
/// taken.
fn vsock_connect(s: &mut UnixStream, port: u32) -> Result<(), AgentError> {
    let fail = |why: String| AgentError::Vsock { port, why };
    s.write_all(connect_line(port).as_bytes())
        .map_err(|e| fail(format!("cannot send CONNECT: {e}")))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => {
                return Err(fail(
                    "closed without OK (is the agent running in the guest?)".into(),
                ))
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_OK_LINE => line.push(b[0]),
            Ok(_) => return Err(fail("answer line too long".into())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(format!("no answer: {e}"))),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match parse_ok_line(&text) {
        Some(_) => Ok(()),
        None => Err(fail(format!("answered {text:?} instead of OK"))),
    }
}

/// Host entropy sent with [`resumed`].
const RESUME_ENTROPY: usize = 2 * ENTROPY_MIN;

/// Tell the agent the VM was just restored: it sets the guest's clock to
/// ours and adds our random bytes to its pool, so that clones of one
/// snapshot stop sharing their random state.
pub fn resumed(target: &Target) -> Result<(), AgentError> {
    let mut conn = Conn::open(target)?;
    let wall_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0);
    let mut entropy = vec![0u8; RESUME_ENTROPY];
    // getrandom, not /dev/urandom: the VMM's threads may not open files.
    crate::host::random(&mut entropy).map_err(|e| AgentError::local("getrandom", e))?;
    conn.send(&Frame::Resumed { wall_ns, entropy })?;
    match conn.recv()? {
        Frame::Done => Ok(()),
        Frame::Error(m) => Err(AgentError::Agent(m)),
        f => Err(AgentError::Unexpected(f.name())),
    }
}
