//! The tunnel table the workers consult: what each tunnel accepts and where
//! its inner packets go. Built once from the configuration; read-only on the
//! hot path.

use std::net::IpAddr;

use gateway_common::{EndpointKey, IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6};
use rustc_hash::FxHashMap;

use crate::wire::ethernet;

/// Encapsulation of a tunnel, in iproute2's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// GRE (protocol 47) carrying IPv4 or IPv6.
    Gre,
    /// IPv4 in IPv4 (protocol 4).
    Ipip,
    /// GRE carrying Ethernet frames (protocol type 0x6558) to and from a
    /// tap, which can be bridged.
    Gretap,
    /// IPv6 in IPv4 (protocol 41), the kernel's sit.
    Sit,
}

impl Mode {
    pub fn ip_protocol(self) -> u8 {
        match self {
            Mode::Gre | Mode::Gretap => IPPROTO_GRE,
            Mode::Ipip => IPPROTO_IPIP,
            Mode::Sit => IPPROTO_IPV6,
        }
    }

    /// The kernel's name for this encapsulation over an IPv4 or an IPv6
    /// underlay (`ip link add type ...` / `ip -6 tunnel add mode ...`).
    pub fn kernel_name(self, ipv6_underlay: bool) -> &'static str {
        match (self, ipv6_underlay) {
            (Mode::Gre, false) => "gre",
            (Mode::Gretap, false) => "gretap",
            (Mode::Ipip, false) => "ipip",
            (Mode::Sit, false) => "sit",
            (Mode::Gre, true) => "ip6gre",
            (Mode::Gretap, true) => "ip6gretap",
            (Mode::Ipip, true) => "ipip6",
            (Mode::Sit, true) => "ip6ip6",
        }
    }

    /// Has a GRE header (and with it keys, checksums, sequence numbers).
    pub fn is_gre(self) -> bool {
        matches!(self, Mode::Gre | Mode::Gretap)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Gre => "gre",
            Mode::Ipip => "ipip",
            Mode::Gretap => "gretap",
            Mode::Sit => "sit",
        })
    }
}

/// The inner device of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Ethernet frames (L2): the gateway adds an Ethernet header.
    #[default]
    Tap,
    /// Bare IP packets (L3).
    Tun,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Tap => "tap",
            DeviceKind::Tun => "tun",
        })
    }
}

/// What the receive path needs to know of one tunnel.
#[derive(Debug, Clone)]
pub struct TunnelRx {
    pub name: String,
    pub mode: Mode,
    pub local: IpAddr,
    pub remote: IpAddr,
    /// Key required on received packets (`ikey`); `None`: keyless only.
    pub ikey: Option<u32>,
    /// Received packets must carry a GRE checksum (`icsum`).
    pub icsum: bool,
    /// Received packets must carry a sequence number newer than the last
    /// accepted one (`iseq`).
    pub iseq: bool,
    pub device_kind: DeviceKind,
    /// Destination MAC of frames written into a tap: the tap's own.
    pub device_mac: ethernet::Address,
    /// Source MAC of frames written into a tap: stands for the far side.
    pub peer_mac: ethernet::Address,
    /// Largest inner packet (the tunnel MTU); longer ones are dropped.
    pub mtu: u16,
    /// Inner source prefixes accepted from this tunnel: the peer's address
    /// and `accept_from`. Empty: any source (no `peer` configured).
    pub allowed_sources: Vec<Prefix>,
}

/// An IP prefix, `address/length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// The host prefix of one address.
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a host prefix).
    pub fn parse(s: &str) -> Option<Prefix> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().ok().filter(|&l| l <= max)?,
            None => max,
        };
        Some(Prefix { addr, len })
    }

    #[inline]
    pub fn contains(&self, a: IpAddr) -> bool {
        match (self.addr, a) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl TunnelRx {
    /// True when this tunnel accepts inner packets from `src`.
    #[inline]
    pub fn accepts_source(&self, src: IpAddr) -> bool {
        self.allowed_sources.is_empty() || self.allowed_sources.iter().any(|p| p.contains(src))
    }
}

impl TunnelRx {
    /// The XDP endpoint-table key of packets arriving on this tunnel.
    pub fn endpoint_key(&self) -> EndpointKey {
        endpoint_key(self.local, self.remote, self.mode.ip_protocol())
    }
}

/// Builds the endpoint key of a packet from its outer destination (our
/// local address) and source (the remote).
pub fn endpoint_key(local: IpAddr, remote: IpAddr, proto: u8) -> EndpointKey {
    match (local, remote) {
        (IpAddr::V4(l), IpAddr::V4(r)) => EndpointKey::v4(l.octets(), r.octets(), proto),
        (l, r) => EndpointKey::v6(to_v6(l), to_v6(r), proto),
    }
}

fn to_v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Index of a tunnel in the [`TunnelTable`].
pub type TunnelId = u16;

/// Most tunnels one gateway serves: one endpoint entry each at most in the
/// XDP program's table, and one registered file each in a worker's
/// io_uring. A tunnel's id also tags its device operations in io_uring
/// below the worker's two reply bits, so no more than 2^14.
pub const MAX_TUNNELS: usize = gateway_common::MAX_ENDPOINTS as usize;
const _: () = assert!(MAX_TUNNELS <= 1 << 14 && MAX_TUNNELS <= TunnelId::MAX as usize);

/// Tunnels indexed by their outer (local, remote, protocol) and key;
/// tunnels that share endpoints are told apart by key, as the kernel does.
/// A lookup is one hash probe whatever the number of tunnels.
#[derive(Debug, Default, Clone)]
pub struct TunnelTable {
    tunnels: Vec<TunnelRx>,
    /// The first tunnel of each endpoint (the XDP program's keys).
    by_endpoint: FxHashMap<EndpointKey, TunnelId>,
    /// Each tunnel by endpoint and the key it takes (`None`: keyless).
    by_key: FxHashMap<(EndpointKey, Option<u32>), TunnelId>,
}

/// Why a lookup found no tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    UnknownEndpoint,
    KeyMismatch,
}

impl TunnelTable {
    /// The table of `tunnels`, in order (a tunnel's id is its index). Two
    /// tunnels with the same endpoint and key (the configuration refuses
    /// them): the first takes the packets.
    pub fn new(tunnels: Vec<TunnelRx>) -> Self {
        let mut by_endpoint = FxHashMap::default();
        let mut by_key = FxHashMap::default();
        by_endpoint.reserve(tunnels.len());
        by_key.reserve(tunnels.len());
        for (i, t) in tunnels.iter().enumerate() {
            let id = i as TunnelId;
            let key = t.endpoint_key();
            by_endpoint.entry(key).or_insert(id);
            by_key.entry((key, t.ikey)).or_insert(id);
        }
        TunnelTable {
            tunnels,
            by_endpoint,
            by_key,
        }
    }

    pub fn len(&self) -> usize {
        self.tunnels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tunnels.is_empty()
    }

    pub fn get(&self, id: TunnelId) -> &TunnelRx {
        &self.tunnels[usize::from(id)]
    }

    pub fn iter(&self) -> impl Iterator<Item = &TunnelRx> {
        self.tunnels.iter()
    }

    /// Distinct endpoint keys, for the XDP program's table.
    pub fn endpoint_keys(&self) -> impl Iterator<Item = &EndpointKey> {
        self.by_endpoint.keys()
    }

    /// Whether any tunnel has this endpoint key.
    pub fn has_endpoint(&self, key: &EndpointKey) -> bool {
        self.by_endpoint.contains_key(key)
    }

    /// The tunnel for a packet with these outer fields and GRE key (`None`
    /// for a keyless packet or IPIP). A keyed tunnel takes only its key; a
    /// keyless one only keyless packets.
    #[inline]
    pub fn lookup(&self, key: &EndpointKey, gre_key: Option<u32>) -> Result<TunnelId, LookupError> {
        if let Some(&id) = self.by_key.get(&(*key, gre_key)) {
            return Ok(id);
        }
        if self.by_endpoint.contains_key(key) {
            Err(LookupError::KeyMismatch)
        } else {
            Err(LookupError::UnknownEndpoint)
        }
    }

    /// Any tunnel with these outer endpoints and protocol, whatever its
    /// key (a path's MTU is the path's, not a key's).
    pub fn any_on_endpoint(&self, key: &EndpointKey) -> Option<TunnelId> {
        self.by_endpoint.get(key).copied()
    }
}

/// Outer TTL: a fixed value, or copied from the inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    Fixed(u8),
    Inherit,
}

impl std::fmt::Display for Ttl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ttl::Fixed(n) => write!(f, "{n}"),
            Ttl::Inherit => f.write_str("inherit"),
        }
    }
}

/// Outer TOS (DSCP; the ECN bits always follow the inner packet, RFC
/// 6040): a fixed value, or copied from the inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tos {
    Fixed(u8),
    Inherit,
}

impl std::fmt::Display for Tos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tos::Fixed(n) => write!(f, "0x{n:02x}"),
            Tos::Inherit => f.write_str("inherit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p = Prefix::parse("10.1.0.0/16").unwrap();
        assert!(p.contains("10.1.200.3".parse().unwrap()));
        assert!(!p.contains("10.2.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let h = Prefix::parse("10.1.1.2").unwrap();
        assert_eq!(h.len, 32);
        assert!(h.contains("10.1.1.2".parse().unwrap()));
        assert!(!h.contains("10.1.1.3".parse().unwrap()));
        let all = Prefix::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6 = Prefix::parse("fd00::/64").unwrap();
        assert!(v6.contains("fd00::2".parse().unwrap()));
        assert!(!v6.contains("fd01::2".parse().unwrap()));
        assert!(Prefix::parse("10.0.0.0/33").is_none());
        assert!(Prefix::parse("banana/8").is_none());
        assert_eq!(v6.to_string(), "fd00::/64");
    }

    fn tunnel(name: &str, remote: &str, mode: Mode, ikey: Option<u32>) -> TunnelRx {
        TunnelRx {
            name: name.into(),
            mode,
            local: "192.0.2.8".parse().unwrap(),
            remote: remote.parse().unwrap(),
            ikey,
            icsum: false,
            iseq: false,
            device_kind: DeviceKind::Tun,
            device_mac: [0; 6],
            peer_mac: [0; 6],
            mtu: 1400,
            allowed_sources: Vec::new(),
        }
    }

    fn key(remote: &str, proto: u8) -> EndpointKey {
        endpoint_key("192.0.2.8".parse().unwrap(), remote.parse().unwrap(), proto)
    }

    #[test]
    fn lookup_by_endpoint_and_key() {
        let table = TunnelTable::new(vec![
            tunnel("keyless", "192.0.2.58", Mode::Gre, None),
            tunnel("k7", "192.0.2.58", Mode::Gre, Some(7)),
            tunnel("k8", "192.0.2.58", Mode::Gretap, Some(8)),
            tunnel("keyed-only", "192.0.2.59", Mode::Gre, Some(1)),
            tunnel("ipip", "192.0.2.59", Mode::Ipip, None),
        ]);
        let a = key("192.0.2.58", IPPROTO_GRE);
        let b = key("192.0.2.59", IPPROTO_GRE);
        assert_eq!(
            table.lookup(&a, None),
            Ok(0),
            "keyless packet, keyless tunnel"
        );
        assert_eq!(table.lookup(&a, Some(7)), Ok(1));
        assert_eq!(
            table.lookup(&a, Some(8)),
            Ok(2),
            "gretap shares protocol 47"
        );
        assert_eq!(table.lookup(&a, Some(9)), Err(LookupError::KeyMismatch));
        assert_eq!(table.lookup(&b, Some(1)), Ok(3));
        assert_eq!(
            table.lookup(&b, None),
            Err(LookupError::KeyMismatch),
            "a keyed tunnel takes no keyless packet"
        );
        assert_eq!(table.lookup(&key("192.0.2.59", IPPROTO_IPIP), None), Ok(4));
        assert_eq!(
            table.lookup(&key("192.0.2.59", IPPROTO_IPIP), Some(1)),
            Err(LookupError::KeyMismatch)
        );
        assert_eq!(
            table.lookup(&key("192.0.2.60", IPPROTO_GRE), None),
            Err(LookupError::UnknownEndpoint)
        );
        assert_eq!(
            table.any_on_endpoint(&a),
            Some(0),
            "the first on the endpoint"
        );
        assert_eq!(table.any_on_endpoint(&b), Some(3));
        assert_eq!(table.endpoint_keys().count(), 3);
    }

    #[test]
    fn ten_thousand_keys_between_two_hosts() {
        let mut tunnels: Vec<TunnelRx> = (0..10_000u32)
            .map(|k| tunnel(&format!("k{k}"), "192.0.2.58", Mode::Gre, Some(k + 1)))
            .collect();
        tunnels.push(tunnel("other", "192.0.2.99", Mode::Gre, None));
        let table = TunnelTable::new(tunnels);
        let a = key("192.0.2.58", IPPROTO_GRE);
        assert_eq!(table.lookup(&a, Some(1)), Ok(0));
        assert_eq!(table.lookup(&a, Some(10_000)), Ok(9_999));
        assert_eq!(
            table.lookup(&a, Some(10_001)),
            Err(LookupError::KeyMismatch)
        );
        assert_eq!(table.lookup(&a, None), Err(LookupError::KeyMismatch));
        assert_eq!(
            table.lookup(&key("192.0.2.99", IPPROTO_GRE), None),
            Ok(10_000)
        );
        assert_eq!(table.endpoint_keys().count(), 2);
    }
}

/// GRE keepalives (Cisco's `keepalive INTERVAL MISSES`): one sent every
/// `interval` seconds; the tunnel is down once `interval * misses`
/// seconds pass without a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: u16,
    pub misses: u8,
}

impl Keepalive {
    /// Seconds without a reply after which the tunnel is down.
    pub fn dead_after(&self) -> u32 {
        u32::from(self.interval) * u32::from(self.misses)
    }
}
