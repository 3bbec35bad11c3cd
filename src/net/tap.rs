//! TAP devices: open, vnet header and offload ioctls, host-side IPv4 setup.
//!
//! A TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every frame read
//! or written carries a 12-byte `virtio_net_hdr_v1` in front, so checksum and
//! segmentation offloads pass between guest and host kernel untouched. The fd
//! is non-blocking; the virtio-net worker waits for it with epoll.
//!
//! TAPs created here are not persistent (no `TUNSETPERSIST`): the kernel
//! deletes them when the fd closes, so they go away with microvm.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{netmask, MAX_TAP_NAME_LEN};

/// The TUN/TAP clone device.
const TUN_DEVICE: &str = "/dev/net/tun";

/// Name template for TAPs microvm creates without a name: the kernel replaces
/// `%d` with the first free number.
pub const AUTO_TAP_NAME: &str = "mvtap%d";

/// Size of the vnet header on each frame: `virtio_net_hdr_v1`, the header of
/// modern (VERSION_1) virtio-net, which always includes `num_buffers`.
pub const VNET_HDR_LEN: usize = 12;

/// `TUNSETOFFLOAD` flags microvm knows how to map to virtio-net features.
pub const TUN_OFFLOADS: u32 = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

/// Errors opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be a Linux interface name.
    #[error("invalid TAP name '{0}' (at most 15 characters, no '/' or whitespace)")]
    InvalidName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {hint}")]
    OpenTunDevice {
        /// What to do about it.
        hint: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Attach mode and there is no such interface.
    #[error("no such TAP device '{0}': create it first (ip tuntap add dev {0} mode tap user $USER && ip link set {0} up) or use --net host=IP/PREFIX,guest=IP to let microvm create one")]
    NoSuchDevice(String),
    /// EPERM attaching to an existing TAP.
    #[error("attaching to TAP '{0}' needs root or CAP_NET_ADMIN, unless the TAP belongs to your user (ip tuntap add dev {0} mode tap user $USER)")]
    AttachPermission(String, #[source] io::Error),
    /// EPERM creating a TAP.
    #[error("creating TAP '{0}' needs root or CAP_NET_ADMIN (or create it beforehand and use --net tap={0})")]
    CreatePermission(String, #[source] io::Error),
    /// Another process holds the TAP.
    #[error("TAP '{0}' is in use by another process (one TAP serves one VM)")]
    Busy(String, #[source] io::Error),
    /// Create mode and the name is taken.
    #[error("cannot create TAP '{0}': a network interface with that name already exists (use --net tap={0} to attach to an existing TAP)")]
    AlreadyExists(String, #[source] io::Error),
    /// The interface exists but is not a single-queue TAP.
    #[error("'{0}' is not a TAP device microvm can use (it is a TUN or other interface, or was created with multi_queue)")]
    NotATap(String, #[source] io::Error),
    /// TUNSETIFF failed otherwise.
    #[error("cannot attach to or create TAP '{0}'")]
    SetIff(String, #[source] io::Error),
    /// EPERM on a host-side configuration ioctl.
    #[error("configuring TAP '{0}' ({1}) needs root or CAP_NET_ADMIN")]
    ConfigPermission(String, &'static str, #[source] io::Error),
    /// Another ioctl failed.
    #[error("cannot configure TAP '{0}': {1} failed")]
    Ioctl(String, &'static str, #[source] io::Error),
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` with `name` filled in.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers,
    // sockaddrs and a pointer); all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(MAX_TAP_NAME_LEN))
    {
        *dst = src as libc::c_char;
    }
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether an interface called `name` exists in this thread's network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(cname) = CString::new(name) else {
        return false;
    };
    // SAFETY: cname is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty()
        || name.len() > MAX_TAP_NAME_LEN
        || name.contains('/')
        || name.chars().any(|c| c.is_whitespace() || c == '\0')
    {
        return Err(TapError::InvalidName(name.to_string()));
    }
    Ok(())
}

impl Tap {
    /// Attach to the existing TAP `name`; never creates one.
    pub fn attach(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        if !interface_exists(name) {
            return Err(TapError::NoSuchDevice(name.to_string()));
        }
        Self::open(name, false)
    }

    /// Create a new TAP called `name`, or `mvtapN` (kernel's choice) if `None`.
    /// Fails if the name is taken. The TAP disappears when this `Tap` is dropped.
    pub fn create(name: Option<&str>) -> Result<Self, TapError> {
        let name = match name {
            Some(n) => {
                check_name(n)?;
                n
            }
            None => AUTO_TAP_NAME,
        };
        Self::open(name, true)
    }

    fn open(name: &str, create: bool) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| TapError::OpenTunDevice {
                hint: match source.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                        "it is missing: load the tun module (modprobe tun)"
                    }
                    Some(libc::EACCES) | Some(libc::EPERM) => {
                        "permission denied: needs root or read-write access to /dev/net/tun"
                    }
                    _ => "unexpected error",
                },
                source,
            })?;

        let mut ifr = ifreq(name);
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if create {
            // Fail with EBUSY instead of silently attaching to an existing interface.
            flags |= libc::IFF_TUN_EXCL;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, and `ifr` is a valid,
        // exclusively borrowed ifreq for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match (err.raw_os_error(), create) {
                (Some(libc::EPERM), false) => TapError::AttachPermission(name, err),
                (Some(libc::EPERM), true) => TapError::CreatePermission(name, err),
                (Some(libc::EBUSY), false) => TapError::Busy(name, err),
                (Some(libc::EBUSY), true) => TapError::AlreadyExists(name, err),
                (Some(libc::EINVAL), false) => TapError::NotATap(name, err),
                _ => TapError::SetIff(name, err),
            });
        }
        // The kernel resolved any `%d` in the name.
        let tap = Tap {
            file,
            name: ifreq_name(&ifr),
        };

        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points
        // to a live local.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        // Start with no offloads: the guest has not said what it can take yet.
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn ioctl_error(&self, op: &'static str) -> TapError {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EPERM) {
            TapError::ConfigPermission(self.name.clone(), op, err)
        } else {
            TapError::Ioctl(self.name.clone(), op, err)
        }
    }

    /// Interface name (as resolved by the kernel).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tell the TAP which offloaded frames it may hand us (`TUN_F_*`): only
    /// those the guest negotiated, or the guest would see partial checksums
    /// or GSO frames it cannot handle.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(self.ioctl_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Which of [`TUN_OFFLOADS`] this kernel's TAP accepts. Leaves offloads off.
    pub fn probe_offloads(&self) -> u32 {
        let candidates = [
            TUN_OFFLOADS,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4,
            libc::TUN_F_CSUM,
        ];
        let supported = candidates
            .into_iter()
            .find(|flags| self.set_offload(*flags).is_ok())
            .unwrap_or(0);
        if let Err(e) = self.set_offload(0) {
            log::warn!("{e}");
        }
        supported
    }

    /// Give the host end `addr/prefix_len` and bring the interface up.
    pub fn configure_host_ipv4(&self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), TapError> {
        let sock = control_socket().map_err(|e| TapError::Ioctl(self.name.clone(), "socket", e))?;
        self.sock_ioctl(&sock, libc::SIOCSIFADDR, "SIOCSIFADDR", |ifr| {
            set_ifreq_addr(ifr, addr)
        })?;
        self.sock_ioctl(&sock, libc::SIOCSIFNETMASK, "SIOCSIFNETMASK", |ifr| {
            set_ifreq_addr(ifr, netmask(prefix_len))
        })?;
        let flags = self.flags(&sock)?;
        self.sock_ioctl(&sock, libc::SIOCSIFFLAGS, "SIOCSIFFLAGS", |ifr| {
            ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        })
    }

    /// Whether the host end is administratively up.
    pub fn is_up(&self) -> Result<bool, TapError> {
        let sock = control_socket().map_err(|e| TapError::Ioctl(self.name.clone(), "socket", e))?;
        Ok(self.flags(&sock)? & libc::IFF_UP as libc::c_short != 0)
    }

    fn flags(&self, sock: &OwnedFd) -> Result<libc::c_short, TapError> {
        let mut ifr = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the flags of a struct ifreq we own.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) };
        if rc < 0 {
            return Err(self.ioctl_error("SIOCGIFFLAGS"));
        }
        // SAFETY: the kernel filled the flags member of the union.
        Ok(unsafe { ifr.ifr_ifru.ifru_flags })
    }

    fn sock_ioctl(
        &self,
        sock: &OwnedFd,
        request: libc::c_ulong,
        op: &'static str,
        fill: impl FnOnce(&mut libc::ifreq),
    ) -> Result<(), TapError> {
        let mut ifr = ifreq(&self.name);
        fill(&mut ifr);
        // SAFETY: the SIOCSIF* requests used here read a struct ifreq that we own
        // and that stays valid for the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut ifr) };
        if rc < 0 {
            return Err(self.ioctl_error(op));
        }
        Ok(())
    }

    /// Read one frame (vnet header first). `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Write one frame (vnet header first).
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the kernel reads at most buf.len() bytes from buf.
        let n = unsafe { libc::write(self.file.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// An AF_INET datagram socket: the handle for interface ioctls in this
/// thread's network namespace.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_ifreq_addr(ifr: &mut libc::ifreq, addr: Ipv4Addr) {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes, and the union member
    // is at least that large; the kernel reads it as a sockaddr_in for AF_INET.
    unsafe {
        std::ptr::write_unaligned(
            std::ptr::addr_of_mut!(ifr.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
            sin,
        );
    }
}

/// Helpers for tests that need a real TAP: they run inside a network
/// namespace the test creates, so no traffic reaches the host's networks.
#[cfg(test)]
pub(crate) mod test_support {
    use std::io;

    /// Report a test that cannot run here: loudly, or as a failure when `CI=true`.
    pub fn skip(test: &str, why: &str) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: cannot run on this host (CI=true): {why}");
        }
        eprintln!("SKIPPED: {test}: {why}");
    }

    /// Run `f` on a thread inside a fresh network namespace. Returns `None`
    /// (after [`skip`]) when this host cannot (no root, no /dev/net/tun).
    pub fn in_new_netns<R: Send + 'static>(
        test: &str,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        if !std::path::Path::new(super::TUN_DEVICE).exists() {
            skip(test, "/dev/net/tun does not exist");
            return None;
        }
        let handle = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread into a new,
            // empty network namespace; it touches no memory.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        });
        match handle.join() {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                skip(
                    test,
                    &format!("cannot create a network namespace (needs root): {e}"),
                );
                None
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::in_new_netns;
    use super::*;

    #[test]
    fn attach_to_missing_tap_says_so() {
        let err = Tap::attach("mvnosuchtap0").unwrap_err();
        assert!(matches!(err, TapError::NoSuchDevice(_)), "{err:?}");
        assert!(err
            .to_string()
            .contains("no such TAP device 'mvnosuchtap0'"));
    }

    #[test]
    fn bad_names_rejected_before_any_syscall() {
        assert!(matches!(Tap::attach("a/b"), Err(TapError::InvalidName(_))));
        assert!(matches!(
            Tap::create(Some("sixteen-chars-xx")),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(
            Tap::create(Some("")),
            Err(TapError::InvalidName(_))
        ));
    }

    #[test]
    fn permission_messages_name_the_capability() {
        let eperm = || io::Error::from_raw_os_error(libc::EPERM);
        let m = TapError::CreatePermission("t0".into(), eperm()).to_string();
        assert!(
            m.contains("creating TAP 't0' needs root or CAP_NET_ADMIN"),
            "{m}"
        );
        let m = TapError::AttachPermission("t0".into(), eperm()).to_string();
        assert!(
            m.contains("attaching to TAP 't0' needs root or CAP_NET_ADMIN"),
            "{m}"
        );
    }

    fn set_persist(tap: &Tap, on: bool) {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                tap.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(on),
            )
        };
        assert_eq!(rc, 0, "TUNSETPERSIST: {}", io::Error::last_os_error());
    }

    #[test]
    fn tap_lifecycle_in_private_netns() {
        let result = in_new_netns("tap_lifecycle_in_private_netns", || {
            let tap = Tap::create(None).expect("create TAP");
            assert!(tap.name().starts_with("mvtap"), "{}", tap.name());
            assert!(interface_exists(tap.name()));
            assert!(!tap.is_up().unwrap());

            let offloads = tap.probe_offloads();
            assert_ne!(
                offloads & libc::TUN_F_CSUM,
                0,
                "TAP without checksum offload"
            );
            tap.set_offload(offloads).unwrap();
            tap.set_offload(0).unwrap();

            tap.configure_host_ipv4(Ipv4Addr::new(10, 0, 2, 1), 24)
                .unwrap();
            assert!(tap.is_up().unwrap());

            // Non-blocking: once the frames the kernel sent on its own
            // (IPv6 neighbour discovery once the link is up) are read,
            // WouldBlock.
            let mut buf = [0u8; 2048];
            let err = (0..64)
                .find_map(|_| tap.read_frame(&mut buf).err())
                .expect("reads end in WouldBlock");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

            // A second user of the same single-queue TAP is refused.
            let err = Tap::attach(tap.name()).unwrap_err();
            assert!(matches!(err, TapError::Busy(..)), "{err:?}");
            // Creating over an existing name is refused too.
            let err = Tap::create(Some(tap.name())).unwrap_err();
            assert!(matches!(err, TapError::AlreadyExists(..)), "{err:?}");
            // "lo" exists but is no TAP.
            let err = Tap::attach("lo").unwrap_err();
            assert!(matches!(err, TapError::NotATap(..)), "{err:?}");

            let name = tap.name().to_string();
            drop(tap);
            // Not persistent: gone with the fd.
            assert!(!interface_exists(&name));

            // A non-persistent TAP dies with its creator, so attach finds nothing.
            let named = Tap::create(Some("mvtest0")).unwrap();
            assert_eq!(named.name(), "mvtest0");
            drop(named);
            assert!(matches!(
                Tap::attach("mvtest0"),
                Err(TapError::NoSuchDevice(_))
            ));

            // The tap= form: attach to a persistent TAP someone else created.
            let creator = Tap::create(Some("mvtest1")).unwrap();
            set_persist(&creator, true);
            drop(creator);
            let tap = Tap::attach("mvtest1").expect("attach to persistent TAP");
            assert_eq!(tap.name(), "mvtest1");
            assert!(!tap.is_up().unwrap());
            tap.set_offload(libc::TUN_F_CSUM).unwrap();
            set_persist(&tap, false);
            drop(tap);
            assert!(!interface_exists("mvtest1"));
        });
        let _ = result;
    }
}
