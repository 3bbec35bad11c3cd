//! User-mode networking through `passt`: no TAP, no privileges, no host
//! address plan.
//!
//! microvm creates a `socketpair(AF_UNIX, SOCK_STREAM)`, starts
//! `passt -f -q --fd N` on one end as a child process and exchanges Ethernet
//! frames on the other ([`super::framing`]: each preceded by its 4-byte
//! big-endian length). passt turns the guest's TCP, UDP and ICMP into
//! ordinary host sockets, listens on the published ports (`-t`/`-u`) and
//! hands those connections to the guest.
//!
//! The guest has a fixed address, set by the kernel's `ip=` (the guest kernel
//! has no DHCP client): [`GUEST_ADDR`]/[`PREFIX_LEN`], gateway [`GATEWAY`].
//! passt maps the gateway address to the host's loopback, so the guest
//! reaches a service on host 127.0.0.1:PORT at 10.0.2.2:PORT. passt also
//! answers DHCP with the same address. The MTU is 1500 (`-m 1500`; passt's
//! default, 65520, is only advertised over DHCP, and the guest's virtio-net
//! starts at 1500 anyway).
//!
//! A thread per passt forwards its stderr to our log and reaps it; if passt
//! exits while the VM runs, the callback given to [`Passt::start`] ends the
//! VM. Dropping [`Passt`] ends passt (which would also exit on its own once
//! our end of the socket closes, for example if microvm is killed).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use super::backend::{BackendError, FrameBackend};
use super::framing::{FrameReader, FrameWriter};
use super::publish::{PortForward, PublishError};
use super::MacAddr;
pub use crate::helper::ExitNotify;
use crate::helper::{Helper, HelperError, HelperSpec, Line};

/// The guest's address in user mode.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's gateway; passt maps it to the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Prefix length of the guest's subnet.
pub const PREFIX_LEN: u8 = 24;
/// MTU passt assumes for the guest.
pub const MTU: u16 = 1500;
/// The passt binary (override with `MICROVM_PASST`).
pub const PASST_BIN: &str = "passt";

/// Largest frame read from passt: what the device can hand the guest.
const MAX_RX_FRAME: usize = super::MAX_FRAME_LEN;
/// Largest frame sent to passt: the largest frame it takes (`ETH_MAX_MTU`).
const MAX_TX_FRAME: usize = 65535;
/// How long a send waits for passt to take an earlier, partly sent frame.
const TX_WAIT: Duration = Duration::from_millis(20);
/// Errors starting passt.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// A published port cannot be had.
    #[error("--publish {0}")]
    Publish(PortForward, #[source] PublishError),
    /// The socketpair or its setup failed.
    #[error("cannot create the socket pair for passt")]
    Socket(#[source] io::Error),
    /// passt is not installed, cannot be started or supervised.
    #[error(transparent)]
    Helper(#[from] HelperError),
}

/// How passt's stderr lines are logged.
fn passt_line(text: &str) -> Line {
    if text.starts_with("Failed to send") {
        // Without a syslog socket passt says so for every message.
        Line::Ignore
    } else if text.starts_with("Don't run as root") {
        Line::Debug
    } else {
        Line::Warn
    }
}

/// A running passt and our end of its socket.
#[derive(Debug)]
pub struct Passt {
    label: String,
    sock: UnixStream,
    reader: Mutex<FrameReader>,
    writer: Mutex<FrameWriter>,
    helper: Helper,
}

/// passt's command line (after the binary) for a guest NIC with `publish`.
pub fn passt_args(fd: RawFd, publish: &[PortForward]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-f",
        "-q",
        "-4",
        "--fd",
        &fd.to_string(),
        "-m",
        &MTU.to_string(),
        "-a",
        &GUEST_ADDR.to_string(),
        "-n",
        &PREFIX_LEN.to_string(),
        "-g",
        &GATEWAY.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for p in publish {
        args.extend(p.passt_args());
    }
    args
}

impl Passt {
    /// Check the published ports, then start passt (`$MICROVM_PASST` or
    /// [`PASST_BIN`] from `PATH`) for NIC `label` (`eth0`) whose guest MAC is `mac`.
    pub fn start(
        label: &str,
        mac: MacAddr,
        publish: &[PortForward],
        on_exit: ExitNotify,
    ) -> Result<Self, PasstError> {
        let bin = std::env::var("MICROVM_PASST").unwrap_or_else(|_| PASST_BIN.to_string());
        Self::start_with(&bin, label, mac, publish, on_exit)
    }

    /// [`start`](Self::start) with the passt binary `bin`.
    pub fn start_with(
        bin: &str,
        label: &str,
        mac: MacAddr,
        publish: &[PortForward],
        on_exit: ExitNotify,
    ) -> Result<Self, PasstError> {
        for p in publish {
            p.check_available()
                .map_err(|e| PasstError::Publish(*p, e))?;
        }
        let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
        ours.set_nonblocking(true).map_err(PasstError::Socket)?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(bin);
        cmd.args(passt_args(fd, publish));
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only fcntl(2), which is async-signal-safe; `fd` is open there
        // (the child inherits every descriptor until exec closes O_CLOEXEC ones).
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spec = HelperSpec {
            name: "passt",
            label: label.to_string(),
            role: "user-mode networking",
            consequence: "the guest has lost its network",
            classify: passt_line,
        };
        let helper = Helper::spawn(
            cmd,
            spec,
            "install the Debian package passt; scripts/deps.sh does",
            on_exit,
        )?;
        drop(theirs);
        let pid = helper.pid();
        log::info!(
            "{label}: user-mode networking through passt (pid {pid}): guest {GUEST_ADDR}/{PREFIX_LEN}, \
             host loopback at {GATEWAY}{}",
            publish
                .iter()
                .map(|p| format!(", publish {p}"))
                .collect::<String>()
        );
        let passt = Self {
            label: label.to_string(),
            sock: ours,
            reader: Mutex::new(FrameReader::new(MAX_RX_FRAME)),
            writer: Mutex::new(FrameWriter::new(MAX_TX_FRAME)),
            helper,
        };
        // passt learns the guest's MAC from the first frame the guest sends;
        // until then it addresses frames to 00:00:00:00:00:00, which the
        // guest drops. A guest that only serves published ports may never
        // speak first, so announce its address now.
        if let Err(e) = passt.send_frame(&gratuitous_arp(mac, GUEST_ADDR)) {
            log::warn!("{label}: cannot announce the guest's MAC to passt: {e}");
        }
        Ok(passt)
    }

    /// passt's process ID.
    pub fn pid(&self) -> u32 {
        self.helper.pid()
    }

    /// Wait until the socket is writable or [`TX_WAIT`] passes.
    fn wait_writable(&self) {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = i32::try_from(TX_WAIT.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll(2) reads and writes exactly one pollfd, which lives on
        // this stack frame for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

/// An ARP announcement: `ip` is at `mac` (request, sender = target).
pub fn gratuitous_arp(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    let mac = mac.bytes();
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    // EtherType ARP; Ethernet/IPv4, 6- and 4-byte addresses, request.
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

impl FrameBackend for Passt {
    fn describe(&self) -> String {
        format!("passt pid {}", self.helper.pid())
    }

    fn poll_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn has_vnet_hdr(&self) -> bool {
        false
    }

    fn offloads(&self) -> u32 {
        0
    }

    fn set_offloads(&self, flags: u32) -> Result<(), BackendError> {
        if flags == 0 {
            Ok(())
        } else {
            Err(BackendError::NoOffloads(self.describe(), flags))
        }
    }

    fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        let mut w = self
            .writer
            .lock()
            .map_err(|_| io::Error::other("passt writer lock poisoned"))?;
        match w.write_frame(&mut &self.sock, frame) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // passt is behind: give it a moment, then try once more.
                self.wait_writable();
                w.write_frame(&mut &self.sock, frame)
            }
            other => other,
        }
    }

    fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut r = self
            .reader
            .lock()
            .map_err(|_| io::Error::other("passt reader lock poisoned"))?;
        r.read_frame(&mut &self.sock, buf)
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        if let Ok(r) = self.reader.lock() {
            let s = r.stats();
            if s.oversize + s.runt > 0 {
                log::info!(
                    "{}: dropped {} oversize and {} runt frames from passt",
                    self.label,
                    s.oversize,
                    s.runt
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 9]);

    #[test]
    fn command_line() {
        let publish = [
            "127.0.0.1:8080:80".parse().unwrap(),
            "5353:53/udp".parse().unwrap(),
        ];
        let args = passt_args(7, &publish);
        let joined = args.join(" ");
        assert_eq!(
            joined,
            "-f -q -4 --fd 7 -m 1500 -a 10.0.2.15 -n 24 -g 10.0.2.2 -t 127.0.0.1/8080:80 -u 5353:53"
        );
    }

    #[test]
    fn port_in_use_fails_before_passt_starts() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let publish = [format!("127.0.0.1:{port}:80").parse().unwrap()];
        let err = Passt::start_with(
            "/nonexistent/passt",
            "eth0",
            MAC,
            &publish,
            Box::new(|_| {}),
        )
        .unwrap_err();
        assert!(matches!(err, PasstError::Publish(..)), "{err:?}");
        let msg = crate::error_chain(&err);
        assert!(
            msg.contains(&format!("127.0.0.1:{port}/tcp is already in use")),
            "{msg}"
        );
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let err = Passt::start_with("/nonexistent/passt", "eth0", MAC, &[], Box::new(|_| {}))
            .unwrap_err();
        assert!(
            matches!(err, PasstError::Helper(HelperError::NotInstalled(..))),
            "{err:?}"
        );
        assert!(err.to_string().contains("Debian package passt"), "{err}");
    }

    fn arp_request(mac: [u8; 6], src: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        f
    }

    /// The real passt: it answers the guest's ARP for the gateway, and when
    /// it dies on its own the exit callback says so.
    #[test]
    fn real_passt_answers_arp_and_its_death_is_reported() {
        if Command::new(PASST_BIN).arg("--version").output().is_err() {
            crate::net::tap::test_support::skip(
                "real_passt_answers_arp_and_its_death_is_reported",
                "passt is not installed",
            );
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let passt = Passt::start_with(
            PASST_BIN,
            "eth0",
            MAC,
            &[],
            Box::new(move |m| {
                let _ = tx.send(m);
            }),
        )
        .expect("start passt");
        let mac = MAC.bytes();
        passt
            .send_frame(&arp_request(mac, GUEST_ADDR, GATEWAY))
            .unwrap();
        let mut buf = vec![0u8; MAX_RX_FRAME];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let reply = loop {
            match passt.recv_frame(&mut buf) {
                Ok(n) => break buf[..n].to_vec(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "no ARP reply");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&reply[..6], &mac, "reply to our MAC");
        assert_eq!(&reply[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&reply[20..22], &[0, 2], "reply opcode");
        assert_eq!(&reply[28..32], &GATEWAY.octets(), "for the gateway");

        // Someone else kills passt: the VM must hear of it.
        let pid = passt.pid() as libc::pid_t;
        // SAFETY: kill(2) on the PID of our own child, not yet reaped
        // (only the supervisor reaps, after it has exited).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let msg = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("exit reported");
        assert!(msg.contains("passt") && msg.contains("exited"), "{msg}");
        assert!(msg.contains("lost its network"), "{msg}");
        // The stream is closed now: reads fail cleanly, no panic.
        let e = passt.recv_frame(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        drop(passt);

        // Ended by us: no report.
        let (tx, rx) = std::sync::mpsc::channel();
        let passt = Passt::start_with(
            PASST_BIN,
            "eth1",
            MAC,
            &[],
            Box::new(move |m| {
                let _ = tx.send(m);
            }),
        )
        .unwrap();
        drop(passt);
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }

    /// A connection to a published port reaches the guest's MAC even when
    /// the guest has sent nothing yet (the announcement at start does it).
    #[test]
    fn published_port_reaches_a_silent_guest() {
        if Command::new(PASST_BIN).arg("--version").output().is_err() {
            crate::net::tap::test_support::skip(
                "published_port_reaches_a_silent_guest",
                "passt is not installed",
            );
            return;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let publish = [format!("127.0.0.1:{port}:80").parse().unwrap()];
        let passt = Passt::start_with(PASST_BIN, "eth0", MAC, &publish, Box::new(|_| {}))
            .expect("start passt");
        let client = std::thread::spawn(move || {
            // passt listens once it has started: retry until it does.
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            for _ in 0..50 {
                if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    std::thread::sleep(Duration::from_secs(2));
                    drop(c);
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut buf = vec![0u8; MAX_RX_FRAME];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let syn = loop {
            match passt.recv_frame(&mut buf) {
                Ok(n) if n >= 34 && buf[12..14] == [0x08, 0x00] && buf[23] == 6 => {
                    break buf[..n].to_vec()
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no TCP frame from passt"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&syn[..6], &MAC.bytes(), "SYN addressed to the guest's MAC");
        assert_eq!(&syn[30..34], &GUEST_ADDR.octets(), "to the guest's address");
        assert_eq!(
            u16::from_be_bytes([syn[36], syn[37]]),
            80,
            "to the guest port"
        );
        drop(passt);
        let _ = client.join();
    }
}
