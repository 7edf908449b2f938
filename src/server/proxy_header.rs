//! The PROXY protocol header (v1 text, v2 binary) that a load balancer such
//! as HAProxy (`send-proxy`, `send-proxy-v2`), nginx or an AWS NLB puts in
//! front of a connection's bytes to say whom it carries. It sits in the
//! worker step, before a [connection](crate::server::connection) starts echoing:
//! with `--proxy-protocol` every connection must start with one.
//!
//! Parsing is the `ppp` crate's. The worker *peeks* at what has arrived
//! (`MSG_PEEK`), asks [`read_header`] whether a whole header is there, and
//! only then takes exactly the header's bytes from the socket, so the bytes
//! behind it stay in the kernel for the echo and are never copied aside.

use std::net::{IpAddr, SocketAddr};

/// The longest header accepted: a v1 header is at most 107 bytes, and a v2
/// header 16 bytes plus its addresses and TLVs. HAProxy's own TLVs (SSL
/// details, a unique id) fit well within this; a longer one is refused
/// rather than buffered.
pub const MAX_HEADER_LEN: usize = 1024;

/// The longest v1 header, by the spec: 107 bytes with its CRLF.
const V1_MAX_LEN: usize = 107;

/// What the bytes peeked so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderRead {
    /// A header may still be arriving: peek again when more bytes come.
    Incomplete,
    /// A whole header of `len` bytes.
    Complete {
        /// The header's length, to take from the socket.
        len: usize,
        /// The client the header names; `None` for a v2 `LOCAL` command (a
        /// proxy's own health check) or an `UNKNOWN`/unspecified family,
        /// where the connection is served as the proxy's own.
        client: Option<SocketAddr>,
    },
    /// Not a valid header: the connection must be closed.
    Invalid(String),
}

/// Parses the start of a connection's bytes as a PROXY header.
///
/// # Examples
/// ```
/// use echo_chamber::server::proxy_header::{read_header, HeaderRead};
/// let bytes = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 7\r\nhello";
/// assert_eq!(
///     read_header(bytes),
///     HeaderRead::Complete { len: 43, client: Some("192.0.2.7:40000".parse().unwrap()) }
/// );
/// assert_eq!(read_header(b"PROXY TCP4 192.0.2"), HeaderRead::Incomplete);
/// assert!(matches!(read_header(b"GET / HTTP/1.1\r\n"), HeaderRead::Invalid(_)));
/// ```
pub fn read_header(bytes: &[u8]) -> HeaderRead {
    use ppp::PartialResult;
    // A v1 header is one line of at most 107 bytes. `ppp` judges a line cut
    // short in a port as an invalid port rather than a partial header, so
    // the line's end is awaited here first.
    let v1 = b"PROXY ";
    let is_v1 = bytes.starts_with(v1) || (bytes.len() < v1.len() && v1.starts_with(bytes));
    let bytes = if is_v1 {
        match bytes.windows(2).position(|pair| pair == b"\r\n") {
            Some(end) if end + 2 <= V1_MAX_LEN => &bytes[..end + 2],
            Some(_) => {
                return HeaderRead::Invalid(format!("a v1 header longer than {V1_MAX_LEN} bytes"));
            }
            None if bytes.len() >= V1_MAX_LEN => {
                return HeaderRead::Invalid(format!("no v1 header end within {V1_MAX_LEN} bytes"));
            }
            None => return HeaderRead::Incomplete,
        }
    } else {
        bytes
    };
    let result = ppp::HeaderResult::parse(bytes);
    // A whole v1 line that ppp finds short of fields is malformed, not
    // unfinished: its end has come.
    if is_v1 && result.is_incomplete() {
        return HeaderRead::Invalid(format!("a v1 header missing fields: {}", printable(bytes)));
    }
    if result.is_incomplete() {
        // A v2 header says its length up front: one too long is refused
        // before its bytes are waited for.
        if let ppp::HeaderResult::V2(Err(ppp::v2::ParseError::Partial(_, needed))) = result
            && 16 + needed > MAX_HEADER_LEN
        {
            return HeaderRead::Invalid(format!(
                "a v2 header of {} bytes, longer than {MAX_HEADER_LEN}",
                16 + needed
            ));
        }
        return match bytes.len() >= MAX_HEADER_LEN {
            true => HeaderRead::Invalid(format!("no header within {MAX_HEADER_LEN} bytes")),
            false => HeaderRead::Incomplete,
        };
    }
    match result {
        ppp::HeaderResult::V1(Ok(header)) => {
            let client = match header.addresses {
                ppp::v1::Addresses::Tcp4(v4) => Some(SocketAddr::new(
                    IpAddr::V4(v4.source_address),
                    v4.source_port,
                )),
                ppp::v1::Addresses::Tcp6(v6) => Some(SocketAddr::new(
                    IpAddr::V6(v6.source_address),
                    v6.source_port,
                )),
                ppp::v1::Addresses::Unknown => None,
            };
            HeaderRead::Complete {
                len: header.header.len(),
                client,
            }
        }
        ppp::HeaderResult::V2(Ok(header)) => {
            let len = header.len();
            if len > MAX_HEADER_LEN {
                return HeaderRead::Invalid(format!(
                    "a v2 header of {len} bytes, longer than {MAX_HEADER_LEN}"
                ));
            }
            let client = match (header.command, header.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(v4)) => Some(SocketAddr::new(
                    IpAddr::V4(v4.source_address),
                    v4.source_port,
                )),
                (_, ppp::v2::Addresses::IPv6(v6)) => Some(SocketAddr::new(
                    IpAddr::V6(v6.source_address),
                    v6.source_port,
                )),
                // Unspecified or unix: the spec says to use the real
                // connection's addresses.
                _ => None,
            };
            HeaderRead::Complete { len, client }
        }
        // ppp's messages can hold control characters: escaped, they stay on one log line.
        ppp::HeaderResult::V1(Err(err)) => HeaderRead::Invalid(printable(err.to_string())),
        ppp::HeaderResult::V2(Err(err)) => HeaderRead::Invalid(printable(err.to_string())),
    }
}

/// `text` (or bytes) escaped for a log line: no control character survives.
fn printable(text: impl AsRef<[u8]>) -> String {
    String::from_utf8_lossy(text.as_ref())
        .escape_debug()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        header.push(0x20 | command);
        header.push(family);
        let len = (addresses.len() + tlvs.len()) as u16;
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(addresses);
        header.extend_from_slice(tlvs);
        header
    }

    const TCP4_ADDRESSES: [u8; 12] = [192, 0, 2, 7, 198, 51, 100, 1, 0x9c, 0x40, 0, 7];

    #[test]
    fn v1_tcp4_tcp6_and_unknown_headers_are_read_exactly() {
        let tcp6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 7\r\ndata";
        assert_eq!(
            read_header(tcp6),
            HeaderRead::Complete {
                len: tcp6.len() - 4,
                client: Some("[2001:db8::7]:40000".parse().expect("addr")),
            }
        );
        let unknown = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            read_header(unknown),
            HeaderRead::Complete {
                len: unknown.len(),
                client: None
            }
        );
    }

    #[test]
    fn v2_proxy_local_and_tlvs_are_read_exactly() {
        let proxy = v2(1, 0x11, &TCP4_ADDRESSES, &[]);
        assert_eq!(
            read_header(&proxy),
            HeaderRead::Complete {
                len: 28,
                client: Some("192.0.2.7:40000".parse().expect("addr")),
            }
        );
        let local = v2(0, 0x00, &[], &[]);
        assert_eq!(
            read_header(&local),
            HeaderRead::Complete {
                len: 16,
                client: None
            }
        );
        // A unique-id TLV (type 5) of 4 bytes after the addresses.
        let with_tlv = v2(1, 0x11, &TCP4_ADDRESSES, &[5, 0, 4, b'a', b'b', b'c', b'd']);
        let mut stream = with_tlv.clone();
        stream.extend_from_slice(b"echo me");
        assert_eq!(
            read_header(&stream),
            HeaderRead::Complete {
                len: with_tlv.len(),
                client: Some("192.0.2.7:40000".parse().expect("addr")),
            }
        );
    }

    #[test]
    fn a_header_arriving_a_byte_at_a_time_is_incomplete_until_whole() {
        for header in [
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 7\r\n".to_vec(),
            v2(1, 0x11, &TCP4_ADDRESSES, &[5, 0, 2, b'x', b'y']),
        ] {
            for end in 1..header.len() {
                assert_eq!(
                    read_header(&header[..end]),
                    HeaderRead::Incomplete,
                    "{end} bytes"
                );
            }
            assert!(matches!(read_header(&header), HeaderRead::Complete { .. }));
        }
    }

    #[test]
    fn garbage_and_oversized_headers_are_invalid() {
        for short in [
            &b"PROXY TCP4\r\nhello"[..],
            b"PROXY TCP6 ::1\r\n",
            b"PROXY TCP4 \r\n",
        ] {
            match read_header(short) {
                HeaderRead::Invalid(why) => assert!(!why.contains('\n'), "{why:?}"),
                other => panic!("{short:?}: {other:?}"),
            }
        }
        for garbage in [
            &b"hello world\r\n"[..],
            b"PROXY TCP4 not-an-address x 1 2\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x30\x11\0\0",
        ] {
            assert!(
                matches!(read_header(garbage), HeaderRead::Invalid(_)),
                "{garbage:?}"
            );
        }
        let long_v1 = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert!(matches!(read_header(&long_v1), HeaderRead::Invalid(_)));
        let tlv: Vec<u8> = [5, 0x07, 0xf0].into_iter().chain([0; 2032]).collect();
        let huge_v2 = v2(1, 0x11, &TCP4_ADDRESSES, &tlv);
        assert!(matches!(read_header(&huge_v2), HeaderRead::Invalid(_)));
        // Refused from its first 16 bytes, which say how long it is.
        assert!(matches!(
            read_header(&huge_v2[..16]),
            HeaderRead::Invalid(_)
        ));
    }
}
