//! The agent protocol: what `microvm exec` / `microvm cp` and the guest
//! agent (`microvm-init agent`) say to each other over one byte stream
//! (a vsock connection to [`AGENT_PORT`], or a Unix socket). One connection
//! is one session: both sides send [`Frame::Hello`] first, then the host
//! sends one request (exec, put, get or resumed) and the frames that belong
//! to it. docs/AGENT.md has the layout byte by byte.
//!
//! A frame is `len: u32 LE` (payload bytes, at most [`MAX_FRAME`]), `kind:
//! u8`, then the payload. Every count and length inside is checked against
//! the bytes that are there and against the bounds below; a frame that does
//! not parse is a [`ProtoError`], and the reader closes the connection.

#![deny(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]

use std::io::{Read, Write};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 52;
/// Protocol version sent in [`Frame::Hello`]; a peer with another one is
/// answered with an error frame and closed.
pub const VERSION: u16 = 1;
/// First bytes of a hello payload.
pub const MAGIC: [u8; 4] = *b"MVAG";
/// Largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Data frames are sent in chunks of at most this much.
pub const CHUNK: usize = 64 << 10;
/// Most argv entries or env entries in an exec request.
pub const MAX_ARGS: usize = 4096;
/// Longest path in a request.
pub const MAX_PATH: usize = 4096;
/// Longest error message.
pub const MAX_MESSAGE: usize = 4096;
/// Stdin bytes the host may send before the agent acknowledges them
/// ([`Frame::StdinAck`]): what the agent holds for a child that is slow to
/// read its stdin.
pub const STDIN_WINDOW: usize = 1 << 20;
/// Host entropy in a [`Frame::Resumed`]: at least 32 bytes, at most 4 KiB.
pub const ENTROPY_MIN: usize = 32;
/// See [`ENTROPY_MIN`].
pub const ENTROPY_MAX: usize = 4096;

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// As a shell reports it: the code's low byte, or 128+N for signal N.
    pub fn shell_code(self) -> u8 {
        match self {
            Self::Code(c) => u8::try_from(c & 0xff).unwrap_or(u8::MAX),
            Self::Signal(s) => u8::try_from(s.clamp(0, 127) + 128).unwrap_or(u8::MAX),
        }
    }
}

/// Run a command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// The command and its arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to (or replacing) the agent's default
    /// environment (`PATH`, `HOME`, and `TERM` with a TTY).
    pub env: Vec<String>,
    /// Working directory; `/` when empty.
    pub cwd: String,
    /// Run as this user and group instead of the agent's own.
    pub user: Option<(u32, u32)>,
    /// Give the command a pseudo-terminal (stderr then goes to it too).
    pub tty: bool,
    /// The terminal's rows and columns (with `tty`).
    pub rows: u16,
    /// See `rows`.
    pub cols: u16,
}

/// What a put or get carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// The bytes of one regular file.
    File,
    /// A tar stream of a directory's contents (paths relative to it).
    Tar,
}

/// Write a file, or unpack a tar stream into a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutRequest {
    /// Target file, or the directory to unpack into (created if missing).
    pub path: String,
    /// What the data frames carry.
    pub payload: Payload,
    /// Permission bits of the file or the directory.
    pub mode: u32,
    /// Owner of the file or directory; with a tar, also keep the owners
    /// the archive names. `None`: the agent's user.
    pub owner: Option<(u32, u32)>,
}

/// The frames. Directions: H = host to agent, A = agent to host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// H, A: first frame of each side.
    Hello {
        /// The sender's [`VERSION`].
        version: u16,
    },
    /// H: run a command; then Stdin*, StdinClose, Resize, Signal.
    Exec(ExecRequest),
    /// H: bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// H: end of the command's stdin.
    StdinClose,
    /// A: this many stdin bytes were taken by the command.
    StdinAck(u32),
    /// H: the terminal's new size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// H: send this signal to the command's process group.
    Signal(i32),
    /// A: command output.
    Stdout(Vec<u8>),
    /// A: command error output (never with a TTY).
    Stderr(Vec<u8>),
    /// A: the command ended; the last frame of an exec.
    Exit(ExitStatus),
    /// H: write a file or unpack a tar; then Data*, End; answered by Done.
    Put(PutRequest),
    /// H, A: a piece of a file or tar stream.
    Data(Vec<u8>),
    /// H, A: end of the data.
    End,
    /// H: read a file or a directory (as tar); answered by GetReply, Data*, End.
    Get {
        /// File or directory.
        path: String,
    },
    /// A: what follows a Get.
    GetReply {
        /// A file's bytes or a directory's tar.
        payload: Payload,
        /// Its permission bits.
        mode: u32,
    },
    /// H: the VM was restored: set the clock, add entropy; answered by Done.
    Resumed {
        /// Host `CLOCK_REALTIME` in nanoseconds since the epoch.
        wall_ns: u64,
        /// Host random bytes for the guest's pool.
        entropy: Vec<u8>,
    },
    /// A: a put or resumed succeeded.
    Done,
    /// H, A: the request failed, or the peer's frame was refused; the
    /// connection closes after it.
    Error(String),
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const EXEC: u8 = 0x10;
    pub const STDIN: u8 = 0x11;
    pub const STDIN_CLOSE: u8 = 0x12;
    pub const STDIN_ACK: u8 = 0x13;
    pub const RESIZE: u8 = 0x14;
    pub const SIGNAL: u8 = 0x15;
    pub const STDOUT: u8 = 0x18;
    pub const STDERR: u8 = 0x19;
    pub const EXIT: u8 = 0x1a;
    pub const PUT: u8 = 0x20;
    pub const DATA: u8 = 0x21;
    pub const END: u8 = 0x22;
    pub const GET: u8 = 0x23;
    pub const GET_REPLY: u8 = 0x24;
    pub const RESUMED: u8 = 0x30;
    pub const DONE: u8 = 0x31;
    pub const ERROR: u8 = 0x7f;
}

/// A frame that cannot be read.
#[derive(Debug)]
pub enum ProtoError {
    /// The stream failed, or ended inside a frame.
    Io(std::io::Error),
    /// A payload longer than [`MAX_FRAME`].
    TooLong(usize),
    /// A kind byte no frame has.
    UnknownKind(u8),
    /// The payload ends before a field does.
    Truncated,
    /// Bytes left after the last field.
    Trailing,
    /// A field out of its bounds or not valid (what, in words).
    Bad(&'static str),
    /// A frame that has no place here (its kind, in words).
    Unexpected(&'static str),
    /// The peer sent an Error frame in the middle of a data stream.
    Remote(String),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::TooLong(n) => write!(f, "frame of {n} bytes (at most {MAX_FRAME})"),
            Self::UnknownKind(k) => write!(f, "unknown frame kind {k:#04x}"),
            Self::Truncated => write!(f, "frame ends inside a field"),
            Self::Trailing => write!(f, "bytes after the last field"),
            Self::Bad(what) => write!(f, "bad {what}"),
            Self::Unexpected(what) => write!(f, "unexpected {what} frame"),
            Self::Remote(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for ProtoError {}

impl From<std::io::Error> for ProtoError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Appends fields to a payload.
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        // Lengths above u32 cannot pass the frame bound; saturate, the
        // encoder's caller checks the total.
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
    }
    fn list(&mut self, items: &[String]) {
        self.u32(u32::try_from(items.len()).unwrap_or(u32::MAX));
        for s in items {
            self.bytes(s.as_bytes());
        }
    }
    fn owner(&mut self, o: Option<(u32, u32)>) {
        match o {
            None => self.u8(0),
            Some((u, g)) => {
                self.u8(1);
                self.u32(u);
                self.u32(g);
            }
        }
    }
}

/// Reads fields from a payload, never past its end.
struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, ProtoError> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn len(&mut self) -> Result<usize, ProtoError> {
        usize::try_from(self.u32()?).map_err(|_| ProtoError::Truncated)
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Bad("flag")),
        }
    }
    fn string(&mut self, max: usize, what: &'static str) -> Result<String, ProtoError> {
        let n = self.len()?;
        if n > max {
            return Err(ProtoError::Bad(what));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Bad(what))
    }
    /// A string list: the count is bounded, and each entry needs at least
    /// its 4 length bytes, so a huge count fails before any allocation.
    fn list(&mut self, what: &'static str) -> Result<Vec<String>, ProtoError> {
        let n = self.len()?;
        if n > MAX_ARGS || n.saturating_mul(4) > self.0.len() {
            return Err(ProtoError::Bad(what));
        }
        (0..n).map(|_| self.string(MAX_FRAME, what)).collect()
    }
    fn owner(&mut self) -> Result<Option<(u32, u32)>, ProtoError> {
        Ok(if self.bool()? {
            Some((self.u32()?, self.u32()?))
        } else {
            None
        })
    }
    fn payload(&mut self) -> Result<Payload, ProtoError> {
        match self.u8()? {
            0 => Ok(Payload::File),
            1 => Ok(Payload::Tar),
            _ => Err(ProtoError::Bad("payload kind")),
        }
    }
    fn path(&mut self) -> Result<String, ProtoError> {
        let p = self.string(MAX_PATH, "path")?;
        if p.is_empty() || p.contains('\0') {
            return Err(ProtoError::Bad("path"));
        }
        Ok(p)
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing)
        }
    }
}

fn payload_byte(p: Payload) -> u8 {
    match p {
        Payload::File => 0,
        Payload::Tar => 1,
    }
}

impl Frame {
    /// The whole frame, header included. Err if the payload would pass
    /// [`MAX_FRAME`] (a data chunk too big, too long a list).
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut e = Enc(vec![0; 5]);
        let k = match self {
            Self::Hello { version } => {
                e.0.extend_from_slice(&MAGIC);
                e.u16(*version);
                kind::HELLO
            }
            Self::Exec(r) => {
                if r.argv.len() > MAX_ARGS || r.env.len() > MAX_ARGS {
                    return Err(ProtoError::Bad("argument count"));
                }
                e.list(&r.argv);
                e.list(&r.env);
                e.bytes(r.cwd.as_bytes());
                e.owner(r.user);
                e.u8(u8::from(r.tty));
                e.u16(r.rows);
                e.u16(r.cols);
                kind::EXEC
            }
            Self::Stdin(d) => {
                e.0.extend_from_slice(d);
                kind::STDIN
            }
            Self::StdinClose => kind::STDIN_CLOSE,
            Self::StdinAck(n) => {
                e.u32(*n);
                kind::STDIN_ACK
            }
            Self::Resize { rows, cols } => {
                e.u16(*rows);
                e.u16(*cols);
                kind::RESIZE
            }
            Self::Signal(s) => {
                e.i32(*s);
                kind::SIGNAL
            }
            Self::Stdout(d) => {
                e.0.extend_from_slice(d);
                kind::STDOUT
            }
            Self::Stderr(d) => {
                e.0.extend_from_slice(d);
                kind::STDERR
            }
            Self::Exit(st) => {
                let (how, v) = match st {
                    ExitStatus::Code(c) => (0, *c),
                    ExitStatus::Signal(s) => (1, *s),
                };
                e.u8(how);
                e.i32(v);
                kind::EXIT
            }
            Self::Put(p) => {
                e.bytes(p.path.as_bytes());
                e.u8(payload_byte(p.payload));
                e.u32(p.mode);
                e.owner(p.owner);
                kind::PUT
            }
            Self::Data(d) => {
                e.0.extend_from_slice(d);
                kind::DATA
            }
            Self::End => kind::END,
            Self::Get { path } => {
                e.bytes(path.as_bytes());
                kind::GET
            }
            Self::GetReply { payload, mode } => {
                e.u8(payload_byte(*payload));
                e.u32(*mode);
                kind::GET_REPLY
            }
            Self::Resumed { wall_ns, entropy } => {
                e.u64(*wall_ns);
                e.0.extend_from_slice(entropy);
                kind::RESUMED
            }
            Self::Done => kind::DONE,
            Self::Error(msg) => {
                // Cut on a character boundary at the bound rather than fail:
                // an error must always be sayable.
                let mut end = msg.len().min(MAX_MESSAGE);
                while !msg.is_char_boundary(end) {
                    end -= 1;
                }
                e.bytes(&msg.as_bytes()[..end]);
                kind::ERROR
            }
        };
        let len = e.0.len() - 5;
        if len > MAX_FRAME {
            return Err(ProtoError::TooLong(len));
        }
        let len32 = u32::try_from(len).map_err(|_| ProtoError::TooLong(len))?;
        e.0[..4].copy_from_slice(&len32.to_le_bytes());
        e.0[4] = k;
        Ok(e.0)
    }

    /// Parse one payload of the given kind.
    pub fn decode(k: u8, payload: &[u8]) -> Result<Frame, ProtoError> {
        let mut d = Dec(payload);
        let f = match k {
            kind::HELLO => {
                if d.array::<4>()? != MAGIC {
                    return Err(ProtoError::Bad("hello magic"));
                }
                Self::Hello { version: d.u16()? }
            }
            kind::EXEC => {
                let argv = d.list("argv")?;
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(ProtoError::Bad("argv"));
                }
                let env = d.list("env")?;
                if env.iter().any(|kv| !kv.contains('=')) {
                    return Err(ProtoError::Bad("env entry"));
                }
                if argv.iter().chain(&env).any(|s| s.contains('\0')) {
                    return Err(ProtoError::Bad("NUL in argv or env"));
                }
                let cwd = d.string(MAX_PATH, "cwd")?;
                if cwd.contains('\0') {
                    return Err(ProtoError::Bad("cwd"));
                }
                Self::Exec(ExecRequest {
                    argv,
                    env,
                    cwd,
                    user: d.owner()?,
                    tty: d.bool()?,
                    rows: d.u16()?,
                    cols: d.u16()?,
                })
            }
            kind::STDIN => Self::Stdin(d.rest()),
            kind::STDIN_CLOSE => Self::StdinClose,
            kind::STDIN_ACK => Self::StdinAck(d.u32()?),
            kind::RESIZE => Self::Resize {
                rows: d.u16()?,
                cols: d.u16()?,
            },
            kind::SIGNAL => {
                let s = d.i32()?;
                if !(1..=64).contains(&s) {
                    return Err(ProtoError::Bad("signal number"));
                }
                Self::Signal(s)
            }
            kind::STDOUT => Self::Stdout(d.rest()),
            kind::STDERR => Self::Stderr(d.rest()),
            kind::EXIT => {
                let how = d.u8()?;
                let v = d.i32()?;
                Self::Exit(match how {
                    0 => ExitStatus::Code(v),
                    1 => ExitStatus::Signal(v),
                    _ => return Err(ProtoError::Bad("exit kind")),
                })
            }
            kind::PUT => Self::Put(PutRequest {
                path: d.path()?,
                payload: d.payload()?,
                mode: d.u32()? & 0o7777,
                owner: d.owner()?,
            }),
            kind::DATA => Self::Data(d.rest()),
            kind::END => Self::End,
            kind::GET => Self::Get { path: d.path()? },
            kind::GET_REPLY => Self::GetReply {
                payload: d.payload()?,
                mode: d.u32()? & 0o7777,
            },
            kind::RESUMED => {
                let wall_ns = d.u64()?;
                let entropy = d.rest();
                if !(ENTROPY_MIN..=ENTROPY_MAX).contains(&entropy.len()) {
                    return Err(ProtoError::Bad("entropy length"));
                }
                Self::Resumed { wall_ns, entropy }
            }
            kind::DONE => Self::Done,
            kind::ERROR => Self::Error(d.string(MAX_MESSAGE, "error message")?),
            other => return Err(ProtoError::UnknownKind(other)),
        };
        d.end()?;
        Ok(f)
    }
}

/// Write one frame in one `write_all` (so that frames written under one
/// lock never interleave).
pub fn write_frame(w: &mut impl Write, f: &Frame) -> Result<(), ProtoError> {
    w.write_all(&f.encode()?)?;
    Ok(())
}

/// Read one frame; `Ok(None)` when the stream ends cleanly between frames.
/// The length is checked before the payload is allocated.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = usize::try_from(u32::from_le_bytes([head[0], head[1], head[2], head[3]]))
        .map_err(|_| ProtoError::TooLong(usize::MAX))?;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLong(len));
    }
    let mut payload = vec![0; len];
    r.read_exact(&mut payload)?;
    Frame::decode(head[4], &payload).map(Some)
}

impl Frame {
    /// The frame's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "Hello",
            Self::Exec(_) => "Exec",
            Self::Stdin(_) => "Stdin",
            Self::StdinClose => "StdinClose",
            Self::StdinAck(_) => "StdinAck",
            Self::Resize { .. } => "Resize",
            Self::Signal(_) => "Signal",
            Self::Stdout(_) => "Stdout",
            Self::Stderr(_) => "Stderr",
            Self::Exit(_) => "Exit",
            Self::Put(_) => "Put",
            Self::Data(_) => "Data",
            Self::End => "End",
            Self::Get { .. } => "Get",
            Self::GetReply { .. } => "GetReply",
            Self::Resumed { .. } => "Resumed",
            Self::Done => "Done",
            Self::Error(_) => "Error",
        }
    }
}

/// The Data frames of a put or a get read as one byte stream, which ends
/// at End. Anything else there stops it with an `InvalidData` read error;
/// [`DataReader::fault`] says what it was.
pub struct DataReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    ended: bool,
    fault: Option<ProtoError>,
}

impl<R: Read> DataReader<R> {
    /// Read data frames from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            ended: false,
            fault: None,
        }
    }

    /// Why the stream stopped before End, if it did.
    pub fn take_fault(&mut self) -> Option<ProtoError> {
        self.fault.take()
    }

    /// Read (and drop) the rest up to End: after a local failure, so that
    /// the peer's next frame can be read and its writes do not stall.
    pub fn drain(&mut self) -> Result<(), ProtoError> {
        let _ = std::io::copy(self, &mut std::io::sink());
        match self.fault.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<R: Read> Read for DataReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.ended {
                return Ok(0);
            }
            if self.fault.is_some() {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            match read_frame(&mut self.inner) {
                Ok(Some(Frame::Data(d))) => {
                    self.buf = d;
                    self.pos = 0;
                }
                Ok(Some(Frame::End)) => self.ended = true,
                Ok(Some(Frame::Error(m))) => self.fault = Some(ProtoError::Remote(m)),
                Ok(Some(f)) => self.fault = Some(ProtoError::Unexpected(f.name())),
                Ok(None) => {
                    self.fault = Some(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Err(e) => self.fault = Some(e),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Bytes written become Data frames of at most [`CHUNK`] bytes; `finish`
/// sends the last one and End. Each frame is one `write_all` on `inner`.
pub struct DataWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> DataWriter<W> {
    /// Write data frames to `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    /// Send what is buffered, then End.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.flush()?;
        let end = Frame::End.encode().map_err(std::io::Error::other)?;
        self.inner.write_all(&end)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for DataWriter<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let f = Frame::Data(std::mem::take(&mut self.buf));
            self.inner
                .write_all(&f.encode().map_err(std::io::Error::other)?)?;
        }
        self.inner.flush()
    }
}

/// A host's `CONNECT <port>\n` line for Firecracker's hybrid vsock socket.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The port in the hybrid socket's answer `OK <host_port>\n` (the line
/// without its newline), or None if it is not that.
pub fn parse_ok_line(line: &str) -> Option<u32> {
    line.strip_prefix("OK ")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let bytes = f.encode().unwrap();
        let back = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip(Frame::Hello { version: VERSION });
        round_trip(Frame::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["A=1".into(), "B=".into()],
            cwd: "/tmp".into(),
            user: Some((1000, 100)),
            tty: true,
            rows: 24,
            cols: 80,
        }));
        round_trip(Frame::Stdin(b"abc".to_vec()));
        round_trip(Frame::Stdin(Vec::new()));
        round_trip(Frame::StdinClose);
        round_trip(Frame::StdinAck(4096));
        round_trip(Frame::Resize {
            rows: 50,
            cols: 132,
        });
        round_trip(Frame::Signal(libc::SIGINT));
        round_trip(Frame::Stdout(vec![0xff; CHUNK]));
        round_trip(Frame::Stderr(b"oops".to_vec()));
        round_trip(Frame::Exit(ExitStatus::Code(7)));
        round_trip(Frame::Exit(ExitStatus::Signal(9)));
        round_trip(Frame::Put(PutRequest {
            path: "/etc/x".into(),
            payload: Payload::Tar,
            mode: 0o755,
            owner: None,
        }));
        round_trip(Frame::Data(vec![1, 2, 3]));
        round_trip(Frame::End);
        round_trip(Frame::Get { path: "/".into() });
        round_trip(Frame::GetReply {
            payload: Payload::File,
            mode: 0o644,
        });
        round_trip(Frame::Resumed {
            wall_ns: 1 << 60,
            entropy: vec![7; 32],
        });
        round_trip(Frame::Done);
        round_trip(Frame::Error("no such file".into()));
    }

    #[test]
    fn header_is_length_then_kind() {
        let b = Frame::Signal(2).encode().unwrap();
        assert_eq!(b, [4, 0, 0, 0, 0x15, 2, 0, 0, 0]);
        let h = Frame::Hello { version: 1 }.encode().unwrap();
        assert_eq!(h, [6, 0, 0, 0, 1, b'M', b'V', b'A', b'G', 1, 0]);
    }

    #[test]
    fn clean_eof_between_frames_is_none() {
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        let err = read_frame(&mut &[1u8, 0][..]).unwrap_err();
        assert!(matches!(err, ProtoError::Io(_)), "{err}");
        // Header complete, payload cut short.
        let err = read_frame(&mut &[4u8, 0, 0, 0, 0x15, 2][..]).unwrap_err();
        assert!(matches!(err, ProtoError::Io(_)), "{err}");
    }

    #[test]
    fn too_long_is_refused_before_reading_it() {
        let len = u32::try_from(MAX_FRAME + 1).unwrap().to_le_bytes();
        let head = [len[0], len[1], len[2], len[3], 0x21];
        let err = read_frame(&mut &head[..]).unwrap_err();
        assert!(matches!(err, ProtoError::TooLong(n) if n == MAX_FRAME + 1));
        let huge = [0xff, 0xff, 0xff, 0xff, 0x21];
        assert!(matches!(
            read_frame(&mut &huge[..]).unwrap_err(),
            ProtoError::TooLong(_)
        ));
        assert!(matches!(
            Frame::Data(vec![0; MAX_FRAME + 1]).encode().unwrap_err(),
            ProtoError::TooLong(_)
        ));
        // Exactly the bound is fine.
        round_trip(Frame::Data(vec![0; MAX_FRAME]));
    }

    #[test]
    fn bad_payloads_are_errors() {
        let bad = |k: u8, p: &[u8]| Frame::decode(k, p).unwrap_err();
        assert!(matches!(bad(0x55, &[]), ProtoError::UnknownKind(0x55)));
        assert!(matches!(
            bad(kind::HELLO, b"XXXX\x01\x00"),
            ProtoError::Bad(_)
        ));
        assert!(matches!(
            bad(kind::HELLO, b"MVAG\x01"),
            ProtoError::Truncated
        ));
        assert!(matches!(bad(kind::DONE, &[0]), ProtoError::Trailing));
        assert!(matches!(
            bad(kind::SIGNAL, &[0, 0, 0, 0]),
            ProtoError::Bad(_)
        ));
        assert!(matches!(
            bad(kind::SIGNAL, &[65, 0, 0, 0]),
            ProtoError::Bad(_)
        ));
        assert!(matches!(
            bad(kind::EXIT, &[2, 0, 0, 0, 0]),
            ProtoError::Bad(_)
        ));
        assert!(matches!(
            bad(kind::RESUMED, &[0; 8 + 31]),
            ProtoError::Bad(_)
        ));
        assert!(matches!(bad(kind::GET, &[0, 0, 0, 0]), ProtoError::Bad(_)));
        // A path longer than MAX_PATH, and one that claims more than is there.
        let mut long = u32::try_from(MAX_PATH + 1).unwrap().to_le_bytes().to_vec();
        long.extend(vec![b'a'; MAX_PATH + 1]);
        assert!(matches!(bad(kind::GET, &long), ProtoError::Bad(_)));
        assert!(matches!(
            bad(kind::GET, &[9, 0, 0, 0, b'/']),
            ProtoError::Truncated
        ));
        // Not UTF-8.
        assert!(matches!(
            bad(kind::ERROR, &[1, 0, 0, 0, 0xff]),
            ProtoError::Bad(_)
        ));
    }

    fn exec_payload(argv: &[&str], env: &[&str]) -> Vec<u8> {
        let req = ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Frame::Exec(req).encode().unwrap()[5..].to_vec()
    }

    #[test]
    fn exec_requests_are_checked() {
        let bad = |p: Vec<u8>| Frame::decode(kind::EXEC, &p).unwrap_err();
        assert!(Frame::decode(kind::EXEC, &exec_payload(&["true"], &[])).is_ok());
        assert!(matches!(bad(exec_payload(&[], &[])), ProtoError::Bad(_)));
        assert!(matches!(bad(exec_payload(&[""], &[])), ProtoError::Bad(_)));
        assert!(matches!(
            bad(exec_payload(&["x"], &["NOEQ"])),
            ProtoError::Bad(_)
        ));
        assert!(matches!(
            bad(exec_payload(&["a\0b"], &[])),
            ProtoError::Bad(_)
        ));
        // A count far beyond the bytes present fails without allocating.
        let mut p = u32::MAX.to_le_bytes().to_vec();
        p.extend([0; 16]);
        assert!(matches!(bad(p), ProtoError::Bad(_)));
        let mut p = u32::try_from(MAX_ARGS + 1).unwrap().to_le_bytes().to_vec();
        p.extend(vec![0; 4 * (MAX_ARGS + 1)]);
        assert!(matches!(bad(p), ProtoError::Bad(_)));
        let too_many = ExecRequest {
            argv: vec!["x".into(); MAX_ARGS + 1],
            ..Default::default()
        };
        assert!(Frame::Exec(too_many).encode().is_err());
        // The tty flag is 0 or 1.
        let mut p = exec_payload(&["true"], &[]);
        let flag = p.len() - 5;
        p[flag] = 2;
        assert!(matches!(bad(p), ProtoError::Bad(_)));
    }

    #[test]
    fn error_messages_are_cut_to_the_bound() {
        let f = Frame::Error("é".repeat(MAX_MESSAGE));
        let b = f.encode().unwrap();
        match read_frame(&mut &b[..]).unwrap().unwrap() {
            Frame::Error(m) => assert!(m.len() <= MAX_MESSAGE && m.starts_with('é')),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exit_status_as_a_shell_says_it() {
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(ExitStatus::Code(256 + 3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    }

    #[test]
    fn data_streams_round_trip_in_chunks() {
        let body: Vec<u8> = (0..200_000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let mut w = DataWriter::new(Vec::new());
        w.write_all(&body).unwrap();
        let wire = w.finish().unwrap();
        let mut frames = &wire[..];
        let mut sizes = Vec::new();
        while let Some(f) = read_frame(&mut frames).unwrap() {
            sizes.push(match f {
                Frame::Data(d) => d.len(),
                Frame::End => 0,
                other => panic!("{other:?}"),
            });
        }
        assert_eq!(sizes, [CHUNK, CHUNK, CHUNK, 200_000 - 3 * CHUNK, 0]);
        let mut r = DataReader::new(&wire[..]);
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert_eq!(back, body);
        assert!(r.take_fault().is_none());
    }

    #[test]
    fn data_streams_stop_at_anything_else() {
        let mut wire = Frame::Data(b"ab".to_vec()).encode().unwrap();
        wire.extend(Frame::Error("disk full".into()).encode().unwrap());
        let mut r = DataReader::new(&wire[..]);
        let mut back = Vec::new();
        assert!(r.read_to_end(&mut back).is_err());
        assert_eq!(back, b"ab");
        assert!(matches!(r.take_fault(), Some(ProtoError::Remote(m)) if m == "disk full"));
        let wire = Frame::Stdout(b"x".to_vec()).encode().unwrap();
        let mut r = DataReader::new(&wire[..]);
        assert!(matches!(r.drain(), Err(ProtoError::Unexpected("Stdout"))));
        // Cut off: no End.
        let wire = Frame::Data(b"x".to_vec()).encode().unwrap();
        let mut r = DataReader::new(&wire[..]);
        assert!(matches!(r.drain(), Err(ProtoError::Io(_))));
    }

    #[test]
    fn hybrid_vsock_lines() {
        assert_eq!(connect_line(52), "CONNECT 52\n");
        assert_eq!(parse_ok_line("OK 1073741824"), Some(1_073_741_824));
        assert_eq!(parse_ok_line("OK 5\r"), Some(5));
        assert_eq!(parse_ok_line("ERR"), None);
        assert_eq!(parse_ok_line("OK x"), None);
    }
}
