//! Decapsulation, sans-IO: a function over the bytes of one received frame
//! that returns where the inner packet (with its new Ethernet header, for a
//! tap) lies in that same buffer, or the reason to drop it. No syscalls, no
//! clock, no allocation: unit-tested and fuzzed without root.

use crate::datapath::drop_reason::DropReason;
use crate::datapath::tunnel::{endpoint_key, DeviceKind, LookupError, Mode, TunnelId, TunnelTable};
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
            let proto = u8::from(ip.protocol());
            if ip.is_fragment() {
                // Only tunnel packets are reassembled: a fragment of
                // anything else (an ICMP error cut in pieces, which anyone
                // can send from any source) must not take room there.
                if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                    return Err(DropReason::NotTunnelProtocol);
                }
                return Err(DropReason::OuterFragment);
            }
            if proto == IPPROTO_ICMP {
                let start = l3 + ip.header_len();
                let end = l3 + usize::from(ip.total_len());
                return path_mtu_from_icmp(&frame[start..end], ip.dst_addr(), table);
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
        // ECN, as for IP in IP: the kernel applies RFC 6040 to the IP
        // header right behind the inner Ethernet header (ip_tunnel_rcv,
        // before eth_type_trans); other frames (ARP, VLAN-tagged) pass as
        // they are.
        let eth_end = inner_start + ethernet::HEADER_LEN;
        let ip_len = payload.end - eth_end;
        let inner = match [frame[eth_end - 2], frame[eth_end - 1]] {
            [0x08, 0x00] => Some((Inner::V4, ipv4::HEADER_LEN)),
            [0x86, 0xdd] => Some((Inner::V6, ipv6::HEADER_LEN)),
            _ => None,
        };
        if let Some((inner, min)) = inner {
            // pskb_inet_may_pull: an IP header cut short is dropped.
            if ip_len < min {
                return Err(DropReason::InnerMalformed);
            }
            let ip = &mut frame[eth_end..payload.end];
            let inner_ecn = match inner {
                Inner::V4 => ip[1] & ECN_MASK,
                Inner::V6 => (u16::from_be_bytes([ip[0], ip[1]]) >> 4) as u8 & ECN_MASK,
            };
            ecn_decapsulate(outer_ecn, inner_ecn, inner, ip)?;
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
                // The kernel's ip_rcv drops a header with a wrong checksum
                // before it would forward the packet.
                if !p.verify_checksum() {
                    return Err(DropReason::InnerMalformed);
                }
                if ttl <= 1 {
                    return Err(DropReason::KeepaliveTtlExpired);
                }
                // Forwarded, as the kernel would: one hop less (the
                // checksum updated for that change alone, RFC 1624).
                let mut q = ipv4::Packet::new_unchecked(&mut frame[inner_start..inner_start + len]);
                q.update_ttl(ttl - 1);
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
    ecn_decapsulate(
        outer_ecn,
        inner_ecn,
        inner,
        &mut frame[inner_start..inner_start + inner_len],
    )?;

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
///
/// Only an error addressed to the tunnel's own local address is taken (the
/// one the quoted packet came from), as the kernel takes only ICMP
/// delivered to a local address: one sent to another host, quoting a
/// tunnel packet, changes nothing here.
fn path_mtu_from_icmp(
    icmp: &[u8],
    to: std::net::Ipv4Addr,
    table: &TunnelTable,
) -> Result<Delivery, DropReason> {
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
    if to != src {
        return Err(DropReason::IcmpNotLocal);
    }
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
    let sum = checksum::icmpv6(src, dst, &[&zeroed[..], &icmp[4..]].concat());
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
    // Addressed to the local address the quoted packet came from (see
    // `path_mtu_from_icmp`).
    if *dst != local {
        return Err(DropReason::IcmpNotLocal);
    }
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

/// ECN, RFC 6040 as the kernel does it (`INET_ECN_decapsulate`) on the
/// inner IP header at the start of `ip`, whose ECN field is `inner_ecn`:
/// congestion marked on the outer header (CE) is carried to an ECN-capable
/// inner packet, and a not-ECT inner packet under a CE outer is dropped;
/// an ECT(1) outer turns an ECT(0) inner into ECT(1) (`INET_ECN_set_ect1`,
/// for L4S). Otherwise the inner ECN field stands. An IPv4 header's
/// checksum is updated for the change alone (RFC 1624).
fn ecn_decapsulate(
    outer: u8,
    inner_ecn: u8,
    inner: Inner,
    ip: &mut [u8],
) -> Result<(), DropReason> {
    const ECT_1: u8 = 0x01;
    const ECT_0: u8 = 0x02;
    let new = match (outer, inner_ecn) {
        (ECN_CE, 0) => return Err(DropReason::EcnCeOnNotEct),
        (ECN_CE, e) if e != ECN_CE => ECN_CE,
        (ECT_1, ECT_0) => ECT_1,
        _ => return Ok(()),
    };
    match inner {
        Inner::V4 => {
            let mut p = ipv4::Packet::new_unchecked(ip);
            let tos = p.dscp_ecn();
            p.update_dscp_ecn((tos & !ECN_MASK) | new);
        }
        Inner::V6 => {
            let mut p = ipv6::Packet::new_unchecked(ip);
            let tc = p.traffic_class();
            p.set_traffic_class((tc & !ECN_MASK) | new);
        }
    }
    Ok(())
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
    use crate::datapath::tunnel::{Mode, TunnelRx};
    use etherparse::{NetSlice, SlicedPacket};
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

    /// An ICMP echo request from `src` to 10.1.1.1, `len` bytes in all (at
    /// least 28), DF set, built by etherparse.
    fn echo_v4(src: [u8; 4], len: usize) -> Vec<u8> {
        let b =
            etherparse::PacketBuilder::ipv4(src, [10, 1, 1, 1], 64).icmpv4_echo_request(0x1234, 1);
        let mut p = Vec::new();
        b.write(&mut p, &vec![0x5a; len - 28]).unwrap();
        assert_eq!(p.len(), len);
        p
    }

    /// An ICMP echo request 10.1.1.2 -> 10.1.1.1, DF set, built by
    /// etherparse.
    fn inner_v4() -> Vec<u8> {
        echo_v4([10, 1, 1, 2], 28)
    }

    /// A UDP datagram fd.. -> fe.. in IPv6, 48 bytes in all, built by
    /// etherparse.
    fn inner_v6() -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).udp(1, 2);
        let mut p = Vec::new();
        b.write(&mut p, &[]).unwrap();
        p
    }

    /// An IPv4 header built by etherparse from `src` to `dst` for
    /// `payload_len` bytes of `proto`, DF clear, with ECN `ecn`.
    fn ipv4_header(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        payload_len: usize,
        ecn: u8,
    ) -> Vec<u8> {
        let mut h = etherparse::Ipv4Header::new(
            payload_len as u16,
            64,
            etherparse::IpNumber(proto),
            src.octets(),
            dst.octets(),
        )
        .unwrap();
        h.identification = 7;
        h.dont_fragment = false;
        h.ecn = etherparse::IpEcn::try_new(ecn).unwrap();
        h.header_checksum = h.calc_header_checksum();
        h.to_bytes().to_vec()
    }

    /// Rewrites the IPv4 header at the start of `ip` with etherparse: parsed,
    /// changed by `edit`, its checksum computed again, written back.
    fn edit_ipv4(ip: &mut [u8], edit: impl FnOnce(&mut etherparse::Ipv4Header)) {
        let (mut h, _) = etherparse::Ipv4Header::from_slice(ip).unwrap();
        edit(&mut h);
        h.header_checksum = h.calc_header_checksum();
        let bytes = h.to_bytes();
        ip[..bytes.len()].copy_from_slice(&bytes);
    }

    /// The Internet checksum (ones complement of the ones' complement sum)
    /// of `bytes`, their checksum field zero, computed by etherparse, in
    /// network byte order. (etherparse sums the 16-bit words as they lie in
    /// memory, so its result goes back into memory the same way.)
    fn internet_checksum(bytes: &[u8]) -> [u8; 2] {
        etherparse::checksum::Sum16BitWords::new()
            .add_slice(bytes)
            .ones_complement()
            .to_ne_bytes()
    }

    /// The ECN field of the IPv4 header at the start of `ip`, read by
    /// etherparse.
    fn ecn_v4(ip: &[u8]) -> u8 {
        etherparse::Ipv4Header::from_slice(ip)
            .unwrap()
            .0
            .ecn
            .value()
    }

    /// An Ethernet frame from the remote's MAC to ours, IPv4 from `src` to
    /// `dst` (etherparse), carrying `payload` as protocol `proto`.
    fn outer_v4_between(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::Ethernet2Header {
            destination: [2, 0, 0, 0, 0, 8],
            source: [2, 0, 0, 0, 0, 58],
            ether_type: etherparse::EtherType::IPV4,
        }
        .write(&mut f)
        .unwrap();
        f.extend_from_slice(&ipv4_header(src, dst, proto, payload.len(), 0));
        f.extend_from_slice(payload);
        f
    }

    fn outer_v4(proto: u8, payload: &[u8]) -> Vec<u8> {
        outer_v4_between(REMOTE, LOCAL, proto, payload)
    }

    fn gre(flags_and_options: &[u8], protocol: u16, inner: &[u8]) -> Vec<u8> {
        let mut g = flags_and_options.to_vec();
        g.splice(2..2, protocol.to_be_bytes());
        g.extend_from_slice(inner);
        g
    }

    /// A GRE packet with a checksum (the C bit, RFC 2784): the ones
    /// complement of the ones' complement sum over the GRE header and
    /// payload with the checksum field zero, computed by etherparse.
    fn gre_with_checksum(protocol: u16, inner: &[u8]) -> Vec<u8> {
        let mut g = gre(&[0x80, 0, 0, 0, 0, 0], protocol, inner);
        let c = internet_checksum(&g);
        g[4..6].copy_from_slice(&c);
        g
    }

    #[test]
    fn gre_to_tap_gets_ethernet_header() {
        let inner = inner_v4();
        let mut f = outer_v4(47, &gre(&[0, 0], 0x0800, &inner));
        let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
        assert_eq!(d.tunnel, 0);
        let out = &f[d.offset..d.offset + d.len];
        let s = SlicedPacket::from_ethernet(out).unwrap();
        let eth = s.link.unwrap().to_header().unwrap().ethernet2().unwrap();
        assert_eq!(eth.destination, TAP_MAC);
        assert_eq!(eth.source, PEER_MAC);
        assert_eq!(eth.ether_type, etherparse::EtherType::IPV4);
        let Some(NetSlice::Ipv4(ip)) = s.net else {
            panic!("no IPv4 packet behind the Ethernet header")
        };
        assert_eq!(ip.header().source(), [10, 1, 1, 2]);
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
        assert_eq!(&f[d.offset..d.offset + d.len], &inner[..]);
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
        edit_ipv4(&mut f[14..], |h| h.source = [192, 168, 0, 99]);
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
        let g = gre_with_checksum(0x0800, &inner);
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
        // A first fragment (more to come), and a later one (an offset).
        let mut frag = outer_v4(4, &inner);
        edit_ipv4(&mut frag[14..], |h| h.more_fragments = true);
        assert_eq!(
            decap(&mut frag, &t, &mut RxState::new(8)),
            Err(DropReason::OuterFragment)
        );
        let mut later = outer_v4(4, &inner);
        edit_ipv4(&mut later[14..], |h| {
            h.fragment_offset = etherparse::IpFragOffset::try_new(185).unwrap()
        });
        assert_eq!(
            decap(&mut later, &t, &mut RxState::new(8)),
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
        // Each packet below is wrong in one way only: its header checksum
        // is computed again (by etherparse) after the change.
        let mut inner = inner_v4();
        inner[0] = 0x65; // IPv6 version in an IPIP packet
        inner[10..12].fill(0);
        let c = internet_checksum(&inner[..20]);
        inner[10..12].copy_from_slice(&c);
        let mut f = outer_v4(4, &inner);
        assert_eq!(
            decap(&mut f, &t, &mut RxState::new(8)),
            Err(DropReason::InnerMalformed)
        );
        let mut inner = inner_v4();
        edit_ipv4(&mut inner, |h| h.total_len = 200); // claims more than there is
        let mut f = outer_v4(4, &inner);
        assert_eq!(
            decap(&mut f, &t, &mut RxState::new(8)),
            Err(DropReason::InnerMalformed)
        );
        // Over the tunnel's MTU (1400): refused; at it, taken.
        for (len, want) in [
            (1500, Err(DropReason::InnerTooBig)),
            (1401, Err(DropReason::InnerTooBig)),
            (1400, Ok(1400)),
        ] {
            let mut f = outer_v4(4, &echo_v4([10, 1, 1, 2], len));
            assert_eq!(
                decap(&mut f, &t, &mut RxState::new(8)).map(|d| d.len),
                want,
                "{len} bytes"
            );
        }
    }

    #[test]
    fn only_the_peer_gets_in() {
        let mut t = tunnel("p", Mode::Ipip, None, DeviceKind::Tun);
        t.allowed_sources = vec![crate::datapath::tunnel::Prefix::parse("10.1.1.2").unwrap()];
        let table = TunnelTable::new(vec![t]);
        let mut f = outer_v4(4, &inner_v4());
        assert!(decap(&mut f, &table, &mut RxState::new(8)).is_ok());
        let spoofed = echo_v4([10, 1, 1, 9], 28);
        let mut f = outer_v4(4, &spoofed);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(8)),
            Err(DropReason::InnerSourceNotPeer)
        );
    }

    #[test]
    fn packet_too_big_is_taken_only_when_addressed_to_the_tunnels_local_address() {
        let local: Ipv6Addr = "2001:db8::8".parse().unwrap();
        let remote: Ipv6Addr = "2001:db8::58".parse().unwrap();
        let other: Ipv6Addr = "2001:db8::99".parse().unwrap();
        let mut t = tunnel("v6", Mode::Gre, None, DeviceKind::Tun);
        t.local = IpAddr::V6(local);
        t.remote = IpAddr::V6(remote);
        let table = TunnelTable::new(vec![t]);
        // ICMPv6 packet too big (etherparse, checksum over the pseudo
        // header) from a router to `to`, quoting our packet local ->
        // remote (GRE) and 8 bytes.
        let ptb = |to: Ipv6Addr| {
            let mut quoted = Vec::new();
            etherparse::Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: 8,
                next_header: etherparse::IpNumber::GRE,
                hop_limit: 64,
                source: local.octets(),
                destination: remote.octets(),
            }
            .write(&mut quoted)
            .unwrap();
            quoted.extend_from_slice(&[0u8; 8]);
            let router = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 58], [2, 0, 0, 0, 0, 8])
                .ipv6(router, to.octets(), 64)
                .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 });
            let mut f = Vec::new();
            b.write(&mut f, &quoted).unwrap();
            f
        };
        let mut f = ptb(local);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(1)).unwrap().kind,
            Kind::PathMtu { mtu: 1400 }
        );
        let mut f = ptb(other);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(1)),
            Err(DropReason::IcmpNotLocal)
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
        let inner = inner_v6();
        let g = gre(&[0, 0], 0x86dd, &inner);
        // Ethernet, then IPv6 remote -> local with next header `next`
        // (both etherparse), then the GRE packet.
        let outer = |next: etherparse::IpNumber| {
            let mut f = Vec::new();
            etherparse::Ethernet2Header {
                destination: [2, 0, 0, 0, 0, 8],
                source: [2, 0, 0, 0, 0, 58],
                ether_type: etherparse::EtherType::IPV6,
            }
            .write(&mut f)
            .unwrap();
            etherparse::Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: g.len() as u16,
                next_header: next,
                hop_limit: 64,
                source: remote.octets(),
                destination: local.octets(),
            }
            .write(&mut f)
            .unwrap();
            f.extend_from_slice(&g);
            f
        };
        let mut f = outer(etherparse::IpNumber::GRE);
        let d = decap(&mut f, &table, &mut RxState::new(8)).unwrap();
        let (eth, rest) =
            etherparse::Ethernet2Header::from_slice(&f[d.offset..d.offset + d.len]).unwrap();
        assert_eq!(eth.ether_type, etherparse::EtherType::IPV6);
        assert_eq!((eth.destination, eth.source), (TAP_MAC, PEER_MAC));
        assert_eq!(rest, &inner[..]);
        // A hop-by-hop header in front of GRE is refused by name.
        let mut f = outer(etherparse::IpNumber::IPV6_HEADER_HOP_BY_HOP);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(8)),
            Err(DropReason::OuterIpv6ExtHeader)
        );
    }

    /// `f` with the ECN fields of the outer IPv4 header (at 14) and of the
    /// inner one at `inner_at` set, both headers rebuilt by etherparse.
    fn with_ecn(mut f: Vec<u8>, outer: u8, inner: u8, inner_at: usize) -> Vec<u8> {
        for (at, ecn) in [(14, outer), (inner_at, inner)] {
            let (mut h, _) = etherparse::Ipv4Header::from_slice(&f[at..]).unwrap();
            h.ecn = etherparse::IpEcn::try_new(ecn).unwrap();
            h.header_checksum = h.calc_header_checksum();
            f[at..at + 20].copy_from_slice(&h.to_bytes());
        }
        f
    }

    /// Checks an IPv4 header's checksum with etherparse.
    fn etherparse_checksum_ok(ip: &[u8]) -> bool {
        let (h, _) = etherparse::Ipv4Header::from_slice(ip).unwrap();
        h.header_checksum == h.calc_header_checksum()
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
            let ip = &f[d.offset..d.offset + d.len];
            assert_eq!(ecn_v4(ip), 3);
            assert!(etherparse_checksum_ok(ip));
        }
        // Outer ECT(1) onto an ECT(0) inner packet: ECT(1) (the kernel's
        // INET_ECN_set_ect1).
        let mut f = with_ecn(base.clone(), 1, 2, at);
        let d = decap(&mut f, &t, &mut RxState::new(8)).unwrap();
        let ip = &f[d.offset..d.offset + d.len];
        assert_eq!(ecn_v4(ip), 1);
        assert!(etherparse_checksum_ok(ip));
        // A header that came in corrupt stays corrupt after the CE mark:
        // its checksum is updated, not computed again.
        let mut f = with_ecn(base.clone(), 3, 2, at);
        f[at + 8] ^= 0x10; // the TTL, behind the checksum's back
        let d = decap(&mut f, &t, &mut RxState::new(8)).unwrap();
        let ip = &f[d.offset..d.offset + d.len];
        assert_eq!(ecn_v4(ip), 3);
        assert!(
            !etherparse_checksum_ok(ip),
            "a corrupt header was made valid"
        );
        // Outer CE on a not-ECT inner packet: dropped.
        let mut f = with_ecn(base.clone(), 3, 0, at);
        assert_eq!(
            decap(&mut f, &t, &mut RxState::new(8)),
            Err(DropReason::EcnCeOnNotEct)
        );
        // Anything else leaves the inner field alone (the kernel carries no
        // ECT onto not-ECT, and nothing onto CE).
        for (outer, inner_ecn) in [(0, 0), (1, 0), (2, 0), (0, 2), (2, 1), (0, 3), (1, 3)] {
            let mut f = with_ecn(base.clone(), outer, inner_ecn, at);
            let d = decap(&mut f, &t, &mut RxState::new(8)).unwrap();
            assert_eq!(
                ecn_v4(&f[d.offset..d.offset + d.len]),
                inner_ecn,
                "outer {outer} inner {inner_ecn}"
            );
        }
    }

    #[test]
    fn gretap_applies_rfc_6040_to_the_ip_inside() {
        let table = TunnelTable::new(vec![tunnel("l2", Mode::Gretap, None, DeviceKind::Tap)]);
        // An Ethernet frame (etherparse) with `ethertype` around `body`, in
        // GRE (protocol 0x6558) in IPv4 with outer ECN `outer`.
        let framed = |outer: u8, ethertype: etherparse::EtherType, body: &[u8]| {
            let mut inner = Vec::new();
            etherparse::Ethernet2Header {
                destination: TAP_MAC,
                source: [2, 0, 0, 0, 9, 2],
                ether_type: ethertype,
            }
            .write(&mut inner)
            .unwrap();
            inner.extend_from_slice(body);
            let g = gre(&[0, 0], 0x6558, &inner);
            let mut f = outer_v4(47, &g);
            let (mut h, _) = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap();
            h.ecn = etherparse::IpEcn::try_new(outer).unwrap();
            h.header_checksum = h.calc_header_checksum();
            f[14..34].copy_from_slice(&h.to_bytes());
            f
        };
        let ip_with = |ecn: u8| {
            let mut p = inner_v4();
            let (mut h, _) = etherparse::Ipv4Header::from_slice(&p).unwrap();
            h.ecn = etherparse::IpEcn::try_new(ecn).unwrap();
            h.header_checksum = h.calc_header_checksum();
            p[..20].copy_from_slice(&h.to_bytes());
            p
        };
        // Outer CE onto ECT(0): CE, the checksum right.
        let mut f = framed(3, etherparse::EtherType::IPV4, &ip_with(2));
        let d = decap(&mut f, &table, &mut RxState::new(1)).unwrap();
        let ip = &f[d.offset + 14..d.offset + d.len];
        assert_eq!(ecn_v4(ip), 3);
        assert!(etherparse_checksum_ok(ip));
        // Outer CE onto not-ECT: dropped, as the kernel does.
        let mut f = framed(3, etherparse::EtherType::IPV4, &ip_with(0));
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(1)),
            Err(DropReason::EcnCeOnNotEct)
        );
        // IPv6 inside: CE onto ECT(1).
        let mut v6 = inner_v6();
        let (mut h, _) = etherparse::Ipv6Header::from_slice(&v6).unwrap();
        h.traffic_class = 1;
        v6[..40].copy_from_slice(&h.to_bytes());
        let mut f = framed(3, etherparse::EtherType::IPV6, &v6);
        let d = decap(&mut f, &table, &mut RxState::new(1)).unwrap();
        let (h, _) = etherparse::Ipv6Header::from_slice(&f[d.offset + 14..]).unwrap();
        assert_eq!(h.traffic_class & 3, 3);
        // Not IP (ARP): delivered as it came, whatever the outer ECN.
        let arp = [0x5au8; 28];
        let mut f = framed(3, etherparse::EtherType::ARP, &arp);
        let d = decap(&mut f, &table, &mut RxState::new(1)).unwrap();
        assert_eq!(&f[d.offset + 14..d.offset + d.len], &arp[..]);
        // An IPv4 header cut short inside: dropped.
        let mut f = framed(3, etherparse::EtherType::IPV4, &ip_with(2)[..12]);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(1)),
            Err(DropReason::InnerMalformed)
        );
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
        // protocol 0 and nothing after it; the inner IPv4 header with TTL
        // `ttl` (etherparse).
        let keepalive = |ttl: u8| {
            let g = gre(&[0, 0], 0, &[]);
            let mut p = ipv4_header(LOCAL, REMOTE, 47, g.len(), 0);
            p.extend_from_slice(&g);
            edit_ipv4(&mut p, |h| h.time_to_live = ttl);
            p
        };
        let inner = keepalive(255);
        let mut f = outer_v4(47, &gre(&[0, 0], 0x0800, &inner));
        let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
        assert_eq!(d.kind, Kind::Keepalive);
        assert_eq!(d.tunnel, 0);
        assert_eq!(d.len, inner.len());
        let out = &f[d.offset..d.offset + d.len];
        let (h, rest) = etherparse::Ipv4Header::from_slice(out).unwrap();
        assert_eq!(h.time_to_live, 254, "forwarded: one hop less");
        assert!(etherparse_checksum_ok(out));
        assert_eq!((h.source, h.destination), (LOCAL.octets(), REMOTE.octets()));
        assert_eq!(rest, &inner[20..]);
        // Not over IPIP (there it is a packet for the device), and not when
        // the TTL is spent or the header's checksum is wrong.
        let mut f = outer_v4(4, &inner);
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)).map(|d| (d.tunnel, d.kind)),
            Ok((1, Kind::Device))
        );
        let mut f = outer_v4(47, &gre(&[0, 0], 0x0800, &keepalive(1)));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::KeepaliveTtlExpired)
        );
        let mut bad = keepalive(255);
        bad[10] ^= 1;
        let mut f = outer_v4(47, &gre(&[0, 0], 0x0800, &bad));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::InnerMalformed)
        );
    }

    #[test]
    fn gretap_delivers_the_ethernet_frame_as_it_came() {
        let mut t = tunnel("l2", Mode::Gretap, Some(9), DeviceKind::Tap);
        t.mtu = 1400;
        let table = TunnelTable::new(vec![t, tunnel("l3", Mode::Gre, None, DeviceKind::Tun)]);
        // An ARP request, broadcast (etherparse): bridged, not answered.
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x42], [0xff; 6])
            .arp(
                etherparse::ArpEthIpv4Packet {
                    operation: etherparse::ArpOperation::REQUEST,
                    sender_mac: [2, 0, 0, 0, 0, 0x42],
                    sender_ipv4: [10, 1, 1, 2],
                    target_mac: [0; 6],
                    target_ipv4: [10, 1, 1, 1],
                }
                .into(),
            )
            .write(&mut frame)
            .unwrap();
        assert_eq!(frame.len(), 14 + 28);
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
        // Shorter than an Ethernet header; longer than the MTU allows (one
        // VLAN tag, 4 bytes, beyond it is fine).
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
        big.truncate(14 + 1404);
        let mut f = keyed(0x6558, &big);
        assert_eq!(
            decap(&mut f, &table, &mut RxState::new(2)).map(|d| d.len),
            Ok(14 + 1404)
        );
    }

    #[test]
    fn sit_carries_ipv6_in_ipv4() {
        let table = TunnelTable::new(vec![tunnel("6in4", Mode::Sit, None, DeviceKind::Tun)]);
        let inner = inner_v6();
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
        // What a router sends back (built by etherparse): ICMP 3/4 with the
        // MTU, quoting our outer header (`from` -> `to`, GRE) and 8 bytes.
        let icmp = |mtu: u16, from: Ipv4Addr, to: Ipv4Addr| {
            let mut quoted = ipv4_header(from, to, 47, 8, 0);
            quoted.extend_from_slice(&[0u8; 8]);
            let h = etherparse::Icmpv4Header::with_checksum(
                etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: mtu,
                    },
                ),
                &quoted,
            );
            let mut m = h.to_bytes().to_vec();
            m.extend_from_slice(&quoted);
            m
        };
        let mut f = outer_v4(1, &icmp(1300, LOCAL, REMOTE));
        let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
        assert_eq!(d.kind, Kind::PathMtu { mtu: 1300 });
        // Below the kernel's min_pmtu: taken as 552.
        let mut f = outer_v4(1, &icmp(300, LOCAL, REMOTE));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)).unwrap().kind,
            Kind::PathMtu { mtu: 552 }
        );
        // About somebody else's packet; addressed to another host (which
        // anyone could send, to lower our path MTU); about a packet from
        // us to a host we have no tunnel with.
        let other = Ipv4Addr::new(192, 168, 0, 99);
        let mut f = outer_v4(1, &icmp(1300, other, REMOTE));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::IcmpNotLocal)
        );
        let mut f = outer_v4_between(REMOTE, other, 1, &icmp(1300, LOCAL, REMOTE));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::IcmpNotLocal)
        );
        let unknown = Ipv4Addr::new(192, 168, 0, 77);
        let mut f = outer_v4(1, &icmp(1300, LOCAL, unknown));
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::UnknownEndpoint)
        );
        // A fragment of one (MF set): never reassembled here, anyone can
        // send those from any source.
        let mut f = outer_v4(1, &icmp(1300, LOCAL, REMOTE));
        edit_ipv4(&mut f[14..], |h| h.more_fragments = true);
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::NotTunnelProtocol)
        );
        // With a wrong checksum.
        let mut bad = icmp(1300, LOCAL, REMOTE);
        bad[2] ^= 1;
        let mut f = outer_v4(1, &bad);
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)),
            Err(DropReason::IcmpMalformed)
        );
    }
}
