//! Host networking: the `--net` and `--publish` options and the backends
//! behind each NIC (a TAP, or user mode through passt).
//!
//! Each `--net` value becomes one [`NetConfig`] and one virtio-net device; the
//! guest names them `eth0`, `eth1`, ... in command-line order.
//! [`setup::open_backend`] sets up the host side of one.

pub mod backend;
pub mod framing;
pub mod passt;
pub mod publish;
pub mod setup;
pub mod tap;

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::str::FromStr;

pub use backend::{BackendError, FrameBackend};
pub use publish::{PortForward, PublishError};
pub use setup::{open_backend, HostNetError};
pub use tap::{Tap, TapError};

/// Largest Ethernet frame a NIC moves in either direction, whatever its
/// backend: a 64 KiB GSO frame plus an Ethernet header with a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65536 + 18;

/// Prefix length used when `host=` has no `/PREFIX`.
pub const DEFAULT_PREFIX_LEN: u8 = 24;

/// Longest interface name the kernel accepts (`IFNAMSIZ` minus the NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// Error parsing a `--net` value or a MAC address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    /// Nothing given.
    #[error("empty --net value (expected user, tap=NAME or host=IP/PREFIX,guest=IP)")]
    Empty,
    /// `user` combined with a TAP key.
    #[error("--net user takes only mac= and bw= (it needs no TAP and no host address)")]
    UserWithTap,
    /// An item without `=`.
    #[error("'{0}' is not KEY=VALUE or 'user' (keys: tap, mac, host, guest, bw)")]
    NotKeyValue(String),
    /// A key we do not know.
    #[error("unknown --net key '{0}' (expected tap, mac, host, guest or bw)")]
    UnknownKey(String),
    /// A `bw=` that is not a rate.
    #[error("--net bw: {0}")]
    BadRate(String),
    /// The same key twice.
    #[error("--net key '{0}' given twice")]
    DuplicateKey(String),
    /// `key=` with nothing after it.
    #[error("--net key '{0}' has an empty value")]
    EmptyValue(String),
    /// Neither `tap=` nor `host=`/`guest=`.
    #[error(
        "--net needs user (user-mode networking), tap=NAME (existing TAP) or host=IP/PREFIX,guest=IP (microvm creates the TAP)"
    )]
    NoBackend,
    /// `host=` without `guest=`.
    #[error(
        "host= needs guest= too (the address the guest gets, e.g. host=10.0.2.1/24,guest=10.0.2.2)"
    )]
    MissingGuest,
    /// `guest=` without `host=`.
    #[error(
        "guest= needs host= too (the host end of the link, e.g. host=10.0.2.1/24,guest=10.0.2.2)"
    )]
    MissingHost,
    /// A bad interface name.
    #[error("invalid TAP name '{name}': {reason}")]
    InvalidTapName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bad MAC address.
    #[error("invalid MAC address '{value}': {reason}")]
    InvalidMac {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `host=`/`guest=` is not an IPv4 address.
    #[error("{key}= value '{value}' is not an IPv4 address")]
    InvalidIp {
        /// `host` or `guest`.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// The `/PREFIX` of `host=` is not a number in range.
    #[error("prefix '/{0}' of host= must be a number from 1 to 30")]
    InvalidPrefix(String),
    /// `guest=` carries its own prefix.
    #[error("guest= takes a plain address: the prefix comes from host= (e.g. host=10.0.2.1/24,guest=10.0.2.2)")]
    GuestPrefix,
    /// Host and guest addresses are equal.
    #[error("host= and guest= are the same address {0}")]
    SameAddress(Ipv4Addr),
    /// The guest is not on the host's subnet.
    #[error("guest address {guest} is not in the host subnet {network}/{prefix_len}")]
    NotInSubnet {
        /// Guest address.
        guest: Ipv4Addr,
        /// Host network address.
        network: Ipv4Addr,
        /// Host prefix length.
        prefix_len: u8,
    },
    /// An address is the network or broadcast address of the subnet.
    #[error(
        "{key}= address {addr} is the network or broadcast address of its /{prefix_len} subnet"
    )]
    ReservedAddress {
        /// `host` or `guest`.
        key: &'static str,
        /// The address.
        addr: Ipv4Addr,
        /// Prefix length.
        prefix_len: u8,
    },
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address (`02:xx:xx:xx:xx:xx`), new on each call.
    pub fn random_local() -> Self {
        // RandomState is seeded from the OS RNG once per process and varies per instance,
        // so this needs neither a `rand` dependency nor unsafe code.
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            hasher.write_u128(t.as_nanos());
        }
        let r = hasher.finish().to_le_bytes();
        MacAddr([0x02, r[0], r[1], r[2], r[3], r[4]])
    }

    /// The six bytes.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// Group (multicast/broadcast) addresses cannot be a NIC's own address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = NetConfigError;

    /// Six two-digit hex bytes separated by `:` (`02:00:00:00:00:01`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| NetConfigError::InvalidMac {
            value: s.to_string(),
            reason,
        };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts
                .next()
                .ok_or_else(|| bad("expected six bytes like 02:00:00:00:00:01"))?;
            if part.len() != 2 {
                return Err(bad("each byte must be two hex digits"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad("not a hex number"))?;
        }
        if parts.next().is_some() {
            return Err(bad("expected six bytes like 02:00:00:00:00:01"));
        }
        let mac = MacAddr(bytes);
        if mac.is_multicast() {
            return Err(bad(
                "multicast bit set (the first byte must be even, e.g. 02:...)",
            ));
        }
        if bytes == [0; 6] {
            return Err(bad("all-zero address"));
        }
        Ok(mac)
    }
}

/// How the host end of one NIC is set up.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetBackend {
    /// Attach to a TAP the user created and configured (`tap=NAME`).
    Tap {
        /// Existing TAP interface name.
        name: String,
    },
    /// microvm creates the TAP, gives the host end `host/prefix_len`, brings it
    /// up, and tells the guest kernel to use `guest` (`host=...,guest=...`).
    Managed {
        /// TAP name; `None` lets the kernel pick `mvtapN`.
        tap: Option<String>,
        /// Host address on the TAP; also the guest's gateway.
        host: Ipv4Addr,
        /// Guest address on `eth<index>`.
        guest: Ipv4Addr,
        /// Subnet prefix length shared by both ends.
        prefix_len: u8,
    },
    /// User-mode networking through a `passt` child (`user`): no TAP, no
    /// privileges; the guest is [`passt::GUEST_ADDR`] and reaches the host's
    /// loopback at [`passt::GATEWAY`].
    User {
        /// Host ports forwarded to the guest (`--publish`).
        publish: Vec<PortForward>,
    },
}

/// One `--net` interface.
///
/// Syntax (keys in any order, separated by `,`):
///
/// - `tap=NAME[,mac=MAC]`: attach to an existing TAP. You set up the host side
///   (for example `ip tuntap add dev NAME mode tap user $USER`, an address or a
///   bridge, `ip link set NAME up`) and configure the guest's address yourself.
///   Needs no privileges when the TAP belongs to your user.
/// - `host=HOST_IP[/PREFIX],guest=GUEST_IP[,tap=NAME][,mac=MAC]`: microvm
///   creates the TAP (named `NAME`, which must not exist yet, or `mvtapN`
///   picked by the kernel), assigns `HOST_IP/PREFIX` (default prefix `/24`) to
///   it, brings it up, and passes `ip=GUEST_IP::HOST_IP:NETMASK::ethN:off` to
///   the guest kernel (see [`NetConfig::kernel_ip_arg`]). Needs root or
///   `CAP_NET_ADMIN`. The TAP is not persistent: it disappears when microvm
///   exits. The guest reaches the host only (no NAT or forwarding is set up),
///   and two VMs must not share a subnet.
///
/// - `user[,mac=MAC]`: user-mode networking through `passt`, with no TAP and
///   no privileges. The guest gets `10.0.2.15/24` (kernel `ip=`), reaches the
///   host's 127.0.0.1 at the gateway `10.0.2.2` and the host's networks
///   through passt's sockets; `--publish` forwards host ports to it.
///
/// `mac=` is six hex bytes (`02:00:00:00:00:01`); without it the NIC gets a
/// random locally administered address `02:xx:xx:xx:xx:xx`, new on each run.
/// `bw=RATE` (any form) limits each direction to RATE bytes a second (`K`,
/// `M`, `G`: powers of 1024).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// Name of the interface in the configuration (`iface_id` in the API);
    /// `eth<N>` for `--net`.
    pub id: String,
    /// Host side of the NIC.
    pub backend: NetBackend,
    /// Guest MAC address; `None` for a random one.
    pub mac: Option<MacAddr>,
    /// Frames to the guest are limited so (unlimited by default).
    #[serde(default)]
    pub rx_rate_limit: crate::rate_limit::RateLimitConfig,
    /// Frames from the guest are limited so.
    #[serde(default)]
    pub tx_rate_limit: crate::rate_limit::RateLimitConfig,
}

impl NetConfig {
    /// Attach to the existing TAP `name`.
    pub fn tap(name: impl Into<String>) -> Self {
        Self {
            id: String::new(),
            backend: NetBackend::Tap { name: name.into() },
            mac: None,
            rx_rate_limit: Default::default(),
            tx_rate_limit: Default::default(),
        }
    }

    /// User-mode networking forwarding `publish` to the guest.
    pub fn user(publish: Vec<PortForward>) -> Self {
        Self {
            id: String::new(),
            backend: NetBackend::User { publish },
            mac: None,
            rx_rate_limit: Default::default(),
            tx_rate_limit: Default::default(),
        }
    }

    /// Create a TAP with `host/prefix_len` on the host end and `guest` in the guest.
    pub fn managed(host: Ipv4Addr, guest: Ipv4Addr, prefix_len: u8) -> Self {
        Self {
            id: String::new(),
            backend: NetBackend::Managed {
                tap: None,
                host,
                guest,
                prefix_len,
            },
            mac: None,
            rx_rate_limit: Default::default(),
            tx_rate_limit: Default::default(),
        }
    }

    /// The guest kernel `ip=` argument for this NIC when it is the `index`-th
    /// (`eth<index>`), or `None` if the user configures the guest (`tap=` form).
    ///
    /// The kernel's `ip=` configures one interface only: the VMM appends it for
    /// the first NIC in host=/guest= or user form (see [`kernel_ip_arg`]);
    /// further such NICs must be configured from inside the guest.
    pub fn kernel_ip_arg(&self, index: usize) -> Option<String> {
        match &self.backend {
            NetBackend::Tap { .. } => None,
            NetBackend::User { .. } => Some(format!(
                "ip={}::{}:{}::eth{index}:off",
                passt::GUEST_ADDR,
                passt::GATEWAY,
                netmask(passt::PREFIX_LEN)
            )),
            NetBackend::Managed {
                host,
                guest,
                prefix_len,
                ..
            } => Some(format!(
                "ip={guest}::{host}:{}::eth{index}:off",
                netmask(*prefix_len)
            )),
        }
    }
}

/// The one `ip=` argument for a VM's NICs: that of the first NIC in
/// host=/guest= or user form, named by its position in `nets`.
pub fn kernel_ip_arg(nets: &[NetConfig]) -> Option<String> {
    nets.iter()
        .enumerate()
        .find_map(|(index, net)| net.kernel_ip_arg(index))
}

/// The netmask of a `/prefix_len` subnet.
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = match prefix_len {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - u32::from(p)),
    };
    Ipv4Addr::from(bits)
}

fn validate_tap_name(name: &str) -> Result<(), NetConfigError> {
    let bad = |reason| NetConfigError::InvalidTapName {
        name: name.to_string(),
        reason,
    };
    if name.len() > MAX_TAP_NAME_LEN {
        return Err(bad("longer than 15 characters"));
    }
    if name == "." || name == ".." {
        return Err(bad("reserved name"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(bad("use only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

fn parse_ip(key: &'static str, value: &str) -> Result<Ipv4Addr, NetConfigError> {
    value.parse().map_err(|_| NetConfigError::InvalidIp {
        key,
        value: value.to_string(),
    })
}

/// Check that `host/prefix_len` and `guest` make a usable point-to-point subnet.
fn validate_subnet(host: Ipv4Addr, guest: Ipv4Addr, prefix_len: u8) -> Result<(), NetConfigError> {
    let mask = u32::from(netmask(prefix_len));
    let network = u32::from(host) & mask;
    if host == guest {
        return Err(NetConfigError::SameAddress(host));
    }
    if u32::from(guest) & mask != network {
        return Err(NetConfigError::NotInSubnet {
            guest,
            network: Ipv4Addr::from(network),
            prefix_len,
        });
    }
    for (key, addr) in [("host", host), ("guest", guest)] {
        let host_part = u32::from(addr) & !mask;
        if host_part == 0 || host_part == !mask {
            return Err(NetConfigError::ReservedAddress {
                key,
                addr,
                prefix_len,
            });
        }
    }
    Ok(())
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    /// See the type's documentation for the syntax.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NetConfigError::Empty);
        }
        let mut tap = None;
        let mut mac = None;
        let mut host = None;
        let mut guest = None;
        let mut bw = None;
        let mut user = false;
        for item in s.split(',') {
            if item == "user" {
                if user {
                    return Err(NetConfigError::DuplicateKey(item.to_string()));
                }
                user = true;
                continue;
            }
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| NetConfigError::NotKeyValue(item.to_string()))?;
            let slot = match key {
                "tap" => &mut tap,
                "mac" => &mut mac,
                "host" => &mut host,
                "guest" => &mut guest,
                "bw" => &mut bw,
                other => return Err(NetConfigError::UnknownKey(other.to_string())),
            };
            if slot.is_some() {
                return Err(NetConfigError::DuplicateKey(key.to_string()));
            }
            if value.is_empty() {
                return Err(NetConfigError::EmptyValue(key.to_string()));
            }
            *slot = Some(value);
        }

        if let Some(name) = tap {
            validate_tap_name(name)?;
        }
        let mac = mac.map(MacAddr::from_str).transpose()?;
        let limit = crate::rate_limit::per_second(
            bw.map(crate::rate_limit::parse_rate)
                .transpose()
                .map_err(NetConfigError::BadRate)?,
            None,
        );
        if user {
            if tap.is_some() || host.is_some() || guest.is_some() {
                return Err(NetConfigError::UserWithTap);
            }
            return Ok(NetConfig {
                id: String::new(),
                backend: NetBackend::User {
                    publish: Vec::new(),
                },
                mac,
                rx_rate_limit: limit,
                tx_rate_limit: limit,
            });
        }
        let tap = tap.map(str::to_string);

        let backend = match (host, guest) {
            (None, None) => NetBackend::Tap {
                name: tap.ok_or(NetConfigError::NoBackend)?,
            },
            (Some(_), None) => return Err(NetConfigError::MissingGuest),
            (None, Some(_)) => return Err(NetConfigError::MissingHost),
            (Some(host), Some(guest)) => {
                let (host_ip, prefix_len) = match host.split_once('/') {
                    None => (host, DEFAULT_PREFIX_LEN),
                    Some((ip, prefix)) => {
                        let len = prefix
                            .parse::<u8>()
                            .ok()
                            .filter(|p| (1..=30).contains(p))
                            .ok_or_else(|| NetConfigError::InvalidPrefix(prefix.to_string()))?;
                        (ip, len)
                    }
                };
                if guest.contains('/') {
                    return Err(NetConfigError::GuestPrefix);
                }
                let host = parse_ip("host", host_ip)?;
                let guest = parse_ip("guest", guest)?;
                validate_subnet(host, guest, prefix_len)?;
                NetBackend::Managed {
                    tap,
                    host,
                    guest,
                    prefix_len,
                }
            }
        };
        Ok(NetConfig {
            id: String::new(),
            backend,
            mac,
            rx_rate_limit: limit,
            tx_rate_limit: limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConfig, NetConfigError> {
        s.parse()
    }

    #[test]
    fn tap_form() {
        assert_eq!(parse("tap=tap0").unwrap(), NetConfig::tap("tap0"));
        let c = parse("mac=02:00:00:00:00:2a,tap=vm-tap.1").unwrap();
        assert_eq!(
            c.backend,
            NetBackend::Tap {
                name: "vm-tap.1".into()
            }
        );
        assert_eq!(c.mac, Some(MacAddr([2, 0, 0, 0, 0, 0x2a])));
        assert_eq!(c.kernel_ip_arg(0), None);
    }

    #[test]
    fn managed_form() {
        let c = parse("host=10.0.2.1/24,guest=10.0.2.2").unwrap();
        assert_eq!(
            c.backend,
            NetBackend::Managed {
                tap: None,
                host: Ipv4Addr::new(10, 0, 2, 1),
                guest: Ipv4Addr::new(10, 0, 2, 2),
                prefix_len: 24
            }
        );
        assert_eq!(
            c.kernel_ip_arg(0).as_deref(),
            Some("ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off")
        );
        assert_eq!(
            c.kernel_ip_arg(2).as_deref(),
            Some("ip=10.0.2.2::10.0.2.1:255.255.255.0::eth2:off")
        );

        let c =
            parse("guest=192.168.7.6,tap=mytap,host=192.168.7.5/30,mac=0a:bb:cc:dd:ee:ff").unwrap();
        assert_eq!(
            c.backend,
            NetBackend::Managed {
                tap: Some("mytap".into()),
                host: Ipv4Addr::new(192, 168, 7, 5),
                guest: Ipv4Addr::new(192, 168, 7, 6),
                prefix_len: 30
            }
        );
        assert_eq!(
            c.kernel_ip_arg(1).as_deref(),
            Some("ip=192.168.7.6::192.168.7.5:255.255.255.252::eth1:off")
        );
    }

    #[test]
    fn user_form() {
        let c = parse("user").unwrap();
        assert_eq!(c, NetConfig::user(Vec::new()));
        assert_eq!(
            c.kernel_ip_arg(0).as_deref(),
            Some("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off")
        );
        let c = parse("user,mac=02:00:00:00:00:07").unwrap();
        assert_eq!(c.mac, Some(MacAddr([2, 0, 0, 0, 0, 7])));
        assert_eq!(parse("mac=02:00:00:00:00:07,user").unwrap(), c);
        use NetConfigError::*;
        assert_eq!(parse("user,tap=t0"), Err(UserWithTap));
        assert_eq!(
            parse("user,host=10.0.2.1/24,guest=10.0.2.3"),
            Err(UserWithTap)
        );
        assert_eq!(parse("user,user"), Err(DuplicateKey("user".into())));
        assert_eq!(parse("users"), Err(NotKeyValue("users".into())));
        // A TAP NIC first: the user NIC is eth1 and gets the ip= argument.
        let nets = vec![NetConfig::tap("tap0"), NetConfig::user(Vec::new())];
        assert_eq!(
            kernel_ip_arg(&nets).as_deref(),
            Some("ip=10.0.2.15::10.0.2.2:255.255.255.0::eth1:off")
        );
    }

    #[test]
    fn default_prefix_is_24() {
        let c = parse("host=10.1.0.1,guest=10.1.0.9").unwrap();
        assert!(matches!(
            c.backend,
            NetBackend::Managed { prefix_len: 24, .. }
        ));
    }

    #[test]
    fn first_managed_nic_gets_the_ip_arg() {
        let nets = vec![
            NetConfig::tap("tap0"),
            parse("host=10.0.3.1/24,guest=10.0.3.2").unwrap(),
            parse("host=10.0.4.1/24,guest=10.0.4.2").unwrap(),
        ];
        assert_eq!(
            kernel_ip_arg(&nets).as_deref(),
            Some("ip=10.0.3.2::10.0.3.1:255.255.255.0::eth1:off")
        );
        assert_eq!(kernel_ip_arg(&nets[..1]), None);
    }

    #[test]
    fn errors() {
        use NetConfigError::*;
        assert_eq!(parse(""), Err(Empty));
        assert_eq!(parse("tap0"), Err(NotKeyValue("tap0".into())));
        assert_eq!(parse("tap=a,bridge=br0"), Err(UnknownKey("bridge".into())));
        assert_eq!(parse("tap=a,tap=b"), Err(DuplicateKey("tap".into())));
        assert_eq!(parse("tap="), Err(EmptyValue("tap".into())));
        assert_eq!(parse("mac=02:00:00:00:00:01"), Err(NoBackend));
        assert_eq!(parse("host=10.0.2.1/24"), Err(MissingGuest));
        assert_eq!(parse("guest=10.0.2.2,tap=x"), Err(MissingHost));
        assert_eq!(
            parse("host=10.0.2.1/24,guest=10.0.2.2/24"),
            Err(GuestPrefix)
        );
        assert_eq!(
            parse("host=10.0.2.1/33,guest=10.0.2.2"),
            Err(InvalidPrefix("33".into()))
        );
        assert_eq!(
            parse("host=10.0.2.1/x,guest=10.0.2.2"),
            Err(InvalidPrefix("x".into()))
        );
        assert_eq!(
            parse("host=10.0.2,guest=10.0.2.2"),
            Err(InvalidIp {
                key: "host",
                value: "10.0.2".into()
            })
        );
        assert_eq!(
            parse("host=10.0.2.1,guest=fe80::1"),
            Err(InvalidIp {
                key: "guest",
                value: "fe80::1".into()
            })
        );
        assert_eq!(
            parse("host=10.0.2.1,guest=10.0.2.1"),
            Err(SameAddress(Ipv4Addr::new(10, 0, 2, 1)))
        );
        assert_eq!(
            parse("host=10.0.2.1/24,guest=10.0.3.2"),
            Err(NotInSubnet {
                guest: Ipv4Addr::new(10, 0, 3, 2),
                network: Ipv4Addr::new(10, 0, 2, 0),
                prefix_len: 24
            })
        );
        assert_eq!(
            parse("host=10.0.2.1/24,guest=10.0.2.255"),
            Err(ReservedAddress {
                key: "guest",
                addr: Ipv4Addr::new(10, 0, 2, 255),
                prefix_len: 24
            })
        );
        assert_eq!(
            parse("host=10.0.2.0/24,guest=10.0.2.2"),
            Err(ReservedAddress {
                key: "host",
                addr: Ipv4Addr::new(10, 0, 2, 0),
                prefix_len: 24
            })
        );
        assert!(matches!(
            parse("tap=a-very-long-tap-name"),
            Err(InvalidTapName { .. })
        ));
        assert!(matches!(parse("tap=a/b"), Err(InvalidTapName { .. })));
        assert!(matches!(parse("tap=tap%d"), Err(InvalidTapName { .. })));
        assert!(matches!(parse("tap=.."), Err(InvalidTapName { .. })));
        // Messages name the offending input.
        let msg = parse("tap=x,mac=zz:00:00:00:00:00")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("zz:00:00:00:00:00"), "{msg}");
    }

    #[test]
    fn mac_parsing() {
        let m: MacAddr = "02:AB:cd:00:01:ff".parse().unwrap();
        assert_eq!(m, MacAddr([2, 0xab, 0xcd, 0, 1, 0xff]));
        assert_eq!(m.to_string(), "02:ab:cd:00:01:ff");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:00:00:00:00:00",
            "02-00-00-00-00-01",
            "0g:00:00:00:00:01",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn random_mac_is_local_unicast_and_varies() {
        let a = MacAddr::random_local();
        let b = MacAddr::random_local();
        assert_eq!(a.0[0], 0x02);
        assert!(!a.is_multicast());
        assert_ne!(a, b);
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(1), Ipv4Addr::new(128, 0, 0, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
