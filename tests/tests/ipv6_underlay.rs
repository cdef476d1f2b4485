//! The lab over an IPv6 underlay: two gateways whose hosts reach each other
//! at 2001:db8::8 and 2001:db8::58, with an ip6gre tunnel (IPv4 inside,
//! into a tap), an ip6ip6 tunnel (IPv6 inside, into a tun) and an ipip6
//! tunnel (IPv4 inside, no encapsulation limit). All ping,
//! and the wire shows IPv6 outer headers with the encapsulation-limit
//! option the kernel's ip6 tunnels send by default.

use std::time::Duration;

use gateway_tests::{require_root, wait_until, Gateway, Lab, RawSocket, Scapy};

fn config(local: &str, remote: &str, me: u8, far: u8) -> String {
    format!(
        r#"
[gateway]
poll = "adaptive"

[[tunnel]]
name = "gre6"
mode = "ip6gre"
local = "{local}"
remote = "{remote}"
mtu = 1400
device = "t6gre"
address = "10.6.1.{me}"
peer = "10.6.1.{far}"

[[tunnel]]
name = "ip6ip6"
mode = "ip6ip6"
local = "{local}"
remote = "{remote}"
mtu = 1400
device = "t6ip6"
device_kind = "tun"
address = "fd00:66::{me}"
peer = "fd00:66::{far}"

[[tunnel]]
name = "ipip6"
mode = "ipip6"
local = "{local}"
remote = "{remote}"
encaplimit = "none"
mtu = 1400
device = "t4ip6"
device_kind = "tun"
address = "10.7.1.{me}"
peer = "10.7.1.{far}"
"#
    )
}

#[test]
fn ip6gre_and_ip6ip6_ping_over_an_ipv6_underlay() {
    if !require_root("ip6gre_and_ip6ip6_ping_over_an_ipv6_underlay") {
        return;
    }
    let lab = Lab::new("v6");
    for (host, addr) in [
        (&lab.host1, "2001:db8::8/64"),
        (&lab.host2, "2001:db8::58/64"),
    ] {
        host.ip(&["-6", "addr", "add", addr, "dev", "ens0", "nodad"]);
    }
    let on_wire = RawSocket::open(&lab.wire, "port1", 4 << 20);
    let gw1 = Gateway::start(&lab.host1, &config("2001:db8::8", "2001:db8::58", 1, 2));
    let gw2 = Gateway::start(&lab.host2, &config("2001:db8::58", "2001:db8::8", 2, 1));

    for (dst, what) in [
        ("10.6.1.2", "ip6gre"),
        ("fd00:66::2", "ip6ip6"),
        ("10.7.1.2", "ipip6"),
    ] {
        wait_until(what, Duration::from_secs(10), || {
            lab.host1.exec(&["ping", "-c", "1", "-W", "1", dst]).0
        });
        let (ok, out) = lab
            .host1
            .exec(&["ping", "-c", "5", "-i", "0.2", "-W", "2", dst]);
        assert!(ok && out.contains(" 0% packet loss"), "{what}: {out}");
    }
    // The other way too.
    for dst in ["10.6.1.1", "fd00:66::1", "10.7.1.1"] {
        let (ok, out) = lab
            .host2
            .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", dst]);
        assert!(ok, "{dst}: {out}");
    }

    // On the wire (host1's port of the bridge): IPv6 outer headers from
    // 2001:db8::8, a destination-options header with the encapsulation
    // limit 4, then GRE (47) or IPv6 (41).
    let frames = on_wire.receive(usize::MAX, Duration::from_millis(300));
    // ipip6 has encaplimit "none": IPv4 (4) straight after the header.
    let mut seen = [false; 3];
    for f in frames
        .iter()
        .filter(|f| f.len() > 62 && f[12..14] == [0x86, 0xdd])
    {
        let (next, src) = (f[20], &f[22..38]);
        if src
            != "2001:db8::8"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        {
            continue;
        }
        if next == 4 {
            seen[2] = true;
            continue;
        }
        if next != 60 {
            continue;
        }
        let opt = &f[54..62];
        assert_eq!(
            &opt[2..5],
            &[4, 1, 4],
            "encapsulation limit option: {opt:?}"
        );
        match opt[0] {
            47 => seen[0] = true,
            41 => seen[1] = true,
            _ => {}
        }
    }
    assert_eq!(
        seen, [true; 3],
        "ip6gre, ip6ip6 and ipip6 packets on the wire"
    );

    // A router on the IPv6 path says it carries 1300 bytes (ICMPv6 packet
    // too big, quoting what host1's gateway sent on ip6gre, as scapy builds
    // it). A 1400-byte DF ping into ip6gre then gets fragmentation needed
    // with what is left: 1300 less IPv6, the encapsulation limit and GRE.
    let mac1 = lab.host1.ip(&["-br", "link", "show", "ens0"]);
    let mac1 = mac1.split_whitespace().nth(2).unwrap().to_string();
    let mut scapy = Scapy::start(&lab.host2, &mac1);
    scapy.send(
        "Ether(dst=GW_MAC)/IPv6(src='2001:db8::58',dst='2001:db8::8')/ICMPv6PacketTooBig(mtu=1300)\
         /IPv6(src='2001:db8::8',dst='2001:db8::58',nh=60)/IPv6ExtHdrDestOpt(nh=47)/GRE()",
    );
    wait_until("the path MTU to be taken", Duration::from_secs(5), || {
        gateway_tests::stats::worker_sum(&gw1.stats(), "path_mtu_updates") == 1
    });
    let (_, out) = lab.host1.exec(&[
        "ping", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1372", "10.6.1.2",
    ]);
    assert!(
        out.contains("mtu = 1248") || out.contains("mtu=1248"),
        "{out}"
    );

    // IPv6 outer fragments, as a tunnel endpoint that fragments its own
    // packets sends them (scapy's fragment6), out of order: reassembled and
    // delivered whole.
    let before = gw1.settled_stats();
    scapy.send(
        "list(reversed([Ether(dst=GW_MAC)/f for f in fragment6(IPv6(src='2001:db8::58',dst='2001:db8::8')\
         /IPv6ExtHdrFragment()/GRE()/IP(src='10.6.1.2',dst='10.6.1.1')/UDP(dport=4400)/Raw(b'6'*1200), 600)]))",
    );
    let after = gw1.settled_stats_after(&before);
    let rx = |s: &serde_json::Value| s["tunnels"][0]["rx_packets"].as_u64().unwrap();
    let merged = |s: &serde_json::Value| gateway_tests::stats::worker_sum(s, "fragments_merged");
    assert_eq!(rx(&after) - rx(&before), 1, "{after}");
    assert_eq!(merged(&after) - merged(&before), 2, "{after}");

    for gw in [&gw1, &gw2] {
        let s = gw.settled_stats();
        gateway_tests::stats::assert_accounting(&s);
        for t in s["tunnels"].as_array().unwrap() {
            assert!(t["rx_packets"].as_u64().unwrap() >= 3, "{s}");
            assert!(t["tx_packets"].as_u64().unwrap() >= 3, "{s}");
        }
    }
}
