//! The host side of the vsock device, in Firecracker's hybrid form: guest
//! stream connections become Unix stream connections on the host.
//!
//! - Host-initiated: a client connects to `uds_path` and writes
//!   `CONNECT <port>\n`; the muxer asks the guest (REQUEST to that port)
//!   and, once the guest accepts, answers `OK <host_port>\n` and the
//!   connection is a byte pipe. No guest listener: the guest resets and the
//!   client's connection is closed.
//! - Guest-initiated: a guest connection to CID 2, port P, is connected to
//!   the Unix socket `<uds_path>_<P>`, or reset when none listens there.
//!
//! Flow control is virtio's credit (virtio 1.2, 5.10.6.3): the muxer
//! offers each connection [`BUF_ALLOC`] bytes, buffers in it only what its
//! Unix peer has not taken yet, and reads from the peer only as much as the
//! guest has room for. A guest that sends past its credit is reset; a peer
//! that never reads stops the guest's sender at [`BUF_ALLOC`]. So the bytes
//! held are at most [`MAX_CONNECTIONS`] x [`BUF_ALLOC`], whatever the guest
//! or the peers do.
//!
//! Every host socket is non-blocking and watched by the muxer's own epoll,
//! whose fd the device worker watches. A socket is watched for reading only
//! until it is known readable (then it is read when the guest has buffers
//! and credit) and for writing only while bytes wait for it, so nothing
//! spins while the guest or a peer is slow.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use crate::devices::virtio::GuestLog;

/// Receive buffer offered to the guest per connection: what a peer that
/// never reads can make the muxer hold for one connection.
pub const BUF_ALLOC: u32 = 256 << 10;
/// Connections at once (host- and guest-initiated together); one more is
/// refused (the guest's REQUEST is reset, a host client is closed).
pub const MAX_CONNECTIONS: usize = 256;
/// Host clients that connected but have not yet been answered.
pub const MAX_HANDSHAKES: usize = 64;
/// Largest payload of one packet, either way (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// How long a host client may take to send its `CONNECT` line, and the
/// guest to accept a host-initiated connection. Firecracker gives 2 s; a
/// guest busy with bulk traffic on a loaded host took longer (50 parallel
/// connections in a TCG-nested guest), so 5 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait, after a restore, for the guest to take the transport reset
/// before host clients are served anyway.
pub const HOLD_LIMIT: Duration = Duration::from_secs(10);
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Replies for connections the muxer does not know, kept until the guest
/// has buffers for them; more are dropped (the guest times out instead).
const MAX_ORPHAN_RESETS: usize = 256;
/// Host connections accepted per readiness of the listener.
const ACCEPTS_PER_ROUND: usize = 16;
/// First local port of host-initiated connections (Firecracker's choice
/// too: far above the ports guests bind).
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Inner epoll tokens: the listener, the timer, then one per socket.
const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_SOCKET_TOKEN: u64 = 16;

/// A connection, by the host's and the guest's port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    host_port: u32,
    guest_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST not answered yet.
    Connecting { since: Instant },
    /// Both sides agreed; bytes flow.
    Established,
}

/// Packets a connection owes the guest, sent in this order.
#[derive(Debug, Default)]
struct Owed {
    request: bool,
    response: bool,
    credit_update: bool,
    /// SHUTDOWN flags to send (0: none).
    shutdown: u32,
    /// The connection is over: send RST and forget it.
    reset: bool,
}

impl Owed {
    fn any(&self) -> bool {
        self.request || self.response || self.credit_update || self.shutdown != 0 || self.reset
    }
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    owed: Owed,
    /// Guest bytes the peer has not taken yet (at most [`BUF_ALLOC`]).
    to_peer: VecDeque<u8>,
    /// Guest bytes handed to the peer so far (wrapping), and the count the
    /// guest was last told.
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    /// The guest's receive buffer and how much of it it emptied.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest (wrapping).
    rx_cnt: u32,
    /// The peer socket has bytes (or EOF) not yet read.
    readable: bool,
    /// The peer will send nothing more (read gave 0, or it hung up).
    peer_eof: bool,
    /// The guest will send nothing more: shut the peer's side down once
    /// `to_peer` is empty.
    guest_sent_all: bool,
    /// The guest will take nothing more.
    guest_takes_none: bool,
    /// SHUTDOWN flags already sent to the guest.
    shut_told: u32,
    /// The peer hung up: its socket is no longer watched (a hang-up is
    /// reported whatever one watches for), only read to its end.
    hung_up: bool,
    /// In `Muxer::rx_queue`.
    queued: bool,
    /// In `Muxer::urgent`.
    urgent_queued: bool,
    /// Events the inner epoll watches for (None: not registered).
    watching: Option<EventSet>,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            owed: Owed::default(),
            to_peer: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            readable: false,
            peer_eof: false,
            guest_sent_all: false,
            guest_takes_none: false,
            shut_told: 0,
            hung_up: false,
            queued: false,
            urgent_queued: false,
            watching: None,
        }
    }

    /// Bytes the guest can take now.
    fn guest_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_read(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.peer_eof
            && !self.guest_takes_none
            && self.guest_credit() > 0
    }

    /// Whether the guest has something to receive from this connection.
    fn has_rx(&self) -> bool {
        self.owed.any() || self.wants_read()
    }

    /// Events to watch: readable until known readable, writable while bytes wait.
    fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if !self.readable && !self.peer_eof && self.state == State::Established {
            ev |= EventSet::IN;
        }
        if !self.to_peer.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Write what waits for the peer; false when the peer is gone.
    fn flush_to_peer(&mut self) -> bool {
        while !self.to_peer.is_empty() {
            let (a, _) = self.to_peer.as_slices();
            match self.stream.write(a) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_peer.drain(..n);
                    // n <= BUF_ALLOC, a u32.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.to_peer.is_empty() && self.guest_sent_all {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        // Tell the guest about room it gained, before it stalls on it.
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= BUF_ALLOC / 2 {
            self.owed.credit_update = true;
        }
        true
    }
}

/// A host client that has not sent its `CONNECT` line yet.
struct Handshake {
    stream: UnixStream,
    since: Instant,
}

/// What happened, for the log and the tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Packets taken from the guest.
    pub tx_packets: u64,
    /// Payload bytes from the guest handed to host peers or buffered.
    pub tx_bytes: u64,
    /// Packets given to the guest.
    pub rx_packets: u64,
    /// Payload bytes given to the guest.
    pub rx_bytes: u64,
    /// Connections established, either way.
    pub connections: u64,
    /// Connections refused or reset.
    pub resets: u64,
    /// Packets from the guest that were refused (bad header, bad chain,
    /// past the credit).
    pub bad_packets: u64,
}

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The socket path is taken by a live socket or another file.
    #[error("vsock socket {0}: the path exists (another VM's socket, or a file)")]
    PathInUse(PathBuf),
    /// Binding, epoll or the timer failed.
    #[error("vsock socket {path}")]
    Io {
        /// The `uds_path`.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The listening socket, made when the VM is built (so it exists before the
/// vCPUs run) and removed when the device goes away.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Listen on `path`. A socket file nobody listens on any more (left by
    /// a VMM that was killed) is replaced; anything else there is refused.
    pub fn bind(path: &Path) -> Result<Self, MuxerError> {
        let io_err = |source| MuxerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            let stale = meta.file_type().is_socket()
                && matches!(UnixStream::connect(path), Err(e) if e.kind() == ErrorKind::ConnectionRefused);
            if !stale {
                return Err(MuxerError::PathInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the socket, for a device worker.
    pub fn try_clone(&self) -> io::Result<UnixListener> {
        self.listener.try_clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The connections of one activated device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<Key, Conn>,
    /// Inner epoll token -> connection.
    by_token: HashMap<u64, Key>,
    handshakes: HashMap<u64, Handshake>,
    /// Connections with something for the guest, oldest first.
    rx_queue: VecDeque<Key>,
    /// Connections that owe the guest a REQUEST, RESPONSE or RST: served
    /// before any data, so a connect is not timed out behind bulk traffic
    /// (Linux gives a connect 2 s by default).
    urgent: VecDeque<Key>,
    /// RSTs for packets of connections the muxer does not know.
    orphan_resets: VecDeque<Header>,
    next_token: u64,
    next_host_port: u32,
    /// Host clients wait in the listen backlog since then (a restored guest
    /// has not yet dropped its old connections; see [`Muxer::hold_clients`]).
    held_since: Option<Instant>,
    stats: VsockStats,
    log: GuestLog,
}

/// One packet for the guest: its header, with the payload in the buffer
/// [`Muxer::next_rx`] was given.
#[derive(Debug, PartialEq, Eq)]
pub struct RxPacket {
    /// The header (its `len` is the payload's length).
    pub header: Header,
}

impl Muxer {
    /// Serve the guest `guest_cid` with `listener` (bound to `uds_path`).
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            handshakes: HashMap::new(),
            rx_queue: VecDeque::new(),
            urgent: VecDeque::new(),
            orphan_resets: VecDeque::new(),
            next_token: FIRST_SOCKET_TOKEN,
            next_host_port: first_host_port(),
            held_since: None,
            stats: VsockStats::default(),
            log: GuestLog::default(),
        })
    }

    /// Leave new host clients in the listen backlog until
    /// [`Muxer::release_clients`] or [`HOLD_LIMIT`]: a restored guest that
    /// has not yet handled the transport reset would reset their
    /// connections along with the saved ones.
    pub fn hold_clients(&mut self) {
        if self.held_since.is_some() {
            return;
        }
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        self.held_since = Some(Instant::now());
        self.arm_timer();
    }

    /// Serve host clients again (those in the backlog first).
    pub fn release_clients(&mut self) {
        if self.held_since.take().is_none() {
            return;
        }
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        ) {
            log::warn!("vsock: cannot watch the host socket again: {e}");
        }
    }

    /// Whether host clients are held.
    pub fn holds_clients(&self) -> bool {
        self.held_since.is_some()
    }

    /// The fd the device worker watches: readable when a host socket is.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// What happened so far.
    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_SOCKET_TOKEN);
        t
    }

    fn header(&self, key: Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn queue_rx(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_rx() {
                c.queued = true;
                self.rx_queue.push_back(key);
            }
            if !c.urgent_queued && (c.owed.request || c.owed.response || c.owed.reset) {
                c.urgent_queued = true;
                self.urgent.push_back(key);
            }
        }
    }

    /// Watch `key`'s socket for what it needs now.
    fn rearm(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.interest();
        let fd = c.stream.as_raw_fd();
        if c.hung_up {
            if c.watching.take().is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            return;
        }
        let res = match c.watching {
            Some(now) if now == want => return,
            Some(_) => self
                .epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(want, c.token)),
            None => self
                .epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(want, c.token)),
        };
        match res {
            Ok(()) => c.watching = Some(want),
            Err(e) => {
                log::warn!("vsock: cannot watch a host socket: {e}");
                c.owed.reset = true;
            }
        }
    }

    /// Forget `key` (its socket closes).
    fn drop_conn(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_token.remove(&c.token);
            if c.queued {
                self.rx_queue.retain(|&k| k != key);
            }
            if c.urgent_queued {
                self.urgent.retain(|&k| k != key);
            }
            if c.watching.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    /// Tear `key` down: the guest gets an RST, the peer's socket closes.
    fn reset(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.owed = Owed {
                reset: true,
                ..Owed::default()
            };
            c.to_peer.clear();
            let _ = c.stream.shutdown(Shutdown::Both);
            self.stats.resets += 1;
            self.queue_rx(key);
            self.rearm(key);
        }
    }

    fn reset_orphan(&mut self, hdr: &Header) {
        if hdr.op == op::RST || self.orphan_resets.len() >= MAX_ORPHAN_RESETS {
            return;
        }
        self.stats.resets += 1;
        let mut h = self.header(
            Key {
                host_port: hdr.dst_port,
                guest_port: hdr.src_port,
            },
            op::RST,
        );
        h.buf_alloc = 0;
        self.orphan_resets.push_back(h);
    }

    fn bad(&mut self, why: std::fmt::Arguments<'_>) {
        self.stats.bad_packets += 1;
        self.log.warn("virtio-vsock", why);
    }

    /// A packet from the guest: `hdr`, with `payload` its `hdr.len` bytes.
    pub fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        self.stats.tx_packets += 1;
        let cid = self.guest_cid;
        if hdr.src_cid != cid || hdr.dst_cid != HOST_CID {
            return self.bad(format_args!(
                "packet from CID {} to CID {} dropped (the guest is {cid}, the host {HOST_CID})",
                hdr.src_cid, hdr.dst_cid
            ));
        }
        if hdr.kind != TYPE_STREAM {
            self.bad(format_args!("socket type {} refused", hdr.kind));
            return self.reset_orphan(hdr);
        }
        let key = Key {
            host_port: hdr.dst_port,
            guest_port: hdr.src_port,
        };
        if hdr.op == op::REQUEST {
            return self.guest_connects(key, hdr);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return self.reset_orphan(hdr);
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        match (hdr.op, c.state) {
            (op::RESPONSE, State::Connecting { .. }) => {
                let line = format!("OK {}\n", key.host_port);
                // The client's socket is new and empty: a short line fits.
                if c.stream.write(line.as_bytes()).ok() != Some(line.len()) {
                    return self.reset(key);
                }
                c.state = State::Established;
                self.stats.connections += 1;
            }
            (op::RST, _) => {
                self.drop_conn(key);
                return;
            }
            (op::RW, State::Established) => {
                let held = c.to_peer.len() + payload.len();
                if c.guest_sent_all || held > BUF_ALLOC as usize {
                    let after_shutdown = c.guest_sent_all;
                    if after_shutdown {
                        self.bad(format_args!("data after the guest's shutdown"));
                    } else {
                        self.bad(format_args!(
                            "{} bytes sent past the connection's credit",
                            held - BUF_ALLOC as usize
                        ));
                    }
                    return self.reset(key);
                }
                c.to_peer.extend(payload);
                let alive = c.flush_to_peer();
                self.stats.tx_bytes += payload.len() as u64;
                if !alive {
                    return self.reset(key);
                }
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => c.owed.credit_update = true,
            (op::SHUTDOWN, State::Established) => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    c.guest_sent_all = true;
                    if c.to_peer.is_empty() {
                        let _ = c.stream.shutdown(Shutdown::Write);
                    }
                }
                if hdr.flags & SHUTDOWN_RCV != 0 {
                    c.guest_takes_none = true;
                }
                // Both ways closed: the guest waits for our RST to finish.
                if c.guest_sent_all && c.guest_takes_none {
                    if !c.flush_to_peer() {
                        return self.reset(key);
                    }
                    if c.to_peer.is_empty() {
                        return self.finish(key);
                    }
                }
            }
            (op, state) => {
                self.bad(format_args!("op {op} in state {state:?}"));
                return self.reset(key);
            }
        }
        self.queue_rx(key);
        self.rearm(key);
    }

    /// The guest closed both ways: RST back, and forget the connection.
    fn finish(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.owed = Owed {
                reset: true,
                ..Owed::default()
            };
            self.queue_rx(key);
            self.rearm(key);
        }
    }

    /// A guest REQUEST to host port `key.host_port`: connect it to
    /// `<uds_path>_<port>`, or refuse.
    fn guest_connects(&mut self, key: Key, hdr: &Header) {
        if self.conns.contains_key(&key) {
            self.bad(format_args!("REQUEST for a connection that exists"));
            return self.reset(key);
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open; a guest connection is refused");
            return self.reset_orphan(hdr);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.host_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "vsock: guest connection to {}: {e}",
                    Path::new(&path).display()
                );
                return self.reset_orphan(hdr);
            }
        };
        let token = self.token();
        let mut c = Conn::new(stream, token, State::Established);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        c.owed.response = true;
        self.conns.insert(key, c);
        self.by_token.insert(token, key);
        self.stats.connections += 1;
        self.queue_rx(key);
        self.rearm(key);
    }

    /// Serve the host sockets the inner epoll reports ready. Bounded: one
    /// batch of events and [`ACCEPTS_PER_ROUND`] accepts.
    pub fn on_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != ErrorKind::Interrupted {
                    log::warn!("vsock: epoll: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_LISTENER => self.accept(),
                TOKEN_TIMER => self.expire(),
                token => {
                    if self.handshakes.contains_key(&token) {
                        self.handshake(token);
                    } else if let Some(&key) = self.by_token.get(&token) {
                        self.socket_ready(key, ev.event_set());
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_ROUND {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: accept: {e}");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES || stream.set_nonblocking(true).is_err() {
                log::warn!("vsock: {MAX_HANDSHAKES} clients wait for CONNECT; one more is closed");
                continue;
            }
            let token = self.token();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    // Edge-triggered: the line is peeked, so the socket stays
                    // readable until all of it has arrived.
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token),
                )
                .is_err()
            {
                continue;
            }
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    since: Instant::now(),
                },
            );
            self.arm_timer();
        }
    }

    fn end_handshake(&mut self, token: u64) -> Option<UnixStream> {
        let h = self.handshakes.remove(&token)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            h.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(h.stream)
    }

    /// A host client sent (part of) its `CONNECT <port>\n` line.
    fn handshake(&mut self, token: u64) {
        let Some(h) = self.handshakes.get(&token) else {
            return;
        };
        // Peek, so bytes the client sends right after the line stay in the
        // socket for the guest.
        let mut line = [0u8; MAX_CONNECT_LINE];
        // SAFETY: `line` is a writable buffer of its length for the call.
        let n = unsafe {
            libc::recv(
                h.stream.as_raw_fd(),
                line.as_mut_ptr().cast(),
                line.len(),
                libc::MSG_PEEK,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            if io::Error::last_os_error().kind() != ErrorKind::WouldBlock {
                self.end_handshake(token);
            }
            return;
        };
        let Some(end) = line[..n].iter().position(|&b| b == b'\n') else {
            if n == 0 || n == line.len() {
                // Closed, or a line too long to be a CONNECT.
                self.end_handshake(token);
            }
            return;
        };
        let Some(mut stream) = self.end_handshake(token) else {
            return;
        };
        let mut consumed = vec![0u8; end + 1];
        if stream.read_exact(&mut consumed).is_err() {
            return;
        }
        let port = std::str::from_utf8(&line[..end])
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(guest_port) = port else {
            log::debug!("vsock: a host client sent no CONNECT line; closed");
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open; a host client is closed");
            return;
        }
        let Some(host_port) = self.free_host_port(guest_port) else {
            return;
        };
        let key = Key {
            host_port,
            guest_port,
        };
        let token = self.token();
        let mut c = Conn::new(
            stream,
            token,
            State::Connecting {
                since: Instant::now(),
            },
        );
        c.owed.request = true;
        self.conns.insert(key, c);
        self.by_token.insert(token, key);
        self.queue_rx(key);
        self.rearm(key);
        self.arm_timer();
    }

    fn free_host_port(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.conns.contains_key(&Key {
                host_port: p,
                guest_port,
            }) {
                return Some(p);
            }
        }
        None
    }

    fn socket_ready(&mut self, key: Key, events: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::OUT) {
            if !c.flush_to_peer() {
                return self.reset(key);
            }
            if c.to_peer.is_empty() && c.guest_sent_all && c.guest_takes_none {
                return self.finish(key);
            }
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            // Read when the guest can take it; EOF shows up there as well.
            c.readable = true;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            if c.state != State::Established || !c.to_peer.is_empty() {
                return self.reset(key);
            }
            c.hung_up = true;
        }
        self.queue_rx(key);
        self.rearm(key);
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            let tick = CONNECT_TIMEOUT / 4;
            if self.timer.reset(tick, Some(tick)).is_ok() {
                self.timer_armed = true;
            }
        }
    }

    /// Drop handshakes and guest answers that took too long.
    fn expire(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| now.duration_since(h.since) > CONNECT_TIMEOUT)
            .map(|(&t, _)| t)
            .collect();
        for t in late {
            self.end_handshake(t);
        }
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, State::Connecting { since } if now.duration_since(since) > CONNECT_TIMEOUT)
            })
            .map(|(&k, _)| k)
            .collect();
        for k in late {
            log::debug!(
                "vsock: the guest did not answer a connection to port {}",
                k.guest_port
            );
            self.reset(k);
        }
        if self
            .held_since
            .is_some_and(|t| now.duration_since(t) > HOLD_LIMIT)
        {
            log::warn!(
                "vsock: the restored guest took no transport reset in {HOLD_LIMIT:?}; serving host clients"
            );
            self.release_clients();
        }
        let pending = self.held_since.is_some()
            || !self.handshakes.is_empty()
            || self
                .conns
                .values()
                .any(|c| matches!(c.state, State::Connecting { .. }));
        if !pending && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }

    /// Whether a packet waits for the guest.
    pub fn has_rx(&self) -> bool {
        !self.orphan_resets.is_empty() || !self.rx_queue.is_empty() || !self.urgent.is_empty()
    }

    /// The next packet for the guest, its payload (at most `buf.len()`
    /// bytes) read into `buf`; `None` when nothing waits.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<Header> {
        if let Some(h) = self.orphan_resets.pop_front() {
            self.stats.rx_packets += 1;
            return Some(h);
        }
        while let Some(key) = self.urgent.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.urgent_queued = false;
            if let Some(hdr) = self.packet_of(key, buf) {
                self.queue_rx(key);
                self.rearm(key);
                self.stats.rx_packets += 1;
                return Some(hdr);
            }
        }
        while let Some(key) = self.rx_queue.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            let Some(hdr) = self.packet_of(key, buf) else {
                self.rearm(key);
                continue;
            };
            // Round robin: the connection goes to the back if it has more.
            self.queue_rx(key);
            self.rearm(key);
            self.stats.rx_packets += 1;
            return Some(hdr);
        }
        None
    }

    /// What connection `key` sends the guest next, if anything.
    fn packet_of(&mut self, key: Key, buf: &mut [u8]) -> Option<Header> {
        let mut hdr = self.header(key, 0);
        let c = self.conns.get_mut(&key)?;
        hdr.fwd_cnt = c.fwd_cnt;
        if c.owed.reset {
            self.drop_conn(key);
            hdr.op = op::RST;
            return Some(hdr);
        }
        if c.owed.request {
            c.owed.request = false;
            hdr.op = op::REQUEST;
        } else if c.owed.response {
            c.owed.response = false;
            hdr.op = op::RESPONSE;
        } else if let Some(n) = Self::read_peer(c, buf) {
            hdr.op = op::RW;
            hdr.len = n;
            self.stats.rx_bytes += u64::from(n);
        } else if c.owed.credit_update {
            hdr.op = op::CREDIT_UPDATE;
        } else if c.owed.shutdown != 0 {
            hdr.op = op::SHUTDOWN;
            hdr.flags = c.owed.shutdown;
            c.shut_told |= c.owed.shutdown;
            c.owed.shutdown = 0;
        } else {
            return None;
        }
        // Every packet carries the credit, so the update is no longer owed.
        c.owed.credit_update = false;
        c.fwd_cnt_told = c.fwd_cnt;
        Some(hdr)
    }

    /// Read from the peer for the guest: the byte count, or `None` (nothing
    /// to read now, or no credit; EOF becomes a SHUTDOWN owed).
    fn read_peer(c: &mut Conn, buf: &mut [u8]) -> Option<u32> {
        if !c.wants_read() {
            return None;
        }
        let room = buf
            .len()
            .min(usize::try_from(c.guest_credit()).unwrap_or(usize::MAX));
        loop {
            match c.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    c.peer_eof = true;
                    c.readable = false;
                    if c.shut_told & SHUTDOWN_SEND == 0 {
                        c.owed.shutdown |= SHUTDOWN_SEND;
                    }
                    return None;
                }
                Ok(n) => {
                    // n <= room <= the guest's credit, a u32.
                    let n = u32::try_from(n).unwrap_or(0);
                    c.rx_cnt = c.rx_cnt.wrapping_add(n);
                    return Some(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.readable = false;
                    return None;
                }
                Err(_) => {
                    // Reset by the peer: nothing more comes, and nothing can go.
                    c.peer_eof = true;
                    c.readable = false;
                    c.owed.reset = true;
                    return None;
                }
            }
        }
    }

    /// Every connection is dropped (the driver reset the device, or a
    /// snapshot was restored); the listener stays.
    pub fn drop_all(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.drop_conn(k);
        }
        let tokens: Vec<u64> = self.handshakes.keys().copied().collect();
        for t in tokens {
            self.end_handshake(t);
        }
        self.rx_queue.clear();
        self.urgent.clear();
        self.orphan_resets.clear();
    }

    /// Count a guest packet refused before it reached the muxer.
    pub fn count_bad(&mut self) {
        self.stats.bad_packets += 1;
    }
}

/// Where a muxer starts numbering host ports: a random point at or above
/// [`FIRST_HOST_PORT`]. A restored guest may still hold sockets of the
/// saved VM's connections until its programs close them after the
/// transport reset; a muxer that counted from the same start would send a
/// REQUEST that matches one of them, and the guest would reset it.
fn first_host_port() -> u32 {
    let mut b = [0u8; 4];
    let r = crate::host::random(&mut b).map_or(0, |()| u32::from_ne_bytes(b));
    FIRST_HOST_PORT | (r & (FIRST_HOST_PORT - 1))
}

/// Connect to the Unix socket at `path` without waiting: a listener whose
/// backlog is full refuses (EAGAIN) instead of stalling the device.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(0);
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the call.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    struct Fixture {
        dir: PathBuf,
        mux: Muxer,
        _listener: Listener,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("microvm-vsock-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("v.sock");
            let listener = Listener::bind(&path).unwrap();
            let mux = Muxer::new(CID, path, listener.try_clone().unwrap()).unwrap();
            Self {
                dir,
                mux,
                _listener: listener,
            }
        }

        fn uds(&self) -> PathBuf {
            self.dir.join("v.sock")
        }

        /// Serve host events until the muxer has a packet for the guest.
        fn next(&mut self, buf: &mut [u8]) -> Header {
            for _ in 0..200 {
                self.mux.on_host_events();
                if let Some(h) = self.mux.next_rx(buf) {
                    return h;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("no packet for the guest");
        }

        fn guest(&mut self, op: u16, host_port: u32, guest_port: u32, payload: &[u8]) {
            let h = Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: guest_port,
                dst_port: host_port,
                len: u32::try_from(payload.len()).unwrap(),
                kind: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 1 << 20,
                fwd_cnt: 0,
            };
            self.mux.on_guest_packet(&h, payload);
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut v = vec![0u8; n];
        s.read_exact(&mut v).unwrap();
        v
    }

    #[test]
    fn host_initiated_connect_data_both_ways_and_shutdown() {
        let mut f = Fixture::new("host");
        let mut client = UnixStream::connect(f.uds()).unwrap();
        client.write_all(b"CONNECT 52\nearly").unwrap();
        let mut buf = vec![0u8; 4096];
        let req = f.next(&mut buf);
        assert_eq!(
            (req.op, req.dst_port, req.dst_cid, req.src_cid),
            (op::REQUEST, 52, CID, HOST_CID)
        );
        assert!(req.src_port >= FIRST_HOST_PORT);
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        f.guest(op::RESPONSE, req.src_port, 52, &[]);
        let line = format!("OK {}\n", req.src_port);
        assert_eq!(read_exactly(&mut client, line.len()), line.as_bytes());
        // Bytes sent right after the CONNECT line reach the guest.
        let rw = f.next(&mut buf);
        assert_eq!((rw.op, rw.len), (op::RW, 5));
        assert_eq!(&buf[..5], b"early");
        f.guest(op::RW, req.src_port, 52, b"hello");
        assert_eq!(read_exactly(&mut client, 5), b"hello");
        // The client closes its side: the guest is told it gets no more.
        client.shutdown(Shutdown::Write).unwrap();
        let sd = f.next(&mut buf);
        assert_eq!((sd.op, sd.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
        f.guest(op::RST, req.src_port, 52, &[]);
        assert_eq!(f.mux.connections(), 0);
        assert_eq!(f.mux.stats().connections, 1);
    }

    #[test]
    fn held_clients_wait_in_the_backlog_until_released() {
        let mut f = Fixture::new("hold");
        f.mux.hold_clients();
        assert!(f.mux.holds_clients());
        let mut client = UnixStream::connect(f.uds()).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        let mut buf = vec![0u8; 4096];
        for _ in 0..20 {
            f.mux.on_host_events();
            assert!(
                f.mux.next_rx(&mut buf).is_none(),
                "a held client reaches the guest"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        f.mux.release_clients();
        assert!(!f.mux.holds_clients());
        let req = f.next(&mut buf);
        assert_eq!((req.op, req.dst_port), (op::REQUEST, 52));
    }

    #[test]
    fn guest_initiated_connects_to_the_port_socket_or_is_reset() {
        let mut f = Fixture::new("guest");
        let mut buf = vec![0u8; 4096];
        // Nobody listens on port 5000 yet: reset.
        f.guest(op::REQUEST, 5000, 1234, &[]);
        let rst = f.next(&mut buf);
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 5000, 1234));
        let mut p = f.uds().into_os_string();
        p.push("_5000");
        let server = UnixListener::bind(&p).unwrap();
        f.guest(op::REQUEST, 5000, 1234, &[]);
        let resp = f.next(&mut buf);
        assert_eq!(resp.op, op::RESPONSE);
        let (mut peer, _) = server.accept().unwrap();
        f.guest(op::RW, 5000, 1234, b"ping");
        assert_eq!(read_exactly(&mut peer, 4), b"ping");
        peer.write_all(b"pong").unwrap();
        let rw = f.next(&mut buf);
        assert_eq!((rw.op, &buf[..4]), (op::RW, &b"pong"[..]));
        // The guest closes both ways: RST back, connection gone.
        let mut h = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 5000,
            kind: TYPE_STREAM,
            op: op::SHUTDOWN,
            flags: SHUTDOWN_SEND | SHUTDOWN_RCV,
            buf_alloc: 1 << 20,
            ..Header::default()
        };
        f.mux.on_guest_packet(&h, &[]);
        assert_eq!(f.next(&mut buf).op, op::RST);
        assert_eq!(f.mux.connections(), 0);
        assert_eq!(read_exactly(&mut peer, 0), b"");
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the peer sees EOF");
        // Garbage: another CID is dropped, a packet for no connection reset.
        h.src_cid = 99;
        f.mux.on_guest_packet(&h, &[]);
        assert!(!f.mux.has_rx());
        assert_eq!(f.mux.stats().bad_packets, 1);
        f.guest(op::RW, 7, 8, b"x");
        assert_eq!(f.next(&mut buf).op, op::RST);
    }

    #[test]
    fn the_guest_is_held_to_its_credit_and_the_host_to_the_guests() {
        let mut f = Fixture::new("credit");
        let mut p = f.uds().into_os_string();
        p.push("_6000");
        let server = UnixListener::bind(&p).unwrap();
        let mut buf = vec![0u8; MAX_PAYLOAD];
        f.guest(op::REQUEST, 6000, 1, &[]);
        assert_eq!(f.next(&mut buf).op, op::RESPONSE);
        let (peer, _) = server.accept().unwrap();
        // A peer that never reads: the guest sends on, ignoring its credit,
        // and is reset once the muxer would hold more than BUF_ALLOC.
        let chunk = vec![7u8; MAX_PAYLOAD];
        let mut sent = 0usize;
        while f.mux.stats().resets == 0 && sent < 64 << 20 {
            f.guest(op::RW, 6000, 1, &chunk);
            sent += chunk.len();
        }
        assert_eq!(f.mux.stats().resets, 1, "never reset after {sent} bytes");
        assert!(f.mux.conns.values().all(|c| c.to_peer.is_empty()));
        assert_eq!(f.next(&mut buf).op, op::RST);
        drop(peer);

        // The host side sends no more than the guest's buffer holds.
        f.guest(op::REQUEST, 6000, 2, &[]);
        let mut small = Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 2,
            dst_port: 6000,
            kind: TYPE_STREAM,
            op: op::CREDIT_UPDATE,
            buf_alloc: 8192,
            ..Header::default()
        };
        f.mux.on_guest_packet(&small, &[]);
        assert_eq!(f.next(&mut buf).op, op::RESPONSE);
        let (mut peer, _) = server.accept().unwrap();
        peer.write_all(&[1u8; 65536]).unwrap();
        let mut got = 0;
        while got < 8192 {
            let h = f.next(&mut buf);
            assert_eq!(h.op, op::RW);
            got += h.len;
        }
        assert_eq!(got, 8192);
        for _ in 0..10 {
            f.mux.on_host_events();
            assert!(f.mux.next_rx(&mut buf).is_none(), "past the guest's credit");
        }
        small.fwd_cnt = 8192;
        f.mux.on_guest_packet(&small, &[]);
        assert_eq!(f.next(&mut buf).op, op::RW);
    }
}
