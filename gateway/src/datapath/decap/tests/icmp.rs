//! Unit tests of ICMP errors about tunnel packets: the path MTU learned.

use super::*;

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
    let ptb_of = |to: Ipv6Addr, mtu: u32| {
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
            .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu });
        let mut f = Vec::new();
        b.write(&mut f, &quoted).unwrap();
        f
    };
    let ptb = |to: Ipv6Addr| ptb_of(to, 1400);
    let mut f = ptb(local);
    assert_eq!(
        decap(&mut f, &table, &mut RxState::new(1)).unwrap().kind,
        Kind::PathMtu {
            mtu: 1400,
            locked: false
        }
    );
    let mut f = ptb(other);
    assert_eq!(
        decap(&mut f, &table, &mut RxState::new(1)),
        Err(DropReason::IcmpNotLocal)
    );
    // Under IPv6's minimum MTU: changes nothing, as in the kernel
    // (RFC 8021); 1280 itself is taken.
    let mut f = ptb_of(local, 1000);
    assert_eq!(
        decap(&mut f, &table, &mut RxState::new(1)),
        Err(DropReason::IcmpMalformed)
    );
    let mut f = ptb_of(local, 1280);
    assert_eq!(
        decap(&mut f, &table, &mut RxState::new(1)).unwrap().kind,
        Kind::PathMtu {
            mtu: 1280,
            locked: false
        }
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
    assert_eq!(
        d.kind,
        Kind::PathMtu {
            mtu: 1300,
            locked: false
        }
    );
    // Below the kernel's min_pmtu: taken as 552, and locked.
    let mut f = outer_v4(1, &icmp(300, LOCAL, REMOTE));
    assert_eq!(
        decap(&mut f, &lab(), &mut RxState::new(8)).unwrap().kind,
        Kind::PathMtu {
            mtu: 552,
            locked: true
        }
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
    // MTU 0 (a router older than RFC 1191): 552, locked.
    let mut f = outer_v4(1, &icmp(0, LOCAL, REMOTE));
    assert_eq!(
        decap(&mut f, &lab(), &mut RxState::new(8)).unwrap().kind,
        Kind::PathMtu {
            mtu: 552,
            locked: true
        }
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
