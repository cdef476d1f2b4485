//! Unit tests of the replies into the device: ARP, neighbour advertisements,
//! ICMP errors and when they may be sent.

use super::*;

#[test]
fn arp_for_the_peer_is_answered_in_place() {
    let t = tunnel(Mode::Gre, DeviceKind::Tap);
    let off = t.read_offset();
    let mut buf = vec![0u8; 3840];
    let req = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0xaa, 0, 0, 0, 1, 0x08, 0x06, // eth
        0, 1, 8, 0, 6, 4, 0, 1, // request
        0x02, 0xaa, 0, 0, 0, 1, 10, 1, 1, 1, // sender
        0, 0, 0, 0, 0, 0, 10, 1, 1, 2, // target
    ];
    buf[off..off + req.len()].copy_from_slice(&req);
    let v = encap(&mut buf, req.len(), &t, Some(HOP), &mut cx(0));
    assert_eq!(
        v,
        Verdict::Reply {
            offset: off,
            len: 42,
            reason: None
        }
    );
    let r = &buf[off..off + 42];
    assert_eq!(&r[0..6], &TAP_MAC);
    assert_eq!(&r[6..12], &PEER_MAC);
    assert_eq!(&r[20..22], &[0, 2], "a reply");
    assert_eq!(&r[22..28], &PEER_MAC);
    assert_eq!(&r[28..32], &[10, 1, 1, 2]);
    assert_eq!(&r[32..38], &TAP_MAC);
    assert_eq!(&r[38..42], &[10, 1, 1, 1]);
    // A question about this end's own address is not ours to answer.
    let mut own = req;
    own[38..42].copy_from_slice(&[10, 1, 1, 1]);
    own[28..32].copy_from_slice(&[10, 1, 1, 9]);
    buf[off..off + own.len()].copy_from_slice(&own);
    assert_eq!(
        encap(&mut buf, own.len(), &t, Some(HOP), &mut cx(0)),
        Verdict::Drop(DropReason::TxChatter)
    );
}

#[test]
fn neighbour_solicitation_for_the_far_side_is_answered() {
    let mut t = tunnel(Mode::Gre, DeviceKind::Tap);
    t.address = Some("fd00::1".parse().unwrap());
    t.peer = Some("fd00::2".parse().unwrap());
    let target: [u8; 16] = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let asker: [u8; 16] = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let mut body = target.to_vec();
    body.extend_from_slice(&[1, 1, 0x02, 0xaa, 0, 0, 0, 1]); // source link-layer option
    let b = etherparse::PacketBuilder::ipv6(
        asker,
        [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2],
        255,
    )
    .icmpv6(etherparse::Icmpv6Type::Unknown {
        type_u8: 135,
        code_u8: 0,
        bytes5to8: [0; 4],
    });
    let mut ns = Vec::new();
    b.write(&mut ns, &body).unwrap();
    let (mut buf, n) = read_into(&t, &ns);
    let Verdict::Reply {
        offset,
        len,
        reason,
    } = encap(&mut buf, n, &t, Some(HOP), &mut cx(0))
    else {
        panic!("no advertisement")
    };
    assert_eq!(reason, None);
    let r = &buf[offset..offset + len];
    assert_eq!(&r[0..6], &TAP_MAC, "to the asker's MAC");
    assert_eq!(&r[6..12], &PEER_MAC);
    assert_eq!(&r[22..38], &target, "from the target");
    assert_eq!(&r[38..54], &asker, "to the asker");
    assert_eq!(r[21], 255, "hop limit 255");
    let icmp = &r[54..];
    assert_eq!(icmp[0], 136, "neighbour advertisement");
    assert_eq!(icmp[4] & 0x40, 0x40, "solicited");
    assert_eq!(&icmp[8..24], &target);
    assert_eq!(&icmp[24..26], &[2, 1], "target link-layer option");
    assert_eq!(&icmp[26..32], &PEER_MAC);
    // The ICMPv6 checksum over the pseudo-header, computed here.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&target);
    pseudo.extend_from_slice(&asker);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(icmp);
    assert!(ones_complement_ok(&pseudo), "ICMPv6 checksum");
    // Not for this end's own address.
    let mut own = ns.clone();
    let at = 40 + 8;
    own[at..at + 16].copy_from_slice(&asker);
    let (mut buf, n) = read_into(&t, &own);
    assert!(matches!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(0)),
        Verdict::Drop(_)
    ));
}

#[test]
fn too_big_with_df_gets_fragmentation_needed() {
    let t = tunnel(Mode::Gre, DeviceKind::Tap);
    let pkt = inner(1472, 64); // 1500 bytes with DF (etherparse's default)
    assert_eq!(pkt.len(), 1500);
    let (mut buf, n) = read_into(&t, &pkt);
    let Verdict::Reply {
        offset,
        len,
        reason,
    } = encap(&mut buf, n, &t, Some(HOP), &mut cx(0))
    else {
        panic!("no ICMP")
    };
    assert_eq!(reason, Some(DropReason::TxTooBigIcmpSent));
    let s = SlicedPacket::from_ethernet(&buf[offset..offset + len]).unwrap();
    let eth = s.link.unwrap().to_header().unwrap().ethernet2().unwrap();
    assert_eq!(eth.destination, TAP_MAC);
    let Some(NetSlice::Ipv4(ip)) = s.net else {
        panic!()
    };
    assert_eq!(ip.header().source(), [10, 1, 1, 2]);
    assert_eq!(ip.header().destination(), [10, 1, 1, 1]);
    assert!(len <= 14 + 576);
    let Some(TransportSlice::Icmpv4(icmp)) = s.transport else {
        panic!()
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }
        )
    );
    assert!(
        ones_complement_ok(&buf[offset + 34..offset + len]),
        "ICMP checksum"
    );
    // The quoted header is the original one.
    assert_eq!(&buf[offset + 42..offset + 62], &pkt[..20]);
    // Without DF it is dropped and counted, not fragmented.
    let mut no_df = pkt.clone();
    no_df[6] = 0;
    let mut h = etherparse::Ipv4Header::from_slice(&no_df).unwrap().0;
    h.header_checksum = h.calc_header_checksum();
    no_df[10..12].copy_from_slice(&h.header_checksum.to_be_bytes());
    let (mut buf, n) = read_into(&t, &no_df);
    assert_eq!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(0)),
        Verdict::Drop(DropReason::TxTooBig)
    );
}

#[test]
fn no_icmp_error_about_an_icmp_error_nor_beyond_the_budget() {
    let t = tunnel(Mode::Gre, DeviceKind::Tun);
    // An ICMP "destination unreachable" of 1500 bytes with DF, too big
    // for the tunnel: dropped, never answered.
    let b = etherparse::PacketBuilder::ipv4([10, 1, 1, 1], [10, 1, 1, 2], 64).icmpv4(
        Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
    );
    let mut err = Vec::new();
    b.write(&mut err, &[0x5a; 1472]).unwrap();
    let (mut buf, n) = read_into(&t, &err);
    assert_eq!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
        Verdict::Drop(DropReason::TxTooBigNoIcmp)
    );
    // An echo request of the same size is answered.
    let (mut buf, n) = read_into(&t, &inner(1472, 64));
    assert!(matches!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
        Verdict::Reply { .. }
    ));
    // ICMPv6 errors likewise (time exceeded, type 3).
    let b = etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).icmpv6(
        etherparse::Icmpv6Type::TimeExceeded(
            etherparse::icmpv6::TimeExceededCode::HopLimitExceeded,
        ),
    );
    let mut err6 = Vec::new();
    b.write(&mut err6, &[0x5a; 1400]).unwrap();
    let (mut buf, n) = read_into(&t, &err6);
    assert_eq!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
        Verdict::Drop(DropReason::TxTooBigNoIcmp)
    );
    // Nor an ICMPv6 error behind a destination-options header.
    let b = etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).icmpv6(
        etherparse::Icmpv6Type::TimeExceeded(
            etherparse::icmpv6::TimeExceededCode::HopLimitExceeded,
        ),
    );
    let mut plain = Vec::new();
    b.write(&mut plain, &[0x5a; 1400]).unwrap();
    let mut behind = plain[..40].to_vec();
    behind[6] = 60; // destination options, then ICMPv6
    behind[4..6].copy_from_slice(&((plain.len() - 40 + 8) as u16).to_be_bytes());
    behind.extend_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0]);
    behind.extend_from_slice(&plain[40..]);
    let (mut buf, n) = read_into(&t, &behind);
    assert_eq!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
        Verdict::Drop(DropReason::TxTooBigNoIcmp)
    );
    // A later IPv6 fragment (of anything) is answered, whatever its
    // payload's first byte: it has no ICMPv6 header to look at.
    for first_byte in [0x01, 0x80] {
        let mut frag = plain[..40].to_vec();
        frag[6] = 44; // a fragment header, offset 1448, then "ICMPv6"
        frag.extend_from_slice(&[58, 0, 0x05, 0xa8, 0, 0, 0, 7]);
        frag.push(first_byte);
        frag.extend_from_slice(&[0x5a; 1399]);
        let plen = (frag.len() - 40) as u16;
        frag[4..6].copy_from_slice(&plen.to_be_bytes());
        let (mut buf, n) = read_into(&t, &frag);
        assert!(
            matches!(
                encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
                Verdict::Reply { .. }
            ),
            "later fragment starting {first_byte:#x} not answered"
        );
    }
    // Nor an ICMP type the kernel does not know (over 18).
    let mut unknown = inner(1472, 64);
    unknown[20] = 42;
    let (mut buf, n) = read_into(&t, &unknown);
    assert_eq!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
        Verdict::Drop(DropReason::TxTooBigNoIcmp)
    );
    // A fragment after the first (offset 185 * 8) is never answered.
    let mut later = inner(1472, 64);
    let (mut h, _) = etherparse::Ipv4Header::from_slice(&later).unwrap();
    h.fragment_offset = etherparse::IpFragOffset::try_new(185).unwrap();
    h.header_checksum = h.calc_header_checksum();
    later[..20].copy_from_slice(&h.to_bytes());
    let (mut buf, n) = read_into(&t, &later);
    assert_eq!(
        encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
        Verdict::Drop(DropReason::TxTooBigNoIcmp)
    );
    // The budget: ICMP_PER_SECOND answers in one second, then none
    // until the next.
    let mut c = cx(1);
    c.now = 9;
    let answered = (0..ICMP_PER_SECOND + 10)
        .filter(|_| {
            let (mut buf, n) = read_into(&t, &inner(1472, 64));
            matches!(
                encap(&mut buf, n, &t, Some(HOP), &mut c),
                Verdict::Reply { .. }
            )
        })
        .count();
    assert_eq!(answered, ICMP_PER_SECOND as usize);
    c.now = 10;
    let (mut buf, n) = read_into(&t, &inner(1472, 64));
    assert!(matches!(
        encap(&mut buf, n, &t, Some(HOP), &mut c),
        Verdict::Reply { .. }
    ));
}
