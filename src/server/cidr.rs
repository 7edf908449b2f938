//! Address ranges written as CIDR blocks (`10.0.0.0/8`, `fc00::/7`), for the
//! flags that name sets of sources, such as `--udp-rate-exempt`. Pure
//! parsing and matching; nothing here touches the network.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One block of addresses: a network address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `prefix` leading bits of `addr`; the bits past the
    /// prefix are cleared.
    ///
    /// # Errors
    /// A prefix longer than the address (32 bits for IPv4, 128 for IPv6).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        // `::ffff:10.0.0.0/104` is `10.0.0.0/8`: addresses are matched in
        // their IPv4 form, so the block must be too.
        if let (IpAddr::V6(v6), 96..=128) = (addr, prefix)
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Cidr::new(IpAddr::V4(v4), prefix - 96);
        }
        let bits = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return Err(format!(
                "the prefix length /{prefix} is longer than {bits} bits"
            ));
        }
        let network = match addr {
            IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & mask32(prefix)).into()),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & mask128(prefix)).into()),
        };
        Ok(Cidr { network, prefix })
    }

    /// Whether `ip` is in the block. An IPv4-mapped IPv6 address
    /// (`::ffff:10.1.2.3`) matches as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDR/LEN`, or a bare address for a block of one.
    fn from_str(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("{text:?} is not an address block such as 10.0.0.0/8 or fc00::/7")
        })?;
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse()
                .map_err(|_| format!("{text:?} has no prefix length from 0 to 128 after the /"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).map_err(|why| format!("{text:?}: {why}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Parses a comma-separated list of blocks; `none` is the empty list.
///
/// # Errors
/// Names the first entry that is not a block.
pub fn parse_list(text: &str) -> Result<Vec<Cidr>, String> {
    if text.trim() == "none" {
        return Ok(Vec::new());
    }
    text.split(',').map(|entry| entry.trim().parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn a_block_contains_its_addresses_and_no_others() {
        let block: Cidr = "10.1.0.0/16".parse().expect("a block");
        assert!(block.contains(ip("10.1.255.3")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(
            block.contains(ip("::ffff:10.1.0.9")),
            "mapped addresses match"
        );
        assert!(!block.contains(ip("::1")));
        let v6: Cidr = "fc00::/7".parse().expect("a block");
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
    }

    #[test]
    fn host_bits_are_cleared_and_bare_addresses_are_single_hosts() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().expect("a block").to_string(),
            "10.0.0.0/8"
        );
        let one: Cidr = "192.0.2.7".parse().expect("a block");
        assert!(one.contains(ip("192.0.2.7")));
        assert!(!one.contains(ip("192.0.2.8")));
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().expect("a block");
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains(ip("::ffff:10.9.9.9")));
        let all: Cidr = "0.0.0.0/0".parse().expect("a block");
        assert!(all.contains(ip("203.0.113.1")));
    }

    #[test]
    fn bad_blocks_say_what_is_wrong() {
        assert!(
            "10.0.0.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("longer than 32 bits")
        );
        assert!(
            "nonsense"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("not an address block")
        );
        assert!(
            "10.0.0.0/x"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("prefix length")
        );
        assert_eq!(parse_list("none"), Ok(Vec::new()));
        assert_eq!(parse_list("10.0.0.0/8, ::1").map(|list| list.len()), Ok(2));
    }
}
