//! Unit tests of coalescing and segmentation, round trips between the
//! two included.

use super::*;

/// An IPv4 packet from 10.1.1.2 to 10.1.1.1 behind a 14-byte Ethernet
/// header, with the transport header and payload `l4` (TCP or UDP),
/// every header and checksum written by etherparse.
fn ip4(proto: u8, df: bool, l4: Vec<u8>) -> Vec<u8> {
    let mut ip = etherparse::Ipv4Header::new(
        l4.len() as u16,
        64,
        etherparse::IpNumber(proto),
        [10, 1, 1, 2],
        [10, 1, 1, 1],
    )
    .unwrap();
    ip.dont_fragment = df;
    ip.identification = 1;
    ip.header_checksum = ip.calc_header_checksum();
    let mut p = Vec::new();
    etherparse::Ethernet2Header {
        destination: [2, 0, 0, 0, 0, 1],
        source: [2, 0, 0, 0, 0, 2],
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut p)
    .unwrap();
    ip.write(&mut p).unwrap();
    if proto == TCP {
        let (mut t, payload) = etherparse::TcpHeader::from_slice(&l4).unwrap();
        t.checksum = t.calc_checksum_ipv4(&ip, payload).unwrap();
        t.write(&mut p).unwrap();
        p.extend_from_slice(payload);
    } else {
        let (mut u, payload) = etherparse::UdpHeader::from_slice(&l4).unwrap();
        u.checksum = u.calc_checksum_ipv4(&ip, payload).unwrap();
        u.write(&mut p).unwrap();
        p.extend_from_slice(payload);
    }
    p
}

/// An IPv4 TCP segment (ACK 7, window `window`) with a right checksum,
/// behind a 14-byte Ethernet header.
fn seg4w(seq: u32, payload: &[u8], flags: u8, ack: u32, window: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..4].copy_from_slice(&[0x13, 0x88, 0xa0, 0x00]);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&window.to_be_bytes());
    tcp.extend_from_slice(payload);
    ip4(TCP, true, tcp)
}

fn seg4(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
    seg4w(seq, payload, flags, 7, 0xff00)
}

/// The TCP checksum of an IPv4 segment behind Ethernet, as etherparse
/// computes it, is the one it carries.
fn tcp_checksum_ok(f: &[u8]) -> bool {
    let (ip, rest) = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap();
    let (t, payload) = etherparse::TcpHeader::from_slice(rest).unwrap();
    ip.header_checksum == ip.calc_header_checksum()
        && t.checksum == t.calc_checksum_ipv4(&ip, payload).unwrap()
}

#[test]
fn consecutive_segments_merge_and_the_result_is_one_valid_gso_packet() {
    let a = seg4(1000, &[1; 100], ACK);
    let b = seg4(1100, &[2; 100], ACK);
    let c = seg4(1200, &[3; 60], ACK | PSH);
    let (sa, sb, sc) = (
        parse(&a, 14, true).unwrap(),
        parse(&b, 14, true).unwrap(),
        parse(&c, 14, true).unwrap(),
    );
    assert!(sa.mergeable && sb.mergeable && sc.mergeable);
    let mut run = Run::start(sa);
    assert!(run.accepts(&sb));
    run.add(&sb);
    assert!(run.accepts(&sc));
    run.add(&sc);
    assert!(run.closed, "PSH ends the run");
    let mut first = a.clone();
    let v = run.finish(&mut first, 14);
    assert_eq!(v.gso_type, GSO_TCPV4);
    assert_eq!(
        (v.hdr_len, v.gso_size, v.csum_start, v.csum_offset),
        (54, 100, 34, 16)
    );
    // The merged packet, checksum completed as the kernel would, is a
    // valid TCP segment carrying all three payloads.
    let mut whole = first.clone();
    whole.extend_from_slice(&b[54..]);
    whole.extend_from_slice(&c[54..]);
    assert_eq!(
        u16::from_be_bytes([whole[16], whole[17]]) as usize,
        whole.len() - 14
    );
    let partial = checksum::sum(&whole[34..]);
    whole[50..52].copy_from_slice(&(!partial).to_be_bytes());
    assert!(tcp_checksum_ok(&whole), "IPv4 and TCP checksums");
    let s = parse(&whole, 14, true).unwrap();
    assert!(s.mergeable, "checksum of the merged packet verifies");
    assert!(s.push);
    assert_eq!(s.payload, 260);
}

#[test]
fn what_gro_would_not_merge_is_refused() {
    let a = parse(&seg4(1000, &[1; 100], ACK), 14, true).unwrap();
    let run = Run::start(a);
    // A gap in sequence numbers.
    assert!(!run.accepts(&parse(&seg4(1200, &[1; 100], ACK), 14, true).unwrap()));
    // Larger than the first.
    assert!(!run.accepts(&parse(&seg4(1100, &[1; 200], ACK), 14, true).unwrap()));
    // FIN, SYN: not mergeable at all.
    assert!(
        !parse(&seg4(1100, &[1; 100], ACK | FIN), 14, true)
            .unwrap()
            .mergeable
    );
    assert!(
        !parse(&seg4(1100, &[1; 100], SYN), 14, true)
            .unwrap()
            .mergeable
    );
    // A bad checksum.
    let mut bad = seg4(1100, &[1; 100], ACK);
    bad[60] ^= 1;
    assert!(!parse(&bad, 14, true).unwrap().mergeable);
    // No payload (a pure ACK).
    assert!(!parse(&seg4(1100, &[], ACK), 14, true).unwrap().mergeable);
    // A different acknowledgement number (a valid segment otherwise).
    let c = parse(&seg4w(1100, &[1; 100], ACK, 8, 0xff00), 14, true).unwrap();
    assert!(c.mergeable);
    assert!(!run.accepts(&c), "another ACK number");
    // A different window: a window update must reach the receiver
    // (tcp_gro_receive compares the flags word, window included).
    let c = parse(&seg4w(1100, &[1; 100], ACK, 7, 0x0100), 14, true).unwrap();
    assert!(c.mergeable);
    assert!(!run.accepts(&c), "another window");
    // The same segment with its window as the first's: taken.
    let c = parse(&seg4w(1100, &[1; 100], ACK, 7, 0xff00), 14, true).unwrap();
    assert!(run.accepts(&c));
    // An IPv4 header with a wrong checksum: never merged (and so never
    // given a right one).
    let mut bad_ip = seg4(1100, &[1; 100], ACK);
    bad_ip[14 + 8] ^= 1;
    assert!(!parse(&bad_ip, 14, true).unwrap().mergeable);
    // Not TCP.
    let mut udp = seg4(1100, &[1; 100], ACK);
    udp[14 + 9] = 17;
    assert!(parse(&udp, 14, false).is_none(), "UDP only when asked for");
    assert!(parse(&udp, 14, true).is_some_and(|s| s.flow.udp));
}

/// An IPv4 UDP datagram behind an Ethernet header, checksum right.
fn udp4(src_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&src_port.to_be_bytes());
    u[2..4].copy_from_slice(&9u16.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    ip4(UDP, false, u)
}

#[test]
fn udp_datagrams_of_one_flow_coalesce_into_a_uso_packet_that_segments_back() {
    let (a, b, c) = (
        udp4(1000, &[1; 64]),
        udp4(1000, &[2; 64]),
        udp4(1000, &[3; 20]),
    );
    let (sa, sb, sc) = (
        parse(&a, 14, true).unwrap(),
        parse(&b, 14, true).unwrap(),
        parse(&c, 14, true).unwrap(),
    );
    assert!(sa.mergeable && sb.mergeable && sc.mergeable);
    // Another flow (source port) is another flow.
    let other = parse(&udp4(1001, &[1; 64]), 14, true).unwrap();
    assert_ne!(other.flow, sa.flow);
    let mut run = Run::start(sa);
    assert!(run.accepts(&sb));
    run.add(&sb);
    assert!(run.accepts(&sc));
    run.add(&sc);
    assert!(run.closed, "a shorter datagram ends the run");
    let mut whole = a.clone();
    let v = run.finish(&mut whole, 14);
    whole.extend_from_slice(&b[42..]);
    whole.extend_from_slice(&c[42..]);
    assert_eq!(
        (v.gso_type, v.gso_size, v.csum_offset, v.hdr_len),
        (GSO_UDP_L4, 64, 6, 42)
    );
    // Cut back as the kernel would: the same three datagrams.
    let s = Segmenter::new(&whole, 14, &v).unwrap();
    assert_eq!(s.count(), 3);
    for (i, orig) in [&a, &b, &c].iter().enumerate() {
        let mut out = vec![0u8; 200];
        let n = s.write(i, &mut out);
        assert_eq!(&out[42..n], &orig[42..], "payload {i}");
        assert!(
            parse(&out[..n], 14, true).unwrap().mergeable,
            "checksums of {i}"
        );
    }
    // A bad checksum is not merged.
    let mut bad = udp4(1000, &[1; 64]);
    bad[50] ^= 1;
    assert!(!parse(&bad, 14, true).unwrap().mergeable);
}

#[test]
fn a_short_segment_closes_the_run() {
    let mut run = Run::start(parse(&seg4(0, &[1; 100], ACK), 14, true).unwrap());
    let s = parse(&seg4(100, &[1; 50], ACK), 14, true).unwrap();
    assert!(run.accepts(&s));
    run.add(&s);
    assert!(run.closed);
    assert!(!run.accepts(&parse(&seg4(150, &[1; 50], ACK), 14, true).unwrap()));
}

#[test]
fn a_tso_packet_is_cut_into_valid_segments_that_coalesce_back() {
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    // A 3000-byte GSO packet as the kernel hands it over: partial
    // checksum, PSH on it, gso_size 1000.
    let big = seg4(5000, &payload, ACK | PSH);
    let h = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1000,
        csum_start: 34,
        csum_offset: 16,
    };
    let s = Segmenter::new(&big, 14, &h).unwrap();
    assert_eq!(s.count(), 3);
    let mut run: Option<Run> = None;
    let mut data = Vec::new();
    for i in 0..3 {
        let mut out = vec![0u8; 2000];
        let n = s.write(i, &mut out);
        assert_eq!(n, s.len(i));
        let seg = parse(&out[..n], 14, true).unwrap();
        assert!(tcp_checksum_ok(&out[..n]), "segment {i}: checksums");
        assert!(seg.mergeable, "segment {i} valid and plain");
        assert_eq!(seg.seq, 5000 + 1000 * i as u32);
        assert_eq!(seg.push, i == 2, "PSH only on the last");
        assert_eq!(
            u16::from_be_bytes([out[18], out[19]]),
            1 + i as u16,
            "IP ids count up"
        );
        data.extend_from_slice(&out[54..n]);
        match run.as_mut() {
            None => run = Some(Run::start(seg)),
            Some(r) => {
                assert!(r.accepts(&seg));
                r.add(&seg);
            }
        }
    }
    assert_eq!(data, payload);
    assert_eq!(run.unwrap().segments, 3);
}

#[test]
fn a_uso_packet_is_cut_into_udp_datagrams() {
    let mut p = seg4(0, &[9; 2500], ACK);
    // Make it UDP: protocol, an 8-byte header where TCP's was.
    p[14 + 9] = UDP;
    p.drain(14 + 20 + 8..14 + 20 + 20);
    let total = (p.len() - 14) as u16;
    p[16..18].copy_from_slice(&total.to_be_bytes());
    let h = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: 42,
        gso_size: 1200,
        csum_start: 34,
        csum_offset: 6,
    };
    let s = Segmenter::new(&p, 14, &h).unwrap();
    assert_eq!(s.count(), 3);
    for i in 0..3 {
        let mut out = vec![0u8; 2000];
        let n = s.write(i, &mut out);
        let udp_len = u16::from_be_bytes([out[38], out[39]]) as usize;
        assert_eq!(udp_len, n - 34);
        let flow = Flow {
            v6: false,
            udp: true,
            src: [10, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ports: [0; 4],
        };
        let sum = checksum::fold(
            pseudo_proto(&flow, UDP, udp_len) + u64::from(checksum::sum(&out[34..n])),
        );
        assert_eq!(sum, 0xffff, "UDP checksum of datagram {i}");
    }
}

#[test]
fn a_gso_header_that_does_not_match_the_packet_is_refused() {
    let p = seg4(0, &[1; 100], ACK);
    let mut h = VnetHdr {
        gso_type: GSO_TCPV6,
        gso_size: 50,
        ..Default::default()
    };
    assert_eq!(Segmenter::new(&p, 14, &h).err(), Some(BadGso));
    h.gso_type = GSO_TCPV4;
    h.gso_size = 0;
    assert_eq!(Segmenter::new(&p, 14, &h).err(), Some(BadGso));
    assert_eq!(Segmenter::new(&p[..40], 14, &h).err(), Some(BadGso));
    // A TCP data offset under 5 words (found by the fuzzer).
    let mut short = p.clone();
    short[14 + 20 + 12] = 2 << 4;
    h.gso_size = 50;
    assert!(Segmenter::new(&p, 14, &h).is_ok());
    assert_eq!(Segmenter::new(&short, 14, &h).err(), Some(BadGso));
}

/// A tap frame (etherparse) on VLAN `vid` from `src_mac`, carrying one
/// datagram of the flow 10.9.9.2:5000 -> 10.9.9.1:6000.
fn tagged(vid: u16, src_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(src_mac, [2, 0, 0, 0, 0, 1])
        .single_vlan(etherparse::VlanId::try_new(vid).unwrap())
        .ipv4([10, 9, 9, 2], [10, 9, 9, 1], 64)
        .udp(5000, 6000);
    let mut f = Vec::new();
    b.write(&mut f, payload).unwrap();
    f
}

#[test]
fn the_same_ip_flow_on_two_vlans_or_from_two_macs_is_two_flows() {
    let mac = [2, 0, 0, 0, 9, 2];
    let a = parse(&tagged(10, mac, &[1; 64]), 18, true).unwrap();
    let b = parse(&tagged(20, mac, &[2; 64]), 18, true).unwrap();
    let c = parse(&tagged(10, [2, 0, 0, 0, 9, 3], &[3; 64]), 18, true).unwrap();
    let d = parse(&tagged(10, mac, &[4; 64]), 18, true).unwrap();
    assert!(a.mergeable && b.mergeable && c.mergeable && d.mergeable);
    assert_eq!(a.flow, b.flow, "the same IP flow");
    let run = Run::start(a);
    assert!(!run.same_flow(&b), "VLAN 20 joined a VLAN 10 run");
    assert!(!run.accepts(&b));
    assert!(!run.same_flow(&c), "another source MAC joined the run");
    assert!(
        run.same_flow(&d) && run.accepts(&d),
        "the same VLAN and MACs"
    );
}

#[test]
fn garbage_never_panics() {
    let mut x: u32 = 1;
    for len in 0..200 {
        let mut p = vec![0u8; len];
        for b in p.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
        if len > 14 {
            p[14] = 0x45;
        }
        let _ = parse(&p, 14, true);
        let _ = parse(&p, 0, true);
        for gso_type in [GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4] {
            let h = VnetHdr {
                gso_type,
                gso_size: (x % 300) as u16,
                ..Default::default()
            };
            if let Ok(s) = Segmenter::new(&p, 14, &h) {
                let mut out = vec![0u8; 4096];
                for i in 0..s.count().min(8) {
                    s.write(i, &mut out);
                }
            }
        }
    }
}
