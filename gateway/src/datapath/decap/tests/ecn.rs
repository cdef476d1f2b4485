//! Unit tests of ECN on decapsulation (RFC 6040, as the kernel does it).

use super::*;

/// The ECN field of the IPv4 header at the start of `ip`, read by
/// etherparse.
fn ecn_v4(ip: &[u8]) -> u8 {
    etherparse::Ipv4Header::from_slice(ip)
        .unwrap()
        .0
        .ecn
        .value()
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
