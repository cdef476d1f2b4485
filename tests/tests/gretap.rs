//! gretap between two gateways: each host bridges its gretap tap with a
//! veth into a namespace that knows nothing of tunnels. The two namespaces
//! share one Ethernet segment through the tunnel: ARP crosses, and so does
//! ping.

use std::time::Duration;

use gateway_tests::{require_root, sh, wait_until, Gateway, Lab, NetNs};

fn config(mode: &str, local: &str, remote: &str) -> String {
    format!(
        r#"
[gateway]
poll = "adaptive"

[[tunnel]]
name = "l2"
mode = "{mode}"
local = "{local}"
remote = "{remote}"
key = 7
mtu = 1400
device = "gtap"
"#
    )
}

/// A namespace with one veth, `eth0` at `addr`, whose other end is bridged
/// with the gretap tap in `host`.
fn client(tag: &str, host: &NetNs, addr: &str) -> NetNs {
    let c = NetNs::new(tag);
    sh(&[
        "ip", "link", "add", "eth0", "netns", &c.name, "type", "veth", "peer", "name", "cport",
        "netns", &host.name,
    ]);
    host.ip(&["link", "add", "br9", "type", "bridge"]);
    host.ip(&["link", "set", "gtap", "master", "br9"]);
    host.ip(&["link", "set", "cport", "master", "br9"]);
    for dev in ["br9", "cport"] {
        host.ip(&["link", "set", dev, "up"]);
    }
    c.ip(&["addr", "add", addr, "dev", "eth0"]);
    c.ip(&["link", "set", "eth0", "up"]);
    c
}

#[test]
fn two_bridged_taps_share_a_segment_through_gretap() {
    if !require_root("two_bridged_taps_share_a_segment_through_gretap") {
        return;
    }
    share_a_segment("gretap", "192.168.0.8", "192.168.0.58");
}

#[test]
fn two_bridged_taps_share_a_segment_through_ip6gretap() {
    if !require_root("two_bridged_taps_share_a_segment_through_ip6gretap") {
        return;
    }
    share_a_segment("ip6gretap", "2001:db8::8", "2001:db8::58");
}

fn share_a_segment(mode: &str, a: &str, b: &str) {
    let lab = Lab::new(&mode[..3]);
    if a.contains(':') {
        lab.host1.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            "ens0",
            "nodad",
        ]);
        lab.host2.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{b}/64"),
            "dev",
            "ens0",
            "nodad",
        ]);
    }
    let gw1 = Gateway::start(&lab.host1, &config(mode, a, b));
    let gw2 = Gateway::start(&lab.host2, &config(mode, b, a));
    let c1 = client("gc1", &lab.host1, "10.9.9.1/24");
    let c2 = client("gc2", &lab.host2, "10.9.9.2/24");

    // The first ping waits for both gateways' next hops and for ARP.
    wait_until("10.9.9.2 to answer", Duration::from_secs(10), || {
        c1.exec(&["ping", "-c", "1", "-W", "1", "10.9.9.2"]).0
    });
    let (ok, out) = c1.exec(&["ping", "-c", "5", "-i", "0.2", "-W", "2", "10.9.9.2"]);
    assert!(ok && out.contains(" 0% packet loss"), "{out}");
    // ARP went through: c1 knows c2's own MAC.
    let c2_mac = c2.ip(&["-br", "link", "show", "eth0"]);
    let c2_mac = c2_mac.split_whitespace().nth(2).unwrap().to_string();
    let neigh = c1.ip(&["neigh", "show", "10.9.9.2"]);
    assert!(neigh.contains(&c2_mac), "c1 has {neigh}, c2 is {c2_mac}");
    // And both gateways carried it, each frame counted.
    for gw in [&gw1, &gw2] {
        let s = gw.settled_stats();
        let t = &s["tunnels"][0];
        assert!(t["rx_packets"].as_u64().unwrap() >= 6, "{s}");
        assert!(t["tx_packets"].as_u64().unwrap() >= 6, "{s}");
        gateway_tests::stats::assert_accounting(&s);
    }
    drop(c1);
    drop(c2);
}

/// Frames of two VLANs carrying the same inner IP/UDP flow, back to back
/// in one burst: each datagram leaves the tap on the VLAN it came on. (The
/// gateway coalesces a flow's datagrams into one UDP GSO packet; keyed on
/// the IP flow alone, a VLAN 20 datagram merged into a VLAN 10 run left
/// with VLAN 10's tag: 6,400 of 100,000 bytes came out on VLAN 10 and
/// 148,500 on VLAN 20.)
#[test]
fn frames_of_two_vlans_never_cross_when_coalesced() {
    if !require_root("frames_of_two_vlans_never_cross_when_coalesced") {
        return;
    }
    const PAYLOAD: usize = 64;
    const PER_VLAN: u32 = 400;
    let wire = gateway_tests::Wire::new("gv", &[]);
    let gw = Gateway::start(&wire.gw, &config("gretap", "192.168.0.8", "192.168.0.58"));
    let gw_mac = wire.gw.mac("ens0");
    let tap_mac = wire.gw.mac("gtap");
    // What the kernel takes from the tap, with each frame's VLAN.
    let cap = gateway_tests::RawSocket::open(&wire.gw, "gtap", 16 << 20);
    // The same flow (10.9.9.2:5000 -> 10.9.9.1:6000) on both VLANs, each
    // datagram marked with its VLAN and number; built by etherparse.
    let frame = |vid: u16, seq: u32| {
        let mut payload = vec![0u8; PAYLOAD];
        payload[..2].copy_from_slice(&vid.to_be_bytes());
        payload[2..6].copy_from_slice(&seq.to_be_bytes());
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 9, 2], tap_mac)
            .single_vlan(etherparse::VlanId::try_new(vid).unwrap())
            .ipv4([10, 9, 9, 2], [10, 9, 9, 1], 64)
            .udp(5000, 6000);
        let mut inner = Vec::new();
        b.write(&mut inner, &payload).unwrap();
        gateway_tests::pkt::outer(
            gw_mac,
            [192, 168, 0, 58],
            [192, 168, 0, 8],
            47,
            &gateway_tests::pkt::gre(0x2000, 0x6558, 7, 0, &inner),
        )
    };
    let sock = gateway_tests::RawSocket::open(&wire.peer, "ens0", 1 << 20);
    let before = gw.stats();
    let mut burst = Vec::new();
    for seq in 0..PER_VLAN {
        burst.push(frame(10, seq));
        burst.push(frame(20, seq));
        if burst.len() == 32 {
            sock.send_batch(&burst);
            burst.clear();
        }
    }
    sock.send_batch(&burst);

    let s = gw.settled_stats_after(&before);
    gateway_tests::stats::assert_accounting(&s);
    assert_eq!(
        s["tunnels"][0]["rx_packets"].as_u64(),
        Some(u64::from(2 * PER_VLAN)),
        "{s}"
    );
    // Every datagram out on its own VLAN, once; a coalesced packet holds
    // several payloads back to back.
    let mut seen = [Vec::new(), Vec::new()];
    for (vid, f) in cap.receive_tagged(usize::MAX, Duration::from_millis(500)) {
        let Ok(p) = etherparse::SlicedPacket::from_ethernet(&f) else {
            continue;
        };
        let Some(etherparse::TransportSlice::Udp(u)) = p.transport else {
            continue;
        };
        for chunk in u.payload().chunks(PAYLOAD) {
            let sent_on = u16::from_be_bytes([chunk[0], chunk[1]]);
            let seq = u32::from_be_bytes([chunk[2], chunk[3], chunk[4], chunk[5]]);
            assert_eq!(
                vid,
                Some(sent_on),
                "datagram {seq} sent on VLAN {sent_on} came out on {vid:?}: {s}"
            );
            seen[usize::from(sent_on == 20)].push(seq);
        }
    }
    for (mut got, vid) in seen.into_iter().zip([10, 20]) {
        got.sort_unstable();
        assert_eq!(
            got,
            (0..PER_VLAN).collect::<Vec<_>>(),
            "VLAN {vid}: datagrams out of {PER_VLAN}: {s}"
        );
    }
    // Coalescing did happen (else this test would prove nothing): UDP GSO
    // needs Linux 6.2 or later, which every machine here has.
    let writes = gateway_tests::stats::worker_sum(&s, "coalesced_writes");
    assert!(
        writes > 0,
        "no datagram was coalesced (a kernel without UDP GSO?), so nothing was tested: {s}"
    );
    eprintln!(
        "{} datagrams coalesced in {writes} writes",
        gateway_tests::stats::worker_sum(&s, "coalesced")
    );
}
