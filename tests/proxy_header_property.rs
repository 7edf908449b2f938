//! The PROXY header parser against random input: it never panics or reads
//! past what it was given, it accepts every well-formed v1 and v2 header
//! exactly (its length and the client it names, whatever follows it), and
//! it calls every strict prefix of one incomplete, never valid or invalid.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use echo_chamber::server::proxy_header::{HeaderRead, MAX_HEADER_LEN, read_header};
use proptest::prelude::*;

/// A well-formed header and the client it names.
fn header() -> impl Strategy<Value = (Vec<u8>, Option<SocketAddr>)> {
    let v4 = (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
    );
    let v6 = (
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<u16>(),
    );
    let tlvs = prop::collection::vec(
        (1u8..=0xff, prop::collection::vec(any::<u8>(), 0..40)),
        0..4,
    );
    prop_oneof![
        v4.prop_map(|(source, destination, sport, dport)| {
            let (source, destination) = (Ipv4Addr::from(source), Ipv4Addr::from(destination));
            let text = format!("PROXY TCP4 {source} {destination} {sport} {dport}\r\n");
            (
                text.into_bytes(),
                Some(SocketAddr::new(IpAddr::V4(source), sport)),
            )
        }),
        v6.prop_map(|(source, destination, sport, dport)| {
            let (source, destination) = (Ipv6Addr::from(source), Ipv6Addr::from(destination));
            let text = format!("PROXY TCP6 {source} {destination} {sport} {dport}\r\n");
            (
                text.into_bytes(),
                Some(SocketAddr::new(IpAddr::V6(source), sport)),
            )
        }),
        Just((b"PROXY UNKNOWN\r\n".to_vec(), None)),
        (v4, tlvs.clone()).prop_map(|((source, destination, sport, dport), tlvs)| {
            let mut addresses = source.to_vec();
            addresses.extend_from_slice(&destination);
            addresses.extend_from_slice(&sport.to_be_bytes());
            addresses.extend_from_slice(&dport.to_be_bytes());
            let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(source)), sport);
            (v2(1, 0x11, &addresses, &tlvs), Some(client))
        }),
        (v6, tlvs.clone()).prop_map(|((source, destination, sport, dport), tlvs)| {
            let mut addresses = source.to_vec();
            addresses.extend_from_slice(&destination);
            addresses.extend_from_slice(&sport.to_be_bytes());
            addresses.extend_from_slice(&dport.to_be_bytes());
            let client = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(source)), sport);
            (v2(1, 0x21, &addresses, &tlvs), Some(client))
        }),
        tlvs.prop_map(|tlvs| (v2(0, 0x00, &[], &tlvs), None)),
    ]
}

fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut body = addresses.to_vec();
    for (kind, value) in tlvs {
        body.push(*kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x20 | command);
    header.push(family);
    header.extend_from_slice(&(body.len() as u16).to_be_bytes());
    header.extend_from_slice(&body);
    header
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn random_bytes_never_panic_or_claim_more_than_was_given(bytes in prop::collection::vec(any::<u8>(), 0..1500)) {
        if let HeaderRead::Complete { len, .. } = read_header(&bytes) {
            prop_assert!(len <= bytes.len() && len <= MAX_HEADER_LEN);
        }
    }

    #[test]
    fn well_formed_headers_are_read_exactly_and_their_prefixes_are_incomplete(
        (header, client) in header(),
        rest in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut stream = header.clone();
        stream.extend_from_slice(&rest);
        prop_assert_eq!(read_header(&stream), HeaderRead::Complete { len: header.len(), client });
        for end in 0..header.len() {
            prop_assert_eq!(read_header(&header[..end]), HeaderRead::Incomplete, "{} bytes", end);
        }
    }
}
