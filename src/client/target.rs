//! Where the client connects: a `host:port` target as the user wrote it,
//! checked up front (so a typo is a usage error) and resolved only when a run
//! starts (so a name that does not resolve is a network failure).

use std::fmt;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

/// An echo server's address: a host name or IP literal and a port.
///
/// Parses `host:port`, `192.0.2.1:7` and `[::1]:9999`. A bare IPv6 address
/// needs brackets, as in URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
}

/// Why a `host:port` string is not a usable [`Target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// Nothing was given.
    Empty,
    /// There is no `:port` part.
    MissingPort,
    /// The host part is empty.
    MissingHost,
    /// The port is not a number from 1 to 65535.
    BadPort(String),
    /// An IPv6 address without brackets, or a bracketed one that is not valid.
    BadIpv6(String),
    /// Something other than `:port` follows the `]` of an IPv6 address.
    AfterBracket(String),
    /// A scoped IPv6 address (`fe80::1%eth0`), which the client does not take.
    ScopedIpv6(String),
    /// A valid IPv6 address and a port, without the brackets that tell
    /// them apart, as in `::1:9999`.
    Ipv6WithoutBrackets(String),
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetError::Empty => f.write_str("empty address, expected host:port"),
            TargetError::MissingPort => f.write_str("no port, expected host:port"),
            TargetError::MissingHost => f.write_str("no host, expected host:port"),
            TargetError::BadPort(port) => {
                write!(f, "port {port:?} is not a number from 1 to 65535")
            }
            TargetError::BadIpv6(host) => {
                write!(
                    f,
                    "{host:?} is not a valid IPv6 address; write IPv6 as [::1]:9999"
                )
            }
            TargetError::ScopedIpv6(_) => f.write_str(crate::error::SCOPED_IPV6_UNSUPPORTED),
            TargetError::Ipv6WithoutBrackets(text) => {
                let (host, port) = text.rsplit_once(':').unwrap_or((text, "PORT"));
                write!(f, "write IPv6 addresses in brackets: [{host}]:{port}")
            }
            TargetError::AfterBracket(rest) => {
                write!(f, "{rest:?} after \"]\"; expected [ipv6]:port")
            }
        }
    }
}

impl std::error::Error for TargetError {}

impl Target {
    /// A target from its parts; an IPv6 host is given without brackets.
    #[must_use]
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Target {
            host: host.into(),
            port,
        }
    }

    /// The host name or IP literal, without brackets.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Looks the host up (DNS for names), in the resolver's order.
    ///
    /// # Errors
    ///
    /// The resolver's error, or `NotFound` when the name has no addresses.
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no addresses found",
            ));
        }
        Ok(addrs)
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Err(TargetError::Empty);
        }
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| TargetError::BadIpv6(text.to_owned()))?;
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(bad_ipv6(host));
            }
            let port = match after.strip_prefix(':') {
                Some(port) => port,
                None if after.is_empty() => return Err(TargetError::MissingPort),
                // Something between `]` and the port, as in `[::1]x:7`.
                None => return Err(TargetError::AfterBracket(after.to_owned())),
            };
            (host, port)
        } else {
            let Some((host, port)) = text.rsplit_once(':') else {
                // A bare number is a port without its host.
                return Err(if text.bytes().all(|b| b.is_ascii_digit()) {
                    TargetError::MissingHost
                } else {
                    TargetError::MissingPort
                });
            };
            if host.contains(':') {
                return Err(if host.parse::<Ipv6Addr>().is_ok() {
                    TargetError::Ipv6WithoutBrackets(text.to_owned())
                } else {
                    bad_ipv6(host)
                });
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(TargetError::MissingHost);
        }
        // Digits only: `u16::from_str` would also take `+80`.
        let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        match port.parse::<u16>() {
            Ok(number) if digits && number != 0 => Ok(Target::new(host, number)),
            _ => Err(TargetError::BadPort(port.to_owned())),
        }
    }
}

/// Why `host` is not an IPv6 address: a scope, or anything else.
fn bad_ipv6(host: &str) -> TargetError {
    match host.split_once('%') {
        Some((address, _)) if address.parse::<Ipv6Addr>().is_ok() => {
            TargetError::ScopedIpv6(host.to_owned())
        }
        _ => TargetError::BadIpv6(host.to_owned()),
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_ipv4_and_bracketed_ipv6() {
        assert_eq!("localhost:7".parse(), Ok(Target::new("localhost", 7)));
        assert_eq!("127.0.0.1:9999".parse(), Ok(Target::new("127.0.0.1", 9999)));
        assert_eq!("[::1]:9999".parse(), Ok(Target::new("::1", 9999)));
        assert_eq!(Target::new("::1", 9999).to_string(), "[::1]:9999");
    }

    #[test]
    fn rejects_what_cannot_be_an_address() {
        assert_eq!("".parse::<Target>(), Err(TargetError::Empty));
        assert_eq!("localhost".parse::<Target>(), Err(TargetError::MissingPort));
        assert_eq!(":80".parse::<Target>(), Err(TargetError::MissingHost));
        assert_eq!(
            "host:http".parse::<Target>(),
            Err(TargetError::BadPort("http".into()))
        );
        assert_eq!(
            "host:0".parse::<Target>(),
            Err(TargetError::BadPort("0".into()))
        );
        assert_eq!(
            "host:65536".parse::<Target>(),
            Err(TargetError::BadPort("65536".into()))
        );
        assert_eq!(
            "::1:80".parse::<Target>(),
            Err(TargetError::Ipv6WithoutBrackets("::1:80".into()))
        );
        assert_eq!(
            TargetError::Ipv6WithoutBrackets("::1:80".into()).to_string(),
            "write IPv6 addresses in brackets: [::1]:80"
        );
        assert_eq!(
            "fe80::1%lo:7".parse::<Target>(),
            Err(TargetError::ScopedIpv6("fe80::1%lo".into()))
        );
        assert_eq!(
            "[fe80::1%lo]:7".parse::<Target>(),
            Err(TargetError::ScopedIpv6("fe80::1%lo".into()))
        );
        assert_eq!(
            "[nope]:80".parse::<Target>(),
            Err(TargetError::BadIpv6("nope".into()))
        );
        assert_eq!("[::1]".parse::<Target>(), Err(TargetError::MissingPort));
        assert_eq!(
            "[::1]x:7".parse::<Target>(),
            Err(TargetError::AfterBracket("x:7".into()))
        );
        assert_eq!("9999".parse::<Target>(), Err(TargetError::MissingHost));
        assert_eq!(
            "host:+80".parse::<Target>(),
            Err(TargetError::BadPort("+80".into()))
        );
    }
}
