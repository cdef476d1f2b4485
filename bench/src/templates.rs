//! The packets the generator sends, built with etherparse (not with the
//! gateway's own code).

use etherparse::{Ethernet2Header, IpNumber, Ipv4Header, PacketBuilder};

use crate::gen::{Template, MAGIC};

/// The addresses of a run: the generator's and the gateway's, outside and
/// inside the tunnel.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub gen: [u8; 4],
    pub gw: [u8; 4],
    pub inner_gen: [u8; 4],
    pub inner_gw: [u8; 4],
}

impl Addrs {
    /// The lab's: 192.168.0.58 (generator) and 192.168.0.8 (gateway),
    /// 10.1.1.2 and 10.1.1.1 inside.
    pub const LAB: Addrs = Addrs {
        gen: [192, 168, 0, 58],
        gw: [192, 168, 0, 8],
        inner_gen: [10, 1, 1, 2],
        inner_gw: [10, 1, 1, 1],
    };
}

/// The stamp plus padding up to `payload` bytes (at least the stamp).
fn payload(payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; payload.max(24)];
    p[..8].copy_from_slice(MAGIC);
    p
}

fn outer(a: &Addrs, dst_mac: [u8; 6], src_mac: [u8; 6], proto: u8, body: &[u8]) -> Vec<u8> {
    let mut ip =
        Ipv4Header::new(body.len() as u16, 64, IpNumber(proto), a.gen, a.gw).expect("header");
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let eth = Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: etherparse::EtherType::IPV4,
    };
    let mut out = Vec::new();
    eth.write(&mut out).expect("eth");
    ip.write(&mut out).expect("ip");
    out.extend_from_slice(body);
    out
}

/// Tunnel encapsulation of an inner packet: GRE (47) or IPIP (4).
fn tunnel(
    a: &Addrs,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    gre: bool,
    inner: &[u8],
) -> (Vec<u8>, usize) {
    let mut body = Vec::new();
    if gre {
        body.extend_from_slice(&[0, 0, 0x08, 0x00]);
    }
    body.extend_from_slice(inner);
    let inner_at = 14 + 20 + if gre { 4 } else { 0 };
    (
        outer(a, dst_mac, src_mac, if gre { 47 } else { 4 }, &body),
        inner_at,
    )
}

/// An ICMP echo request to the gateway host's inner address, through the
/// tunnel: the kernel behind the tap answers it, so it measures the round
/// trip with no userspace echo server in the way.
pub fn tunnel_echo(
    a: &Addrs,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    gre: bool,
    size: usize,
) -> Template {
    let b = PacketBuilder::ipv4(a.inner_gen, a.inner_gw, 64).icmpv4_echo_request(0x4000, 1);
    let mut inner = Vec::new();
    b.write(&mut inner, &payload(size)).expect("inner");
    let (bytes, inner_at) = tunnel(a, dst_mac, src_mac, gre, &inner);
    let icmp = inner_at + 20;
    Template {
        bytes,
        stamp_at: icmp + 8,
        icmp_at: Some(icmp),
        flow_at: icmp + 4,
        ipv4_at: None,
    }
}

/// A UDP datagram to a closed port of the gateway host's inner address,
/// through the tunnel: decapsulation only (the kernel drops it after IP
/// input; its port-unreachable answers are rate-limited to a trickle).
pub fn tunnel_udp(
    a: &Addrs,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    gre: bool,
    size: usize,
) -> Template {
    let b = PacketBuilder::ipv4(a.inner_gen, a.inner_gw, 64).udp(1024, 9);
    let mut inner = Vec::new();
    b.write(&mut inner, &payload(size)).expect("inner");
    // No UDP checksum (allowed for IPv4): the stamp changes per packet.
    inner[26..28].copy_from_slice(&[0, 0]);
    let (bytes, inner_at) = tunnel(a, dst_mac, src_mac, gre, &inner);
    let udp = inner_at + 20;
    Template {
        bytes,
        stamp_at: udp + 8,
        icmp_at: None,
        flow_at: udp,
        ipv4_at: None,
    }
}

/// An ICMP echo request straight to the gateway host's underlay address:
/// the bare wire's round trip.
pub fn bare_echo(a: &Addrs, dst_mac: [u8; 6], src_mac: [u8; 6], size: usize) -> Template {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(a.gen, a.gw, 64)
        .icmpv4_echo_request(0x4000, 1);
    let mut bytes = Vec::new();
    b.write(&mut bytes, &payload(size)).expect("bare");
    let icmp = 14 + 20;
    Template {
        bytes,
        stamp_at: icmp + 8,
        icmp_at: Some(icmp),
        flow_at: icmp + 4,
        ipv4_at: None,
    }
}

/// The inner frame a tap receives for [`tunnel_udp`] (for the device
/// ceiling): Ethernet to the tap's MAC, then the same inner packet.
pub fn tap_frame(tap_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], size: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([0x02, 0x47, 0x57, 0, 0, 0x99], tap_mac)
        .ipv4(src, dst, 64)
        .udp(1024, 9);
    let mut out = Vec::new();
    b.write(&mut out, &payload(size)).expect("frame");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::stamp_of;

    #[test]
    fn templates_parse_and_stamps_are_found() {
        let m = [2, 0, 0, 0, 0, 1];
        for gre in [true, false] {
            let t = tunnel_echo(&Addrs::LAB, m, m, gre, 64);
            let s = etherparse::SlicedPacket::from_ethernet(&t.bytes).unwrap();
            assert!(s.net.is_some());
            assert_eq!(&t.bytes[t.stamp_at..t.stamp_at + 8], MAGIC);
            // The reply the kernel would send: type 0 instead of 8.
            let mut reply = t.bytes.clone();
            reply[t.icmp_at.unwrap()] = 0;
            reply[t.stamp_at + 16..t.stamp_at + 24].copy_from_slice(&42u64.to_be_bytes());
            assert_eq!(stamp_of(&reply), Some(42));
        }
        let b = bare_echo(&Addrs::LAB, m, m, 64);
        let mut reply = b.bytes.clone();
        reply[b.icmp_at.unwrap()] = 0;
        reply[b.stamp_at + 16..b.stamp_at + 24].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(stamp_of(&reply), Some(7));
        let u = tunnel_udp(&Addrs::LAB, m, m, true, 64);
        assert_eq!(&u.bytes[u.stamp_at..u.stamp_at + 8], MAGIC);
        assert_eq!(u.bytes.len(), 14 + 20 + 4 + 20 + 8 + 64);
    }
}
