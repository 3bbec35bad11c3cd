//! `microvm-vsock`: the guest's end of a vsock stream, as a small static
//! tool for images without socat (the test initramfs is busybox only).
//!
//!   microvm-vsock connect CID PORT   stdin to the stream, the stream to
//!                                    stdout; half-closes at end of input
//!   microvm-vsock echo PORT          listen on PORT, send every connection
//!                                    back what it sends, until it closes
//!
//! Exit status: 0, or 1 with a message on stderr.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A vsock stream socket.
struct Stream(OwnedFd);

fn os_err<T>(what: &str) -> io::Result<T> {
    let e = io::Error::last_os_error();
    Err(io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all zeroes is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return os_err("socket(AF_VSOCK)");
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (linux/vm_sockets.h, the timeval form).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// How long `connect` waits for the host to accept.
const CONNECT_TIMEOUT_S: libc::time_t = 30;

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

impl Stream {
    fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        // Linux gives a vsock connect 2 s; a loaded host may answer later.
        let timeout = libc::timeval {
            tv_sec: CONNECT_TIMEOUT_S,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a valid timeval for the call; a kernel that
        // does not know the option leaves the default.
        unsafe {
            libc::setsockopt(
                raw(&fd),
                libc::AF_VSOCK,
                SO_VM_SOCKETS_CONNECT_TIMEOUT,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let a = addr(cid, port);
        // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
        let rc = unsafe { libc::connect(raw(&fd), std::ptr::addr_of!(a).cast(), ADDR_LEN) };
        if rc < 0 {
            return os_err(&format!("connect to CID {cid} port {port}"));
        }
        Ok(Self(fd))
    }

    fn shutdown_write(&self) {
        // SAFETY: shutdown(2) on a socket this process owns.
        unsafe { libc::shutdown(raw(&self.0), libc::SHUT_WR) };
    }
}

fn raw(fd: &OwnedFd) -> RawFd {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its length during the call.
        let n = unsafe { libc::read(raw(&self.0), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).or_else(|_| os_err("read"))
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is readable for its length during the call.
        let n = unsafe { libc::write(raw(&self.0), buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).or_else(|_| os_err("write"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn connect(cid: u32, port: u32) -> io::Result<()> {
    let s = std::sync::Arc::new(Stream::connect(cid, port)?);
    let up = s.clone();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        io::copy(&mut io::stdin().lock(), &mut &*up)?;
        up.shutdown_write();
        Ok(())
    });
    io::copy(&mut &*s, &mut io::stdout().lock())?;
    sender
        .join()
        .map_err(|_| io::Error::other("the sending thread panicked"))?
}

fn echo(port: u32) -> io::Result<()> {
    let fd = socket()?;
    let a = addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe { libc::bind(raw(&fd), std::ptr::addr_of!(a).cast(), ADDR_LEN) } < 0 {
        return os_err(&format!("bind port {port}"));
    }
    // SAFETY: listen(2) on a bound socket this process owns.
    if unsafe { libc::listen(raw(&fd), 128) } < 0 {
        return os_err("listen");
    }
    loop {
        // SAFETY: accept4(2) without an address buffer.
        let c = unsafe {
            libc::accept4(
                raw(&fd),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return os_err("accept");
        }
        // SAFETY: a new fd nobody else owns.
        let s = Stream(unsafe { OwnedFd::from_raw_fd(c) });
        std::thread::spawn(move || {
            if let Err(e) = io::copy(&mut &s, &mut &s) {
                eprintln!("microvm-vsock: echo: {e}");
            }
            s.shutdown_write();
        });
    }
}

fn number(s: Option<&String>, what: &str) -> io::Result<u32> {
    s.and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("expected {what}")))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let res = match args.get(1).map(String::as_str) {
        Some("connect") => number(args.get(2), "a CID")
            .and_then(|cid| number(args.get(3), "a port").map(|p| (cid, p)))
            .and_then(|(cid, port)| connect(cid, port)),
        Some("echo") => number(args.get(2), "a port").and_then(echo),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: microvm-vsock connect CID PORT | microvm-vsock echo PORT",
        )),
    };
    if let Err(e) = res {
        eprintln!("microvm-vsock: {e}");
        std::process::exit(1);
    }
}
