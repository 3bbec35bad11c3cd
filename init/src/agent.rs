//! `microvm-init agent [--unix PATH] [--port N]`: the guest agent. PID 1
//! starts it as its own child (PID 1 reaps every orphan with waitpid(-1),
//! which would take the exit statuses of the agent's commands); it can also
//! be run by hand, and with `--unix` on the host for tests.
//!
//! One thread per connection, one session per connection (the protocol is
//! in `microvm_init::agent_proto` and docs/AGENT.md). Whatever a peer sends,
//! the worst it gets is its own connection closed with a log line.
//!
//! An exec session's threads: this one reads the host's frames (stdin into
//! a channel the host may fill only up to `STDIN_WINDOW`, resize, signal);
//! a stdin thread writes to the command and acknowledges what it took; one
//! thread per output reads the command and blocks on the socket when the
//! host does not read (so the command blocks too); a finisher waits for the
//! command and the end of its output, sends Exit and shuts the socket.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use microvm_init::agent_proto::{
    read_frame, write_frame, DataReader, DataWriter, ExecRequest, ExitStatus, Frame, Payload,
    ProtoError, PutRequest, AGENT_PORT, CHUNK, STDIN_WINDOW, VERSION,
};
use microvm_init::DEFAULT_PATH;

/// Sessions served at once; a connection beyond is told so and closed.
const MAX_SESSIONS: usize = 128;
/// `_IOW('R', 0x03, int[2])`: add entropy and credit it (needs root).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// One line on stderr (the console), naming the connection when a
/// session's thread says it.
fn log(msg: &str) {
    let t = std::thread::current();
    match t.name().filter(|n| n.starts_with("agent-")) {
        Some(n) => {
            let _ = writeln!(std::io::stderr(), "microvm-init agent: {n}: {msg}");
        }
        None => {
            let _ = writeln!(std::io::stderr(), "microvm-init agent: {msg}");
        }
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Where connections come from.
enum Listener {
    Vsock(OwnedFd),
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<File> {
        match self {
            Self::Unix(l) => l.accept().map(|(s, _)| File::from(OwnedFd::from(s))),
            Self::Vsock(fd) => {
                // SAFETY: accept4 on our listening socket; no address wanted.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    return Err(errno());
                }
                // SAFETY: a new descriptor that nothing else owns.
                Ok(File::from(unsafe { OwnedFd::from_raw_fd(c) }))
            }
        }
    }
}

fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).unwrap_or(16);
    // SAFETY: bind with a valid sockaddr_vm of the given length.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) } != 0 {
        return Err(errno());
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
        return Err(errno());
    }
    Ok(fd)
}

/// Run the agent; returns the process exit code (only on a setup failure).
pub fn main(args: &[String]) -> u8 {
    let mut unix = None;
    let mut port = AGENT_PORT;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--unix", Some(p)) => unix = Some(p.clone()),
            ("--port", Some(p)) => match p.parse() {
                Ok(n) => port = n,
                Err(_) => {
                    log(&format!("--port {p}: not a port number"));
                    return 2;
                }
            },
            _ => {
                log("usage: microvm-init agent [--unix PATH] [--port N]");
                return 2;
            }
        }
    }
    // PID 1 blocks the signals it waits for; start clean, so that the
    // commands we spawn do not inherit a mask either.
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    let listener = match &unix {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            std::os::unix::net::UnixListener::bind(path).map(Listener::Unix)
        }
        None => vsock_listen(port).map(Listener::Vsock),
    };
    let listener = match listener {
        Ok(l) => l,
        // A guest kernel without vsock: nothing to serve, nothing to say.
        Err(e)
            if unix.is_none()
                && matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::ENODEV)) =>
        {
            return 1
        }
        Err(e) => {
            let at = unix.unwrap_or_else(|| format!("vsock port {port}"));
            log(&format!("cannot listen on {at}: {e}"));
            return 1;
        }
    };
    let mut next_id = 0u64;
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and the like: wait a little instead of spinning.
                log(&format!("accept: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        if SESSIONS.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
            SESSIONS.fetch_sub(1, Ordering::SeqCst);
            let mut c = conn;
            let _ = write_frame(&mut c, &Frame::Error("too many sessions".into()));
            continue;
        }
        let spawned = std::thread::Builder::new()
            .name(format!("agent-{id}"))
            .spawn(move || {
                serve(conn);
                SESSIONS.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            SESSIONS.fetch_sub(1, Ordering::SeqCst);
            log(&format!("connection {id}: cannot start a thread: {e}"));
        }
    }
}

/// Why a session ended early.
enum Fail {
    /// The peer sent something we do not accept: tell it, log, close.
    Proto(ProtoError),
    /// The peer went away or the socket failed: just close.
    Gone,
}

impl From<ProtoError> for Fail {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Io(_) => Self::Gone,
            other => Self::Proto(other),
        }
    }
}

type Writer = Arc<Mutex<File>>;

fn send(w: &Writer, f: &Frame) -> Result<(), Fail> {
    let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
    write_frame(&mut *g, f).map_err(Fail::from)
}

fn unexpected(f: &Frame) -> Fail {
    Fail::Proto(ProtoError::Unexpected(f.name()))
}

fn serve(conn: File) {
    let mut rd = match conn.try_clone() {
        Ok(r) => r,
        Err(e) => {
            log(&e.to_string());
            return;
        }
    };
    let wr: Writer = Arc::new(Mutex::new(conn));
    match session(&mut rd, &wr) {
        Ok(()) | Err(Fail::Gone) => {}
        Err(Fail::Proto(e)) => refuse(&wr, &e),
    }
}

/// Say why we close on the peer's account, to the console and to the peer.
fn refuse(wr: &Writer, e: &ProtoError) {
    log(&format!("{e}; closing the connection"));
    let _ = send(wr, &Frame::Error(format!("agent: {e}")));
}

fn session(rd: &mut File, wr: &Writer) -> Result<(), Fail> {
    match read_frame(rd)? {
        None => return Ok(()),
        Some(Frame::Hello { version }) if version == VERSION => {}
        Some(Frame::Hello { version }) => {
            log(&format!("a peer speaks version {version}; closing"));
            let msg = format!("agent speaks protocol version {VERSION}, not {version}");
            return send(wr, &Frame::Error(msg));
        }
        Some(f) => return Err(unexpected(&f)),
    }
    send(wr, &Frame::Hello { version: VERSION })?;
    match read_frame(rd)? {
        None => Ok(()),
        Some(Frame::Exec(req)) => exec(req, rd, wr),
        Some(Frame::Put(req)) => put(&req, rd, wr),
        Some(Frame::Get { path }) => get(&path, wr),
        Some(Frame::Resumed { wall_ns, entropy }) => resumed(wall_ns, &entropy, wr),
        Some(f) => Err(unexpected(&f)),
    }
}

// ---------------------------------------------------------------- exec ----

/// A started command and the ends of its stdio that we hold.
struct Running {
    child: Child,
    pid: libc::pid_t,
    stdin: Option<File>,
    /// Readers of its output; `true` for stderr.
    outputs: Vec<(File, bool)>,
    /// The pty master, for resizes.
    master: Option<File>,
}

fn set_winsize(fd: &File, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize we pass; fd is a pty.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// A pty pair, both ends close-on-exec from the start (a command spawned by
/// another session at the same moment must not inherit them, or our reader
/// would never see the end of this one's output).
fn open_pty() -> std::io::Result<(File, File)> {
    // SAFETY: open(2) on a constant NUL-terminated path.
    let m = unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if m < 0 {
        return Err(errno());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(m) });
    // SAFETY: unlockpt and TIOCGPTPEER on the master we just opened.
    let s = unsafe {
        if libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(errno());
        }
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(errno());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let slave = File::from(unsafe { OwnedFd::from_raw_fd(s) });
    Ok((master, slave))
}

fn spawn(req: &ExecRequest) -> std::io::Result<Running> {
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH);
    let root = req.user.is_none_or(|(uid, _)| uid == 0);
    cmd.env("HOME", if root { "/root" } else { "/" });
    if req.tty {
        cmd.env("TERM", "xterm-256color");
    }
    for kv in &req.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.current_dir(if req.cwd.is_empty() { "/" } else { &req.cwd });
    let mut pty = None;
    if req.tty {
        let (master, slave) = open_pty()?;
        set_winsize(&master, req.rows, req.cols);
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        pty = Some(master);
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let (tty, user) = (req.tty, req.user);
    // SAFETY: runs in the forked child before exec and calls only
    // async-signal-safe functions on values copied before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // Its own session and process group: signals go to the group,
            // and a TTY becomes its controlling terminal.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = user {
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // The slave copies the Command holds go with it: the master then sees
    // EIO once the command and its children have closed theirs.
    drop(cmd);
    let pid = libc::pid_t::try_from(child.id()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    if let Some(master) = pty {
        return Ok(Running {
            child,
            pid,
            stdin: Some(master.try_clone()?),
            outputs: vec![(master.try_clone()?, false)],
            master: Some(master),
        });
    }
    let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
    let mut outputs = Vec::new();
    outputs.extend(
        child
            .stdout
            .take()
            .map(|s| (File::from(OwnedFd::from(s)), false)),
    );
    outputs.extend(
        child
            .stderr
            .take()
            .map(|s| (File::from(OwnedFd::from(s)), true)),
    );
    Ok(Running {
        child,
        pid,
        stdin,
        outputs,
        master: None,
    })
}

/// What the reader hands the stdin thread.
enum StdinMsg {
    Data(Vec<u8>),
    Close,
}

/// Whether the command can still be signalled: set false once it is a
/// zombie we are about to reap, under the lock, so a signal never reaches a
/// reused pid.
type Alive = Arc<Mutex<bool>>;

fn signal(alive: &Alive, pid: libc::pid_t, sig: libc::c_int) {
    let g = alive.lock().unwrap_or_else(|e| e.into_inner());
    if *g {
        // SAFETY: kill(2) on the command's process group (it called setsid,
        // so its pgid is its pid), or on the command alone if that failed.
        unsafe {
            if libc::kill(-pid, sig) != 0 {
                libc::kill(pid, sig);
            }
        }
    }
}

fn exec(req: ExecRequest, rd: &mut File, wr: &Writer) -> Result<(), Fail> {
    let mut run = match spawn(&req) {
        Ok(r) => r,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let msg = format!("microvm-init agent: cannot run {:?}: {e}\n", req.argv[0]);
            send(wr, &Frame::Stderr(msg.into_bytes()))?;
            return send(wr, &Frame::Exit(ExitStatus::Code(code)));
        }
    };
    let pid = run.pid;
    let alive: Alive = Arc::new(Mutex::new(true));
    let pending = Arc::new(AtomicUsize::new(0));

    let (tx, rx) = mpsc::channel::<StdinMsg>();
    let stdin_thread = {
        let (wr, pending, target) = (wr.clone(), pending.clone(), run.stdin.take());
        std::thread::spawn(move || feed_stdin(target, &rx, &wr, &pending))
    };
    let readers: Vec<_> = run
        .outputs
        .drain(..)
        .map(|(f, is_err)| {
            let wr = wr.clone();
            std::thread::spawn(move || pump_output(f, is_err, &wr))
        })
        .collect();
    let finisher = {
        let (wr, alive) = (wr.clone(), alive.clone());
        let sock = rd.try_clone().map_err(|_| Fail::Gone)?;
        let child = run.child;
        std::thread::spawn(move || finish(child, readers, &alive, &wr, &sock))
    };

    let mut outcome = Ok(());
    loop {
        let f = match read_frame(rd) {
            Ok(Some(f)) => f,
            Ok(None) => {
                break;
            }
            Err(e) => {
                // The finisher shuts the socket after Exit: not an error then.
                if *alive.lock().unwrap_or_else(|e| e.into_inner()) {
                    outcome = Err(Fail::from(e));
                }
                break;
            }
        };
        match f {
            Frame::Stdin(d) => {
                let now = pending.fetch_add(d.len(), Ordering::SeqCst) + d.len();
                if now > STDIN_WINDOW {
                    outcome = Err(Fail::Proto(ProtoError::Bad("stdin: more than the window")));
                    break;
                }
                let _ = tx.send(StdinMsg::Data(d));
            }
            Frame::StdinClose => {
                let _ = tx.send(StdinMsg::Close);
            }
            Frame::Resize { rows, cols } => {
                if let Some(m) = &run.master {
                    set_winsize(m, rows, cols);
                }
            }
            Frame::Signal(sig) => signal(&alive, pid, sig),
            other => {
                outcome = Err(unexpected(&other));
                break;
            }
        }
    }
    // Said before the finisher shuts the socket after Exit.
    if let Err(Fail::Proto(e)) = &outcome {
        refuse(wr, e);
        outcome = Err(Fail::Gone);
    }
    // The host is gone (or broke the protocol) while the command runs: it
    // has nobody to talk to, stop it. (After Exit, `alive` is false.)
    signal(&alive, pid, libc::SIGKILL);
    drop(tx);
    drop(run.master);
    let _ = stdin_thread.join();
    let _ = finisher.join();
    outcome
}

/// Write what the host sent to the command's stdin, acknowledging every
/// chunk once written (or dropped, when the command closed its stdin).
fn feed_stdin(
    mut target: Option<File>,
    rx: &mpsc::Receiver<StdinMsg>,
    wr: &Writer,
    pending: &AtomicUsize,
) {
    while let Ok(msg) = rx.recv() {
        match msg {
            StdinMsg::Data(d) => {
                if let Some(t) = &mut target {
                    if t.write_all(&d).is_err() {
                        target = None;
                    }
                }
                pending.fetch_sub(d.len(), Ordering::SeqCst);
                let n = u32::try_from(d.len()).unwrap_or(u32::MAX);
                if send(wr, &Frame::StdinAck(n)).is_err() {
                    return;
                }
            }
            // A pty has no end of input short of closing the master,
            // which the output reader still needs; only a pipe is closed.
            StdinMsg::Close => {
                if target.as_ref().is_some_and(|t| !is_tty(t)) {
                    target = None;
                }
            }
        }
    }
}

fn is_tty(f: &File) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(f.as_raw_fd()) == 1 }
}

fn pump_output(mut f: File, is_err: bool, wr: &Writer) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EIO: a pty whose every slave is closed.
            Err(_) => return,
        };
        let data = buf[..n].to_vec();
        let frame = if is_err {
            Frame::Stderr(data)
        } else {
            Frame::Stdout(data)
        };
        if send(wr, &frame).is_err() {
            return;
        }
    }
}

fn finish(
    mut child: Child,
    readers: Vec<std::thread::JoinHandle<()>>,
    alive: &Alive,
    wr: &Writer,
    sock: &File,
) {
    // Wait without reaping first, so the pid stays ours until `alive` is
    // false; then reap.
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let id = libc::id_t::try_from(child.id()).unwrap_or_default();
    loop {
        // SAFETY: waitid on our own child with a valid siginfo pointer.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 || errno().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    *alive.lock().unwrap_or_else(|e| e.into_inner()) = false;
    let status = match child.wait() {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => ExitStatus::Code(c),
            (None, Some(s)) => ExitStatus::Signal(s),
            (None, None) => ExitStatus::Code(255),
        },
        Err(e) => {
            log(&format!("wait: {e}"));
            ExitStatus::Code(255)
        }
    };
    for r in readers {
        let _ = r.join();
    }
    let _ = send(wr, &Frame::Exit(status));
    // Wakes the session's reader: the exec is over.
    // SAFETY: shutdown(2) on the connection's socket, which we hold open.
    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
}

// --------------------------------------------------------------- files ----

/// Writes whole frames under the session's lock (so one `write` is one
/// frame, never split by another thread's).
struct Locked<'a>(&'a Writer);

impl Write for Locked<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn chown(path: &str, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    match owner {
        Some((u, g)) => std::os::unix::fs::lchown(path, Some(u), Some(g)),
        None => Ok(()),
    }
}

fn put(req: &PutRequest, rd: &mut File, wr: &Writer) -> Result<(), Fail> {
    let mut data = DataReader::new(rd);
    let result = match req.payload {
        Payload::File => put_file(req, &mut data),
        Payload::Tar => put_tar(req, &mut data),
    };
    data.drain()?;
    match result {
        Ok(()) => send(wr, &Frame::Done),
        Err(e) => send(wr, &Frame::Error(format!("{}: {e}", req.path))),
    }
}

fn put_file(req: &PutRequest, data: &mut DataReader<&mut File>) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(req.mode)
        .open(&req.path)?;
    std::io::copy(data, &mut f)?;
    f.set_permissions(std::fs::Permissions::from_mode(req.mode))?;
    chown(&req.path, req.owner)
}

fn put_tar(req: &PutRequest, data: &mut DataReader<&mut File>) -> std::io::Result<()> {
    std::fs::create_dir_all(&req.path)?;
    let mut ar = tar::Archive::new(&mut *data);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(req.owner.is_some());
    ar.set_overwrite(true);
    ar.unpack(&req.path)?;
    std::fs::set_permissions(&req.path, std::fs::Permissions::from_mode(req.mode))?;
    chown(&req.path, req.owner)
}

fn get(path: &str, wr: &Writer) -> Result<(), Fail> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return send(wr, &Frame::Error(format!("{path}: {e}"))),
    };
    let mode = meta.permissions().mode() & 0o7777;
    let mut out = DataWriter::new(Locked(wr));
    let sent = if meta.is_dir() {
        send(
            wr,
            &Frame::GetReply {
                payload: Payload::Tar,
                mode,
            },
        )?;
        let mut b = tar::Builder::new(&mut out);
        b.follow_symlinks(false);
        b.append_dir_all(".", path).and_then(|()| b.finish())
    } else if meta.is_file() {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) => return send(wr, &Frame::Error(format!("{path}: {e}"))),
        };
        send(
            wr,
            &Frame::GetReply {
                payload: Payload::File,
                mode,
            },
        )?;
        std::io::copy(&mut f, &mut out).map(|_| ())
    } else {
        return send(
            wr,
            &Frame::Error(format!("{path}: not a regular file or directory")),
        );
    };
    match sent.and_then(|()| out.finish().map(|_| ())) {
        Ok(()) => Ok(()),
        // Halfway through: an Error instead of End tells the host the
        // data it has is not the whole.
        Err(e) => send(wr, &Frame::Error(format!("{path}: {e}"))),
    }
}

// -------------------------------------------------------------- resume ----

fn resumed(wall_ns: u64, entropy: &[u8], wr: &Writer) -> Result<(), Fail> {
    let mut problems = Vec::new();
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(wall_ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::try_from(wall_ns % 1_000_000_000).unwrap_or(0),
    };
    // SAFETY: clock_settime reads the timespec we pass.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        problems.push(format!("clock: {}", errno()));
    }
    if let Err(e) = add_entropy(entropy) {
        problems.push(format!("entropy: {e}"));
    }
    if problems.is_empty() {
        send(wr, &Frame::Done)
    } else {
        log(&format!("resumed: {}", problems.join(", ")));
        send(wr, &Frame::Error(problems.join(", ")))
    }
}

/// `struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }`
/// holding `bytes`, credited at 8 bits a byte (the host's own getrandom).
fn rand_pool_info(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = i32::try_from(bytes.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut info = Vec::with_capacity(8 + bytes.len() + 4);
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // Keep the u32 array whole for the kernel's copy.
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    Ok(info)
}

/// Credit the bytes to the pool (RNDADDENTROPY, root only), or at least mix
/// them in with a plain write.
fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    let info = rand_pool_info(bytes)?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints and buf_size
    // bytes, all inside `info`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc == 0 {
        return Ok(());
    }
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_pool_info_layout() {
        let info = rand_pool_info(&[0xab; 33]).unwrap();
        assert_eq!(info.len(), 8 + 36);
        assert_eq!(info[..4], (33 * 8i32).to_ne_bytes());
        assert_eq!(info[4..8], 33i32.to_ne_bytes());
        assert!(info[8..41].iter().all(|&b| b == 0xab));
        assert!(info[41..].iter().all(|&b| b == 0));
    }
}
