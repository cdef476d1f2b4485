//! The inbound fast path with real parts: the gateway binary, its XDP
//! program on a veth, AF_XDP sockets, io_uring writes into real tap and tun
//! devices. Packets are built with etherparse and sent from the peer end of
//! the veth; what reaches each device is captured there with AF_PACKET.

use std::time::{Duration, Instant};

use gateway_tests::stats::{assert_accounting, drops, total_drops, tunnel_rx, u64_at, worker_sum};
use gateway_tests::{pkt, require_root, wait_until, Gateway, NetNs, RawSocket, Wire};

const LOCAL: [u8; 4] = [192, 168, 0, 8];
const REMOTE: [u8; 4] = [192, 168, 0, 58];
const REMOTE2: [u8; 4] = [192, 168, 0, 59];
const OTHER: [u8; 4] = [192, 168, 0, 99];

/// Four tunnels: GRE and IPIP, each into a tap and into a tun.
const CONFIG: &str = r#"
[gateway]
poll = "adaptive"
xdp_mode = "native"

[[tunnel]]
name = "gre-tap"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tap1"
address = "10.1.1.1"
peer = "10.1.1.2"

[[tunnel]]
name = "gre-tun"
mode = "gre"
key = 300
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tun1"
device_kind = "tun"
address = "30.1.1.1"
peer = "30.1.1.2"
accept_from = ["fd00::/64"]

[[tunnel]]
name = "ipip-tun"
mode = "ipip"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tun2"
device_kind = "tun"
address = "20.1.1.1"
peer = "20.1.1.2"

[[tunnel]]
name = "ipip-tap"
mode = "ipip"
local = "192.168.0.8"
remote = "192.168.0.59"
mtu = 1400
device = "tap2"
address = "40.1.1.1"
peer = "40.1.1.2"
"#;

struct Lab {
    wire: Wire,
    gw: Gateway,
    gw_mac: [u8; 6],
    tx: RawSocket,
}

fn lab(tag: &str) -> Lab {
    let wire = Wire::new(tag, &["192.168.0.59/24"]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    let gw_mac = wire.gw.mac("ens0");
    let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    Lab {
        wire,
        gw,
        gw_mac,
        tx,
    }
}

/// Frames the kernel itself sends into a tap (ARP for the peer, which the
/// gateway answers) are not what these tests look at.
fn without_arp(frames: Vec<Vec<u8>>, is_tap: bool) -> Vec<Vec<u8>> {
    if !is_tap {
        return frames;
    }
    frames
        .into_iter()
        .filter(|f| f.len() < 14 || f[12..14] != [0x08, 0x06])
        .collect()
}

#[test]
fn gre_and_ipip_arrive_as_exact_inner_packets_on_tap_and_tun() {
    if !require_root("gre_and_ipip_arrive_as_exact_inner_packets_on_tap_and_tun") {
        return;
    }
    let l = lab("in1");
    let tap1_mac = l.wire.gw.mac("tap1");
    let tap2_mac = l.wire.gw.mac("tap2");
    let caps: Vec<(&str, RawSocket)> = ["tap1", "tun1", "tun2", "tap2"]
        .iter()
        .map(|d| (*d, RawSocket::open(&l.wire.gw, d, 1 << 22)))
        .collect();

    // (device, inner packet, frame to send)
    let mut cases: Vec<(&str, Vec<u8>, Vec<u8>)> = Vec::new();
    let icmp = pkt::icmp_echo([10, 1, 1, 2], [10, 1, 1, 1], 1, b"through gre into a tap");
    let udp = pkt::udp([10, 1, 1, 2], [10, 1, 1, 1], 4000, 5000, b"udp via gre/tap");
    for inner in [icmp, udp] {
        let f = pkt::outer(
            l.gw_mac,
            REMOTE,
            LOCAL,
            47,
            &pkt::gre(0, 0x0800, 0, 0, &inner),
        );
        cases.push(("tap1", inner, f));
    }
    let icmp = pkt::icmp_echo([30, 1, 1, 2], [30, 1, 1, 1], 2, b"keyed gre into a tun");
    let udp6 = pkt::udp6(
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        4000,
        5000,
        b"ipv6 inside gre",
    );
    for (inner, proto) in [(icmp, 0x0800u16), (udp6, 0x86dd)] {
        let f = pkt::outer(
            l.gw_mac,
            REMOTE,
            LOCAL,
            47,
            &pkt::gre(0x2000, proto, 300, 0, &inner),
        );
        cases.push(("tun1", inner, f));
    }
    let icmp = pkt::icmp_echo([20, 1, 1, 2], [20, 1, 1, 1], 3, b"ipip into a tun");
    let udp = pkt::udp(
        [20, 1, 1, 2],
        [20, 1, 1, 1],
        4000,
        5000,
        b"udp via ipip/tun",
    );
    for inner in [icmp, udp] {
        let f = pkt::outer(l.gw_mac, REMOTE, LOCAL, 4, &inner);
        cases.push(("tun2", inner, f));
    }
    let icmp = pkt::icmp_echo([40, 1, 1, 2], [40, 1, 1, 1], 4, b"ipip into a tap");
    let udp = pkt::udp(
        [40, 1, 1, 2],
        [40, 1, 1, 1],
        4000,
        5000,
        b"udp via ipip/tap",
    );
    for inner in [icmp, udp] {
        let f = pkt::outer(l.gw_mac, REMOTE2, LOCAL, 4, &inner);
        cases.push(("tap2", inner, f));
    }
    for (_, _, f) in &cases {
        l.tx.send(f);
    }

    for (dev, cap) in &caps {
        let expected: Vec<&Vec<u8>> = cases
            .iter()
            .filter(|(d, _, _)| d == dev)
            .map(|(_, inner, _)| inner)
            .collect();
        let got = without_arp(
            cap.receive(expected.len() + 8, Duration::from_millis(700)),
            dev.starts_with("tap"),
        );
        // Drop anything the kernel itself generates on a tap (none is
        // expected as incoming, but be precise about what we compare).
        let got: Vec<Vec<u8>> = if dev.starts_with("tap") {
            let mac = if *dev == "tap1" { tap1_mac } else { tap2_mac };
            got.into_iter()
                .map(|f| {
                    assert_eq!(&f[0..6], &mac, "{dev}: destination is the tap's own MAC");
                    let et = u16::from_be_bytes([f[12], f[13]]);
                    let v = f[14] >> 4;
                    assert!(
                        (et == 0x0800 && v == 4) || (et == 0x86dd && v == 6),
                        "{dev}: ethertype {et:#x} matches the inner version {v}"
                    );
                    f[14..].to_vec()
                })
                .collect()
        } else {
            got
        };
        assert_eq!(got.len(), expected.len(), "{dev}: number of packets");
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(&g[..], &e[..], "{dev}: the exact inner packet");
        }
    }

    let s = l.gw.settled_stats();
    assert_eq!(tunnel_rx(&s, "gre-tap"), 2);
    assert_eq!(tunnel_rx(&s, "gre-tun"), 2);
    assert_eq!(tunnel_rx(&s, "ipip-tun"), 2);
    assert_eq!(tunnel_rx(&s, "ipip-tap"), 2);
    assert_eq!(total_drops(&s), 0, "{s}");
    assert_eq!(u64_at(&s, &["xdp", "redirected"]), 8);
    assert_accounting(&s);
}

#[test]
fn unwanted_packets_arrive_nowhere_and_are_counted_by_reason() {
    if !require_root("unwanted_packets_arrive_nowhere_and_are_counted_by_reason") {
        return;
    }
    let l = lab("in2");
    let caps: Vec<RawSocket> = ["tap1", "tun1", "tun2", "tap2"]
        .iter()
        .map(|d| RawSocket::open(&l.wire.gw, d, 1 << 22))
        .collect();
    let inner = pkt::icmp_echo([10, 1, 1, 2], [10, 1, 1, 1], 1, b"must not arrive");
    let m = l.gw_mac;
    let mut truncated_inner = inner.clone();
    truncated_inner.truncate(24); // header claims more than is there
    let v6_in_ipip = pkt::udp6([0xfd; 16], [0xfe; 16], 1, 2, b"x");
    let mut bad_outer_sum = pkt::outer(m, REMOTE, LOCAL, 47, &pkt::gre(0, 0x0800, 0, 0, &inner));
    bad_outer_sum[14 + 10] ^= 0x55;
    // The configured tunnel's packet, tagged for VLAN 100: that VLAN's.
    let mut tagged = Vec::new();
    etherparse::PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x58], m)
        .single_vlan(etherparse::VlanId::try_new(100).unwrap())
        .ipv4(REMOTE, LOCAL, 64)
        .write(
            &mut tagged,
            etherparse::IpNumber(47),
            &pkt::gre(0, 0x0800, 0, 0, &inner),
        )
        .unwrap();

    let sends: Vec<(&str, Vec<u8>)> = vec![
        // Unconfigured remote: the XDP program passes it to the kernel.
        (
            "xdp:pass_no_endpoint",
            pkt::outer(m, OTHER, LOCAL, 47, &pkt::gre(0, 0x0800, 0, 0, &inner)),
        ),
        (
            "key_mismatch",
            pkt::outer(
                m,
                REMOTE,
                LOCAL,
                47,
                &pkt::gre(0x2000, 0x0800, 301, 0, &inner),
            ),
        ),
        // Key 5: neither the keyless tunnel nor key 300.
        (
            "key_mismatch",
            pkt::outer(
                m,
                REMOTE,
                LOCAL,
                47,
                &pkt::gre(0x2000, 0x0800, 5, 0, &inner),
            ),
        ),
        (
            "gre_version",
            pkt::outer(
                m,
                REMOTE,
                LOCAL,
                47,
                &pkt::gre(0x0001, 0x0800, 0, 0, &inner),
            ),
        ),
        (
            "gre_reserved_flags",
            pkt::outer(
                m,
                REMOTE,
                LOCAL,
                47,
                &pkt::gre(0x4000, 0x0800, 0, 0, &[&[0u8; 4][..], &inner[..]].concat()),
            ),
        ),
        (
            "gre_truncated",
            pkt::outer(m, REMOTE, LOCAL, 47, &[0x20, 0x00, 0x08, 0x00, 0x00, 0x00]),
        ),
        (
            "inner_malformed",
            pkt::outer(
                m,
                REMOTE,
                LOCAL,
                47,
                &pkt::gre(0, 0x0800, 0, 0, &truncated_inner),
            ),
        ),
        (
            "inner_malformed",
            pkt::outer(m, REMOTE, LOCAL, 4, &v6_in_ipip),
        ),
        (
            "gre_protocol_unsupported",
            pkt::outer(m, REMOTE, LOCAL, 47, &pkt::gre(0, 0x6558, 0, 0, &[0u8; 60])),
        ),
        (
            "gre_checksum_unexpected",
            pkt::outer(
                m,
                REMOTE,
                LOCAL,
                47,
                &pkt::gre(0x8000, 0x0800, 0, 0, &inner),
            ),
        ),
        ("outer_checksum", bad_outer_sum),
        ("xdp:pass_vlan", tagged),
        // A good packet, but unicast to another host's MAC.
        (
            "xdp:pass_other_host",
            pkt::outer(
                [0x02, 0, 0, 0, 0, 0x99],
                REMOTE,
                LOCAL,
                47,
                &pkt::gre(0, 0x0800, 0, 0, &inner),
            ),
        ),
    ];
    for (_, f) in &sends {
        l.tx.send(f);
    }
    for (i, cap) in caps.iter().enumerate() {
        let got = without_arp(
            cap.receive(10, Duration::from_millis(500)),
            i == 0 || i == 3,
        );
        assert!(got.is_empty(), "a refused packet reached a device: {got:?}");
    }
    let s = l.gw.settled_stats();
    for reason in [
        "key_mismatch",
        "gre_version",
        "gre_reserved_flags",
        "gre_truncated",
        "inner_malformed",
        "gre_protocol_unsupported",
        "gre_checksum_unexpected",
        "outer_checksum",
    ] {
        let want = sends.iter().filter(|(r, _)| *r == reason).count() as u64;
        assert_eq!(drops(&s, reason), want, "drops.{reason} in {s}");
    }
    assert_eq!(u64_at(&s, &["xdp", "pass_no_endpoint"]), 1, "{s}");
    assert_eq!(u64_at(&s, &["xdp", "pass_other_host"]), 1, "{s}");
    assert_eq!(u64_at(&s, &["xdp", "pass_vlan"]), 1, "{s}");
    assert_eq!(worker_sum(&s, "delivered"), 0);
    assert_eq!(worker_sum(&s, "rx_frames"), sends.len() as u64 - 3);
    assert_accounting(&s);

    // The kernel still gets everything that is not a tunnel's: ARP and
    // ping to the underlay address work while the gateway runs. (The peer
    // forgets the gateway's MAC first, which it may have learnt from the
    // gateway's own ARP before the XDP program was attached, so that it
    // must ask again.)
    l.wire.peer.ip(&["neigh", "flush", "dev", "ens0"]);
    let (ok, out) = l
        .wire
        .peer
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.0.8"]);
    assert!(ok, "ping to the underlay while the gateway runs: {out}");
    let s = l.gw.settled_stats();
    assert!(u64_at(&s, &["xdp", "pass_not_ip"]) >= 1, "ARP passed: {s}");
    assert!(
        u64_at(&s, &["xdp", "pass_other_proto"]) >= 3,
        "ICMP passed: {s}"
    );
}

#[test]
fn hundred_thousand_packets_are_all_accounted_for() {
    if !require_root("hundred_thousand_packets_are_all_accounted_for") {
        return;
    }
    let l = lab("in3");
    let cap = RawSocket::open(&l.wire.gw, "tap1", 256 << 20);
    // Datagrams seen on the device: the gateway writes runs of one flow's
    // datagrams as one UDP GSO packet, which a capture there sees whole
    // (14 + 20 + 8 bytes of headers, then the 64-byte payloads).
    let counter = std::thread::spawn(move || {
        without_arp(cap.receive(usize::MAX, Duration::from_secs(3)), true)
            .iter()
            .map(|f| f.len().saturating_sub(42) / 64)
            .sum::<usize>()
    });

    const TOTAL: usize = 100_000;
    const RATE: f64 = 20_000.0; // packets per second, steady
    let good = pkt::outer(
        l.gw_mac,
        REMOTE,
        LOCAL,
        47,
        &pkt::gre(
            0,
            0x0800,
            0,
            0,
            &pkt::udp([10, 1, 1, 2], [10, 1, 1, 1], 4000, 9, &[0x5a; 64]),
        ),
    );
    let bad = pkt::outer(
        l.gw_mac,
        REMOTE,
        LOCAL,
        47,
        &pkt::gre(
            0x2000,
            0x0800,
            77,
            0,
            &pkt::udp([10, 1, 1, 2], [10, 1, 1, 1], 4000, 9, &[0xa5; 64]),
        ),
    );
    let start = Instant::now();
    let mut sent_bad = 0u64;
    for i in 0..TOTAL {
        if i % 10 == 9 {
            l.tx.send(&bad);
            sent_bad += 1;
        } else {
            l.tx.send(&good);
        }
        if i % 100 == 99 {
            let due = Duration::from_secs_f64((i + 1) as f64 / RATE);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let sent_good = TOTAL as u64 - sent_bad;
    let captured = counter.join().unwrap() as u64;
    let s = l.gw.settled_stats();
    eprintln!("sent {TOTAL} in {:?}; stats {s}", start.elapsed());

    // Every packet sent was steered to the socket. The socket's kernel
    // side drops what finds no room (ring full, no fill buffer) when the
    // worker falls behind the sender, which a paced rate cannot rule out
    // on a slower machine; those are counted there, and everything else
    // reached the worker, which delivered or counted all of it.
    assert_eq!(u64_at(&s, &["xdp", "redirected"]), TOTAL as u64, "{s}");
    let mut lost_in_kernel = 0;
    for w in s["workers"].as_array().unwrap() {
        lost_in_kernel += u64_at(w, &["xsk", "rx_dropped"]) + u64_at(w, &["xsk", "rx_ring_full"]);
    }
    let rx = worker_sum(&s, "rx_frames");
    let delivered = worker_sum(&s, "delivered");
    let refused = drops(&s, "key_mismatch");
    assert_eq!(
        rx + lost_in_kernel,
        TOTAL as u64,
        "sent = received + dropped by the socket for want of room: {s}"
    );
    assert_eq!(
        delivered + refused,
        rx,
        "received = delivered + refused for the key: {s}"
    );
    assert!(
        delivered <= sent_good && refused <= sent_bad,
        "more delivered or refused than sent: {s}"
    );
    if lost_in_kernel == 0 {
        assert_eq!(delivered, sent_good, "{s}");
        assert_eq!(refused, sent_bad, "{s}");
    } else {
        eprintln!("{lost_in_kernel} frames dropped by the socket for want of room");
    }
    assert_eq!(tunnel_rx(&s, "gre-tap"), delivered, "{s}");
    assert_eq!(captured, delivered, "datagrams seen on tap1: {s}");
    eprintln!(
        "{} of them coalesced into {} writes",
        worker_sum(&s, "coalesced") + worker_sum(&s, "coalesced_writes"),
        worker_sum(&s, "coalesced_writes")
    );
    assert_accounting(&s);
}

/// The gateway's own underlay MAC changes while it runs: tunnel packets to
/// the new MAC are taken, and one to the old MAC is another host's
/// (`pass_other_host`), as the kernel would have it.
#[test]
fn the_xdp_program_follows_the_underlays_new_mac() {
    if !require_root("the_xdp_program_follows_the_underlays_new_mac") {
        return;
    }
    let l = lab("in5");
    let inner = pkt::icmp_echo([10, 1, 1, 2], [10, 1, 1, 1], 1, b"mac change");
    let to = |mac: [u8; 6]| pkt::outer(mac, REMOTE, LOCAL, 47, &pkt::gre(0, 0x0800, 0, 0, &inner));
    let old = l.gw_mac;
    let new = [0x02, 0, 0, 0, 0x0b, 0x08];
    l.tx.send(&to(old));
    wait_until(
        "the first packet delivered",
        Duration::from_secs(20),
        || {
            let s = l.gw.stats();
            (worker_sum(&s, "delivered") == 1)
                .then_some(())
                .ok_or(s.to_string())
        },
    );
    l.wire
        .gw
        .ip(&["link", "set", "ens0", "address", "02:00:00:00:0b:08"]);
    l.wire.peer.ip(&["neigh", "flush", "dev", "ens0"]);
    // Until the gateway has seen the change, a packet to the old MAC is
    // still taken: send one now and then until one is not delivered. (The
    // kernel's own frames to the old MAC count as another host's too, so
    // that counter alone does not say the change was seen.)
    let mut sent_old = 0;
    wait_until(
        "a packet to the old MAC no longer delivered",
        Duration::from_secs(30),
        || {
            let before = l.gw.settled_stats();
            l.tx.send(&to(old));
            sent_old += 1;
            let after = l.gw.settled_stats_after(&before);
            let delivered = worker_sum(&after, "delivered") - worker_sum(&before, "delivered");
            (delivered == 0)
                .then_some(())
                .ok_or(format!("{delivered} delivered: {after}"))
        },
    );
    let d = |s: &serde_json::Value| {
        (
            worker_sum(s, "delivered"),
            u64_at(s, &["xdp", "pass_other_host"]),
        )
    };
    // The new MAC's frames alone: each delivered.
    let before = l.gw.settled_stats();
    for _ in 0..5 {
        l.tx.send(&to(new));
    }
    let after = l.gw.settled_stats_after(&before);
    let ((d0, _), (d1, _)) = (d(&before), d(&after));
    assert_eq!(
        d1 - d0,
        5,
        "to the new MAC, delivered ({sent_old} sent to the old one before): {after}"
    );
    // Then the old MAC's alone: none delivered, each another host's (the
    // kernel's own frames to the old MAC may add to that counter).
    let before = after;
    for _ in 0..5 {
        l.tx.send(&to(old));
    }
    let after = l.gw.settled_stats_after(&before);
    let ((d0, o0), (d1, o1)) = (d(&before), d(&after));
    assert_eq!(d1 - d0, 0, "to the old MAC, not delivered: {after}");
    assert!(o1 - o0 >= 5, "to the old MAC, another host's: {after}");
    assert_accounting(&after);
}

fn underlay_answers(peer: &NetNs) -> bool {
    peer.exec(&["ping", "-c", "1", "-W", "2", "192.168.0.8"]).0
}

#[test]
fn sigterm_and_sigkill_leave_no_xdp_program_behind() {
    if !require_root("sigterm_and_sigkill_leave_no_xdp_program_behind") {
        return;
    }
    let wire = Wire::new("in4", &["192.168.0.59/24"]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    assert!(wire.gw.has_xdp("ens0"), "XDP attached while running");
    let (status, last) = gw.stop_with(libc::SIGTERM);
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert_eq!(last.expect("final stats at exit")["event"], "final");
    assert!(!wire.gw.has_xdp("ens0"), "XDP detached after SIGTERM");
    assert!(
        !wire.gw.exec(&["ip", "link", "show", "tap1"]).0,
        "the tap the gateway created is gone"
    );
    assert!(
        underlay_answers(&wire.peer),
        "underlay answers ping after SIGTERM"
    );

    let gw = Gateway::start(&wire.gw, CONFIG);
    assert!(wire.gw.has_xdp("ens0"));
    gw.signal(libc::SIGKILL);
    let killed = Instant::now();
    // The kernel lets go of the program when the killed process's last
    // reference to its link is closed, which takes its own time.
    wait_until(
        "the XDP program to be detached after SIGKILL",
        Duration::from_secs(20),
        || {
            let shown = wire.gw.ip(&["link", "show", "ens0"]);
            if shown.contains("xdp") {
                Err(format!("still attached: {shown}"))
            } else {
                Ok(())
            }
        },
    );
    eprintln!("XDP gone {:?} after SIGKILL", killed.elapsed());
    drop(gw);
    assert!(
        underlay_answers(&wire.peer),
        "underlay answers ping after SIGKILL"
    );
}
