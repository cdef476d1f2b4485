//! Unit tests of encapsulation, with the packet builders they share (all
//! built by etherparse); the replies into the device are tested in `reply`.

use super::*;
use crate::wire::checksum;
use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};
use std::net::Ipv4Addr;

mod reply;

/// A worker's context at time 0 with outer IPv4 ID `ident`.
fn cx(ident: u16) -> TxContext {
    TxContext::new(ident)
}

const TAP_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];
const HOP: NextHop = NextHop {
    dst: [0x02, 0, 0, 0, 0, 0x58],
    src: [0x02, 0, 0, 0, 0, 0x08],
};

fn tunnel(mode: Mode, kind: DeviceKind) -> TunnelTx {
    TunnelTx {
        mode,
        local: Ipv4Addr::new(192, 168, 0, 8).into(),
        remote: Ipv4Addr::new(192, 168, 0, 58).into(),
        encap_limit: None,
        path_mtu: Default::default(),
        ident: Default::default(),
        okey: None,
        ocsum: false,
        oseq: None,
        tos: crate::datapath::tunnel::Tos::Fixed(0),
        pmtudisc: true,
        ignore_df: false,
        ttl: Ttl::Fixed(64),
        mtu: 1400,
        device_kind: kind,
        device_mac: TAP_MAC,
        peer_mac: PEER_MAC,
        address: Some("10.1.1.1".parse().unwrap()),
        peer: Some("10.1.1.2".parse().unwrap()),
        keepalive: None,
    }
}

/// An ICMP echo request 10.1.1.1 -> 10.1.1.2 built by etherparse.
fn inner(payload_len: usize, ttl: u8) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv4([10, 1, 1, 1], [10, 1, 1, 2], ttl)
        .icmpv4_echo_request(7, 1);
    let mut out = Vec::new();
    b.write(&mut out, &vec![0x5a; payload_len]).unwrap();
    out
}

/// The frame buffer as the worker has it after a device read.
fn read_into(t: &TunnelTx, packet: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; 3840];
    let off = t.read_offset();
    let mut n = 0;
    if t.device_kind == DeviceKind::Tap {
        buf[off..off + 6].copy_from_slice(&PEER_MAC);
        buf[off + 6..off + 12].copy_from_slice(&TAP_MAC);
        let et = if packet[0] >> 4 == 6 {
            [0x86, 0xdd]
        } else {
            [0x08, 0x00]
        };
        buf[off + 12..off + 14].copy_from_slice(&et);
        n = 14;
    }
    buf[off + n..off + n + packet.len()].copy_from_slice(packet);
    (buf, n + packet.len())
}

fn ones_complement_ok(data: &[u8]) -> bool {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

#[test]
fn gre_from_a_tap() {
    let t = tunnel(Mode::Gre, DeviceKind::Tap);
    let pkt = inner(56, 64);
    let (mut buf, n) = read_into(&t, &pkt);
    let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(9)) else {
        panic!("not sent")
    };
    assert_eq!(len, 14 + 20 + 4 + pkt.len());
    let s = SlicedPacket::from_ethernet(&buf[..len]).unwrap();
    let eth = s.link.unwrap().to_header().unwrap().ethernet2().unwrap();
    assert_eq!(eth.destination, HOP.dst);
    assert_eq!(eth.source, HOP.src);
    let Some(NetSlice::Ipv4(ip)) = s.net else {
        panic!()
    };
    let h = ip.header();
    assert_eq!(h.source(), [192, 168, 0, 8]);
    assert_eq!(h.destination(), [192, 168, 0, 58]);
    assert_eq!(h.protocol(), etherparse::IpNumber(47));
    assert_eq!(h.ttl(), 64);
    assert!(h.dont_fragment());
    assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
    assert_eq!(&buf[34..38], &[0, 0, 0x08, 0x00]);
    assert_eq!(&buf[38..len], &pkt[..]);
}

#[test]
fn ipip_from_a_tun_inherits_ttl_and_maps_ecn() {
    let mut t = tunnel(Mode::Ipip, DeviceKind::Tun);
    t.ttl = Ttl::Inherit;
    let mut pkt = inner(20, 33);
    pkt[1] = 0x03; // CE
    let mut h = etherparse::Ipv4Header::from_slice(&pkt).unwrap().0;
    h.ecn = etherparse::IpEcn::CongestionExperienced;
    h.header_checksum = h.calc_header_checksum();
    pkt[10..12].copy_from_slice(&h.header_checksum.to_be_bytes());
    let (mut buf, n) = read_into(&t, &pkt);
    let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(9)) else {
        panic!()
    };
    let s = SlicedPacket::from_ethernet(&buf[..len]).unwrap();
    let Some(NetSlice::Ipv4(ip)) = s.net else {
        panic!()
    };
    assert_eq!(ip.header().protocol(), etherparse::IpNumber(4));
    assert_eq!(ip.header().ttl(), 33);
    assert_eq!(
        ip.header().ecn().value(),
        0x02,
        "CE is carried as ECT(0) outside"
    );
    assert_eq!(&buf[34..len], &pkt[..]);
}

#[test]
fn gre_key_and_checksum() {
    let mut t = tunnel(Mode::Gre, DeviceKind::Tun);
    t.okey = Some(0x0102_0304);
    t.ocsum = true;
    let pkt = inner(31, 64);
    let (mut buf, n) = read_into(&t, &pkt);
    let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(9)) else {
        panic!()
    };
    let gre = &buf[34..len];
    assert_eq!(&gre[0..4], &[0xa0, 0x00, 0x08, 0x00]);
    assert_eq!(&gre[8..12], &[1, 2, 3, 4]);
    assert!(
        ones_complement_ok(gre),
        "GRE checksum over header and payload"
    );
    assert_eq!(&gre[12..], &pkt[..]);
}

#[test]
fn oseq_numbers_from_one_and_goes_on() {
    let mut t = tunnel(Mode::Gre, DeviceKind::Tun);
    t.oseq = Some(std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0)));
    let pkt = inner(31, 64);
    for want in 1..=3u32 {
        let (mut buf, n) = read_into(&t, &pkt);
        let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(9)) else {
            panic!()
        };
        let gre = &buf[34..len];
        assert_eq!(&gre[0..4], &[0x10, 0x00, 0x08, 0x00]);
        assert_eq!(&gre[4..8], &want.to_be_bytes());
        assert_eq!(&gre[8..], &pkt[..]);
    }
}

#[test]
fn tos_and_df_follow_the_kernels_rules() {
    // Inner: DSCP AF41 (0x88), ECN CE, DF set.
    let mut pkt = inner(31, 64);
    pkt[1] = 0x88 | 3;
    let c = checksum::checksum(&{
        let mut h = pkt[..20].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
    let outer = |t: &TunnelTx, pkt: &[u8]| {
        let (mut buf, n) = read_into(t, pkt);
        let Verdict::Transmit { .. } = encap(&mut buf, n, t, Some(HOP), &mut cx(9)) else {
            panic!()
        };
        let ip = ipv4::Packet::new_checked(buf[14..].to_vec()).unwrap();
        (ip.dscp_ecn(), ip.dont_frag())
    };
    let mut t = tunnel(Mode::Ipip, DeviceKind::Tun);
    // Default: TOS 0, ECN from the inner packet (CE sent as ECT(0)), DF.
    assert_eq!(outer(&t, &pkt), (0x02, true));
    t.tos = crate::datapath::tunnel::Tos::Inherit;
    assert_eq!(outer(&t, &pkt), (0x88 | 0x02, true));
    t.tos = crate::datapath::tunnel::Tos::Fixed(0xb8 | 1);
    assert_eq!(
        outer(&t, &pkt),
        (0xb8 | 0x02, true),
        "ECN bits of tos are not used"
    );
    // nopmtudisc: DF follows the inner packet; ignore-df clears it.
    t.ttl = Ttl::Inherit;
    t.pmtudisc = false;
    assert!(outer(&t, &pkt).1);
    let mut no_df = pkt.clone();
    no_df[6] = 0;
    let c = checksum::checksum(&{
        let mut h = no_df[..20].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    no_df[10..12].copy_from_slice(&c.to_be_bytes());
    assert!(!outer(&t, &no_df).1);
    t.ignore_df = true;
    assert!(!outer(&t, &pkt).1);
}

#[test]
fn gretap_sends_whole_frames_whatever_they_carry() {
    let mut t = tunnel(Mode::Gretap, DeviceKind::Tap);
    t.ttl = Ttl::Inherit;
    t.okey = Some(9);
    // A broadcast ARP request from the bridge: carried, not answered.
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 0x42, 0x08, 0x06]);
    frame.extend_from_slice(&[1u8; 28]);
    let off = t.read_offset();
    assert_eq!(off, t.outer_len(), "the frame's own header is kept");
    let mut buf = vec![0u8; 3840];
    buf[off..off + frame.len()].copy_from_slice(&frame);
    let Verdict::Transmit { len } = encap(&mut buf, frame.len(), &t, Some(HOP), &mut cx(9)) else {
        panic!()
    };
    let ip = ipv4::Packet::new_checked(&buf[14..len]).unwrap();
    assert_eq!(ip.protocol(), IpProtocol::Gre);
    assert_eq!(ip.ttl(), 64, "no IP inside: the default TTL");
    let gre = &buf[34..len];
    assert_eq!(&gre[0..4], &[0x20, 0x00, 0x65, 0x58]);
    assert_eq!(&gre[4..8], &9u32.to_be_bytes());
    assert_eq!(&gre[8..], &frame[..]);
    // An IPv4 packet inside lends its TTL.
    let mut framed = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0x42, 0x08, 0x00];
    framed.extend_from_slice(&inner(31, 33));
    let mut buf = vec![0u8; 3840];
    buf[off..off + framed.len()].copy_from_slice(&framed);
    let Verdict::Transmit { len } = encap(&mut buf, framed.len(), &t, Some(HOP), &mut cx(9)) else {
        panic!()
    };
    assert_eq!(ipv4::Packet::new_checked(&buf[14..len]).unwrap().ttl(), 33);
}

#[test]
fn a_learned_path_mtu_lowers_what_fits_and_expires() {
    let t = tunnel(Mode::Gre, DeviceKind::Tun);
    let pkt = inner(1300, 64); // 1328 bytes, DF set
    let (mut buf, n) = read_into(&t, &pkt);
    assert!(matches!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
        Verdict::Transmit { .. }
    ));
    assert!(t.path_mtu.lower(1300, 1000));
    assert!(!t.path_mtu.lower(1400, 1000), "only lowered");
    let (mut buf, n) = read_into(&t, &pkt);
    let Verdict::Reply { offset, .. } = encap(&mut buf, n, &t, Some(HOP), &mut cx(1)) else {
        panic!("not refused")
    };
    // ICMP fragmentation needed with what fits: 1300 less IPv4 and GRE.
    let icmp = &buf[offset + 20..];
    assert_eq!((icmp[0], icmp[1]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1300 - 24);
    // Ten minutes on, the tunnel MTU holds again.
    assert_eq!(t.path_mtu.get(1000 + PATH_MTU_EXPIRES), None);
}

#[test]
fn chatter_and_families() {
    let t = tunnel(Mode::Ipip, DeviceKind::Tap);
    // A router solicitation to ff02::2 from a link-local address.
    let b = etherparse::PacketBuilder::ipv6(
        [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        255,
    )
    .icmpv6(etherparse::Icmpv6Type::Unknown {
        type_u8: 133,
        code_u8: 0,
        bytes5to8: [0; 4],
    });
    let mut rs = Vec::new();
    b.write(&mut rs, &[]).unwrap();
    let (mut buf, n) = read_into(&t, &rs);
    assert_eq!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(0)),
        Verdict::Drop(DropReason::TxChatter)
    );
    // Global IPv6 is not carried by IPIP.
    let b = etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).udp(1, 2);
    let mut v6 = Vec::new();
    b.write(&mut v6, &[1, 2, 3]).unwrap();
    let (mut buf, n) = read_into(&t, &v6);
    assert_eq!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(0)),
        Verdict::Drop(DropReason::TxFamilyNotCarried)
    );
    // Without a next hop nothing is sent.
    let (mut buf, n) = read_into(&t, &inner(8, 64));
    assert_eq!(
        encap(&mut buf, n, &t, None, &mut cx(0)),
        Verdict::Drop(DropReason::TxNoNeighbour)
    );
    // Garbage from a tun.
    let tun = tunnel(Mode::Gre, DeviceKind::Tun);
    let (mut buf, n) = read_into(&tun, &[0x12, 0x34]);
    assert_eq!(
        encap(&mut buf, n, &tun, Some(HOP), &mut cx(0)),
        Verdict::Drop(DropReason::TxMalformed)
    );
}

/// A routable IPv6 UDP datagram of `len` bytes in all (etherparse).
fn inner6(len: usize) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv6(
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        64,
    )
    .udp(1, 2);
    let mut out = Vec::new();
    b.write(&mut out, &vec![0x33; len - 48]).unwrap();
    out
}

#[test]
fn ipv6_over_an_ipv4_path_under_1280_goes_out_with_df_clear() {
    // gre over IPv4 (24 bytes of outer IPv4 + GRE): a router says the
    // path carries 600, which leaves 576 for IPv6, under its minimum.
    let t = tunnel(Mode::Gre, DeviceKind::Tun);
    assert!(t.path_mtu.lower(600, 0));
    // As sit: IPv6 is told 1280, never less; a packet of 1280 leaves,
    // outer DF clear, for the router to fragment; so does a small one.
    for size in [1280, 500] {
        let (mut buf, n) = read_into(&t, &inner6(size));
        let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(5)) else {
            panic!("{size}: not sent")
        };
        let (outer, _) = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap();
        assert!(
            !outer.dont_fragment,
            "{size}: outer DF set on a path too small"
        );
    }
    // A 1300-byte one gets "packet too big" saying 1280.
    let (mut buf, n) = read_into(&t, &inner6(1300));
    let Verdict::Reply { offset, len, .. } = encap(&mut buf, n, &t, Some(HOP), &mut cx(5)) else {
        panic!("no ICMPv6")
    };
    let s = SlicedPacket::from_ip(&buf[offset..offset + len]).unwrap();
    let Some(TransportSlice::Icmpv6(icmp)) = s.transport else {
        panic!()
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 }
    );
    // IPv4 on the same path still gets "fragmentation needed", with
    // the path's MTU less the overhead.
    let (mut buf, n) = read_into(&t, &inner(1000, 64));
    let Verdict::Reply { offset, len, .. } = encap(&mut buf, n, &t, Some(HOP), &mut cx(5)) else {
        panic!("no ICMP")
    };
    let s = SlicedPacket::from_ip(&buf[offset..offset + len]).unwrap();
    let Some(TransportSlice::Icmpv4(icmp)) = s.transport else {
        panic!()
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 576 }
        )
    );
    // On a path of 1400 (1376 left), IPv6 is told as before.
    let t = tunnel(Mode::Gre, DeviceKind::Tun);
    assert!(t.path_mtu.lower(1400, 0));
    let (mut buf, n) = read_into(&t, &inner6(1390));
    assert!(matches!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(5)),
        Verdict::Reply { .. }
    ));
}

/// The tunnel of `tunnel(mode, kind)` over IPv6 (2001:db8::8 to ::58),
/// with the encapsulation limit the kernel sends by default.
fn tunnel6(mode: Mode, kind: DeviceKind) -> TunnelTx {
    let mut t = tunnel(mode, kind);
    t.local = "2001:db8::8".parse::<std::net::Ipv6Addr>().unwrap().into();
    t.remote = "2001:db8::58".parse::<std::net::Ipv6Addr>().unwrap().into();
    t.encap_limit = Some(4);
    t
}

/// An IPv4 UDP datagram 10.1.1.1:sport -> 10.1.1.2:9 with TOS `tos`
/// (etherparse).
fn udp4(sport: u16, tos: u8) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv4([10, 1, 1, 1], [10, 1, 1, 2], 64).udp(sport, 9);
    let mut out = Vec::new();
    b.write(&mut out, &[0x11; 32]).unwrap();
    let (mut h, _) = etherparse::Ipv4Header::from_slice(&out).unwrap();
    h.dscp = etherparse::IpDscp::try_new(tos >> 2).unwrap();
    h.ecn = etherparse::IpEcn::try_new(tos & 3).unwrap();
    h.header_checksum = h.calc_header_checksum();
    out[..20].copy_from_slice(&h.to_bytes());
    out
}

/// Encapsulates `inner` on `t` and gives the outer IPv6 header
/// (etherparse).
fn outer6(t: &TunnelTx, inner: &[u8]) -> etherparse::Ipv6Header {
    let (mut buf, n) = read_into(t, inner);
    let v = encap(&mut buf, n, t, Some(HOP), &mut cx(1));
    let Verdict::Transmit { len } = v else {
        panic!("not sent: {v:?}")
    };
    etherparse::Ipv6Header::from_slice(&buf[14..len]).unwrap().0
}

#[test]
fn ip6gre_leaves_ecn_out_as_the_kernel_does_and_ipip6_copies_it() {
    // Measured in the VM lab against Linux 6.1: ip6gre sent an inner TOS
    // of 0x2a as traffic class 0x00; ipip6 sent 0x02 (ECN copied).
    for (mode, kind) in [
        (Mode::Gre, DeviceKind::Tun),
        (Mode::Gretap, DeviceKind::Tap),
    ] {
        let t = tunnel6(mode, kind);
        let inner = udp4(1, 0x2a);
        assert_eq!(outer6(&t, &inner).traffic_class, 0x00, "{mode:?} {kind:?}");
        let mut t = t;
        t.tos = Tos::Fixed(0xb8);
        assert_eq!(outer6(&t, &inner).traffic_class, 0xb8);
        // Inherit: the inner byte as it is, CE included.
        t.tos = Tos::Inherit;
        assert_eq!(outer6(&t, &udp4(1, 0x2b)).traffic_class, 0x2b);
    }
    let t = tunnel6(Mode::Ipip, DeviceKind::Tun);
    assert_eq!(outer6(&t, &udp4(1, 0x2a)).traffic_class, 0x02);
    assert_eq!(
        outer6(&t, &udp4(1, 0x2b)).traffic_class,
        0x02,
        "CE goes as ECT(0)"
    );
    assert_eq!(outer6(&t, &udp4(1, 0x29)).traffic_class, 0x01);
}

#[test]
fn a_gretap_frame_without_ip_goes_over_ipv6_with_traffic_class_0() {
    // An ARP request read from the tap (etherparse), on a gretap tunnel
    // with a fixed TOS: ip6gretap sends it with 0 (ip6gre_xmit_other),
    // gretap over IPv4 with the tunnel's TOS.
    let mut arp = Vec::new();
    etherparse::PacketBuilder::ethernet2(TAP_MAC, [0xff; 6])
        .arp(
            etherparse::ArpPacket::new(
                etherparse::ArpHardwareId::ETHERNET,
                etherparse::EtherType::IPV4,
                etherparse::ArpOperation::REQUEST,
                &TAP_MAC,
                &[10, 1, 1, 1],
                &[0; 6],
                &[10, 1, 1, 2],
            )
            .unwrap(),
        )
        .write(&mut arp)
        .unwrap();
    for (mut t, want) in [
        (tunnel6(Mode::Gretap, DeviceKind::Tap), 0x00),
        (tunnel(Mode::Gretap, DeviceKind::Tap), 0xb8),
    ] {
        t.tos = Tos::Fixed(0xb8);
        let mut buf = vec![0u8; 3840];
        let off = t.read_offset();
        buf[off..off + arp.len()].copy_from_slice(&arp);
        let v = encap(&mut buf, arp.len(), &t, Some(HOP), &mut cx(1));
        let Verdict::Transmit { len } = v else {
            panic!("not sent: {v:?}")
        };
        let tc = if t.local.is_ipv6() {
            etherparse::Ipv6Header::from_slice(&buf[14..len])
                .unwrap()
                .0
                .traffic_class
        } else {
            let h = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap().0;
            (h.dscp.value() << 2) | h.ecn.value()
        };
        assert_eq!(tc, want, "{:?}", t.local);
    }
}

#[test]
fn an_ipv6_outer_header_labels_each_inner_flow() {
    for mode in [Mode::Gre, Mode::Ipip] {
        let t = tunnel6(mode, DeviceKind::Tun);
        let labels: Vec<u32> = (1..=64u16)
            .map(|port| outer6(&t, &udp4(port, 0)).flow_label.value())
            .collect();
        assert!(labels.iter().all(|l| *l != 0), "{labels:?}");
        // The same flow, the same label, whatever the payload.
        let mut longer = udp4(1, 0);
        let (mut h, _) = etherparse::Ipv4Header::from_slice(&longer).unwrap();
        h.total_len += 4;
        h.header_checksum = h.calc_header_checksum();
        longer[..20].copy_from_slice(&h.to_bytes());
        longer.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(outer6(&t, &longer).flow_label.value(), labels[0]);
        let mut distinct = labels.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() >= 60,
            "64 flows, {} labels: {labels:?}",
            distinct.len()
        );
        // Another process (another secret): other labels.
        let (mut buf, n) = read_into(&t, &udp4(1, 0));
        let mut other = cx(1);
        other.flow_seed = 0x5eed_1234;
        let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut other) else {
            panic!("not sent")
        };
        let label = etherparse::Ipv6Header::from_slice(&buf[14..len])
            .unwrap()
            .0
            .flow_label
            .value();
        assert_ne!(label, labels[0], "the secret counts");
    }
}

#[test]
fn packets_without_df_take_ids_from_the_tunnel_not_the_worker() {
    // nopmtudisc: DF follows the inner packet, which has none here. Two
    // workers (two contexts with the same ID) never send the same ID.
    let mut t = tunnel(Mode::Gre, DeviceKind::Tun);
    t.pmtudisc = false;
    let mut no_df = inner(100, 64);
    let (mut h, _) = etherparse::Ipv4Header::from_slice(&no_df).unwrap();
    h.dont_fragment = false;
    h.header_checksum = h.calc_header_checksum();
    no_df[..20].copy_from_slice(&h.to_bytes());
    let mut ids = Vec::new();
    for _ in 0..4 {
        for worker in [&mut cx(77), &mut cx(77)] {
            let (mut buf, n) = read_into(&t, &no_df);
            let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), worker) else {
                panic!("not sent")
            };
            let (outer, _) = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap();
            assert!(!outer.dont_fragment);
            ids.push(outer.identification);
        }
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "an ID repeated: {ids:?}");
}

#[test]
fn a_nopmtudisc_tunnel_numbers_df_and_other_packets_from_one_counter() {
    // The kernel's iptunnel_xmit takes __ip_select_ident for every packet:
    // with DF following the inner packet, the IDs of DF and non-DF
    // packets make one sequence (measured in the VM lab against 6.1).
    let mut t = tunnel(Mode::Ipip, DeviceKind::Tun);
    t.pmtudisc = false;
    let df = inner(100, 64);
    let mut no_df = df.clone();
    let (mut h, _) = etherparse::Ipv4Header::from_slice(&no_df).unwrap();
    h.dont_fragment = false;
    h.header_checksum = h.calc_header_checksum();
    no_df[..20].copy_from_slice(&h.to_bytes());
    let mut worker = cx(500);
    let mut ids = Vec::new();
    for packet in [&df, &no_df, &df, &df, &no_df] {
        let (mut buf, n) = read_into(&t, packet);
        let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut worker) else {
            panic!("not sent")
        };
        let (outer, _) = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap();
        ids.push(outer.identification);
    }
    let steps: Vec<u16> = ids.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    assert_eq!(steps, [1, 1, 1, 1], "{ids:?}");
}

#[test]
fn a_keepalive_probe_is_what_cisco_sends_and_our_receive_rules_take_back() {
    // A keyed gre tunnel (okey 7 out, ikey 9 in, icsum) from a tap.
    let mut t = tunnel(Mode::Gre, DeviceKind::Tap);
    t.okey = Some(7);
    t.keepalive = Some(KeepaliveProbe {
        interval: 10,
        reply_key: Some(9),
        reply_csum: true,
    });
    let mut buf = vec![0u8; 3840];
    let v = keepalive_probe(&mut buf, &t, Some(HOP), &mut cx(3));
    let Verdict::Transmit { len } = v else {
        panic!("not sent: {v:?}")
    };
    let sent = buf[..len].to_vec();
    let s = SlicedPacket::from_ethernet(&sent).unwrap();
    let Some(NetSlice::Ipv4(outer)) = s.net else {
        panic!("IPv4")
    };
    let h = outer.header();
    assert_eq!(
        (h.source(), h.destination(), h.protocol()),
        (
            [192, 168, 0, 8],
            [192, 168, 0, 58],
            etherparse::IpNumber(47)
        )
    );
    // The outer GRE header: the tunnel's own (key 7), carrying IPv4.
    let g = outer.payload().payload;
    assert_eq!(&g[..8], &[0x20, 0, 0x08, 0x00, 0, 0, 0, 7]);
    // Inside: IPv4 from the remote to us, TTL 255, GRE protocol 0 with our
    // ikey and a right checksum, and nothing more.
    let (inner, rest) = etherparse::Ipv4Header::from_slice(&g[8..]).unwrap();
    assert_eq!(
        (inner.source, inner.destination, inner.protocol),
        (
            [192, 168, 0, 58],
            [192, 168, 0, 8],
            etherparse::IpNumber(47)
        )
    );
    assert_eq!(inner.time_to_live, 255);
    assert_eq!(inner.header_checksum, inner.calc_header_checksum());
    assert_eq!(rest.len(), 12, "C and K: 4 + 4 + 4 bytes, no payload");
    assert_eq!(&rest[..4], &[0xa0, 0, 0, 0]);
    assert_eq!(&rest[8..], &[0, 0, 0, 9]);
    assert!(ones_complement_ok(rest), "GRE checksum: {rest:?}");
    // No next hop: not sent. No keepalive configured: refused.
    assert_eq!(
        keepalive_probe(&mut buf, &t, None, &mut cx(3)),
        Verdict::Drop(DropReason::TxNoNeighbour)
    );
    t.keepalive = None;
    assert_eq!(
        keepalive_probe(&mut buf, &t, Some(HOP), &mut cx(3)),
        Verdict::Drop(DropReason::TxMalformed)
    );
}

#[test]
fn a_locked_path_mtu_sends_without_df_as_the_kernel_does() {
    // A router reported 400, under min_pmtu: the path is taken as 552 and
    // locked; what fits goes out without DF (the kernel's ip_mtu_locked),
    // what does not gets "fragmentation needed" as before (measured
    // against Linux 6.1 in the VM lab's differential run).
    let t = tunnel(Mode::Gre, DeviceKind::Tun);
    assert!(t.path_mtu.lower_locked(552, true, 0));
    let (mut buf, n) = read_into(&t, &inner(200, 64));
    let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(1)) else {
        panic!("not sent")
    };
    let (outer, _) = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap();
    assert!(!outer.dont_fragment, "locked: no DF");
    let (mut buf, n) = read_into(&t, &inner(1000, 64));
    assert!(matches!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
        Verdict::Reply { .. }
    ));
    // The same MTU reported again, not locked: the lock stays; a lock
    // comes to an MTU already in force.
    assert!(!t.path_mtu.lower(552, 0));
    assert_eq!(t.path_mtu.get_locked(0), Some((552, true)));
    let u = tunnel(Mode::Gre, DeviceKind::Tun);
    assert!(u.path_mtu.lower(552, 0));
    assert!(u.path_mtu.lower_locked(552, true, 0));
    assert_eq!(u.path_mtu.get_locked(0), Some((552, true)));
    // gretap too (iptunnel_xmit clears DF on any locked route).
    let g = tunnel(Mode::Gretap, DeviceKind::Tap);
    assert!(g.path_mtu.lower_locked(552, true, 0));
    let (mut buf, n) = read_into(&g, &inner(200, 64));
    let Verdict::Transmit { len } = encap(&mut buf, n, &g, Some(HOP), &mut cx(1)) else {
        panic!("not sent")
    };
    let (outer, _) = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap();
    assert!(!outer.dont_fragment, "gretap, locked: no DF");
    // Unlocked: DF as ever.
    let v = tunnel(Mode::Gre, DeviceKind::Tun);
    assert!(v.path_mtu.lower(1300, 0));
    let (mut buf, n) = read_into(&v, &inner(200, 64));
    let Verdict::Transmit { len } = encap(&mut buf, n, &v, Some(HOP), &mut cx(1)) else {
        panic!("not sent")
    };
    let (outer, _) = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap();
    assert!(outer.dont_fragment);
}
