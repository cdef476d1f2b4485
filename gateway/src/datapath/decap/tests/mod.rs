//! Unit tests of decapsulation, with the frame builders they share (all
//! built by etherparse); the ECN and ICMP cases are in `ecn` and `icmp`.

use super::*;
use crate::datapath::tunnel::{Mode, TunnelRx};
use etherparse::{NetSlice, SlicedPacket};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

mod ecn;
mod icmp;

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
    let b = etherparse::PacketBuilder::ipv4(src, [10, 1, 1, 1], 64).icmpv4_echo_request(0x1234, 1);
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
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize, ecn: u8) -> Vec<u8> {
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

/// The same tunnel packet, tagged for VLAN 100 (802.1Q, then 802.1ad):
/// a VLAN's frame, not the underlay's, dropped as `not_ip`.
#[test]
fn a_vlan_tagged_tunnel_packet_is_not_the_underlays() {
    let inner = inner_v4();
    let good = outer_v4(47, &gre(&[0, 0], 0x0800, &inner));
    assert!(decap(&mut good.clone(), &lab(), &mut RxState::new(8)).is_ok());
    for tpid in [
        etherparse::EtherType::VLAN_TAGGED_FRAME,
        etherparse::EtherType::PROVIDER_BRIDGING,
    ] {
        let mut f = crate::wire::ethernet::tagged_by_etherparse(&good, tpid, 100);
        assert_eq!(
            decap(&mut f, &lab(), &mut RxState::new(8)).map(|d| d.len),
            Err(DropReason::NotIp),
            "{tpid:?}"
        );
    }
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
    let mut reserved = outer_v4(47, &gre(&[0x00, 0x08], 0x0800, &inner));
    assert_eq!(
        decap(&mut reserved, &t, &mut RxState::new(8)),
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
fn ipv6_outer_gre_carrying_ipv6() {
    let local: Ipv6Addr = "2001:db8::8".parse().unwrap();
    let remote: Ipv6Addr = "2001:db8::58".parse().unwrap();
    let mut t = tunnel("v6", Mode::Gre, None, DeviceKind::Tap);
    t.local = IpAddr::V6(local);
    t.remote = IpAddr::V6(remote);
    let table = TunnelTable::new(vec![t]);
    let inner = inner_v6();
    // Ethernet, then IPv6 remote -> local with next header `next`
    // (both etherparse), then the GRE packet with `flags`.
    let outer_with = |next: etherparse::IpNumber, flags: [u8; 2]| {
        let g = gre(&flags, 0x86dd, &inner);
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
    let outer = |next| outer_with(next, [0, 0]);
    let mut f = outer(etherparse::IpNumber::GRE);
    let d = decap(&mut f, &table, &mut RxState::new(8)).unwrap();
    let (eth, rest) =
        etherparse::Ethernet2Header::from_slice(&f[d.offset..d.offset + d.len]).unwrap();
    assert_eq!(eth.ether_type, etherparse::EtherType::IPV6);
    assert_eq!((eth.destination, eth.source), (TAP_MAC, PEER_MAC));
    assert_eq!(rest, &inner[..]);
    // The reserved flags next to the version: ip6_gre takes GRE without
    // gre_demux, and only refuses R (and the version); over IPv4 they are
    // refused (see gre_header_rules).
    let mut f = outer_with(etherparse::IpNumber::GRE, [0x00, 0x08]);
    assert_eq!(
        decap(&mut f, &table, &mut RxState::new(8)).map(|d| d.kind),
        Ok(Kind::Device)
    );
    let mut f = outer_with(etherparse::IpNumber::GRE, [0x40, 0x00]);
    assert_eq!(
        decap(&mut f, &table, &mut RxState::new(8)),
        Err(DropReason::GreReservedFlags)
    );
    // A hop-by-hop header in front of GRE is refused by name.
    let mut f = outer(etherparse::IpNumber::IPV6_HEADER_HOP_BY_HOP);
    assert_eq!(
        decap(&mut f, &table, &mut RxState::new(8)),
        Err(DropReason::OuterIpv6ExtHeader)
    );
}

/// Checks an IPv4 header's checksum with etherparse.
fn etherparse_checksum_ok(ip: &[u8]) -> bool {
    let (h, _) = etherparse::Ipv4Header::from_slice(ip).unwrap();
    h.header_checksum == h.calc_header_checksum()
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
fn a_reflected_keepalive_of_ours_is_a_reply_not_a_packet() {
    // What a peer sends back when it reflects our keepalive: GRE from its
    // end to ours, protocol 0, nothing inside, with the key we expect.
    let mut f = outer_v4(47, &gre(&[0, 0], 0, &[]));
    let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
    assert_eq!((d.tunnel, d.kind, d.len), (0, Kind::KeepaliveReply, 0));
    let mut f = outer_v4(47, &gre(&[0x20, 0, 0, 0, 0x01, 0x2c], 0, &[]));
    let d = decap(&mut f, &lab(), &mut RxState::new(8)).unwrap();
    assert_eq!((d.tunnel, d.kind), (2, Kind::KeepaliveReply), "key 300");
    // With the wrong key: not any tunnel's.
    let mut f = outer_v4(47, &gre(&[0x20, 0, 0, 0, 0, 7], 0, &[]));
    assert_eq!(
        decap(&mut f, &lab(), &mut RxState::new(8)),
        Err(DropReason::KeyMismatch)
    );
    // A gretap tunnel carries no keepalives: protocol 0 is not its own.
    let table = TunnelTable::new(vec![tunnel("l2", Mode::Gretap, None, DeviceKind::Tap)]);
    let mut f = outer_v4(47, &gre(&[0, 0], 0, &[]));
    assert_eq!(
        decap(&mut f, &table, &mut RxState::new(8)),
        Err(DropReason::GreProtocolUnsupported)
    );
}
