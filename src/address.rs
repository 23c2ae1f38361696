//! Client addresses: which address a client is counted and logged under,
//! and the reverse proxies (`BZPUSH_TRUSTED_PROXIES`) whose
//! `X-Forwarded-For` names it.
//!
//! A client never chooses its own address: the header counts only on a
//! connection from a trusted proxy, and only what trusted proxies wrote
//! into it, read from the right (the right-most entry that is not a
//! trusted proxy is the client; whatever is left of it, the client may
//! have written itself). Per-address limits count IPv6 clients by their
//! /64, the network one customer gets, so that one client holding a /64
//! counts once. Nothing here reads a socket or keeps state.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// An address or a network in CIDR notation: `10.0.0.0/8`, `fd00::/8`, or
/// one address (`127.0.0.1`, `::1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `text` as an address or a network; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IPv4 or IPv6 address"))?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("/{p}: the prefix length is 0 to {bits} here"))?,
        };
        let cidr = Cidr { network, prefix };
        if cidr.mask(network) != network {
            return Err(format!(
                "{text}: host bits are set; the network is {}",
                Cidr {
                    network: cidr.mask(network),
                    prefix
                }
            ));
        }
        Ok(cidr)
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && self.mask(ip) == self.network
    }

    /// `ip` with the bits past the prefix cleared.
    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let keep = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & keep).into())
            }
            IpAddr::V6(v6) => {
                let keep = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & keep).into())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = if self.network.is_ipv4() { 32 } else { 128 };
        match self.prefix {
            p if p == bits => write!(f, "{}", self.network),
            p => write!(f, "{}/{p}", self.network),
        }
    }
}

/// The reverse proxies whose `X-Forwarded-For` names the client
/// (`BZPUSH_TRUSTED_PROXIES`); none (`off`) by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// `off`, or comma-separated addresses and networks.
    pub fn parse(value: &str) -> Result<TrustedProxies, String> {
        if value.trim() == "off" {
            return Ok(TrustedProxies::default());
        }
        let entries: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Err(
                "expected off, or addresses and networks like 127.0.0.1, 10.0.0.0/8".into(),
            );
        }
        entries
            .into_iter()
            .map(Cidr::parse)
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client a trusted proxy at `peer` forwarded, from the values of
    /// its `X-Forwarded-For` header fields in order: the right-most entry
    /// that is not a trusted proxy. Past an entry that is no address (a
    /// proxy that writes `unknown`), and when every entry is a trusted
    /// proxy, the last trusted one is all that is known: that is the
    /// answer. A peer that is no trusted proxy is its own client, whatever
    /// it sent.
    pub fn client<'a>(&self, peer: IpAddr, forwarded: impl Iterator<Item = &'a [u8]>) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let values: Vec<&[u8]> = forwarded.collect();
        let mut known = peer;
        for value in values.iter().rev() {
            let text = String::from_utf8_lossy(value);
            for entry in text.rsplit(',') {
                let Some(ip) = parse_entry(entry.trim()) else {
                    return known;
                };
                if !self.trusts(ip) {
                    return ip;
                }
                known = ip;
            }
        }
        known
    }
}

/// One `X-Forwarded-For` entry: an address, or an address and a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`), as some proxies write it.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
            inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("off");
        }
        let list: Vec<String> = self.0.iter().map(Cidr::to_string).collect();
        f.write_str(&list.join(", "))
    }
}

/// The address per-address limits count a client under: an IPv4 address,
/// or an IPv6 address's /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddress(IpAddr);

impl ClientAddress {
    pub fn of(ip: IpAddr) -> ClientAddress {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                ClientAddress(IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()))
            }
            v4 => ClientAddress(v4),
        }
    }
}

impl fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn networks_parse_contain_and_refuse_what_is_not_one() {
        let net = Cidr::parse("10.1.0.0/16").expect("a network");
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        assert!(!net.contains(ip("::1")));
        let one = Cidr::parse("127.0.0.1").expect("an address");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        assert_eq!(one.to_string(), "127.0.0.1");
        let v6 = Cidr::parse("fd00::/8").expect("a network");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("all")
                .contains(ip("8.8.8.8"))
        );
        for bad in ["10.1.0.1/16", "10.0.0.0/33", "nginx", "10.0.0.0/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(
            Cidr::parse("10.1.0.1/16")
                .unwrap_err()
                .contains("10.1.0.0/16")
        );
    }

    #[test]
    fn the_client_is_the_right_most_entry_no_trusted_proxy_wrote() {
        let proxies = TrustedProxies::parse("127.0.0.1, 10.0.0.0/8").expect("valid");
        let client = |peer: &str, fields: &[&str]| {
            proxies
                .client(ip(peer), fields.iter().map(|f| f.as_bytes()))
                .to_string()
        };
        // nginx's $proxy_add_x_forwarded_for: what came, then the peer.
        assert_eq!(client("127.0.0.1", &["192.0.2.7"]), "192.0.2.7");
        // A client that wrote its own header gets no say.
        assert_eq!(client("127.0.0.1", &["1.2.3.4, 192.0.2.7"]), "192.0.2.7");
        // Through two trusted proxies; fields repeated.
        assert_eq!(
            client("127.0.0.1", &["6.6.6.6, 192.0.2.7", "10.0.0.5"]),
            "192.0.2.7"
        );
        assert_eq!(client("127.0.0.1", &["[2001:db8::1]:4711"]), "2001:db8::1");
        assert_eq!(client("127.0.0.1", &["192.0.2.7:80"]), "192.0.2.7");
        // Nothing but trusted proxies, garbage, or no header at all: the
        // last trusted proxy is all that is known.
        assert_eq!(client("127.0.0.1", &["10.0.0.5"]), "10.0.0.5");
        assert_eq!(client("127.0.0.1", &["1.2.3.4, unknown"]), "127.0.0.1");
        assert_eq!(client("127.0.0.1", &[]), "127.0.0.1");
        // Not from a trusted proxy: the header is ignored.
        assert_eq!(client("192.0.2.9", &["1.2.3.4"]), "192.0.2.9");
        let off = TrustedProxies::parse("off").expect("off");
        assert_eq!(
            off.client(ip("127.0.0.1"), [b"1.2.3.4".as_slice()].into_iter()),
            ip("127.0.0.1")
        );
        assert_eq!(off.to_string(), "off");
        assert_eq!(proxies.to_string(), "127.0.0.1, 10.0.0.0/8");
        assert!(TrustedProxies::parse(" , ").is_err());
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a = ClientAddress::of(ip("2001:db8:1:2:aaaa::1"));
        let b = ClientAddress::of(ip("2001:db8:1:2:bbbb::9"));
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_ne!(a, ClientAddress::of(ip("2001:db8:1:3::1")));
        assert_eq!(
            ClientAddress::of(ip("::ffff:192.0.2.1")).to_string(),
            "192.0.2.1"
        );
    }
}
