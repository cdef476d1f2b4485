//! Encapsulation, sans-IO: what to do with one packet read from a tunnel's
//! device. The packet was read into a buffer at the offset that leaves room
//! for the tunnel's outer headers, which are then written in front of it in
//! place: not one copy of the packet bytes. Taps also bring ARP requests and
//! IPv6 neighbour solicitations, which are answered in place, and packets
//! too big for the tunnel, which get ICMP back into the device.

use std::net::{IpAddr, Ipv4Addr};

use crate::config::Ttl;
use crate::drop_reason::DropReason;
use crate::tunnel::{DeviceKind, Mode};
use crate::wire::{checksum, ethernet, gre, ipv4, ipv6, IpProtocol};

/// What the send path needs to know of one tunnel.
#[derive(Debug, Clone)]
pub struct TunnelTx {
    pub mode: Mode,
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub okey: Option<u32>,
    pub ocsum: bool,
    pub ttl: Ttl,
    pub mtu: u16,
    pub device_kind: DeviceKind,
    /// The tap's own MAC (ARP replies and ICMP are addressed to it).
    pub device_mac: ethernet::Address,
    /// The MAC the gateway answers ARP/ND with: stands for the far side.
    pub peer_mac: ethernet::Address,
    /// This end's inner address: never answered for in ARP/ND.
    pub address: Option<IpAddr>,
    /// The far end's inner address: source of ICMP errors we generate.
    pub peer: Option<IpAddr>,
}

impl TunnelTx {
    fn gre_repr(&self, protocol: ethernet::EtherType) -> gre::Repr {
        gre::Repr {
            protocol,
            checksum: self.ocsum,
            key: self.okey,
            sequence: None,
        }
    }

    /// Bytes of outer headers: Ethernet, IPv4 and GRE with its options.
    pub fn outer_len(&self) -> usize {
        ethernet::HEADER_LEN
            + ipv4::HEADER_LEN
            + match self.mode {
                Mode::Ipip => 0,
                Mode::Gre => self.gre_repr(ethernet::EtherType::Ipv4).header_len(),
            }
    }

    /// Where a read from the device must land in the frame so that the
    /// inner IP packet starts right after the outer headers (a tap's
    /// Ethernet header sits in front of it and is overwritten).
    pub fn read_offset(&self) -> usize {
        match self.device_kind {
            DeviceKind::Tap => self.outer_len() - ethernet::HEADER_LEN,
            DeviceKind::Tun => self.outer_len(),
        }
    }
}

/// The outer Ethernet addresses: the next hop's MAC and ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub dst: ethernet::Address,
    pub src: ethernet::Address,
}

/// What to do with a packet read from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send `buf[0..len]` (outer headers included) on the underlay.
    Transmit {
        len: usize,
    },
    /// Write `buf[offset..offset + len]` back into the device (an ARP
    /// reply, a neighbour advertisement or an ICMP error).
    Reply {
        offset: usize,
        len: usize,
        reason: Option<DropReason>,
    },
    Drop(DropReason),
}

const ETH_P_ARP_LEN: usize = 28;

/// Processes `n` bytes read at `t.read_offset()` in `buf` (which extends to
/// the end of the frame). `ident` is the outer IPv4 identification to use.
pub fn encap(
    buf: &mut [u8],
    n: usize,
    t: &TunnelTx,
    next_hop: Option<NextHop>,
    ident: u16,
) -> Verdict {
    let off = t.read_offset();
    if off + n > buf.len() {
        return Verdict::Drop(DropReason::TxMalformed);
    }
    let inner_start = t.outer_len();
    let family = match t.device_kind {
        DeviceKind::Tun => match buf.get(off).map(|b| b >> 4) {
            Some(4) => ethernet::EtherType::Ipv4,
            Some(6) => ethernet::EtherType::Ipv6,
            _ => return Verdict::Drop(DropReason::TxMalformed),
        },
        DeviceKind::Tap => {
            let Ok(eth) = ethernet::Frame::new_checked(&buf[off..off + n]) else {
                return Verdict::Drop(DropReason::TxMalformed);
            };
            match eth.ethertype() {
                ethernet::EtherType::Arp => return arp_reply(buf, off, n, t),
                ethernet::EtherType::Ipv4 if is_multicast(&eth.dst_addr()) => {
                    return Verdict::Drop(DropReason::TxChatter)
                }
                ethernet::EtherType::Ipv4 => ethernet::EtherType::Ipv4,
                ethernet::EtherType::Ipv6 => {
                    if let Some(v) = neighbour_advert(buf, off, n, t) {
                        return v;
                    }
                    ethernet::EtherType::Ipv6
                }
                _ => return Verdict::Drop(DropReason::TxNotIp),
            }
        }
    };
    let inner_n = n - (inner_start - off);

    // The inner packet: check it, decide TTL, ECN and DF from it.
    let (inner_len, inner_ttl, inner_ecn, inner_df) = match family {
        ethernet::EtherType::Ipv4 => {
            let Ok(ip) = ipv4::Packet::new_checked(&buf[inner_start..inner_start + inner_n]) else {
                return Verdict::Drop(DropReason::TxMalformed);
            };
            let dst = ip.dst_addr();
            if dst.is_multicast() || dst.is_broadcast() {
                return Verdict::Drop(DropReason::TxChatter);
            }
            (
                usize::from(ip.total_len()),
                ip.ttl(),
                ip.dscp_ecn() & 0x03,
                ip.dont_frag(),
            )
        }
        _ => {
            let Ok(ip) = ipv6::Packet::new_checked(&buf[inner_start..inner_start + inner_n]) else {
                return Verdict::Drop(DropReason::TxMalformed);
            };
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            // Link-local and multicast never cross a router: router
            // solicitations, MLD reports and neighbour discovery stay home.
            if dst.is_multicast() || (src.segments()[0] & 0xffc0) == 0xfe80 || src.is_unspecified()
            {
                return Verdict::Drop(DropReason::TxChatter);
            }
            if t.mode == Mode::Ipip {
                return Verdict::Drop(DropReason::TxFamilyNotCarried);
            }
            (
                ip.total_len(),
                ip.hop_limit(),
                (ip.traffic_class() & 0x03),
                true,
            )
        }
    };

    if inner_len > usize::from(t.mtu) {
        if inner_df {
            return too_big(buf, off, inner_start, inner_len, family, t);
        }
        return Verdict::Drop(DropReason::TxTooBig);
    }
    let Some(hop) = next_hop else {
        return Verdict::Drop(DropReason::TxNoNeighbour);
    };

    // Outer headers, back to front.
    let mut at = inner_start;
    if t.mode == Mode::Gre {
        let repr = t.gre_repr(family);
        at -= repr.header_len();
        repr.emit(&mut buf[at..]);
        if t.ocsum {
            gre::Packet::new_unchecked(&mut buf[at..inner_start + inner_len]).fill_checksum();
        }
    }
    let payload_len = inner_start + inner_len - at;
    at -= ipv4::HEADER_LEN;
    // RFC 6040 normal mode: copy ECN, but never CE onto the outer header.
    let ecn = if inner_ecn == 0x03 { 0x02 } else { inner_ecn };
    let repr = ipv4::Repr {
        src: t.local,
        dst: t.remote,
        protocol: match t.mode {
            Mode::Gre => IpProtocol::Gre,
            Mode::Ipip => IpProtocol::Ipip,
        },
        payload_len,
        ttl: match t.ttl {
            Ttl::Fixed(v) => v,
            Ttl::Inherit => inner_ttl,
        },
        dscp_ecn: ecn,
        // The kernel's default (pmtudisc): outer DF set.
        dont_frag: true,
        ident,
    };
    repr.emit(&mut ipv4::Packet::new_unchecked(&mut buf[at..]));
    at -= ethernet::HEADER_LEN;
    debug_assert_eq!(at, 0);
    ethernet::Repr {
        dst: hop.dst,
        src: hop.src,
        ethertype: ethernet::EtherType::Ipv4,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut buf[at..]));
    Verdict::Transmit {
        len: inner_start + inner_len,
    }
}

fn is_multicast(mac: &ethernet::Address) -> bool {
    mac[0] & 1 == 1
}

/// Answers an ARP request for any address but this end's own with the
/// peer MAC, so the kernel routes into the tap with no manual entries.
fn arp_reply(buf: &mut [u8], off: usize, n: usize, t: &TunnelTx) -> Verdict {
    let a = off + ethernet::HEADER_LEN;
    if n < ethernet::HEADER_LEN + ETH_P_ARP_LEN {
        return Verdict::Drop(DropReason::TxMalformed);
    }
    let arp = &buf[a..a + ETH_P_ARP_LEN];
    let is_request = arp[0..2] == [0, 1]
        && arp[2..4] == [8, 0]
        && arp[4] == 6
        && arp[5] == 4
        && arp[6..8] == [0, 1];
    if !is_request {
        return Verdict::Drop(DropReason::TxChatter);
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&arp[8..14]);
    let mut spa = [0u8; 4];
    spa.copy_from_slice(&arp[14..18]);
    let mut tpa = [0u8; 4];
    tpa.copy_from_slice(&arp[24..28]);
    if spa == tpa || t.address == Some(IpAddr::V4(Ipv4Addr::from(tpa))) {
        // Gratuitous ARP or a question about this end's own address.
        return Verdict::Drop(DropReason::TxChatter);
    }
    let arp = &mut buf[a..a + ETH_P_ARP_LEN];
    arp[6..8].copy_from_slice(&[0, 2]);
    arp[8..14].copy_from_slice(&t.peer_mac);
    arp[14..18].copy_from_slice(&tpa);
    arp[18..24].copy_from_slice(&sha);
    arp[24..28].copy_from_slice(&spa);
    ethernet::Repr {
        dst: sha,
        src: t.peer_mac,
        ethertype: ethernet::EtherType::Arp,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut buf[off..]));
    Verdict::Reply {
        offset: off,
        len: ethernet::HEADER_LEN + ETH_P_ARP_LEN,
        reason: None,
    }
}

/// If the IPv6 packet in the tap frame is a neighbour solicitation for an
/// address on the far side, turns it into the advertisement in place.
fn neighbour_advert(buf: &mut [u8], off: usize, n: usize, t: &TunnelTx) -> Option<Verdict> {
    let ip_at = off + ethernet::HEADER_LEN;
    let ip = ipv6::Packet::new_checked(&buf[ip_at..off + n]).ok()?;
    let body = ip.payload();
    if ip.next_header() != IpProtocol::Icmpv6 || body.len() < 24 || body[0] != 135 {
        return None;
    }
    if ip.hop_limit() != 255 || ip.src_addr().is_unspecified() {
        // Not a valid solicitation, or duplicate address detection.
        return Some(Verdict::Drop(DropReason::TxChatter));
    }
    let mut target = [0u8; 16];
    target.copy_from_slice(&body[8..24]);
    let target = std::net::Ipv6Addr::from(target);
    if t.address == Some(IpAddr::V6(target)) {
        return Some(Verdict::Drop(DropReason::TxChatter));
    }
    let asker = ip.src_addr();
    let eth = ethernet::Frame::new_unchecked(&buf[off..]);
    let asker_mac = eth.src_addr();
    // The advertisement: 24 bytes of NA plus a target link-layer option.
    const NA_LEN: usize = 32;
    if buf.len() < ip_at + ipv6::HEADER_LEN + NA_LEN {
        return Some(Verdict::Drop(DropReason::TxMalformed));
    }
    {
        let mut ip = ipv6::Packet::new_unchecked(&mut buf[ip_at..]);
        ip.set_version_and_traffic_class(0);
        ip.set_payload_len(NA_LEN as u16);
        ip.set_next_header(IpProtocol::Icmpv6);
        ip.set_hop_limit(255);
        ip.set_src_addr(target);
        ip.set_dst_addr(asker);
    }
    let icmp = ip_at + ipv6::HEADER_LEN;
    let na = &mut buf[icmp..icmp + NA_LEN];
    na[0] = 136;
    na[1] = 0;
    na[2..4].copy_from_slice(&[0, 0]);
    na[4..8].copy_from_slice(&[0x60, 0, 0, 0]); // solicited, override
    na[8..24].copy_from_slice(&target.octets());
    na[24] = 2; // target link-layer address
    na[25] = 1;
    na[26..32].copy_from_slice(&t.peer_mac);
    let c = icmpv6_checksum(&target.octets(), &asker.octets(), &buf[icmp..icmp + NA_LEN]);
    buf[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    ethernet::Repr {
        dst: asker_mac,
        src: t.peer_mac,
        ethertype: ethernet::EtherType::Ipv6,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut buf[off..]));
    Some(Verdict::Reply {
        offset: off,
        len: ethernet::HEADER_LEN + ipv6::HEADER_LEN + NA_LEN,
        reason: None,
    })
}

fn icmpv6_checksum(src: &[u8; 16], dst: &[u8; 16], body: &[u8]) -> u16 {
    let mut acc = u64::from(checksum::sum(src)) + u64::from(checksum::sum(dst));
    acc += body.len() as u64 + u64::from(u8::from(IpProtocol::Icmpv6));
    acc += u64::from(checksum::sum(body));
    !checksum::fold(acc)
}

/// Builds ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6)
/// carrying the tunnel MTU, in place, for writing back into the device.
fn too_big(
    buf: &mut [u8],
    off: usize,
    inner_start: usize,
    inner_len: usize,
    family: ethernet::EtherType,
    t: &TunnelTx,
) -> Verdict {
    let (ip_hdr, icmp_hdr, max_total) = match family {
        ethernet::EtherType::Ipv4 => (ipv4::HEADER_LEN, 8, 576),
        _ => (ipv6::HEADER_LEN, 8, 1280),
    };
    let l2 = match t.device_kind {
        DeviceKind::Tap => ethernet::HEADER_LEN,
        DeviceKind::Tun => 0,
    };
    let start = off;
    let ip_at = start + l2;
    let quoted_at = ip_at + ip_hdr + icmp_hdr;
    let quoted = inner_len.min(max_total - ip_hdr - icmp_hdr);
    // Read the original addresses before they are overwritten.
    let (orig_src, orig_dst) = match family {
        ethernet::EtherType::Ipv4 => {
            let p = ipv4::Packet::new_unchecked(&buf[inner_start..]);
            (IpAddr::V4(p.src_addr()), IpAddr::V4(p.dst_addr()))
        }
        _ => {
            let p = ipv6::Packet::new_unchecked(&buf[inner_start..]);
            (IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr()))
        }
    };
    if quoted_at + quoted > buf.len() {
        return Verdict::Drop(DropReason::TxTooBig);
    }
    buf.copy_within(inner_start..inner_start + quoted, quoted_at);
    let from = match (t.peer, orig_dst) {
        (Some(p), d) if p.is_ipv4() == d.is_ipv4() => p,
        (_, d) => d,
    };
    let icmp_len = icmp_hdr + quoted;
    match (family, from, orig_src) {
        (ethernet::EtherType::Ipv4, IpAddr::V4(from), IpAddr::V4(to)) => {
            let icmp = &mut buf[ip_at + ip_hdr..quoted_at];
            icmp[0] = 3; // destination unreachable
            icmp[1] = 4; // fragmentation needed and DF set
            icmp[2..4].copy_from_slice(&[0, 0]);
            icmp[4..6].copy_from_slice(&[0, 0]);
            icmp[6..8].copy_from_slice(&t.mtu.to_be_bytes());
            let c = checksum::checksum(&buf[ip_at + ip_hdr..quoted_at + quoted]);
            buf[ip_at + ip_hdr + 2..ip_at + ip_hdr + 4].copy_from_slice(&c.to_be_bytes());
            ipv4::Repr {
                src: from,
                dst: to,
                protocol: IpProtocol::Icmp,
                payload_len: icmp_len,
                ttl: 64,
                dscp_ecn: 0,
                dont_frag: false,
                ident: 0,
            }
            .emit(&mut ipv4::Packet::new_unchecked(&mut buf[ip_at..]));
        }
        (_, IpAddr::V6(from), IpAddr::V6(to)) => {
            let icmp = &mut buf[ip_at + ip_hdr..quoted_at];
            icmp[0] = 2; // packet too big
            icmp[1] = 0;
            icmp[2..4].copy_from_slice(&[0, 0]);
            icmp[4..8].copy_from_slice(&u32::from(t.mtu.max(1280)).to_be_bytes());
            let c = icmpv6_checksum(
                &from.octets(),
                &to.octets(),
                &buf[ip_at + ip_hdr..quoted_at + quoted],
            );
            buf[ip_at + ip_hdr + 2..ip_at + ip_hdr + 4].copy_from_slice(&c.to_be_bytes());
            let mut ip = ipv6::Packet::new_unchecked(&mut buf[ip_at..]);
            ip.set_version_and_traffic_class(0);
            ip.set_payload_len(icmp_len as u16);
            ip.set_next_header(IpProtocol::Icmpv6);
            ip.set_hop_limit(64);
            ip.set_src_addr(from);
            ip.set_dst_addr(to);
        }
        _ => return Verdict::Drop(DropReason::TxTooBig),
    }
    if l2 > 0 {
        ethernet::Repr {
            dst: t.device_mac,
            src: t.peer_mac,
            ethertype: family,
        }
        .emit(&mut ethernet::Frame::new_unchecked(&mut buf[start..]));
    }
    Verdict::Reply {
        offset: start,
        len: l2 + ip_hdr + icmp_len,
        reason: Some(DropReason::TxTooBigIcmpSent),
    }
}
