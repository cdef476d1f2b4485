//! The answers written back into a device instead of sending a packet:
//! ARP replies and IPv6 neighbour advertisements for the far side, and
//! ICMP "fragmentation needed" / ICMPv6 "packet too big" for packets too
//! big for the tunnel, with the rules for when such an error may be sent.

use std::net::{IpAddr, Ipv4Addr};

use super::{TunnelTx, Verdict};
use crate::datapath::drop_reason::DropReason;
use crate::datapath::tunnel::DeviceKind;
use crate::wire::{checksum, ethernet, ipv4, ipv6, IpProtocol};

const ETH_P_ARP_LEN: usize = 28;

/// Whether an ICMP error may be sent about this IPv4 packet, as the
/// kernel's `__icmp_send` decides: not about a fragment after the first,
/// nor about an ICMP error (destination unreachable, source quench,
/// redirect, time exceeded, parameter problem), a type it does not know
/// (over 18) or an ICMP header cut short.
pub(super) fn answerable_v4<T: AsRef<[u8]>>(ip: &ipv4::Packet<T>) -> bool {
    if ip.frag_offset() != 0 {
        return false;
    }
    if ip.protocol() != IpProtocol::Icmp {
        return true;
    }
    match ip.payload().first() {
        Some(&kind) => kind <= 18 && !matches!(kind, 3 | 4 | 5 | 11 | 12),
        None => false,
    }
}

/// The IPv6 counterpart, as the kernel's `is_ineligible`: not about an
/// ICMPv6 error (types under 128, RFC 4443 2.4 (e.2)), found behind any
/// extension headers, nor about one whose type is cut off. A fragment
/// after the first carries no ICMPv6 header to look at, and is answered
/// (`ipv6_skip_exthdr` stops there).
pub(super) fn answerable_v6<T: AsRef<[u8]>>(ip: &ipv6::Packet<T>) -> bool {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const AH: u8 = 51;
    const DSTOPTS: u8 = 60;
    let rest = ip.payload();
    let mut next = u8::from(ip.next_header());
    let mut at = 0usize;
    // Bounded: at most 8 extension headers are stepped over.
    for _ in 0..8 {
        let len = match next {
            HOP_BY_HOP | ROUTING | DSTOPTS => match rest.get(at + 1) {
                Some(&l) => (usize::from(l) + 1) * 8,
                None => return true,
            },
            AH => match rest.get(at + 1) {
                Some(&l) => (usize::from(l) + 2) * 4,
                None => return true,
            },
            FRAGMENT => {
                let Some(h) = rest.get(at..at + 8) else {
                    return true;
                };
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return true;
                }
                8
            }
            _ => break,
        };
        let Some(&n) = rest.get(at) else { return true };
        next = n;
        at += len;
    }
    if next != u8::from(IpProtocol::Icmpv6) {
        return true;
    }
    match rest.get(at) {
        Some(&kind) => kind >= 128,
        None => false,
    }
}

/// Answers an ARP request for any address but this end's own with the
/// peer MAC, so the kernel routes into the tap with no manual entries.
pub(super) fn arp_reply(buf: &mut [u8], off: usize, n: usize, t: &TunnelTx) -> Verdict {
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
pub(super) fn neighbour_advert(
    buf: &mut [u8],
    off: usize,
    n: usize,
    t: &TunnelTx,
) -> Option<Verdict> {
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
    ipv6::Repr {
        src: target,
        dst: asker,
        next_header: IpProtocol::Icmpv6,
        payload_len: NA_LEN,
        hop_limit: 255,
    }
    .emit(&mut ipv6::Packet::new_unchecked(&mut buf[ip_at..]));
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
    let c = checksum::icmpv6(&target.octets(), &asker.octets(), &buf[icmp..icmp + NA_LEN]);
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

/// Builds ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6)
/// carrying the tunnel MTU, in place, for writing back into the device.
pub(super) fn too_big(
    buf: &mut [u8],
    off: usize,
    inner_start: usize,
    inner_len: usize,
    family: ethernet::EtherType,
    t: &TunnelTx,

    mtu: u16,
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
            icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
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
            icmp[4..8].copy_from_slice(&u32::from(mtu.max(1280)).to_be_bytes());
            let c = checksum::icmpv6(
                &from.octets(),
                &to.octets(),
                &buf[ip_at + ip_hdr..quoted_at + quoted],
            );
            buf[ip_at + ip_hdr + 2..ip_at + ip_hdr + 4].copy_from_slice(&c.to_be_bytes());
            ipv6::Repr {
                src: from,
                dst: to,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp_len,
                hop_limit: 64,
            }
            .emit(&mut ipv6::Packet::new_unchecked(&mut buf[ip_at..]));
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
