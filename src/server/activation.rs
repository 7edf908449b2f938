//! Sockets handed over by a service manager (systemd socket activation, or
//! any manager that follows its `LISTEN_FDS` convention): the other source of
//! the [`Sockets`] that the server serves, beside [`crate::server::listener`]. The
//! binary takes the descriptors from the environment (with the `sd-notify`
//! crate); this module only checks what each one is and sorts it into a TCP
//! listener or a UDP socket.

use std::fmt;
use std::os::fd::OwnedFd;

use crate::server::listener::Sockets;

/// One descriptor from the service manager, with the name its unit gave it
/// (`FileDescriptorName=`, or `unknown`).
#[derive(Debug)]
pub struct Inherited {
    /// The descriptor.
    pub fd: OwnedFd,
    /// Its name, for messages.
    pub name: String,
}

/// Why the inherited descriptors cannot be served.
#[derive(Debug)]
pub enum ActivationError {
    /// A descriptor of a kind the server does not serve.
    Unservable {
        /// The descriptor's number.
        fd: i32,
        /// Its name.
        name: String,
        /// What it is, such as `a unix stream socket`.
        what: String,
    },
    /// More sockets of one kind than the server can serve.
    TooMany {
        /// `TCP listeners` or `UDP sockets`.
        kind: &'static str,
        /// How many were passed.
        count: usize,
        /// How many can be served.
        most: usize,
    },
}

impl fmt::Display for ActivationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActivationError::Unservable { fd, name, what } => write!(
                f,
                "the service manager passed descriptor {fd} ({name:?}), {what}; echo-server \
                 serves listening TCP sockets and UDP sockets of IPv4 or IPv6 only: fix the \
                 .socket unit"
            ),
            ActivationError::TooMany { kind, count, most } => write!(
                f,
                "the service manager passed {count} {kind}; echo-server serves at most {most}: \
                 fix the .socket unit"
            ),
        }
    }
}

impl std::error::Error for ActivationError {}

/// Sorts inherited descriptors into the sockets a server of `workers`
/// workers serves: at most one TCP listener, and at most one UDP socket per
/// worker (each worker serves one; with fewer, the first workers take them).
///
/// # Errors
/// [`ActivationError`] for a descriptor that is not a listening TCP socket
/// or a UDP socket of IPv4 or IPv6, or for too many of a kind.
pub fn sort_sockets(inherited: Vec<Inherited>, workers: usize) -> Result<Sockets, ActivationError> {
    use std::os::fd::AsRawFd;
    let mut sockets = Sockets::default();
    let mut listeners = 0;
    for Inherited { fd, name } in inherited {
        let number = fd.as_raw_fd();
        let socket = socket2::Socket::from(fd);
        let unservable = |what: String| ActivationError::Unservable {
            fd: number,
            name: name.clone(),
            what,
        };
        let family = match socket.domain() {
            Ok(domain) if domain == socket2::Domain::IPV4 || domain == socket2::Domain::IPV6 => {
                domain
            }
            Ok(domain) if domain == socket2::Domain::UNIX => {
                return Err(unservable("a unix socket".into()));
            }
            Ok(domain) => return Err(unservable(format!("a socket of family {domain:?}"))),
            Err(_) => return Err(unservable("not a socket".into())),
        };
        let family = if family == socket2::Domain::IPV4 {
            "IPv4"
        } else {
            "IPv6"
        };
        match socket.r#type() {
            Ok(kind) if kind == socket2::Type::STREAM => {
                if !socket.is_listener().unwrap_or(false) {
                    return Err(unservable(format!(
                        "an {family} stream socket that is not listening"
                    )));
                }
                listeners += 1;
                sockets.tcp = Some(socket.into());
            }
            Ok(kind) if kind == socket2::Type::DGRAM => sockets.udp.push(socket.into()),
            Ok(kind) => return Err(unservable(format!("an {family} socket of type {kind:?}"))),
            Err(_) => return Err(unservable("a socket whose type cannot be read".into())),
        }
    }
    if listeners > 1 {
        return Err(ActivationError::TooMany {
            kind: "TCP listeners",
            count: listeners,
            most: 1,
        });
    }
    if sockets.udp.len() > workers {
        return Err(ActivationError::TooMany {
            kind: "UDP sockets",
            count: sockets.udp.len(),
            most: workers,
        });
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inherited(fd: impl Into<OwnedFd>, name: &str) -> Inherited {
        Inherited {
            fd: fd.into(),
            name: name.into(),
        }
    }

    #[test]
    fn listeners_and_udp_sockets_are_sorted_by_kind() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tcp_addr = tcp.local_addr().expect("addr");
        let sockets =
            sort_sockets(vec![inherited(udp, "udp"), inherited(tcp, "tcp")], 2).expect("servable");
        assert_eq!(
            sockets.tcp.expect("a listener").local_addr().expect("addr"),
            tcp_addr
        );
        assert_eq!(sockets.udp.len(), 1);
    }

    #[test]
    fn unix_sockets_and_unlistening_streams_are_refused_by_name() {
        let (unix, _) = std::os::unix::net::UnixStream::pair().expect("pair");
        let err = sort_sockets(vec![inherited(unix, "control")], 1).expect_err("a unix socket");
        assert!(
            err.to_string().contains("(\"control\"), a unix socket"),
            "{err}"
        );
        let stream = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let err = sort_sockets(vec![inherited(stream, "x")], 1).expect_err("not listening");
        assert!(err.to_string().contains("not listening"), "{err}");
    }

    #[test]
    fn two_listeners_are_too_many() {
        let one = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let two = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let err = sort_sockets(vec![inherited(one, "a"), inherited(two, "b")], 4)
            .expect_err("two listeners");
        assert!(err.to_string().contains("2 TCP listeners"), "{err}");
    }
}
