//! `--publish [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`: a host port that
//! user-mode networking forwards to a guest port, as `docker run -p` does.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::str::FromStr;

/// Transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Errors parsing or checking a `--publish` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// Not `[HOST_IP:]HOST_PORT:GUEST_PORT[/PROTO]`.
    #[error("'{0}' is not [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp] (e.g. 8080:80 or 127.0.0.1:8080:80)")]
    Syntax(String),
    /// A port that is not 1..=65535.
    #[error("'{0}' is not a port number (1 to 65535)")]
    Port(String),
    /// A host address that is not IPv4.
    #[error("host address '{0}' is not an IPv4 address (user-mode networking is IPv4 only)")]
    Address(String),
    /// Neither tcp nor udp.
    #[error("unknown protocol '{0}' (expected tcp or udp)")]
    Protocol(String),
    /// The host port is taken.
    #[error("host port {0} is already in use")]
    InUse(String),
    /// The host address is not one of this host's.
    #[error("cannot listen on {0}: {1}")]
    Unusable(String, String),
}

/// One published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortForward {
    /// Host address to listen on; `None` for all of them.
    pub host_ip: Option<Ipv4Addr>,
    /// Host port.
    pub host_port: u16,
    /// Guest port the connections go to.
    pub guest_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

fn port(s: &str) -> Result<u16, PublishError> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PublishError::Port(s.to_string()))
}

impl FromStr for PortForward {
    type Err = PublishError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ports, protocol) = match s.rsplit_once('/') {
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some((_, other)) => return Err(PublishError::Protocol(other.to_string())),
            None => (s, Protocol::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host_port, guest_port) = match parts.as_slice() {
            [h, g] => (None, *h, *g),
            [ip, h, g] => {
                let ip = ip
                    .parse::<Ipv4Addr>()
                    .map_err(|_| PublishError::Address(ip.to_string()))?;
                (Some(ip), *h, *g)
            }
            _ if ports.contains('[') || parts.len() > 3 => {
                return Err(PublishError::Address(ports.to_string()))
            }
            _ => return Err(PublishError::Syntax(s.to_string())),
        };
        Ok(Self {
            host_ip,
            host_port: port(host_port)?,
            guest_port: port(guest_port)?,
            protocol,
        })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.guest_port, self.protocol
        )
    }
}

impl PortForward {
    /// passt's option for this port: `-t`/`-u` and `[ADDR/]PORT:GUEST_PORT`.
    pub fn passt_args(&self) -> [String; 2] {
        let flag = match self.protocol {
            Protocol::Tcp => "-t",
            Protocol::Udp => "-u",
        };
        let spec = match self.host_ip {
            Some(ip) => format!("{ip}/{}:{}", self.host_port, self.guest_port),
            None => format!("{}:{}", self.host_port, self.guest_port),
        };
        [flag.to_string(), spec]
    }

    /// Fail if the host port cannot be had now, so the user hears of it
    /// before the guest boots (passt only says so on its own stderr and exits).
    pub fn check_available(&self) -> Result<(), PublishError> {
        let addr = SocketAddrV4::new(
            self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            self.host_port,
        );
        // TcpListener::bind sets SO_REUSEADDR, as passt does: connections in
        // TIME_WAIT do not count as "in use", listeners do.
        let res = match self.protocol {
            Protocol::Tcp => TcpListener::bind(addr).map(drop),
            Protocol::Udp => UdpSocket::bind(addr).map(drop),
        };
        let shown = format!("{addr}/{}", self.protocol);
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(PublishError::InUse(shown)),
            Err(e) => Err(PublishError::Unusable(shown, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<PortForward, PublishError> {
        s.parse()
    }

    #[test]
    fn forms() {
        assert_eq!(
            p("8080:80").unwrap(),
            PortForward {
                host_ip: None,
                host_port: 8080,
                guest_port: 80,
                protocol: Protocol::Tcp
            }
        );
        let f = p("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(f.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(
            (f.host_port, f.guest_port, f.protocol),
            (5353, 53, Protocol::Udp)
        );
        assert_eq!(
            f.passt_args(),
            ["-u".to_string(), "127.0.0.1/5353:53".into()]
        );
        assert_eq!(
            p("8080:80/tcp").unwrap().passt_args(),
            ["-t".to_string(), "8080:80".into()]
        );
        assert_eq!(p("127.0.0.1:1:2").unwrap().to_string(), "127.0.0.1:1:2/tcp");
    }

    #[test]
    fn errors() {
        use PublishError::*;
        assert_eq!(p("80"), Err(Syntax("80".into())));
        assert_eq!(p(""), Err(Syntax("".into())));
        assert_eq!(p("0:80"), Err(Port("0".into())));
        assert_eq!(p("8080:65536"), Err(Port("65536".into())));
        assert_eq!(p("x:80"), Err(Port("x".into())));
        assert_eq!(p("8080:80/sctp"), Err(Protocol("sctp".into())));
        assert_eq!(p("localhost:8080:80"), Err(Address("localhost".into())));
        assert!(matches!(p("[::1]:8080:80"), Err(Address(_))));
        assert!(matches!(p("::1:8080:80"), Err(Address(_))));
    }

    #[test]
    fn port_in_use_is_reported() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let f = p(&format!("127.0.0.1:{port}:80")).unwrap();
        let e = f.check_available().unwrap_err();
        assert_eq!(e, PublishError::InUse(format!("127.0.0.1:{port}/tcp")));
        assert!(e.to_string().contains("already in use"), "{e}");
        // All addresses conflict with the loopback listener too.
        let all = p(&format!("{port}:80")).unwrap();
        assert!(matches!(all.check_available(), Err(PublishError::InUse(_))));
        drop(l);
        f.check_available().unwrap();

        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        let f = p(&format!("127.0.0.1:{port}:53/udp")).unwrap();
        assert!(matches!(f.check_available(), Err(PublishError::InUse(_))));
        // The TCP port of the same number is free.
        p(&format!("127.0.0.1:{port}:53"))
            .unwrap()
            .check_available()
            .unwrap();

        // An address this host does not have.
        let f = p("192.0.2.254:8080:80").unwrap();
        assert!(matches!(
            f.check_available(),
            Err(PublishError::Unusable(..))
        ));
    }
}
