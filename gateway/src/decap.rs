//! Decapsulation, sans-IO: a function over the bytes of one received frame
//! that returns where the inner packet (with its new Ethernet header, for a
//! tap) lies in that same buffer, or the reason to drop it. No syscalls, no
//! clock, no allocation: unit-tested and fuzzed without root.

use crate::drop_reason::DropReason;
use crate::tunnel::{endpoint_key, DeviceKind, LookupError, Mode, TunnelId, TunnelTable};
use crate::wire::{checksum, ethernet, gre, ipv4, ipv6, Error, IpProtocol};
use gateway_common::{IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6};

/// A packet to deliver: `frame[offset..offset + len]` goes to the device of
/// `tunnel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub tunnel: TunnelId,
    pub offset: usize,
    pub len: usize,
    pub kind: Kind,
}

/// What a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A packet for the tunnel's device.
    Device,
    /// A GRE keepalive: `frame[offset..offset + len]` is an IPv4 packet
    /// from the tunnel's local address to its remote, to be sent back on
    /// the underlay (as the kernel would route it), not into the device.
    Keepalive,
    /// An ICMP "fragmentation needed" about a packet the gateway sent on
    /// this tunnel's path: the path's MTU is now at most `mtu` (nothing to
    /// deliver; `offset` and `len` are 0).
    PathMtu { mtu: u16 },
}

/// What decapsulation remembers between packets, per worker: the next
/// sequence number expected on each tunnel with `iseq` (0: any). A NIC
/// hashes a tunnel's packets (same outer addresses) onto one queue, so one
/// worker sees them all.
#[derive(Debug, Clone, Default)]
pub struct RxState {
    pub next_seq: Vec<u32>,
}

impl RxState {
    pub fn new(tunnels: usize) -> RxState {
        RxState {
            next_seq: vec![0; tunnels],
        }
    }
}

/// Inner network protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    V4,
    V6,
}

/// Decapsulates the Ethernet frame in `frame` in place. For a tap device an
/// Ethernet header (destination: the tap's MAC) is written just in front of
/// the inner packet, over the outer headers, so the result is one contiguous
/// slice of `frame`.
#[inline]
pub fn decap(
    frame: &mut [u8],
    table: &TunnelTable,
    state: &mut RxState,
) -> Result<Delivery, DropReason> {
    let eth = ethernet::Frame::new_checked(&*frame).map_err(|_| DropReason::Truncated)?;
    let (ethertype, l3) = match eth.network() {
        Ok(v) => v,
        Err(Error::Truncated) => return Err(DropReason::Truncated),
        Err(Error::Malformed) => return Err(DropReason::NotIp),
    };

    // The outer header: its addresses make the lookup key; `payload` is the
    // byte range of what follows it, cut at the length it declares.
    let (key, payload, outer_ecn) = match ethertype {
        ethernet::EtherType::Ipv4 => {
            let ip = ipv4::Packet::new_checked(&frame[l3..]).map_err(outer_error)?;
            if !ip.verify_checksum() {
                return Err(DropReason::OuterChecksum);
            }
            if ip.is_fragment() {
                return Err(DropReason::OuterFragment);
            }
            let proto = u8::from(ip.protocol());
            if proto == IPPROTO_ICMP {
                let start = l3 + ip.header_len();
                let end = l3 + usize::from(ip.total_len());
                return path_mtu_from_icmp(&frame[start..end], table);
            }
            if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                return Err(DropReason::NotTunnelProtocol);
            }
            let key = endpoint_key(ip.dst_addr().into(), ip.src_addr().into(), proto);
            (
                key,
                l3 + ip.header_len()..l3 + usize::from(ip.total_len()),
                ip.dscp_ecn() & ECN_MASK,
            )
        }
        ethernet::EtherType::Ipv6 => {
            let ip = ipv6::Packet::new_checked(&frame[l3..]).map_err(outer_error)?;
            let end = l3 + ip.total_len();
            let mut start = l3 + ipv6::HEADER_LEN;
            let mut proto = u8::from(ip.next_header());
            if proto == IPPROTO_ICMPV6 {
                let (src, dst) = (ip.src_addr().octets(), ip.dst_addr().octets());
                return path_mtu_from_icmpv6(&frame[start..end], &src, &dst, table);
            }
            // One destination-options header, as ip6tnl and ip6gre send
            // by default (RFC 2473's encapsulation limit), is stepped over.
            if proto == IPV6_DSTOPTS {
                let opts = frame.get(start..start + 2).ok_or(DropReason::Truncated)?;
                let len = (usize::from(opts[1]) + 1) * 8;
                proto = opts[0];
                start += len;
                if start > end {
                    return Err(DropReason::OuterMalformed);
                }
            }
            if proto == IPV6_FRAGMENT {
                return Err(DropReason::OuterFragment);
            }
            if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                return Err(match proto {
                    0 | 43 | 60 | 51 | 135 => DropReason::OuterIpv6ExtHeader,
                    _ => DropReason::NotTunnelProtocol,
                });
            }
            let key = endpoint_key(ip.dst_addr().into(), ip.src_addr().into(), proto);
            (key, start..end, ip.traffic_class() & ECN_MASK)
        }
        _ => return Err(DropReason::NotIp),
    };

    let (tunnel, inner, inner_start) = if key.proto == IPPROTO_GRE {
        let g = gre::Packet::new_checked(&frame[payload.clone()]).map_err(|e| match e {
            gre::HeaderError::Truncated => DropReason::GreTruncated,
            gre::HeaderError::Version => DropReason::GreVersion,
            gre::HeaderError::ReservedFlags => DropReason::GreReservedFlags,
        })?;
        if !g.verify_checksum() {
            return Err(DropReason::GreChecksumBad);
        }
        let id = table.lookup(&key, g.key()).map_err(lookup_error)?;
        let t = table.get(id);
        match (g.has_checksum(), t.icsum) {
            (false, true) => return Err(DropReason::GreChecksumMissing),
            (true, false) => return Err(DropReason::GreChecksumUnexpected),
            _ => {}
        }
        // The kernel's rule (ip_tunnel_rcv): with iseq, a packet must carry
        // a number, and one older than the next expected is refused; the
        // first packet, and any after the counter wraps to 0, set it.
        // Without iseq a number is ignored.
        if t.iseq {
            let seq = g.sequence().ok_or(DropReason::GreSequenceMissing)?;
            if let Some(next) = state.next_seq.get_mut(usize::from(id)) {
                if *next != 0 && (seq.wrapping_sub(*next) as i32) < 0 {
                    return Err(DropReason::GreSequenceOld);
                }
                *next = seq.wrapping_add(1);
            }
        }
        // A gre tunnel carries IP, a gretap tunnel Ethernet frames; as
        // in the kernel, each takes only its own.
        // (`None`: an Ethernet frame.)
        let inner = match (g.protocol(), t.mode) {
            (ethernet::EtherType::Ipv4, Mode::Gre) => Some(Inner::V4),
            (ethernet::EtherType::Ipv6, Mode::Gre) => Some(Inner::V6),
            (ethernet::EtherType::TransparentEthernet, Mode::Gretap) => None,
            _ => return Err(DropReason::GreProtocolUnsupported),
        };
        (id, inner, payload.start + g.header_len())
    } else {
        let id = table.lookup(&key, None).map_err(lookup_error)?;
        // IPIP carries IPv4, sit IPv6.
        let inner = if key.proto == IPPROTO_IPV6 {
            Inner::V6
        } else {
            Inner::V4
        };
        (id, Some(inner), payload.start)
    };

    let t = table.get(tunnel);
    let Some(inner) = inner else {
        // The frame goes into the tap as it came: no source check (it is
        // bridged, not routed), one VLAN tag allowed beyond the MTU.
        let len = payload.end - inner_start;
        if len < ethernet::HEADER_LEN {
            return Err(DropReason::InnerMalformed);
        }
        if len - ethernet::HEADER_LEN > usize::from(t.mtu) + 4 {
            return Err(DropReason::InnerTooBig);
        }
        return Ok(Delivery {
            tunnel,
            offset: inner_start,
            len,
            kind: Kind::Device,
        });
    };
    let rest = &frame[inner_start..payload.end];
    let (inner_len, inner_src, inner_ecn) = match inner {
        Inner::V4 => {
            let p = ipv4::Packet::new_checked(rest).map_err(|_| DropReason::InnerMalformed)?;
            // A GRE keepalive as routers send them (Cisco's): a GRE packet
            // from our end to theirs, wrapped in one from theirs to ours.
            // The kernel answers it by routing the inner packet back out;
            // so does the gateway, without the device.
            if key.proto == IPPROTO_GRE
                && p.protocol() == IpProtocol::Gre
                && std::net::IpAddr::V4(p.src_addr()) == t.local
                && std::net::IpAddr::V4(p.dst_addr()) == t.remote
            {
                let len = usize::from(p.total_len());
                let ttl = p.ttl();
                if ttl <= 1 {
                    return Err(DropReason::KeepaliveTtlExpired);
                }
                // Forwarded, as the kernel would: one hop less.
                let mut q = ipv4::Packet::new_unchecked(&mut frame[inner_start..inner_start + len]);
                q.set_ttl(ttl - 1);
                q.fill_checksum();
                return Ok(Delivery {
                    tunnel,
                    offset: inner_start,
                    len,
                    kind: Kind::Keepalive,
                });
            }
            (
                usize::from(p.total_len()),
                std::net::IpAddr::V4(p.src_addr()),
                p.dscp_ecn() & ECN_MASK,
            )
        }
        Inner::V6 => {
            let p = ipv6::Packet::new_checked(rest).map_err(|_| DropReason::InnerMalformed)?;
            (
                p.total_len(),
                std::net::IpAddr::V6(p.src_addr()),
                p.traffic_class() & ECN_MASK,
            )
        }
    };
    if !t.accepts_source(inner_src) {
        return Err(DropReason::InnerSourceNotPeer);
    }
    if inner_len > usize::from(t.mtu) {
        return Err(DropReason::InnerTooBig);
    }
    // ECN, RFC 6040 as the kernel does it (INET_ECN_decapsulate):
    // congestion marked on the outer header is carried to an ECN-capable
    // inner packet; a not-ECT inner packet under a CE outer is dropped.
    // Otherwise the inner ECN field stands.
    if outer_ecn == ECN_CE && inner_ecn != ECN_CE {
        if inner_ecn == 0 {
            return Err(DropReason::EcnCeOnNotEct);
        }
        let inner_bytes = &mut frame[inner_start..inner_start + inner_len];
        match inner {
            Inner::V4 => {
                let mut p = ipv4::Packet::new_unchecked(inner_bytes);
                let tos = p.dscp_ecn();
                p.set_dscp_ecn(tos | ECN_CE);
                p.fill_checksum();
            }
            Inner::V6 => {
                let mut p = ipv6::Packet::new_unchecked(inner_bytes);
                let tc = p.traffic_class();
                p.set_traffic_class(tc | ECN_CE);
            }
        }
    }

    match t.device_kind {
        DeviceKind::Tun => Ok(Delivery {
            tunnel,
            offset: inner_start,
            len: inner_len,
            kind: Kind::Device,
        }),
        DeviceKind::Tap => {
            // The outer Ethernet and IP headers (at least 34 bytes) lie in
            // front of the inner packet, so there is room for 14 here.
            let offset = inner_start - ethernet::HEADER_LEN;
            let repr = ethernet::Repr {
                dst: t.device_mac,
                src: t.peer_mac,
                ethertype: match inner {
                    Inner::V4 => ethernet::EtherType::Ipv4,
                    Inner::V6 => ethernet::EtherType::Ipv6,
                },
            };
            repr.emit(&mut ethernet::Frame::new_unchecked(
                &mut frame[offset..inner_start],
            ));
            Ok(Delivery {
                tunnel,
                offset,
                len: inner_len + ethernet::HEADER_LEN,
                kind: Kind::Device,
            })
        }
    }
}

/// An ICMP "fragmentation needed" from a router on the path (RFC 1191),
/// about a packet the gateway sent: the tunnel with the quoted packet's
/// endpoints, and the MTU it reports (no lower than the kernel's
/// `min_pmtu`, 552).
fn path_mtu_from_icmp(icmp: &[u8], table: &TunnelTable) -> Result<Delivery, DropReason> {
    const ICMP_HEADER: usize = 8;
    if icmp.len() < ICMP_HEADER + ipv4::HEADER_LEN || !checksum::verify(icmp) {
        return Err(DropReason::IcmpMalformed);
    }
    if icmp[0] != 3 || icmp[1] != 4 {
        return Err(DropReason::NotTunnelProtocol);
    }
    let mtu = u16::from_be_bytes([icmp[6], icmp[7]]);
    let quoted = &icmp[ICMP_HEADER..];
    if quoted[0] >> 4 != 4 || mtu < 68 {
        return Err(DropReason::IcmpMalformed);
    }
    let src = std::net::Ipv4Addr::new(quoted[12], quoted[13], quoted[14], quoted[15]);
    let dst = std::net::Ipv4Addr::new(quoted[16], quoted[17], quoted[18], quoted[19]);
    // What we sent: from our local address to the remote.
    let key = endpoint_key(src.into(), dst.into(), quoted[9]);
    let tunnel = table
        .any_on_endpoint(&key)
        .ok_or(DropReason::UnknownEndpoint)?;
    Ok(Delivery {
        tunnel,
        offset: 0,
        len: 0,
        kind: Kind::PathMtu {
            mtu: mtu.max(MIN_PMTU),
        },
    })
}

/// The IPv6 counterpart: ICMPv6 "packet too big" (RFC 4443) about a
/// packet the gateway sent; an MTU under 1280 is taken as 1280, as the
/// kernel does.
fn path_mtu_from_icmpv6(
    icmp: &[u8],
    src: &[u8; 16],
    dst: &[u8; 16],
    table: &TunnelTable,
) -> Result<Delivery, DropReason> {
    const ICMP_HEADER: usize = 8;
    if icmp.len() < ICMP_HEADER + ipv6::HEADER_LEN {
        return Err(DropReason::IcmpMalformed);
    }
    if icmp[0] != 2 {
        return Err(DropReason::NotTunnelProtocol);
    }
    let mut zeroed = [0u8; 4];
    zeroed[..2].copy_from_slice(&icmp[..2]);
    let sum = crate::encap::icmpv6_checksum(src, dst, &[&zeroed[..], &icmp[4..]].concat());
    if sum != u16::from_be_bytes([icmp[2], icmp[3]]) {
        return Err(DropReason::IcmpMalformed);
    }
    let mtu = u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]);
    let quoted = &icmp[ICMP_HEADER..];
    if quoted[0] >> 4 != 6 {
        return Err(DropReason::IcmpMalformed);
    }
    let mut proto = quoted[6];
    if proto == IPV6_DSTOPTS {
        proto = *quoted
            .get(ipv6::HEADER_LEN)
            .ok_or(DropReason::IcmpMalformed)?;
    }
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    local.copy_from_slice(&quoted[8..24]);
    remote.copy_from_slice(&quoted[24..40]);
    let key = endpoint_key(
        std::net::Ipv6Addr::from(local).into(),
        std::net::Ipv6Addr::from(remote).into(),
        proto,
    );
    let tunnel = table
        .any_on_endpoint(&key)
        .ok_or(DropReason::UnknownEndpoint)?;
    Ok(Delivery {
        tunnel,
        offset: 0,
        len: 0,
        kind: Kind::PathMtu {
            mtu: mtu.clamp(1280, 65535) as u16,
        },
    })
}

/// The kernel's `net.ipv4.route.min_pmtu` default.
pub const MIN_PMTU: u16 = 552;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPV6_FRAGMENT: u8 = 44;

const ECN_MASK: u8 = 0x03;
const IPV6_DSTOPTS: u8 = 60;
const ECN_CE: u8 = 0x03;

fn outer_error(e: Error) -> DropReason {
    match e {
        Error::Truncated => DropReason::Truncated,
        Error::Malformed => DropReason::OuterMalformed,
    }
}

fn lookup_error(e: LookupError) -> DropReason {
    match e {
        LookupError::UnknownEndpoint => DropReason::UnknownEndpoint,
        LookupError::KeyMismatch => DropReason::KeyMismatch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{Mode, TunnelRx};
    use crate::wire::checksum;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 8);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 58);
    const TAP_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
    const PEER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];

    fn tunnel(name: &str, mode: Mode, ikey: Option<u32>, kind: DeviceKind) -> TunnelRx {
        TunnelRx {
            name: name.into(),
            mode,
            local: LOCAL.into(),
            remote: REMOTE.into(),
            ikey,
            icsum: false,
            iseq: false,
            device_kind: kind,
            device_mac: TAP_MAC,
            peer_mac: PEER_MAC,
            mtu: 1400,
            allowed_sources: Vec::new(),
        }
    }

    fn lab() -> TunnelTable {
        TunnelTable::new(vec![
            tunnel("tun100", Mode::Gre, None, DeviceKind::Tap),
            tunnel("tun200", Mode::Ipip, None, DeviceKind::Tun),
            tunnel("tun300", Mode::Gre, Some(300), DeviceKind::Tun),
        ])
    }

    /// An ICMP echo request 10.1.1.2 -> 10.1.1.1, built by hand.
    fn inner_v4() -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 28, 0, 1, 0x40, 0, 64, 1, 0, 0, 10, 1, 1, 2, 10, 1, 1, 1, // IPv4
            8, 0, 0, 0, 0x12, 0x34, 0, 1, // ICMP echo
        ];
        let c = checksum::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let c = checksum::checksum(&p[20..]);
        p[22..24].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn outer_v4(proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 8]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 58]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        let repr = ipv4::Repr {
            src: REMOTE,
            dst: LOCAL,
            protocol: IpProtocol::from(proto),
            payload_len: payload.len(),
            ttl: 64,
            dscp_ecn: 0,
            dont_frag: false,
            ident: 7,
        };
        repr.emit(&mut ipv4::Packet::new_unchecked(&mut f[14..]));
        f
    }

    fn gre(flags_and_options: &[u8], protocol: u16, inner: &[u8]) -> Vec<u8> {
        let mut g = flags_and_options.to_vec();
        g.splice(2..2, protocol.to_be_bytes());
        g.extend_from_slice(inner);
        g
    }

    #[test]
    fn gre_to_tap_gets_ethernet_header() {
        let inner = inner_v4();
        let mut f = outer_v4(47, &gre(&[0, 0], 0x0800, &inner));
        let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
        assert_eq!(d.tunnel, 0);
        let out = &f[d.offset..d.offset + d.len];
        assert_eq!(&out[0..6], &TAP_MAC);
        assert_eq!(&out[6..12], &PEER_MAC);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(&out[14..], &inner[..]);
    }

    #[test]
    fn ipip_to_tun_is_bare_packet() {
        let inner = inner_v4();
        let mut f = outer_v4(4, &inner);
        let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
        assert_eq!(d.tunnel, 1);
        assert_eq!(&f[d.offset..d.offset + d.len], &inner[..]);
    }

    #[test]
    fn ethernet_padding_is_trimmed() {
        let inner = inner_v4();
        let mut f = outer_v4(4, &inner);
        f.extend_from_slice(&[0xee; 10]);
        let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
        assert_eq!(d.len, inner.len());
    }

    #[test]
    fn keys_select_tunnels() {
        let inner = inner_v4();
        let mut f = outer_v4(47, &gre(&[0x20, 0, 0, 0, 1, 0x2c], 0x0800, &inner));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)).unwrap().tunnel,
            2
        );
        let mut wrong = outer_v4(47, &gre(&[0x20, 0, 0, 0, 1, 0x2d], 0x0800, &inner));
        assert_eq!(
            decap(&mut wrong, &lab(), &mut RxState::new(8)),
            Err(DropReason::KeyMismatch)
        );
        // A keyless packet goes to the keyless tunnel only.
        let only_keyed = TunnelTable::new(vec![tunnel("k", Mode::Gre, Some(5), DeviceKind::Tun)]);
        let mut keyless = outer_v4(47, &gre(&[0, 0], 0x0800, &inner));
        assert_eq!(
            decap(&mut keyless, &only_keyed, &mut RxState::new(8)),
            Err(DropReason::KeyMismatch)
        );
    }

    #[test]
    fn unknown_remote_is_dropped() {
        let inner = inner_v4();
        let mut f = outer_v4(4, &inner);
        f[14 + 12..14 + 16].copy_from_slice(&[192, 168, 0, 99]);
        ipv4::Packet::new_unchecked(&mut f[14..]).fill_checksum();
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::UnknownEndpoint)
        );
    }

    #[test]
    fn gre_header_rules() {
        let inner = inner_v4();
        let t = lab();
        let mut v1 = outer_v4(47, &gre(&[0, 1], 0x0800, &inner));
        assert_eq!(
            decap(&mut v1, &t, &mut RxState::new(8)),
            Err(DropReason::GreVersion)
        );
        let mut routing = outer_v4(47, &gre(&[0x40, 0, 0, 0, 0, 0], 0x0800, &inner));
        assert_eq!(
            decap(&mut routing, &t, &mut RxState::new(8)),
            Err(DropReason::GreReservedFlags)
        );
        let mut eth = outer_v4(47, &gre(&[0, 0], 0x6558, &inner));
        assert_eq!(
            decap(&mut eth, &t, &mut RxState::new(8)),
            Err(DropReason::GreProtocolUnsupported)
        );
        let mut short = outer_v4(47, &[0x20, 0, 0x08]);
        assert_eq!(
            decap(&mut short, &t, &mut RxState::new(8)),
            Err(DropReason::GreTruncated)
        );
    }

    #[test]
    fn gre_checksum_rules() {
        let inner = inner_v4();
        let mut g = gre(&[0x80, 0, 0, 0, 0, 0], 0x0800, &inner);
        gre::Packet::new_unchecked(&mut g[..]).fill_checksum();
        // Right checksum, but the tunnel does not expect one.
        let mut f = outer_v4(47, &g);
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::GreChecksumUnexpected)
        );
        let mut expecting = tunnel("c", Mode::Gre, None, DeviceKind::Tun);
        expecting.icsum = true;
        let table = TunnelTable::new(vec![expecting]);
        let mut f = outer_v4(47, &g);
        assert!(decap(&mut f, &table, &mut RxState::new(8)).is_ok());
        let mut bad = g.clone();
        *bad.last_mut().unwrap() ^= 0xff;
        let mut f = outer_v4(47, &bad);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(8)),
            Err(DropReason::GreChecksumBad)
        );
        let mut f = outer_v4(47, &gre(&[0, 0], 0x0800, &inner));
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(8)),
            Err(DropReason::GreChecksumMissing)
        );
    }

    #[test]
    fn outer_rules() {
        let inner = inner_v4();
        let t = lab();
        let mut bad_sum = outer_v4(4, &inner);
        bad_sum[14 + 10] ^= 1;
        assert_eq!(
            decap(&mut bad_sum, &t, &mut RxState::new(8)),
            Err(DropReason::OuterChecksum)
        );
        let mut frag = outer_v4(4, &inner);
        frag[14 + 6] = 0x20;
        ipv4::Packet::new_unchecked(&mut frag[14..]).fill_checksum();
        assert_eq!(
            decap(&mut frag, &t, &mut RxState::new(8)),
            Err(DropReason::OuterFragment)
        );
        let mut udp = outer_v4(17, &inner);
        assert_eq!(
            decap(&mut udp, &t, &mut RxState::new(8)),
            Err(DropReason::NotTunnelProtocol)
        );
        let mut arp = outer_v4(4, &inner);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            decap(&mut arp, &t, &mut RxState::new(8)),
            Err(DropReason::NotIp)
        );
        let mut cut = outer_v4(4, &inner);
        cut.truncate(40);
        assert_eq!(
            decap(&mut cut, &t, &mut RxState::new(8)),
            Err(DropReason::Truncated)
        );
        assert_eq!(
            decap(&mut [0u8; 10], &t, &mut RxState::new(8)),
            Err(DropReason::Truncated)
        );
    }

    #[test]
    fn inner_rules() {
        let t = lab();
        let mut inner = inner_v4();
        inner[0] = 0x65; // IPv6 version in an IPIP packet
        let mut f = outer_v4(4, &inner);
        assert_eq!(
            decap(&mut f, &t, &mut RxState::new(8)),
            Err(DropReason::InnerMalformed)
        );
        let mut inner = inner_v4();
        inner[3] = 200; // claims more than there is
        let mut f = outer_v4(4, &inner);
        assert_eq!(
            decap(&mut f, &t, &mut RxState::new(8)),
            Err(DropReason::InnerMalformed)
        );
        let mut big = inner_v4();
        big.resize(1500, 0);
        big[2..4].copy_from_slice(&1500u16.to_be_bytes());
        let mut f = outer_v4(4, &big);
        assert_eq!(
            decap(&mut f, &t, &mut RxState::new(8)),
            Err(DropReason::InnerTooBig)
        );
    }

    #[test]
    fn only_the_peer_gets_in() {
        let mut t = tunnel("p", Mode::Ipip, None, DeviceKind::Tun);
        t.allowed_sources = vec![crate::tunnel::Prefix::parse("10.1.1.2").unwrap()];
        let table = TunnelTable::new(vec![t]);
        let mut f = outer_v4(4, &inner_v4());
        assert!(decap(&mut f, &table, &mut RxState::new(8)).is_ok());
        let mut spoofed = inner_v4();
        spoofed[12..16].copy_from_slice(&[10, 1, 1, 9]);
        ipv4::Packet::new_unchecked(&mut spoofed[..]).fill_checksum();
        let mut f = outer_v4(4, &spoofed);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(8)),
            Err(DropReason::InnerSourceNotPeer)
        );
    }

    #[test]
    fn ipv6_outer_gre_carrying_ipv6() {
        let local: Ipv6Addr = "2001:db8::8".parse().unwrap();
        let remote: Ipv6Addr = "2001:db8::58".parse().unwrap();
        let mut t = tunnel("v6", Mode::Gre, None, DeviceKind::Tap);
        t.local = IpAddr::V6(local);
        t.remote = IpAddr::V6(remote);
        let table = TunnelTable::new(vec![t]);
        let mut inner = vec![0u8; 48];
        inner[0] = 0x60;
        inner[5] = 8;
        inner[6] = 17;
        inner[7] = 64;
        let g = gre(&[0, 0], 0x86dd, &inner);
        let mut f = vec![0u8; 14 + 40];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        {
            let mut ip = ipv6::Packet::new_unchecked(&mut f[14..]);
            ip.set_version_and_traffic_class(0);
            ip.set_payload_len(g.len() as u16);
            ip.set_next_header(IpProtocol::Gre);
            ip.set_hop_limit(64);
            ip.set_src_addr(remote);
            ip.set_dst_addr(local);
        }
        f.extend_from_slice(&g);
        let d = decap(&mut f, &table, &mut RxState::new(8)).unwrap();
        assert_eq!(&f[d.offset + 12..d.offset + 14], &[0x86, 0xdd]);
        assert_eq!(&f[d.offset + 14..d.offset + d.len], &inner[..]);
        // A hop-by-hop header in front of GRE is refused by name.
        f[14 + 6] = 0;
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(8)),
            Err(DropReason::OuterIpv6ExtHeader)
        );
    }

    fn with_ecn(mut f: Vec<u8>, outer: u8, inner: u8, inner_at: usize) -> Vec<u8> {
        f[15] = (f[15] & !3) | outer;
        let mut p = ipv4::Packet::new_unchecked(&mut f[14..]);
        p.fill_checksum();
        f[inner_at + 1] = (f[inner_at + 1] & !3) | inner;
        let mut q = ipv4::Packet::new_unchecked(&mut f[inner_at..]);
        q.fill_checksum();
        f
    }

    #[test]
    fn ecn_follows_rfc_6040_as_the_kernel_does() {
        let inner = inner_v4();
        let base = outer_v4(4, &inner);
        let t = lab();
        let at = 34;
        // Outer CE onto an ECT inner packet: the inner one becomes CE, with
        // a right header checksum.
        for ect in [1, 2] {
            let mut f = with_ecn(base.clone(), 3, ect, at);
            let d = decap(&mut f, &t, &mut RxState::new(8)).unwrap();
            let p = ipv4::Packet::new_checked(&f[d.offset..d.offset + d.len]).unwrap();
            assert_eq!(p.dscp_ecn() & 3, 3);
            assert!(p.verify_checksum());
        }
        // Outer CE on a not-ECT inner packet: dropped.
        let mut f = with_ecn(base.clone(), 3, 0, at);
        assert_eq!(
            decap(&mut f, &t, &mut RxState::new(8)),
            Err(DropReason::EcnCeOnNotEct)
        );
        // Anything else leaves the inner field alone (the kernel does not
        // carry ECT(1) over, nor ECT onto not-ECT).
        for (outer, inner_ecn) in [(0, 0), (1, 0), (2, 0), (1, 2), (2, 1), (0, 3), (1, 3)] {
            let mut f = with_ecn(base.clone(), outer, inner_ecn, at);
            let d = decap(&mut f, &t, &mut RxState::new(8)).unwrap();
            assert_eq!(
                f[d.offset + 1] & 3,
                inner_ecn,
                "outer {outer} inner {inner_ecn}"
            );
        }
    }

    #[test]
    fn iseq_takes_numbers_in_order_as_the_kernel_does() {
        let mut t = tunnel("tun100", Mode::Gre, None, DeviceKind::Tun);
        t.iseq = true;
        let table = TunnelTable::new(vec![t]);
        let mut st = RxState::new(1);
        let inner = inner_v4();
        let mut send = |seq: Option<u32>| {
            let g = match seq {
                Some(n) => {
                    let mut h = vec![0x10, 0];
                    h.extend_from_slice(&n.to_be_bytes());
                    gre(&h, 0x0800, &inner)
                }
                None => gre(&[0, 0], 0x0800, &inner),
            };
            let mut f = outer_v4(47, &g);
            decap(&mut f, &table, &mut st).map(|_| ())
        };
        assert_eq!(send(None), Err(DropReason::GreSequenceMissing));
        assert_eq!(send(Some(10)), Ok(()));
        assert_eq!(send(Some(10)), Err(DropReason::GreSequenceOld));
        assert_eq!(send(Some(9)), Err(DropReason::GreSequenceOld));
        assert_eq!(send(Some(12)), Ok(()), "a gap is fine");
        assert_eq!(send(Some(11)), Err(DropReason::GreSequenceOld));
        // Serial-number arithmetic across the wrap.
        assert_eq!(send(Some(0x8000_0000)), Ok(()));
        assert_eq!(send(Some(u32::MAX)), Ok(()));
        // next is now 0: the kernel takes anything then.
        assert_eq!(send(Some(5)), Ok(()));
        assert_eq!(send(Some(4)), Err(DropReason::GreSequenceOld));
    }

    #[test]
    fn a_tunnel_without_iseq_ignores_sequence_numbers() {
        let t = lab();
        let mut st = RxState::new(8);
        for _ in 0..2 {
            let mut f = outer_v4(47, &gre(&[0x10, 0, 0, 0, 0, 7], 0x0800, &inner_v4()));
            assert!(decap(&mut f, &t, &mut st).is_ok());
        }
    }

    #[test]
    fn a_gre_keepalive_is_handed_back_for_the_underlay() {
        // Cisco's: outer remote -> local carrying GRE local -> remote with
        // protocol 0 and nothing after it.
        let mut inner = vec![
            0x45, 0, 0, 24, 0, 0, 0, 0, 255, 47, 0, 0, 192, 168, 0, 8, 192, 168, 0, 58, 0, 0, 0, 0,
        ];
        let c = checksum::checksum(&inner[..20]);
        inner[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = outer_v4(47, &gre(&[0, 0], 0x0800, &inner));
        let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
        assert_eq!(d.kind, Kind::Keepalive);
        assert_eq!(d.tunnel, 0);
        let out = ipv4::Packet::new_checked(&f[d.offset..d.offset + d.len]).unwrap();
        assert_eq!(out.ttl(), 254, "forwarded: one hop less");
        assert!(out.verify_checksum());
        assert_eq!((out.src_addr(), out.dst_addr()), (LOCAL, REMOTE));
        // Not over IPIP, and not when the TTL is spent.
        let mut f = outer_v4(4, &inner);
        assert_ne!(
            decap(&mut f, &lab(), &mut RxState::new(8)).map(|d| d.kind == Kind::Keepalive),
            Ok(true)
        );
        inner[8] = 1;
        inner[10..12].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&inner[..20]);
        inner[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = outer_v4(47, &gre(&[0, 0], 0x0800, &inner));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::KeepaliveTtlExpired)
        );
    }

    #[test]
    fn gretap_delivers_the_ethernet_frame_as_it_came() {
        let mut t = tunnel("l2", Mode::Gretap, Some(9), DeviceKind::Tap);
        t.mtu = 1400;
        let table = TunnelTable::new(vec![t, tunnel("l3", Mode::Gre, None, DeviceKind::Tun)]);
        // An ARP request, broadcast: bridged, not answered.
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 0x42, 0x08, 0x06]);
        frame.extend_from_slice(&[0u8; 28]);
        let keyed = |proto: u16, inner: &[u8]| {
            let mut h = vec![0x20, 0];
            h.extend_from_slice(&9u32.to_be_bytes());
            outer_v4(47, &gre(&h, proto, inner))
        };
        let mut f = keyed(0x6558, &frame);
        let d = decap(&mut f, &table, &mut RxState::new(2)).unwrap();
        assert_eq!(d.tunnel, 0);
        assert_eq!(&f[d.offset..d.offset + d.len], &frame[..]);
        // IP on the gretap tunnel, Ethernet on the gre one: refused.
        let mut f = keyed(0x0800, &inner_v4());
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(2)),
            Err(DropReason::GreProtocolUnsupported)
        );
        let mut f = outer_v4(47, &gre(&[0, 0], 0x6558, &frame));
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(2)),
            Err(DropReason::GreProtocolUnsupported)
        );
        // Shorter than an Ethernet header; longer than the MTU allows.
        let mut f = keyed(0x6558, &frame[..10]);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(2)),
            Err(DropReason::InnerMalformed)
        );
        let mut big = frame.clone();
        big.resize(14 + 1405, 0);
        let mut f = keyed(0x6558, &big);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(2)),
            Err(DropReason::InnerTooBig)
        );
    }

    #[test]
    fn sit_carries_ipv6_in_ipv4() {
        let table = TunnelTable::new(vec![tunnel("6in4", Mode::Sit, None, DeviceKind::Tun)]);
        let mut inner = vec![0u8; 48];
        inner[0] = 0x60;
        inner[5] = 8;
        inner[6] = 17;
        inner[7] = 64;
        let mut f = outer_v4(41, &inner);
        let d = decap(&mut f, &table, &mut RxState::new(1)).unwrap();
        assert_eq!(&f[d.offset..d.offset + d.len], &inner[..]);
        // IPv4 inside protocol 41 is not IPv6.
        let mut f = outer_v4(41, &inner_v4());
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(1)),
            Err(DropReason::InnerMalformed)
        );
    }

    #[test]
    fn fragmentation_needed_about_a_tunnel_packet_reports_the_path_mtu() {
        // What a router sends back: ICMP 3/4 with the MTU, quoting our
        // outer header (local -> remote, GRE) and 8 bytes after it.
        let icmp = |mtu: u16, src: Ipv4Addr| {
            let mut m = vec![3, 4, 0, 0, 0, 0];
            m.extend_from_slice(&mtu.to_be_bytes());
            let mut quoted = outer_v4(47, &[0u8; 8])[14..].to_vec();
            quoted[12..16].copy_from_slice(&src.octets());
            quoted[16..20].copy_from_slice(&REMOTE.octets());
            m.extend_from_slice(&quoted);
            let c = checksum::checksum(&m);
            m[2..4].copy_from_slice(&c.to_be_bytes());
            m
        };
        let mut f = outer_v4(1, &icmp(1300, LOCAL));
        let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
        assert_eq!(d.kind, Kind::PathMtu { mtu: 1300 });
        // Below the kernel's min_pmtu: taken as 552.
        let mut f = outer_v4(1, &icmp(300, LOCAL));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)).unwrap().kind,
            Kind::PathMtu { mtu: 552 }
        );
        // About somebody else's packet; with a wrong checksum.
        let mut f = outer_v4(1, &icmp(1300, Ipv4Addr::new(192, 168, 0, 99)));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::UnknownEndpoint)
        );
        let mut bad = icmp(1300, LOCAL);
        bad[2] ^= 1;
        let mut f = outer_v4(1, &bad);
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::IcmpMalformed)
        );
    }
}
